"""ALPS (`--method alps`): exact counts and N:M patterns, reconstruction against a brute-force optimum over all
supports, the conjugate-gradient refinement, the all-zero-Hessian fallback, the engine (OWL, block lists), the CLI."""

from __future__ import annotations

import itertools
import json
import logging

import pytest
import torch
import yaml
from helpers import block_linears as _block_linears
from helpers import load_weights, make_tiny_model
from helpers import random_calibration as _calib
from torch import nn
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.masks import NMPattern, nm_violations, prune_count
from sparsetune.prune import alps, magnitude, sparsegpt
from sparsetune.prune.api import prune_and_report, prune_model
from sparsetune.prune.config import PruneConfig

INFO_KEYS = {"admm_iterations", "rho", "support_converged", "support_change", "cg_iterations", "recon_error"}


def _problem(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight (rows, cols) and the Hessian X^T X of 64 correlated inputs with uneven scales."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * torch.linspace(0.3, 2.0, cols)
    x = torch.randn(64, cols, generator=g) @ mix
    return torch.randn(rows, cols, generator=g), x.T @ x


def _dampened(H: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """The objective both SparseGPT and ALPS minimise: H + percdamp * mean(diag H) * I (fp64)."""
    return (H + percdamp * H.diag().mean() * torch.eye(H.shape[0])).double()


def _error(W: torch.Tensor, W0: torch.Tensor, H: torch.Tensor) -> float:
    delta = (W - W0).double()
    return float((delta @ H.double() * delta).sum())


def _best_kept(w0: torch.Tensor, H: torch.Tensor, subsets) -> float:
    """min over the given supports S of the row's error with its kept weights solved exactly:
    e(S) = w0 H w0^T - c_S^T H_SS^-1 c_S with c = H w0."""
    w0 = w0.double()
    c, base = H @ w0, float(w0 @ H @ w0)
    best = base
    for S in subsets:
        idx = list(S)
        if idx:
            best = min(best, base - float(c[idx] @ torch.linalg.solve(H[idx][:, idx], c[idx])))
    return best


def _optimum_unstructured(W0: torch.Tensor, H: torch.Tensor, n_prune: int) -> float:
    """Brute force over every support of the whole matrix: each row's best error with exactly a kept entries,
    then the best split of the kept count over the rows."""
    rows, cols = W0.shape
    per_row = [
        [_best_kept(W0[r], H, itertools.combinations(range(cols), a)) for a in range(cols + 1)] for r in range(rows)
    ]
    keep = rows * cols - n_prune
    splits = (a for a in itertools.product(range(cols + 1), repeat=rows) if sum(a) == keep)
    return min(sum(per_row[r][a] for r, a in enumerate(split)) for split in splits)


def _optimum_nm(W0: torch.Tensor, H: torch.Tensor, nm: NMPattern) -> float:
    cols = W0.shape[1]
    groups = [list(itertools.combinations(range(g, g + nm.m), nm.n)) for g in range(0, cols, nm.m)]
    supports = [sum(choice, ()) for choice in itertools.product(*groups)]
    return sum(_best_kept(W0[r], H, supports) for r in range(W0.shape[0]))


# ---- the kernel -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparsity", "expected"),
    # rows 6, 4, 2 of 16 inputs: 96, 64 and 32 weights; the count rounds down (prune_count), as every method
    [(0.3, [28, 19, 9]), (0.5, [48, 32, 16]), (0.7, [67, 44, 22]), (0.9, [86, 57, 28])],
)
def test_exact_count_per_matrix_in_a_stacked_group(sparsity, expected):
    W, H = _problem(12, 16, seed=1)
    weights = [W[:6] * 10, W[6:10], W[10:] * 0.01]  # very different scales: the count is still per matrix
    pruned, infos = alps.prune_group(weights, H, sparsity)
    assert [int((w == 0).sum()) for w in pruned] == expected
    assert [w.shape for w in pruned] == [w.shape for w in weights]
    for w in pruned:
        assert int(((w == 0) & torch.signbit(w)).sum()) == 0  # +0.0 only
    assert len(infos) == 3 and all(set(info) >= INFO_KEYS for info in infos)


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8)])
def test_exact_nm_pattern(pattern):
    W, H = _problem(12, 32, seed=2)
    pruned, _ = alps.prune_group([W[:8], W[8:]], H, pattern)
    for w, w0 in zip(pruned, [W[:8], W[8:]], strict=True):
        kept = (w != 0).reshape(w.shape[0], -1, pattern.m).sum(dim=2)
        assert torch.all(kept == pattern.n)  # exactly N of every M consecutive inputs, in every row
        assert nm_violations(w, pattern) == 0
        assert not torch.equal(w, w0.masked_fill(w == 0, 0.0))  # the kept weights were updated too


