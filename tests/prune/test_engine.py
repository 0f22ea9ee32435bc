"""The engine's own invariants: block outputs, sequential vs two-pass, targets, tied embeddings."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import make_tiny_model
from helpers import random_calibration as _calib

from sparsetune.errors import SparsetuneError
from sparsetune.prune import wanda
from sparsetune.prune.activations import ActivationStore
from sparsetune.prune.api import PruneResult, build_report, plan_targets, prune_and_report, prune_model
from sparsetune.prune.config import PruneConfig
from sparsetune.prune.engine import EngineOptions, capture_block_inputs, prune_block_sequential


def _hidden_states(model, ids):
    with torch.no_grad():
        return model.model(input_ids=ids, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("dense_down_stats", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_capture_matches_model_embeddings_and_block_output_matches_pruned_forward(family, dense_down_stats):
    model = make_tiny_model(family)
    ids = _calib(n=6, t=16).input_ids
    X, kwargs = capture_block_inputs(model, ids, 4, torch.device("cpu"), ActivationStore("memory", torch.device("cpu")))
    hidden = _hidden_states(model, ids)
    assert torch.allclose(X, hidden[0], atol=1e-6)
    cfg = PruneConfig(model="x", method="wanda", sparsity=0.5)
    blocks, _ = plan_targets(model, cfg)
    opts = EngineOptions(method=wanda, target=0.5, method_options={}, batch_size=4, dense_down_stats=dense_down_stats)
    layer = model.model.layers[0]
    X_in = X.clone()
    prune_block_sequential(layer, X, kwargs[0], blocks[0], opts)
    with torch.no_grad():
        expected = layer(X_in, **kwargs[0].kwargs)
    assert torch.allclose(X, expected, atol=1e-5)  # the engine's one pass equals the pruned block's forward


def test_dense_down_stats_score_down_proj_on_the_unpruned_gate_and_up():
    model = make_tiny_model("llama")
    ids = _calib(n=6, t=16).input_ids
    X, kwargs = capture_block_inputs(model, ids, 4, torch.device("cpu"), ActivationStore("memory", torch.device("cpu")))
    layer = model.model.layers[0]
    mlp = layer.mlp
    with torch.no_grad():  # attention is not targeted, so the MLP input is the dense block's
        h1 = X + layer.self_attn(hidden_states=layer.input_layernorm(X), **kwargs[0].kwargs)[0]
        hn = layer.post_attention_layernorm(h1)
        z_dense = mlp.act_fn(mlp.gate_proj(hn)) * mlp.up_proj(hn)
    down_dense = mlp.down_proj.weight.detach().clone()
    pruned_down = {}
    for dense_down_stats in (True, False):
        copy_ = copy.deepcopy(model)
        blocks, _ = plan_targets(copy_, PruneConfig(model="x", targets=["mlp"]))
        opts = EngineOptions(
            method=wanda, target=0.5, method_options={}, batch_size=4, dense_down_stats=dense_down_stats
        )
        prune_block_sequential(copy_.model.layers[0], X.clone(), kwargs[0], blocks[0], opts)
        pruned_down[dense_down_stats] = copy_.model.layers[0].mlp.down_proj.weight.detach()
    stats = wanda.init_stats(z_dense.shape[-1], torch.device("cpu"))
    wanda.accumulate(stats, z_dense)
    expected = wanda.prune_group([down_dense], stats, 0.5)[0]
    assert torch.equal(pruned_down[True], expected)
    # the strict true-sequential statistic (pruned gate/up) picks a different down_proj mask
    assert not torch.equal(pruned_down[False] == 0, expected == 0)


def test_down_stats_default_is_dense_for_wanda_and_pruned_for_sparsegpt():
    assert PruneConfig(model="x", method="wanda").dense_down_stats
    assert not PruneConfig(model="x", method="sparsegpt").dense_down_stats
    assert not PruneConfig(model="x", down_stats="pruned").dense_down_stats
    assert PruneConfig(model="x", method="sparsegpt", down_stats="dense").dense_down_stats


@pytest.mark.parametrize(
    ("settings", "recorded"),
    [({"method": "magnitude"}, None), ({"method": "sparsegpt"}, "pruned"), ({"sequential": False}, "dense")],
)
def test_report_records_where_down_stats_came_from(settings, recorded, tiny_tokenizer):
    cfg = PruneConfig(model="x", **settings)
    calib = None if cfg.method == "magnitude" else _calib()
    report = prune_and_report(make_tiny_model("llama"), tiny_tokenizer, cfg, calib, show_progress=False)
    assert report["down_stats"] == recorded


def test_zero_sparsity_leaves_model_and_outputs_unchanged(tiny_tokenizer):
    model = make_tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prune_model(model, tiny_tokenizer, PruneConfig(model="x", sparsity=0.0), _calib(), show_progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_sequential_and_two_pass_differ_after_first_sublayer(tiny_tokenizer):
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    prune_model(a, tiny_tokenizer, PruneConfig(model="x", sequential=True), _calib(), show_progress=False)
    prune_model(b, tiny_tokenizer, PruneConfig(model="x", sequential=False), _calib(), show_progress=False)
    # q/k/v of block 0 see the same (dense) input in both modes; o_proj sees pruned attention only in sequential.
    la, lb = a.model.layers[0].self_attn, b.model.layers[0].self_attn
    assert torch.equal(la.q_proj.weight, lb.q_proj.weight)
    assert not torch.equal(la.o_proj.weight, lb.o_proj.weight)


def test_targets_and_ignore_regexes(tiny_tokenizer):
    model = make_tiny_model("llama")
    cfg = PruneConfig(model="x", targets=["mlp"], ignore=[r"layers\.1\."], sparsity=0.5)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert set(report["modules"]) == {f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert float((model.model.layers[1].mlp.up_proj.weight == 0).float().mean()) == 0.0
    assert float((model.model.layers[0].self_attn.q_proj.weight == 0).float().mean()) == 0.0


def test_targets_matching_nothing_is_an_error():
    with pytest.raises(SparsetuneError, match="matched no Linear"):
        plan_targets(make_tiny_model("llama"), PruneConfig(model="x", targets=["nonexistent"]))


def test_pattern_not_dividing_in_features_names_the_module():
    with pytest.raises(SparsetuneError, match=r"model\.layers\.0\.self_attn\.q_proj.*not divisible by M=3"):
        plan_targets(make_tiny_model("llama"), PruneConfig(model="x", pattern="2:3"))


def test_tied_lm_head_is_never_pruned_without_untie(tiny_tokenizer):
    model = make_tiny_model("llama", tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embed = model.model.embed_tokens.weight.clone()
    prune_model(model, tiny_tokenizer, PruneConfig(model="x", sparsity=0.5), _calib(), show_progress=False)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    with pytest.raises(SparsetuneError, match="--untie-embeddings"):
        plan_targets(model, PruneConfig(model="x", targets=["lm_head"]))


def test_untie_embeddings_prunes_a_copy_of_lm_head(tiny_tokenizer):
    model = make_tiny_model("llama", tie=True)
    embed = model.model.embed_tokens.weight.clone()
    cfg = PruneConfig(model="x", targets=["lm_head"], untie_embeddings=True, sparsity=0.5)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert list(report["modules"]) == ["lm_head"]
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embed)
    zeros_per_row = (model.lm_head.weight == 0).sum(dim=1)
    pad = model.config.pad_token_id  # its embedding row is all zeros from init
    assert torch.all(zeros_per_row[torch.arange(256) != pad] == 32)
    assert model.config.tie_word_embeddings is False


def test_a_model_whose_blocks_cannot_be_found_is_refused_naming_its_type():
    from transformers import LlamaConfig, PreTrainedModel

    class Flat(PreTrainedModel):  # a "causal LM" with no block list anywhere
        config_class = LlamaConfig

        def __init__(self, config):
            super().__init__(config)
            self.body = torch.nn.Sequential(torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16))

    config = LlamaConfig(num_hidden_layers=2, hidden_size=8, intermediate_size=8, num_attention_heads=2)
    config.model_type = "mystery"
    with pytest.raises(SparsetuneError, match=r"decoder blocks of model type 'mystery' \(Flat\).*no ModuleList"):
        plan_targets(Flat(config), PruneConfig(model="x"))


def test_prune_model_returns_what_it_produced_and_the_report_is_built_from_that(tiny_tokenizer):
    """`prune_model` prunes and returns a `PruneResult`; `build_report` only reads it (and the model), and
    `prune_and_report` is the two in a row."""
    model, twin = make_tiny_model("llama"), make_tiny_model("llama")
    calib = _calib()
    cfg = PruneConfig(model="x", method="wanda", sparsity=0.5)
    result = prune_model(model, tiny_tokenizer, cfg, calib, show_progress=False)
    assert isinstance(result, PruneResult) and result.cfg.method == "wanda" and result.calib is calib
    assert result.sparsity_before == 0.0 and result.head is None and (result.processes, result.rank) == (1, 0)
    weights = {n: t.weight() for b in result.blocks for n, t in b.modules()}
    assert len(weights) == 2 * 7  # two blocks of q, k, v, o, gate, up, down
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == sum(w.numel() for w in weights.values()) // 2  # Wanda at 50%, row by row: exactly half
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    report = build_report(model, result)
    assert all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())  # reading only
    assert report["global_sparsity"] == report["summary"]["global_sparsity"] == 0.5
    assert report["weights_pruned"] == zeros and set(report["modules"]) == set(weights)
    assert report["calibration"] == calib.describe() and report["settings"]["calib_seqlen"] == cfg.calib_seqlen
    together = prune_and_report(twin, tiny_tokenizer, cfg, calib, show_progress=False)
    for key in ("timings", "memory", "summary", "prune_s"):  # measured, not computed
        together.pop(key), report.pop(key)
    assert together == report
    assert all(torch.equal(v, snapshot[k]) for k, v in twin.state_dict().items())
