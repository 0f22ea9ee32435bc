"""A .gguf file is converted once, tensor by tensor, into a sharded HF dir (issue 32): the same tensors and config
as transformers' own whole-model GGUF loading, then streamed like any HF dir."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights

from sparsetune import loading
from sparsetune.errors import SparsetuneError
from sparsetune.gguf_convert import convert_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gguf():
    try:
        return loading.bundled_gguf_path()
    except SparsetuneError as err:
        pytest.skip(str(err))


def test_the_bundled_gguf_converts_to_the_tensors_transformers_loads(gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "converted"
    out.mkdir()
    convert_gguf(gguf, out)
    whole = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    want = whole.state_dict()
    got = load_weights(out)
    tied = {"lm_head.weight"} if whole.config.tie_word_embeddings else set()
    assert set(got) == set(want) - tied
    assert all(torch.equal(got[k], want[k]) for k in got)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == whole.config.num_hidden_layers + 1
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == whole.config.num_hidden_layers
    assert (out / "tokenizer.json").is_file()


def test_a_broken_gguf_is_one_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SparsetuneError, match="could not read GGUF file .*broken.gguf"):
        convert_gguf(bad, out)
    assert list(out.iterdir()) == []