@pytest.mark.parametrize(
    ("rows", "cols", "target"),
    [(1, 10, 0.5), (2, 8, 0.5), (3, 8, 0.7), (2, 8, NMPattern(2, 4)), (3, 8, NMPattern(2, 4))],
)
def test_reconstruction_is_near_the_brute_force_optimum_and_beats_sparsegpt(rows, cols, target):
    W0, H = _problem(rows, cols, seed=0)
    Hd = _dampened(H)
    if isinstance(target, NMPattern):
        optimum = _optimum_nm(W0, Hd, target)
    else:
        optimum = _optimum_unstructured(W0, Hd, int(rows * cols * target))
    (w_alps,), _ = alps.prune_group([W0], H, target)
    (w_sgpt,) = sparsegpt.prune_group([W0], H, target)
    err_alps, err_sgpt = _error(w_alps, W0, Hd), _error(w_sgpt, W0, Hd)
    assert err_alps >= optimum * (1 - 1e-5)  # no feasible support does better than the optimum
    assert err_alps <= optimum * 1.01
    assert err_alps <= err_sgpt


def test_reconstruction_over_many_problems_beats_sparsegpt_on_average():
    """ALPS is a heuristic (on a few weights its support can settle early); over many problems it is closer to
    the optimum than SparseGPT."""
    ratio_alps, ratio_sgpt = [], []
    for seed in range(6):
        W0, H = _problem(2, 8, seed)
        Hd = _dampened(H)
        optimum = _optimum_unstructured(W0, Hd, 8)
        (w_alps,), _ = alps.prune_group([W0], H, 0.5)
        (w_sgpt,) = sparsegpt.prune_group([W0], H, 0.5)
        ratio_alps.append(_error(w_alps, W0, Hd) / optimum)
        ratio_sgpt.append(_error(w_sgpt, W0, Hd) / optimum)
    assert min(ratio_alps) >= 1 - 1e-5
    assert sum(ratio_alps) < sum(ratio_sgpt)
    assert sum(r < 1.001 for r in ratio_alps) >= 2  # the optimum itself in a third of them


def test_conjugate_gradient_solves_the_kept_weights_and_never_touches_pruned_ones():
    W0, H = _problem(3, 10, seed=3)
    Hd = _dampened(H)
    (before,), (info_before,) = alps.prune_group([W0], H, 0.6, alps_cg_iter=0)
    (after,), (info_after,) = alps.prune_group([W0], H, 0.6, alps_cg_iter=10)
    assert torch.equal(before == 0, after == 0)  # the same support; pruned entries stay exact zeros
    assert info_before["cg_iterations"] == 0 and info_after["cg_iterations"] > 0
    assert _error(after, W0, Hd) <= _error(before, W0, Hd)
    assert info_after["recon_error"] <= info_after["recon_error_admm"] == pytest.approx(info_before["recon_error"])
    # 10 steps on systems of at most 10 unknowns: the exact least-squares solution on the support, row by row
    for r in range(3):
        idx = torch.nonzero(after[r]).squeeze(1)
        c = Hd @ W0[r].double()
        exact = torch.linalg.solve(Hd[idx][:, idx], c[idx])
        torch.testing.assert_close(after[r, idx].double(), exact, rtol=2e-3, atol=2e-4)


def test_reported_error_is_the_relative_reconstruction_error():
    W0, H = _problem(4, 12, seed=4)
    (w,), (info,) = alps.prune_group([W0], H, 0.5)
    expected = _error(w, W0, H) / _error(torch.zeros_like(W0), W0, H)  # tr(dW H dW^T) / tr(W0 H W0^T)
    assert info["recon_error"] == pytest.approx(expected, rel=1e-3)


def test_dead_inputs_get_zero_weights_and_the_count_holds():
    W0, H = _problem(4, 12, seed=5)
    H[3, :] = H[:, 3] = 0.0  # input 3 never fires
    (w,), _ = alps.prune_group([W0], H, 0.5)
    assert torch.all(w[:, 3] == 0)
    assert int((w == 0).sum()) == 24


@pytest.mark.parametrize("target", [0.7, NMPattern(2, 4)])
def test_all_zero_hessian_falls_back_to_magnitude_with_a_warning(target):
    W0, _ = _problem(4, 16, seed=6)
    pruned, infos = alps.prune_group([W0[:2], W0[2:]], torch.zeros(16, 16), target)
    expected = magnitude.prune_group([W0[:2], W0[2:]], None, target)
    assert all(torch.equal(p, e) for p, e in zip(pruned, expected, strict=True))
    assert [int((w == 0).sum()) for w in pruned] == ([22, 22] if target == 0.7 else [16, 16])
    assert all(info["fallback"] == "magnitude" and "all zero" in info["warning"] for info in infos)


