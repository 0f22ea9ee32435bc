"""Issue 19: every decoder family, end to end on tiny random configs (tests/architectures.py).

Per family, one model pruned with Wanda 50% and one with SparseGPT 2:4 (module-scoped fixtures) are checked for
exact sparsity over every targeted matrix (Linears, Conv1D, expert slices), untouched embeddings / lm_head / other
weights, perplexity, export round trips and 2-step masked-ft and LoRA* runs. The engine's block outputs are checked
against the pruned block's own forward, block by block. Then MoE statistics, fallbacks and refusals on hand-built
cases.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from architectures import FAMILY_CONFIGS, FUSED_ON_DISK, MOE_FAMILIES, make_family_model
from helpers import load_weights, make_tiny_model, tiny_args, write_text
from helpers import random_calibration as _calib
from torch.nn import functional as F

from sparsetune import structure
from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern, matrix_mask, nm_violations
from sparsetune.prune import sparsegpt, wanda
from sparsetune.prune.activations import ActivationStore
from sparsetune.prune.api import plan_targets, prune_and_report, prune_model
from sparsetune.prune.config import PruneConfig
from sparsetune.prune.engine import EngineOptions, capture_block_inputs, prune_block, run_blocks

FAMILIES = list(FAMILY_CONFIGS)
WANDA = {"method": "wanda", "sparsity": 0.5}
SGPT_24 = {"method": "sparsegpt", "pattern": "2:4"}
REFERENCE = Path(__file__).parent / "data" / "llama_prune_reference.json"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def dense(family):
    return make_family_model(family)


def _pruned(dense, settings, tokenizer):
    model = copy.deepcopy(dense)
    report = prune_and_report(model, tokenizer, PruneConfig(model="x", **settings), _calib(), show_progress=False)
    return model, report


@pytest.fixture(scope="module")
def wanda_50(dense, tiny_tokenizer):
    return _pruned(dense, WANDA, tiny_tokenizer)


@pytest.fixture(scope="module")
def sgpt_24(dense, tiny_tokenizer):
    return _pruned(dense, SGPT_24, tiny_tokenizer)


def _target_params(model) -> set[str]:
    """State-dict keys holding prunable matrices (found independently of the engine: by module type)."""
    from transformers.pytorch_utils import Conv1D

    keys = set()
    for name, module in model.named_modules():
        if ".h." not in name and ".layers." not in name:
            continue
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            keys.add(f"{name}.weight")
        for param in ("gate_up_proj", "down_proj"):
            p = module._parameters.get(param)
            if p is not None and p.dim() == 3:
                keys.add(f"{name}.{param}")
    return keys


def _matrices(model) -> dict[str, torch.Tensor]:
    """Every prunable [out, in] matrix, built here by hand: Linear weights, Conv1D weights transposed, and each
    expert's slice of a fused expert parameter ([E, out, in] in these families)."""
    from transformers.pytorch_utils import Conv1D

    out = {}
    for name, module in model.named_modules():
        if ".h." not in name and ".layers." not in name:
            continue
        if isinstance(module, torch.nn.Linear):
            out[name] = module.weight.detach()
        elif isinstance(module, Conv1D):
            out[name] = module.weight.detach().t()
        for param in ("gate_up_proj", "down_proj"):
            p = module._parameters.get(param)
            if p is not None and p.dim() == 3:
                flip = getattr(module, "is_transposed", False)  # GPT-OSS stores [E, in, out]
                slices = [w.t() if flip else w for w in p.detach()]
                out.update({f"{name}.{param}[{e}]": w for e, w in enumerate(slices)})
    return out


# ----- the matrix -----------------------------------------------------------------------------------------------


def test_wanda_50_prunes_every_target_exactly(family, wanda_50):
    model, report = wanda_50
    matrices = _matrices(model)
    assert set(report["modules"]) == set(matrices)  # every Linear, Conv1D and expert slice, nothing else
    assert set(structure.prunable_targets(model)) == set(matrices)
    for name, w in matrices.items():
        assert int((w == 0).sum()) == w.numel() // 2, name  # per row (Wanda) or per matrix (a fallback)
    assert report["global_sparsity"] == 0.5
    if family in MOE_FAMILIES:
        assert any("experts" in n for n in matrices)
        assert report["moe"]["calibrate"] == "routed"
        assert report["architecture"]["target_kinds"]["expert"] > 0
    assert report["architecture"]["family"] == "tested"


