"""Model structure: choosing the prunable matrices by --targets / --ignore (`select_targets`)."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model
from torch import nn

from sparsetune import structure
from sparsetune.errors import SparsetuneError


def _block_linears(model: nn.Module, i: int) -> list[str]:
    prefix = f"model.layers.{i}."
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(prefix)]


def test_default_targets_are_every_block_matrix_in_order():
    model = make_tiny_model("llama")
    blocks, head = structure.select_targets(model, [], [])
    assert [[t.name for t in block] for block in blocks] == [_block_linears(model, 0), _block_linears(model, 1)]
    assert len(blocks[0]) == 7 and head is None  # q, k, v, o, gate, up, down
    q = blocks[0][0]
    assert q.kind == "linear" and q.module is model.model.layers[0].self_attn.q_proj


def test_targets_and_ignore_are_regexes_searched_in_full_names():
    model = make_tiny_model("llama")
    blocks, head = structure.select_targets(model, ["mlp", "lm_head"], [r"layers\.1\.", "down"])
    assert [[t.name for t in block] for block in blocks] == [
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        [],
    ]
    assert head is not None and head.name == "lm_head" and head.module is model.lm_head


def test_a_tied_lm_head_needs_untie_embeddings():
    model = make_tiny_model("llama", tie=True)
    with pytest.raises(SparsetuneError, match="--untie-embeddings"):
        structure.select_targets(model, ["lm_head"], [])
    blocks, head = structure.select_targets(model, ["lm_head"], [], untie_embeddings=True)
    assert blocks == [[], []] and head is not None and head.module is model.lm_head


def test_a_choice_matching_nothing_is_refused():
    with pytest.raises(SparsetuneError, match=r"--targets nonexistent matched no Linear.*model type 'llama'"):
        structure.select_targets(make_tiny_model("llama"), ["nonexistent"], [])
    with pytest.raises(SparsetuneError, match=r"--targets \(default\) matched no Linear"):
        structure.select_targets(make_tiny_model("llama"), [], ["layers"])


def test_an_unknown_block_weight_is_refused_unless_ignored():
    model = make_tiny_model("llama")
    model.model.layers[1].mlp.register_parameter("scales", nn.Parameter(torch.ones(4, 4)))
    with pytest.raises(SparsetuneError, match=r"model\.layers\.1\.mlp\.scales \(LlamaMLP, shape \[4, 4\]\).*--ignore"):
        structure.select_targets(model, [], [])
    blocks, _ = structure.select_targets(model, [], ["scales"])
    assert [t.name for t in blocks[1]] == _block_linears(model, 1)