# ---- the engine -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("target", [{"sparsity": 0.7}, {"pattern": "2:4"}, {"pattern": "4:8"}])
@pytest.mark.parametrize("sequential", [True, False])
def test_engine_exact_sparsity_and_pattern(family, target, sequential, tiny_tokenizer, one_thread):
    model = make_tiny_model(family)
    cfg = PruneConfig(model="x", method="alps", sequential=sequential, **target)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    assert report["down_stats"] == ("pruned" if sequential else "dense")
    for name, mod in _block_linears(model).items():
        w = mod.weight
        if "pattern" in target:
            nm = NMPattern(*map(int, target["pattern"].split(":")))
            assert nm_violations(w, nm) == 0, name
            assert int((w == 0).sum()) == w.numel() * (nm.m - nm.n) // nm.m, name
        else:
            assert int((w == 0).sum()) == prune_count(w.numel(), 0.7), name
        info = report["modules"][name]
        assert set(info) >= INFO_KEYS, name
        assert 1 <= info["admm_iterations"] <= 300 and 0 <= info["recon_error"] < 1, name


def test_engine_owl_and_block_lists_meet_each_block_target_exactly(tiny_tokenizer, one_thread):
    model = make_tiny_model("llama", num_hidden_layers=4)
    cfg = PruneConfig(model="x", method="alps", sparsity=0.7, owl=True, owl_lambda=0.1)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    targets = report["layerwise"]["block_targets"]
    assert len(set(targets)) > 1
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                assert int((mod.weight == 0).sum()) == prune_count(mod.weight.numel(), targets[i]), (i, name)

    model = make_tiny_model("llama")
    cfg = PruneConfig(model="x", method="alps", block_sparsity=[0.3, 0.6])
    prune_model(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, nn.Linear):
                assert int((mod.weight == 0).sum()) == prune_count(mod.weight.numel(), [0.3, 0.6][i]), (i, name)

    model = make_tiny_model("llama", num_hidden_layers=4)
    cfg = PruneConfig(model="x", method="alps", pattern="4:8", owl=True, owl_lambda=0.2)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    patterns = [NMPattern(*map(int, t.split(":"))) for t in report["layerwise"]["block_targets"]]
    assert sum(p.n for p in patterns) == 16 and len(set(patterns)) > 1
    for i, layer in enumerate(model.model.layers):
        for mod in layer.modules():
            if isinstance(mod, nn.Linear):
                kept = (mod.weight != 0).reshape(mod.weight.shape[0], -1, 8).sum(dim=2)
                assert torch.all(kept == patterns[i].n)


def test_engine_warns_naming_the_module_whose_hessian_is_all_zero(tiny_tokenizer, caplog, one_thread):
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight.zero_()  # attention output, o_proj's input, is all zero
    o_proj = model.model.layers[0].self_attn.o_proj
    expected = magnitude.prune_group([o_proj.weight.data], None, 0.5)[0]
    cfg = PruneConfig(model="x", method="alps", sparsity=0.5)
    with caplog.at_level(logging.WARNING, logger="sparsetune"):
        report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    name = "model.layers.0.self_attn.o_proj"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "all zero" in w] == [f"{name}: {report['modules'][name]['warning']}"]
    assert report["modules"][name]["fallback"] == "magnitude"
    assert torch.equal(o_proj.weight, expected) and int((o_proj.weight == 0).sum()) == o_proj.weight.numel() // 2
    assert "fallback" not in report["modules"]["model.layers.1.self_attn.o_proj"]


# ---- settings and the CLI -----------------------------------------------------------------------------------------


def test_settings_defaults_and_validation():
    cfg = PruneConfig(model="x", method="alps")
    assert (cfg.alps_rho, cfg.alps_rho_growth, cfg.alps_max_iter, cfg.alps_cg_iter) == (0.1, 1.0, 300, 10)
    assert not cfg.dense_down_stats  # the update needs the input the layer really sees
    for bad in ({"alps_rho": 0}, {"alps_rho_growth": -1}, {"alps_max_iter": 0}, {"alps_cg_iter": -1}):
        with pytest.raises(ValueError):
            PruneConfig(model="x", method="alps", **bad)