def test_sparsegpt_24_prunes_every_target_to_the_pattern(family, sgpt_24):
    model, report = sgpt_24
    matrices = _matrices(model)
    assert set(report["modules"]) == set(matrices)
    for name, w in matrices.items():
        assert nm_violations(w, NMPattern(2, 4)) == 0, name
        assert int((w == 0).sum()) == w.numel() // 2, name
    assert report["global_sparsity"] == 0.5


def test_embeddings_lm_head_and_every_other_weight_are_untouched(dense, wanda_50, sgpt_24):
    targets = _target_params(dense)
    want = dense.state_dict()
    for model, _ in (wanda_50, sgpt_24):
        got = model.state_dict()
        assert sorted(got) == sorted(want)
        for key, tensor in want.items():
            if key not in targets:
                assert torch.equal(got[key], tensor), key
        assert torch.equal(model.get_input_embeddings().weight, dense.get_input_embeddings().weight)
        assert torch.equal(model.get_output_embeddings().weight, dense.get_output_embeddings().weight)


@pytest.mark.parametrize("settings", [WANDA, SGPT_24], ids=["wanda", "sparsegpt"])
def test_engine_block_outputs_equal_the_pruned_blocks_forward(family, dense, settings):
    model = copy.deepcopy(dense)
    cfg = PruneConfig(model="x", **settings)
    blocks, _ = plan_targets(model, cfg)
    ids = _calib().input_ids
    X, calls = capture_block_inputs(model, ids, 4, torch.device("cpu"), ActivationStore("memory", torch.device("cpu")))
    method = wanda if settings["method"] == "wanda" else sparsegpt
    opts = EngineOptions(method=method, target=cfg.nm or 0.5, method_options={}, dense_down_stats=cfg.dense_down_stats)
    for i, layer in enumerate(structure.decoder_layers(model)):
        X_in = X.clone()
        prune_block(layer, X, calls[i], blocks[i], opts)
        with torch.no_grad():
            out = layer(X_in, *calls[i].args, **calls[i].kwargs)
        expected = out[0] if isinstance(out, tuple) else out
        assert torch.allclose(X, expected, atol=1e-5, rtol=1e-5), i
    assert any(bool((t.weight() == 0).any()) for b in blocks for t in b.targets)


def test_perplexity_runs_and_equals_the_models_own_cross_entropy(wanda_50):
    from sparsetune.evaluate import ppl

    model, _ = wanda_50
    ids = torch.randint(4, 256, (4 * 32,), generator=torch.Generator().manual_seed(5))
    result = ppl.perplexity_on_ids(model, ids, seqlen=32, batch_size=2)
    with torch.no_grad():
        windows = ids.view(4, 32)
        logits = model(input_ids=windows).logits.float()
        nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert result["tokens_scored"] == 4 * 31
    assert result["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert math.isfinite(result["ppl"])


def _round_trip(model, fmt, tmp_path):
    from sparsetune.export.config import ExportConfig
    from sparsetune.export.loader import load_exported
    from sparsetune.export.writer import export_model

    out = tmp_path / fmt
    out.mkdir()
    report = export_model(model, None, out, ExportConfig(model="x", format=fmt))
    back = load_exported(out)
    want, got = model.state_dict(), back.state_dict()
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        assert torch.equal(got[key].view(torch.uint8), tensor.contiguous().view(torch.uint8)), key
    return report, json.loads((out / "sparsetune_config.json").read_text())


def _sparse_on_disk(model, tmp_path) -> set[str]:
    """Keys of the tensors `save_pretrained` writes (the family's checkpoint layout) that are half zeros."""

    model.save_pretrained(tmp_path / "plain")
    saved = load_weights(tmp_path / "plain")
    weights = {k: t for k, t in saved.items() if t.dim() >= 2 and not k.endswith("bias")}  # GPT-OSS: [E, out] biases
    return {k for k, t in weights.items() if int((t == 0).sum()) * 2 >= t.numel()}


def test_export_sparse_bitmask_round_trips_bit_for_bit(family, wanda_50, tmp_path):
    model, _ = wanda_50
    report, meta = _round_trip(model, "sparse-bitmask", tmp_path)
    stored = {m["key"] for m in meta["modules"].values()}
    assert _sparse_on_disk(model, tmp_path) == stored  # every pruned matrix is stored compressed, experts included
    if family in FUSED_ON_DISK:  # the checkpoint keeps experts fused: one stacked tensor per parameter
        assert meta["expert_layout"] == "stacked"
    elif family in MOE_FAMILIES:  # as the family's checkpoints store experts: one 2-D Linear weight per expert
        assert any(".experts.0." in key for key in stored) and meta["expert_layout"] is None


def test_export_sparse_24_bitmask_round_trips_bit_for_bit(family, sgpt_24, tmp_path):
    model, _ = sgpt_24
    if family == "gpt2":  # Conv1D stores [in, out]: its 2:4 groups do not run along stored rows
        with pytest.raises(SparsetuneError, match=r"conv1d weight stored \[in, out\]"):
            _round_trip(model, "sparse-24-bitmask", tmp_path)
        return
    _, meta = _round_trip(model, "sparse-24-bitmask", tmp_path)
    stored = {m["key"] for m in meta["modules"].values()}
    if family in FUSED_ON_DISK:  # [E, in, out]: 2:4 groups do not run along stored rows, so experts stay dense
        assert all("stored [in, out]" in meta["ignore"][k] for k in _sparse_on_disk(model, tmp_path) - stored)
        stored |= {k for k in meta["ignore"] if "experts" in k}
    assert _sparse_on_disk(model, tmp_path) == stored


def test_a_fused_3d_expert_parameter_is_stored_stacked_and_restored():
    """Where a checkpoint layout keeps fused experts whole, the [E, R, C] tensor is one [E * R, C] matrix whose
    `shape` holds the three dims; decompressing gives the exact tensor back."""
    from sparsetune.export.codecs import bitmask_decompress
    from sparsetune.export.loader import decompress_state
    from sparsetune.export.writer import encode_tensors, plan_modules

    model = make_family_model("mixtral")
    param = model.model.layers[0].mlp.experts.gate_up_proj
    with torch.no_grad():
        param.mul_(torch.rand(param.shape, generator=torch.Generator().manual_seed(0)) > 0.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}  # in-memory (fused) layout
    plan = plan_modules(model, state, "sparse-bitmask", [], 0.9, False)
    key = "model.layers.0.mlp.experts.gate_up_proj"
    assert plan.keys[key] == key
    tensors = encode_tensors(state, plan, "sparse-bitmask")
    assert tensors[f"{key}.shape"].tolist() == [4, 256, 64]
    flat = {p: tensors[f"{key}.{p}"] for p in ("compressed", "bitmask", "row_offsets")}
    stacked = bitmask_decompress({**flat, "shape": torch.tensor([4 * 256, 64])})
    assert torch.equal(stacked, param.detach().reshape(4 * 256, 64))  # the expert slices, stacked row-major
    back = decompress_state(tensors, "sparse-bitmask", {key: key})
    assert torch.equal(back[key], param.detach())


def _seft_on_wanda_50(wanda_50, tokenizer, tmp_path: Path, out_name: str, *options: str) -> tuple[Path, Path]:
    """The Wanda 50% model saved, then a tiny `sparsetune seft` run on it with `options`: (pruned dir, output)."""
    from typer.testing import CliRunner

    from sparsetune.cli.app import app
    from sparsetune.prune.api import save_pruned

    model, report = wanda_50
    pruned = tmp_path / "pruned"
    save_pruned(copy.deepcopy(model), tokenizer, PruneConfig(model="x", **WANDA), dict(report), pruned, False)
    out = tmp_path / out_name
    result = CliRunner().invoke(app, tiny_args(pruned, out, write_text(tmp_path / "t.txt"), *options))
    assert result.exit_code == 0, result.output
    return pruned, out


def test_masked_ft_two_steps_keep_the_sparsity(family, wanda_50, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = wanda_50
    pruned, out = _seft_on_wanda_50(wanda_50, tiny_tokenizer, tmp_path, "ft", "--method", "masked-ft", "--steps", "2")
    # Loaded back, not read from the files: save_pretrained unfuses some families' experts into per-expert keys.
    before, after = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (pruned, out))
    changed = 0
    for key in _target_params(model):
        assert torch.equal(after[key] == 0, before[key] == 0), key
        changed += int((after[key] != before[key]).sum())
    assert changed > 0  # it trained


def test_lora_reprune_two_steps_restores_the_sparsity(family, wanda_50, tiny_tokenizer, tmp_path):
    """LoRA* on every family: LoRA on the blocks' Linears / Conv1Ds, merged and re-pruned per row (so each matrix
    ends within one zero per row of its start); fused expert slices stay exactly as pruned."""
    from transformers import AutoModelForCausalLM

    options = ("--method", "lora-reprune", "--steps", "2", "--lr", "1e-2")
    pruned, out = _seft_on_wanda_50(wanda_50, tiny_tokenizer, tmp_path, "lora", *options)
    before = _matrices(AutoModelForCausalLM.from_pretrained(pruned))
    after = _matrices(AutoModelForCausalLM.from_pretrained(out))
    changed = 0
    for name, w in after.items():
        if name.endswith("]"):  # a fused expert slice: frozen
            assert torch.equal(w, before[name]), name
            continue
        zeros_before, zeros_after = int((before[name] == 0).sum()), int((w == 0).sum())
        assert abs(zeros_after - zeros_before) <= w.shape[0], name
        changed += int((w != before[name]).sum())
    assert changed > 0


# ----- Llama: today's results, and the derived order reproduces the fast path ----------------------------------


@pytest.mark.parametrize("key", json.loads(REFERENCE.read_text()) if REFERENCE.exists() else [])
def test_llama_results_are_those_of_the_engine_before_issue_19(key, tiny_tokenizer):
    """tests/data/llama_prune_reference.json was written by the pre-issue-19 code (commit 5ae6319) on this tiny
    Llama and calibration: per module the sha256 of the packed keep-mask, and sum |w| / sum w^2 of the weights."""
    import hashlib

    import numpy as np

    entry = json.loads(REFERENCE.read_text())[key]
    model = make_tiny_model("llama")
    cfg = PruneConfig(model="x", **entry["settings"])
    prune_model(model, tiny_tokenizer, cfg, None if cfg.method == "magnitude" else _calib(), show_progress=False)
    for name, want in entry["modules"].items():
        w = model.get_submodule(name).weight.detach()
        mask = np.packbits((w != 0).numpy().reshape(-1))
        assert hashlib.sha256(mask.tobytes()).hexdigest() == want["mask_sha256"], name
        assert float(w.double().abs().sum()) == pytest.approx(want["abs_sum"], rel=1e-6), name
        assert float(w.double().pow(2).sum()) == pytest.approx(want["sq_sum"], rel=1e-6), name


@pytest.mark.parametrize("settings", [WANDA, SGPT_24, {**WANDA, "sequential": False}], ids=["wanda", "sgpt", "2pass"])
@pytest.mark.parametrize("fam", ["llama", "qwen3"])
def test_derived_order_on_llama_layout_gives_the_fast_paths_weights(fam, settings):
    results = []
    for derived_order in (False, True):
        model = make_tiny_model(fam)
        cfg = PruneConfig(model="x", **settings)
        blocks, head = plan_targets(model, cfg)
        assert all(b.fast for b in blocks)
        if derived_order:  # forget the Llama layout: the engine derives each block's stages from its forward pass
            for block in blocks:
                block.groups = None
        method = wanda if cfg.method == "wanda" else sparsegpt
        opts = EngineOptions(
            method=method,
            target=cfg.nm or 0.5,
            method_options={},
            sequential=cfg.sequential,
            dense_down_stats=cfg.dense_down_stats,
        )
        run_blocks(model, _calib().input_ids, blocks, head, opts)
        results.append({n: t.weight().clone() for b in blocks for n, t in b.modules()})
    fast, derived = results
    for name, w in fast.items():
        assert torch.equal(derived[name], w), name


# ----- Mixture-of-Experts statistics -----------------------------------------------------------------------------


def _experts_inputs(model, layer: int = 0):
    """What the dense model's experts module of `layer` receives for the calibration set: (hidden, index, weight)
    per mini-batch, captured with a plain forward pre-hook (no sparsetune code involved)."""
    experts = model.model.layers[layer].mlp.experts
    seen = []
    hook = experts.register_forward_pre_hook(lambda _m, args: seen.append(tuple(a.detach() for a in args[:3])))
    with torch.no_grad():
        for sl in (slice(0, 4), slice(4, 8)):
            model(input_ids=_calib().input_ids[sl], use_cache=False)
    hook.remove()
    return [torch.cat([s[i] for s in seen]) for i in range(3)]


@pytest.mark.parametrize("mode", ["routed", "all"])
@pytest.mark.parametrize("fam", ["mixtral", "gpt_oss"])  # gpt_oss: [E, in, out] experts with biases, own gating
def test_expert_statistics_come_from_routed_tokens_weighted_by_the_router(fam, mode, tiny_tokenizer):
    dense = make_family_model(fam)
    hidden, index, weights = _experts_inputs(dense)
    experts = dense.model.layers[0].mlp.experts
    model = copy.deepcopy(dense)
    cfg = PruneConfig(model="x", targets=[r"layers\.0\.mlp\.experts"], sparsity=0.5, moe_calibrate=mode)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)  # attention stays dense
    got = model.model.layers[0].mlp.experts
    counts = []
    for e in range(experts.num_experts):
        if mode == "all":
            x, w = hidden, torch.ones(hidden.shape[0])
        else:
            rows, k = torch.where(index == e)
            x, w = hidden[rows], weights[rows, k]
        counts.append(x.shape[0])
        xw = x * w[:, None]
        flip = getattr(experts, "is_transposed", False)
        gate_up = experts.gate_up_proj.detach()[e]
        with torch.no_grad():
            h = x @ gate_up if flip else x @ gate_up.t()
            if fam == "gpt_oss":
                h = experts._apply_gate(h + experts.gate_up_proj_bias.detach()[e])  # interleaved, clamped GLU
            else:
                gate, up = h.chunk(2, dim=-1)
                h = F.silu(gate) * up
        z = h * w[:, None]  # down reads the dense gate/up output (Wanda's dense_down_stats)
        for param, inputs in (("gate_up_proj", xw), ("down_proj", z)):
            dense_w = getattr(experts, param).detach()[e]
            dense_w = dense_w.t() if flip else dense_w  # as [out, in]
            want = wanda.prune_group([dense_w], inputs.pow(2).sum(dim=0), 0.5)[0]
            got_w = getattr(got, param).detach()[e]
            assert torch.equal(got_w.t() if flip else got_w, want), (param, e)
    tokens = report["moe"]["tokens_per_expert"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert tokens == counts
    assert sum(tokens) == (8 * 32 * (2 if mode == "routed" else 4))  # top-2 routing; "all": 4 experts each
    assert report["moe"]["calibrate"] == mode and report["moe"]["magnitude_fallback"] == []


def _starve_expert(model, expert: int = 3):
    """Reroute every token away from one expert (index `expert` -> 0) in every MoE layer's router."""
    for layer in model.model.layers:
        router = layer.mlp.gate
        original = router.forward

        def forward(hidden, _orig=original):
            logits, weights, index = _orig(hidden)
            return logits, weights, torch.where(index == expert, torch.zeros_like(index), index)

        router.forward = forward


def test_an_expert_no_token_reaches_falls_back_to_magnitude_with_a_warning(tiny_tokenizer, caplog):
    model = make_family_model("mixtral")
    _starve_expert(model)
    dense_slice = model.model.layers[0].mlp.experts.gate_up_proj.detach()[3].clone()
    report = prune_and_report(model, tiny_tokenizer, PruneConfig(model="x", **WANDA), _calib(), show_progress=False)
    starved = [f"model.layers.{i}.mlp.experts.{p}[3]" for i in range(2) for p in ("gate_up_proj", "down_proj")]
    assert report["moe"]["magnitude_fallback"] == sorted(starved)
    assert report["moe"]["tokens_per_expert"]["model.layers.0.mlp.experts.gate_up_proj"][3] == 0
    for name in starved:
        assert report["modules"][name]["fallback"] == "magnitude"
        assert any(name in r.getMessage() and "no calibration token" in r.getMessage() for r in caplog.records)
    got = model.model.layers[0].mlp.experts.gate_up_proj.detach()[3]
    assert torch.equal(got != 0, matrix_mask(dense_slice.abs(), 0.5))
    # --moe-calibrate all feeds that expert every token: no fallback
    again = make_family_model("mixtral")
    _starve_expert(again)
    cfg = PruneConfig(model="x", moe_calibrate="all", **WANDA)
    report = prune_and_report(again, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert report["moe"]["magnitude_fallback"] == []
    assert report["moe"]["tokens_per_expert"]["model.layers.0.mlp.experts.gate_up_proj"] == [8 * 32] * 4


def test_targets_and_ignore_see_expert_slices(tiny_tokenizer):
    model = make_family_model("qwen3_moe")
    cfg = PruneConfig(model="x", targets=[r"experts\.down_proj\[[02]\]"], ignore=[r"layers\.1\."], **WANDA)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert set(report["modules"]) == {f"model.layers.0.mlp.experts.down_proj[{e}]" for e in (0, 2)}
    down = model.model.layers[0].mlp.experts.down_proj.detach()
    assert [int((down[e] == 0).sum()) for e in range(4)] == [down[0].numel() // 2, 0, down[0].numel() // 2, 0]
    assert not bool((model.model.layers[1].mlp.experts.down_proj == 0).any())


# ----- magnitude through the engine, unknown families, refusals ----------------------------------------------------


@pytest.mark.parametrize("fam", ["gpt2", "mixtral"])
def test_magnitude_runs_no_forward_pass_and_thresholds_each_matrix(fam, tiny_tokenizer):
    model = make_family_model(fam)
    dense = {n: w.clone() for n, w in _matrices(model).items()}

    def no_forward(*_):
        raise AssertionError("magnitude needs no forward pass")

    model.get_input_embeddings().register_forward_pre_hook(no_forward)
    report = prune_and_report(
        model, None, PruneConfig(model="x", method="magnitude", sparsity=0.5), show_progress=False
    )
    assert report["calibration"] is None
    for name, w in _matrices(model).items():
        assert torch.equal(w != 0, matrix_mask(dense[name].abs(), 0.5)), name
        assert torch.equal(w[w != 0], dense[name][w != 0]), name


def test_an_unknown_family_is_tried_generically_and_reported_so(tiny_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("falcon", hidden_size=64, num_attention_heads=4, num_hidden_layers=2, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    report = prune_and_report(model, tiny_tokenizer, PruneConfig(model="x", **WANDA), _calib(), show_progress=False)
    arch = report["architecture"]
    assert arch["model_type"] == "falcon" and arch["family"] == "untested: tried generically"
    assert arch["decoder_path"] == "transformer.h"
    # parallel attention: query_key_value and dense_h_to_4h read the same normed input, so they share a statistic
    assert arch["derived_stages"][0][0] == ["self_attention.query_key_value,mlp.dense_h_to_4h"]
    for name, w in _matrices(model).items():
        assert int((w == 0).sum()) == w.numel() // 2, name


class _Bilinearish(torch.nn.Module):
    """A projection the engine does not know: a bare 2-D weight applied with F.linear."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.kernel = torch.nn.Parameter(weight.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.kernel)


def test_a_weight_the_engine_does_not_know_is_refused_before_anything_is_pruned(tiny_tokenizer):
    model = make_tiny_model("llama")
    mlp = model.model.layers[1].mlp
    mlp.up_proj = _Bilinearish(mlp.up_proj.weight.detach())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    match = r"model type 'llama': model\.layers\.1\.mlp\.up_proj\.kernel \(_Bilinearish, shape \[128, 64\]\)"
    with pytest.raises(SparsetuneError, match=match):
        prune_model(model, tiny_tokenizer, PruneConfig(model="x", **WANDA), _calib(), show_progress=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing pruned
    # --ignore it: pruned around it, the unknown weight left dense
    cfg = PruneConfig(model="x", ignore=[r"up_proj\.kernel"], **WANDA)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert "model.layers.1.mlp.up_proj" not in report["modules"] and report["modules_pruned"] == 13
    assert torch.equal(mlp.up_proj.kernel, before["model.layers.1.mlp.up_proj.kernel"])


def test_cli_prunes_a_moe_dir_with_moe_calibrate_all_and_reports_it(tmp_path, tiny_tokenizer, text_file):
    from typer.testing import CliRunner

    from sparsetune.cli.app import app

    src = tmp_path / "mixtral"
    make_family_model("mixtral").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    calib = ["--calib", str(text_file), "--calib-samples", "4", "--seqlen", "32"]
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["prune", str(src), *calib, "--moe-calibrate", "all", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["settings"]["moe_calibrate"] == "all" and report["moe"]["calibrate"] == "all"
    assert report["moe"]["tokens_per_expert"]["model.layers.1.mlp.experts.down_proj"] == [4 * 32] * 4
    saved = load_weights(out)  # Mixtral's checkpoint layout: w1 / w3 / w2 per expert
    for w in ("w1", "w2", "w3"):
        weight = saved[f"model.layers.0.block_sparse_moe.experts.2.{w}.weight"]
        assert int((weight == 0).sum()) == weight.numel() // 2
    bad = CliRunner().invoke(app, ["prune", str(src), *calib, "--moe-calibrate", "some", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "moe_calibrate" in bad.output and not (tmp_path / "x").exists()


@pytest.mark.parametrize("fam", ["gpt2", "mixtral"])
def test_an_interrupted_generic_run_resumes_to_the_same_weights(fam, tiny_tokenizer, tmp_path, monkeypatch):
    from sparsetune.prune.checkpoint import Checkpointer

    settings = {"method": "sparsegpt", "pattern": "2:4"}
    straight = make_family_model(fam)
    prune_model(straight, tiny_tokenizer, PruneConfig(model="x", **settings), _calib(), show_progress=False)

    class Stop(Exception):
        pass

    save = Checkpointer.save

    def save_then_stop(self, block, *args, **kwargs):
        save(self, block, *args, **kwargs)
        if block == 0:
            raise Stop

    cfg = PruneConfig(model="x", checkpoint_dir=str(tmp_path / "ck"), **settings)
    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        prune_model(make_family_model(fam), tiny_tokenizer, cfg, _calib(), show_progress=False)
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = make_family_model(fam)
    cfg = PruneConfig(model="x", checkpoint_dir=str(tmp_path / "ck"), resume=True, **settings)
    report = prune_and_report(resumed, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert report["resumed_from_block"] == 1
    want = straight.state_dict()
    for key, tensor in resumed.state_dict().items():
        assert torch.equal(tensor, want[key]), key


@pytest.mark.parametrize("fam", ["gpt2", "mixtral", "gpt_oss"])
def test_prunable_targets_give_writable_out_in_views_of_the_stored_weights(fam):
    model = make_family_model(fam)
    targets = structure.prunable_targets(model)
    assert set(targets) == set(_matrices(model))
    for name, view in _matrices(model).items():
        got = targets[name]()
        assert got.shape == view.shape and torch.equal(got, view), name
    name = next(n for n in targets if "[1]" in n) if fam != "gpt2" else "transformer.h.0.mlp.c_fc"
    targets[name]()[0, 2] = 0.0  # [out, in] index: output row 0, input column 2
    assert _matrices(model)[name][0, 2] == 0.0
    assert int((_matrices(model)[name] == 0).sum()) == 1