def test_rho_growth_scales_the_schedule():
    W0, H = _problem(8, 32, seed=7)
    (_,), (slow,) = alps.prune_group([W0], H, 0.7, alps_rho_growth=0.5)
    (_,), (fast,) = alps.prune_group([W0], H, 0.7, alps_rho_growth=3.0)
    assert fast["admm_iterations"] < slow["admm_iterations"]
    (_,), (capped,) = alps.prune_group([W0], H, 0.7, alps_max_iter=4)
    assert capped["admm_iterations"] == 4 and capped["support_converged"] is False


def test_sweep_accepts_alps():
    from sparsetune.evaluate.config import SweepConfig
    from sparsetune.sweep import grid, prune_config

    cfg = SweepConfig(model="m", output="o", methods=["alps", "wanda"], sparsities=[0.7], patterns=["2:4"])
    points = [p for p in grid(cfg) if p.method == "alps"]
    assert [p.key for p in points] == ["alps-0.7", "alps-2of4"]
    assert prune_config(cfg, points[0]).method == "alps"


runner = CliRunner(env={"COLUMNS": "250"})


def test_prune_cli_alps_end_to_end_and_recipe_round_trip(tiny_model_dir, text_file, tmp_path, one_thread):
    out = tmp_path / "out"
    settings = ["--alps-rho", "0.2", "--alps-rho-growth", "1.5", "--alps-max-iter", "60", "--alps-cg-iter", "4"]
    args = [tiny_model_dir, "--method", "alps", "--sparsity", "0.7", "--calib", text_file, "--calib-samples", "4"]
    result = runner.invoke(app, ["prune", *map(str, args), "--seqlen", "32", *settings, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["method"] == "alps"
    weights = load_weights(out)
    report = json.loads((out / "sparsity_report.json").read_text())
    linears = [k.removesuffix(".weight") for k in weights if ".layers." in k and k.endswith("proj.weight")]
    assert len(linears) == 14
    for name in linears:
        w = weights[f"{name}.weight"]
        assert int((w == 0).sum()) == prune_count(w.numel(), 0.7), name
        info = report["modules"][name]
        assert set(info) >= INFO_KEYS and info["admm_iterations"] <= 60 and info["cg_iterations"] <= 4, name
    assert report["down_stats"] == "pruned" and report["settings"]["down_stats"] == "auto"
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert (recipe["alps_rho"], recipe["alps_rho_growth"], recipe["alps_max_iter"], recipe["alps_cg_iter"]) == (
        0.2,
        1.5,
        60,
        4,
    )
    out2 = tmp_path / "out2"
    again = runner.invoke(app, ["prune", "--recipe", str(out / "recipe.yaml"), "-o", str(out2)])
    assert again.exit_code == 0, again.output
    rerun = load_weights(out2)
    assert all(torch.equal(weights[k], rerun[k]) for k in weights)
    # recipe.yaml records the data dir actually used (SPARSETUNE_DATA_DIR here), so the rerun's settings name it
    assert json.loads((out2 / "sparsity_report.json").read_text())["settings"] == report["settings"] | {
        "output": str(out2),
        "data_dir": recipe["data_dir"],
    }


def test_prune_help_lists_the_alps_settings():
    result = runner.invoke(app, ["prune", "--help"])
    assert result.exit_code == 0
    for flag in ("--alps-rho ", "--alps-rho-growth", "--alps-max-iter", "--alps-cg-iter"):
        assert flag in result.output, flag
    assert "default: 300" in result.output and "alps" in result.output


def test_resume_keeps_the_finished_blocks_module_info(tiny_tokenizer, tmp_path, one_thread):
    cfg = PruneConfig(model="x", method="alps", sparsity=0.7, checkpoint_dir=str(tmp_path / "ckpt"))
    first = prune_and_report(make_tiny_model("llama"), tiny_tokenizer, cfg, _calib(), show_progress=False)
    resumed_cfg = cfg.model_copy(update={"resume": True})
    model = make_tiny_model("llama")
    resumed = prune_and_report(model, tiny_tokenizer, resumed_cfg, _calib(), show_progress=False)
    assert resumed["resumed_from_block"] == 2  # every block was finished: all of it comes from the checkpoint
    for name in _block_linears(model):
        assert resumed["modules"][name] == first["modules"][name], name


@pytest.mark.slow
def test_real_layer_reconstruction_beats_sparsegpt(bundled_model_dir, shared_data):
    """SmolLM2's first block on real C4 text: ALPS's per-matrix reconstruction error is below SparseGPT's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsetune.data import calibration_set

    model = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    ids = calibration_set(tok, "c4", 4, 128, 0, "random", str(shared_data)).input_ids
    attn = model.model.layers[0].self_attn
    hessians = {name: torch.zeros(576, 576) for name in ("q_proj", "o_proj")}

    def hook(name):
        def accumulate(_mod, args):  # returns None: the input passes on unchanged
            x = args[0].reshape(-1, 576)
            hessians[name].addmm_(x.T, x)

        return accumulate

    handles = [getattr(attn, name).register_forward_pre_hook(hook(name)) for name in hessians]
    with torch.no_grad():
        model.model.layers = model.model.layers[:1]  # only the first block's inputs are needed
        model.model(input_ids=ids)
    for h in handles:
        h.remove()
    groups = {"q_proj": [attn.q_proj, attn.k_proj, attn.v_proj], "o_proj": [attn.o_proj]}
    for target in (0.7, NMPattern(2, 4)):
        for name, mods in groups.items():
            weights = [m.weight.detach() for m in mods]
            ours, infos = alps.prune_group(weights, hessians[name], target)
            theirs = sparsegpt.prune_group(weights, hessians[name], target)
            for w0, a, s, info in zip(weights, ours, theirs, infos, strict=True):
                base = _error(torch.zeros_like(w0), w0, hessians[name])
                assert _error(a, w0, hessians[name]) / base == pytest.approx(info["recon_error"], rel=1e-3)
                assert _error(a, w0, hessians[name]) < _error(s, w0, hessians[name]), (name, target)
                assert info["support_converged"]


# ---- the ADMM step's pieces ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_sampled_kth_smallest_is_exact_including_ties_and_a_useless_sample(seed):
    """The bracket from a sample only decides how much goes through kthvalue; the answer is the sorted value."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(50_000, generator=g).abs()
    values[:7_000] = 0.0  # many exact ties at zero, as dead inputs give
    values[7_000:9_000] = 0.5  # and a block of ties in the middle
    values = values[torch.randperm(values.numel(), generator=g)]
    ordered = values.sort().values
    good = torch.randint(values.numel(), (4096,), generator=g)
    useless = torch.zeros(4096, dtype=torch.long)  # every draw the same entry: the bracket is one value wide
    for k in (1, 6_999, 7_000, 7_001, 20_000, 37_123, 49_999, 50_000):
        for sample in (good, useless, None):
            assert float(alps.kth_smallest(values, k, sample)) == float(ordered[k - 1]), (k, sample is good)


def test_unstructured_select_drops_exactly_the_count_per_matrix():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(30, 40, generator=g).abs()
    select = alps._UnstructuredSelect([10, 20], [123, 456], cols=40, device=A.device)
    mask = select(A)
    for rows, k, seg in ((slice(0, 10), 123, A[:10]), (slice(10, 30), 456, A[10:])):
        kept = mask[rows].bool()
        assert int((~kept).sum()) == k
        assert float(seg[~kept].max()) < float(seg[kept].min())  # the k smallest, nothing else


def test_the_two_forms_of_the_b_update_give_the_same_admm(monkeypatch):
    """(Hn + rho I)^-1 through the eigenbasis (two GEMMs a step) and as an explicit matrix (one GEMM a step) are
    the same algebra: forced each way on one problem, the schedule is the same and the final iterate agrees to
    rounding. The reported row norms are tr(Wn0 Hn Wn0^T) per row, computed here directly."""
    W0, H = _problem(24, 16, seed=11)
    Hn = _dampened(H).float()
    d = Hn.diag().sqrt()
    Hn = Hn / d / d.unsqueeze(1)
    Wn0 = W0 * d
    L, Q = torch.linalg.eigh(Hn.double())
    n_prune = prune_count(Wn0.numel(), 0.6)
    assert alps.explicit_inverse_pays(16, 47) and not alps.explicit_inverse_pays(16, 48)  # n < CHECK_EVERY m = 48
    runs = {}
    for explicit in (False, True):
        monkeypatch.setattr(alps, "explicit_inverse_pays", lambda m, n, explicit=explicit: explicit)
        select = alps._UnstructuredSelect([24], [n_prune], cols=16, device=Wn0.device)
        runs[explicit] = alps.admm_support(Wn0, Q.float(), L.float(), select, Wn0.numel() - n_prune, 0.1, 1.0, 12)
    (B_eig, info_eig), (B_exp, info_exp) = runs[False], runs[True]
    assert info_eig["iterations"] == info_exp["iterations"] == 12 and info_eig["rho"] == info_exp["rho"]
    assert torch.allclose(B_eig, B_exp, rtol=1e-4, atol=1e-4)
    assert torch.allclose(info_eig["row_norms"], (Wn0.double() @ Hn.double() * Wn0.double()).sum(1).float(), rtol=1e-4)
