"""`sparsetune.plan`: the data-constrained sparse scaling law (Wu, Xiao, Okanovic et al. 2026) and the densities
`sparsetune plan` chooses from it.

Reference values: computed by running the functions of github.com/boqian333/sparse-dc-scaling (commit 94414a8),
`figures/optimal_sparsity.ipynb`, outside this project (its first cell's `scaling_law`, `optimal_N`, `optimal_D`,
`D_to_C` and `best_loss_per_F_at_S`, with numpy, unmodified):
- SCALING_LAW: `scaling_law(N, U, D, S)` at N x U x epochs x S;
- OPTIMAL: `optimal_N(C, S)`, `optimal_D(C, S)` and `D_to_C(1.3e10, S)`;
- BUDGET_CHOICE: the notebook's per-FLOP-budget density (as in its `plot_for_UT`: for every S in S_vals =
  linspace(0.05, 1, 120), `best_loss_per_F_at_S(S, [optimal_D(F, S)], [optimal_N(F, S)], [F], UT)`, then the argmin
  over S), for its three unique-token budgets UT and the first, middle and last of its 18 FLOP lines
  (`flops_grid_from_UT`);
- LOSS_OPTIMAL / COMPUTE_OPTIMAL: the argmin of the notebook's `scaling_law(N x s, min(U, D), D, s)` over
  s = k/512, k = 32..512 (plan's grid), with D fixed, or D = C / (6 N s) for a compute budget C.
"""

from __future__ import annotations

import json
import math

import pytest

from sparsetune import plan
from sparsetune.errors import SparsetuneError

REL = 1e-6

SCALING_LAW = [  # (N active, U, D, S, loss)
    (2e07, 1.3e09, 1.3e09, 1, 3.593775699832482),
    (2e07, 1.3e09, 1.3e09, 0.5, 3.481235293489148),
    (2e07, 1.3e09, 1.3e09, 0.25, 3.438263918530916),
    (2e07, 1.3e09, 1.3e09, 0.0625, 3.4143727739393603),
    (2e07, 1.3e09, 5.2e09, 1, 3.446023051709053),
    (2e07, 1.3e09, 5.2e09, 0.5, 3.325361188999105),
    (2e07, 1.3e09, 5.2e09, 0.25, 3.2821270954933808),
    (2e07, 1.3e09, 5.2e09, 0.0625, 3.259098421889089),
    (2e07, 1.3e09, 2.08e10, 1, 3.3970897699132516),
    (2e07, 1.3e09, 2.08e10, 0.5, 3.258759907490083),
    (2e07, 1.3e09, 2.08e10, 0.25, 3.2148885511754495),
    (2e07, 1.3e09, 2.08e10, 0.0625, 3.193937001283542),
    (2e07, 1.3e10, 1.3e10, 1, 3.345351962827189),
    (2e07, 1.3e10, 1.3e10, 0.5, 3.232811556483855),
    (2e07, 1.3e10, 1.3e10, 0.25, 3.1898401815256228),
    (2e07, 1.3e10, 1.3e10, 0.0625, 3.1659490369340673),
    (2e07, 1.3e10, 5.2e10, 1, 3.275735251523429),
    (2e07, 1.3e10, 5.2e10, 0.5, 3.1593682533022402),
    (2e07, 1.3e10, 5.2e10, 0.25, 3.1162730930751334),
    (2e07, 1.3e10, 5.2e10, 0.0625, 3.0927883194995345),
    (2e07, 1.3e10, 2.08e11, 1, 3.2526793253170974),
    (2e07, 1.3e10, 2.08e11, 0.5, 3.1279876841810643),
    (2e07, 1.3e10, 2.08e11, 0.25, 3.084592264421855),
    (2e07, 1.3e10, 2.08e11, 0.0625, 3.0620861705766287),
    (1.2e08, 1.3e09, 1.3e09, 1, 3.2502321311093216),
    (1.2e08, 1.3e09, 1.3e09, 0.5, 3.1895827514720776),
    (1.2e08, 1.3e09, 1.3e09, 0.25, 3.168779106707172),
    (1.2e08, 1.3e09, 1.3e09, 0.0625, 3.1673602305287374),
    (1.2e08, 1.3e09, 5.2e09, 1, 3.1024794829858924),
    (1.2e08, 1.3e09, 5.2e09, 0.5, 3.0337086469820345),
    (1.2e08, 1.3e09, 5.2e09, 0.25, 3.012642283669637),
    (1.2e08, 1.3e09, 5.2e09, 0.0625, 3.012085878478466),
    (1.2e08, 1.3e09, 2.08e10, 1, 3.053546201190091),
    (1.2e08, 1.3e09, 2.08e10, 0.5, 2.9671073654730127),
    (1.2e08, 1.3e09, 2.08e10, 0.25, 2.945403739351706),
    (1.2e08, 1.3e09, 2.08e10, 0.0625, 2.9469244578729192),
    (1.2e08, 1.3e10, 1.3e10, 1, 3.00139228080396),
    (1.2e08, 1.3e10, 1.3e10, 0.5, 2.938732090443584),
    (1.2e08, 1.3e10, 1.3e10, 0.25, 2.914806510090555),
    (1.2e08, 1.3e10, 1.3e10, 0.0625, 2.9015044107230885),
    (1.2e08, 1.3e10, 5.2e10, 1, 2.9317755695002),
    (1.2e08, 1.3e10, 5.2e10, 0.5, 2.8652887872619694),
    (1.2e08, 1.3e10, 5.2e10, 0.25, 2.841239421640066),
    (1.2e08, 1.3e10, 5.2e10, 0.0625, 2.8283436932885557),
    (1.2e08, 1.3e10, 2.08e11, 1, 2.9087196432938685),
    (1.2e08, 1.3e10, 2.08e11, 0.5, 2.8339082181407935),
    (1.2e08, 1.3e10, 2.08e11, 0.25, 2.8095585929867872),
    (1.2e08, 1.3e10, 2.08e11, 0.0625, 2.79764154436565),
    (1e09, 1.3e09, 1.3e09, 1, 3.060984169171561),
    (1e09, 1.3e09, 1.3e09, 0.5, 3.0347738771334263),
    (1e09, 1.3e09, 1.3e09, 0.25, 3.043906138222495),
    (1e09, 1.3e09, 1.3e09, 0.0625, 3.103103142093545),
    (1e09, 1.3e09, 5.2e09, 1, 2.913231521048132),
    (1e09, 1.3e09, 5.2e09, 0.5, 2.878899772643383),
    (1e09, 1.3e09, 5.2e09, 0.25, 2.88776931518496),
    (1e09, 1.3e09, 5.2e09, 0.0625, 2.9478287900432734),
    (1e09, 1.3e09, 2.08e10, 1, 2.8642982392523306),
    (1e09, 1.3e09, 2.08e10, 0.5, 2.8122984911343614),
    (1e09, 1.3e09, 2.08e10, 0.25, 2.8205307708670286),
    (1e09, 1.3e09, 2.08e10, 0.0625, 2.8826673694377267),
    (1e09, 1.3e10, 1.3e10, 1, 2.785409056351171),
    (1e09, 1.3e10, 1.3e10, 0.5, 2.7547303196137305),
    (1e09, 1.3e10, 1.3e10, 0.25, 2.7438532521822285),
    (1e09, 1.3e10, 1.3e10, 0.0625, 2.741292353364172),
    (1e09, 1.3e10, 5.2e10, 1, 2.7157923450474106),
    (1e09, 1.3e10, 5.2e10, 0.5, 2.681287016432116),
    (1e09, 1.3e10, 5.2e10, 0.25, 2.670286163731739),
    (1e09, 1.3e10, 5.2e10, 0.0625, 2.6681316359296394),
    (1e09, 1.3e10, 2.08e11, 1, 2.692736418841079),
    (1e09, 1.3e10, 2.08e11, 0.5, 2.64990644731094),
    (1e09, 1.3e10, 2.08e11, 0.25, 2.6386053350784606),
    (1e09, 1.3e10, 2.08e11, 0.0625, 2.6374294870067336),
]
OPTIMAL = [  # (C, S, optimal_N, optimal_D, D_to_C(1.3e10, S))
    (1e18, 1, 109143617.0487574, 1527039978.821777, 7.2474610502883656e19),
    (1e18, 0.5, 85881687.2571798, 1940654311.6411953, 4.487354103015599e19),
    (1e18, 0.125, 74135385.07361667, 2248139218.554893, 3.3438000566961672e19),
    (1e21, 1, 3451424219.432582, 48289244112.121, 7.2474610502883656e19),
    (1e21, 0.5, 2715817410.30947, 61368877758.123955, 4.487354103015599e19),
    (1e21, 0.125, 2344366720.462783, 71092404277.84535, 3.3438000566961672e19),
]
BUDGET_CHOICE = [  # (UT, F, index of the chosen density in S_vals, its density, best loss)
    (1.3e09, 4.531319087716954e19, 41, 0.37731092436974784, 2.846717530997261),
    (1.3e09, 1.7256062744890658e20, 54, 0.48109243697478987, 2.8022312439897132),
    (1.3e09, 5.6641488596461906e20, 61, 0.5369747899159664, 2.784850916356092),
    (1.3e10, 4.916198103097584e21, 42, 0.3852941176470588, 2.581303490658881),
    (1.3e10, 1.8721749956502766e22, 55, 0.4890756302521008, 2.561148383349374),
    (1.3e10, 6.145247628872027e22, 61, 0.5369747899159664, 2.5535424173231775),
    (1.3e11, 6.864589329869414e23, 46, 0.4172268907563025, 2.454950903248292),
    (1.3e11, 2.6141567587952836e24, 57, 0.5050420168067227, 2.446991452370264),
    (1.3e11, 8.580736662336765e24, 62, 0.5449579831932773, 2.444436371474196),
]
LOSS_OPTIMAL = [  # (dense-equivalent N, U, D, argmin density, its loss)
    (1e09, 1.3e10, 1.3e11, 0.814453125, 2.691020741183382),
    (1.2e08, 1.3e09, 1.3e10, 0.806640625, 3.0497716388501916),
    (5e08, 2e09, 2e09, 0.904296875, 3.0320685832388192),
    (2e09, 1e09, 1.6e10, 0.61328125, 2.8422859859318477),
]
COMPUTE_OPTIMAL = [  # (dense-equivalent N, U, C, argmin density, its tokens, its loss); D = C / (6 N s)
    (1.2e08, 1.3e09, 5e18, 0.666015625, 10426849136.526556, 3.0632649798930394),
    (1e09, 1.3e10, 7.8e19, 0.4375, 29714285714.285713, 2.75759454718845),
    (1e09, 1.3e09, 7.8e19, 0.583984375, 22260869565.217392, 2.8397646544623774),
]


@pytest.mark.parametrize(("n", "u", "d", "s", "expected"), SCALING_LAW)
def test_scaling_law_matches_the_notebook(n, u, d, s, expected):
    assert plan.predicted_loss(n, u, d, s) == pytest.approx(expected, rel=REL)


@pytest.mark.parametrize(("c", "s", "n_opt", "d_opt", "c_for_u"), OPTIMAL)
def test_optimal_allocation_matches_the_notebook(c, s, n_opt, d_opt, c_for_u):
    assert plan.optimal_active_params(c, s) == pytest.approx(n_opt, rel=REL)
    assert plan.optimal_tokens(c, s) == pytest.approx(d_opt, rel=REL)
    assert plan.flops_for_optimal_tokens(1.3e10, s) == pytest.approx(c_for_u, rel=REL)
    assert 6 * n_opt * d_opt == pytest.approx(c, rel=REL)  # the split spends exactly the budget


@pytest.mark.parametrize(("ut", "flops", "index", "density", "loss"), BUDGET_CHOICE)
def test_per_budget_density_matches_the_notebook(ut, flops, index, density, loss):
    chosen, per_density = plan.density_per_budget(flops, ut)
    assert len(per_density) == 120 and plan.NOTEBOOK_DENSITIES.index(chosen.density) == index
    assert chosen.density == pytest.approx(density, rel=REL)
    assert chosen.loss == pytest.approx(loss, rel=REL)
    # the point it names spends the budget and reproduces its own loss
    assert chosen.flops == pytest.approx(flops, rel=REL)
    u = min(ut, chosen.tokens)
    assert plan.predicted_loss(chosen.active_params, u, chosen.tokens, chosen.density) == pytest.approx(loss, rel=REL)


@pytest.mark.parametrize(("n", "u", "d", "density", "loss"), LOSS_OPTIMAL)
def test_loss_optimal_density(n, u, d, density, loss):
    chosen = plan.loss_optimal(n, u, d)
    assert chosen.density == pytest.approx(density, rel=REL) and chosen.loss == pytest.approx(loss, rel=REL)
    assert chosen.tokens == d and chosen.params == n


@pytest.mark.parametrize(("n", "u", "c", "density", "tokens", "loss"), COMPUTE_OPTIMAL)
def test_compute_optimal_density_and_tokens(n, u, c, density, tokens, loss):
    chosen = plan.compute_optimal(n, u, c)
    assert chosen.density == pytest.approx(density, rel=REL)
    assert chosen.tokens == pytest.approx(tokens, rel=REL) and chosen.loss == pytest.approx(loss, rel=REL)
    assert chosen.flops == pytest.approx(c, rel=REL)


# One epoch (D = U) with fewer active parameters than the unique data can use: no repetition term is active and
# the law is E + A f(S) / n^alpha + B / U^beta. Coefficients written out from the issue / notebook.
a, b, e, alpha, eps, mu, c = 5.24073718, 6.10303089, 0.85355013, 0.32682177, -0.00968044, 0.84661793, -0.27288932


def one_epoch_loss(n, u, s):
    f = s**eps + c * (1 - s) ** mu
    return math.exp(e) + math.exp(a) * f / n**alpha + math.exp(b) / u**alpha


@pytest.mark.parametrize(("n", "u", "s"), [(2e7, 1e9, 1.0), (4e7, 2e9, 0.5), (2e8, 1.3e10, 0.25), (2e6, 1e8, 0.0625)])
def test_one_epoch_is_the_chinchilla_form(n, u, s):
    f = s**eps + c * (1 - s) ** mu
    g = (alpha * math.exp(a) * f / (alpha * math.exp(b))) ** (1 / (2 * alpha))
    assert n <= g * g * u  # below U_N = G^2 U (alpha = beta): no parameter repetition either
    assert plan.predicted_loss(n, u, u, s) == pytest.approx(one_epoch_loss(n, u, s), rel=1e-12)


def test_one_epoch_dense_by_hand():
    # n = 1e8, U = D = 2e9, dense (f = 1): E + A / n^alpha + B / U^alpha, each term by hand:
    # exp(0.85355013) = 2.347968; exp(5.24073718) / 1e8^0.32682177 = 188.8092 / 411.6936 = 0.458616;
    # exp(6.10303089) / 2e9^0.32682177 = 447.2112 / 1095.9206 = 0.408069
    expected = 2.347968 + 0.458616 + 0.408069
    assert plan.predicted_loss(1e8, 2e9, 2e9, 1.0) == pytest.approx(expected, abs=2e-6)


def test_repetition_is_worth_less_than_fresh_data():
    fresh = plan.predicted_loss(1e8, 4e9, 4e9, 0.5)
    repeated = plan.predicted_loss(1e8, 1e9, 4e9, 0.5)  # 4 epochs of a quarter of the data
    one_pass = plan.predicted_loss(1e8, 1e9, 1e9, 0.5)
    assert fresh < repeated < one_pass


def test_make_plan_tokens_and_flops():
    by_tokens = plan.make_plan(1e9, 1.3e10, tokens=1.3e11, density=0.5)
    assert by_tokens.loss_optimal == plan.loss_optimal(1e9, 1.3e10, 1.3e11)
    assert by_tokens.compute_optimal is None and by_tokens.budget_choice is None
    assert [p.density for p in by_tokens.grid] == list(plan.TABLE_GRID)
    assert by_tokens.requested.loss == pytest.approx(plan.predicted_loss(5e8, 1.3e10, 1.3e11, 0.5), rel=1e-12)
    assert by_tokens.recommended is by_tokens.loss_optimal
    by_flops = plan.make_plan(1e9, 1.3e10, flops=7.8e19)
    assert by_flops.compute_optimal == plan.compute_optimal(1e9, 1.3e10, 7.8e19)
    assert by_flops.budget_choice == plan.density_per_budget(7.8e19, 1.3e10)[0]
    for p in by_flops.grid:  # every density spends the budget
        assert p.flops == pytest.approx(7.8e19, rel=1e-12)
    json.dumps(by_flops.as_dict())


def test_range_notes_name_what_is_extrapolated():
    inside = plan.make_plan(1.2e8, 1.3e9, tokens=1.3e10)
    assert not any("outside" in n or "beyond" in n for n in inside.notes)
    assert any("C4" in n and "fine-tuning" in n for n in inside.notes)
    outside = plan.make_plan(7e9, 1e9, tokens=5e10, density=0.03)
    text = " ".join(outside.notes)
    assert "outside the fit's models" in text and "below the fit's sparsest" in text
    assert "50.0 epochs" in text and "training-token budgets" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 1e9, 1e10, None, None), "--params must be positive"),
        ((1e8, -1, 1e10, None, None), "--unique-tokens must be positive"),
        ((1e8, 1e9, -1e10, None, None), "--tokens must be positive"),
        ((1e8, 1e9, None, 0, None), "--flops must be positive"),
        ((1e8, 2e10, 1e10, None, None), "exceeds --tokens"),
        ((1e8, 1e9, 1e10, None, 1.5), "--density must be in (0, 1]"),
        ((1e8, 1e9, 1e10, None, 0.0), "--density must be in (0, 1]"),
        ((1e8, 1e9, 1e10, 1e19, None), "not both"),
        ((1e8, 1e9, None, None, None), "missing --tokens"),
    ],
)
def test_bad_input(args, message):
    with pytest.raises(SparsetuneError, match=message.replace("(", r"\(").replace("]", r"\]")):
        plan.make_plan(*args)


def test_parse_count():
    assert plan.parse_count("1.3e10", "x") == 1.3e10
    assert plan.parse_count("120M", "x") == 1.2e8 and plan.parse_count("13B", "x") == 1.3e10
    with pytest.raises(SparsetuneError, match="not a number"):
        plan.parse_count("lots", "--params")
    with pytest.raises(SparsetuneError, match="positive"):
        plan.parse_count("-3", "--params")


def test_count_params_from_a_llama_config(tmp_path):
    # SmolLM2-135M's shape: 134,515,008 parameters (tied embeddings), its published count
    cfg = {
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    count, source = plan.count_params(str(tmp_path / "config.json"))
    assert count == 134_515_008 and "counted from" in source
    assert plan.count_params(str(tmp_path))[0] == 134_515_008  # a dir without weights: its config
    untied = plan.count_params(str(tmp_path / "config.json"))[0]
    cfg["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert plan.count_params(str(tmp_path))[0] == untied + 49152 * 576


def test_count_params_from_safetensors_headers(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    save_file({"a": torch.zeros(3, 5), "b": torch.zeros(7)}, str(tmp_path / "model-1.safetensors"))
    save_file({"c": torch.zeros(2, 2, 2)}, str(tmp_path / "model-2.safetensors"), metadata={"format": "pt"})
    count, source = plan.count_params(str(tmp_path))
    assert count == 3 * 5 + 7 + 8 and "2 safetensors" in source


def test_smet_command_covers_the_planned_tokens():
    p = plan.make_plan(1.2e8, 1.3e9, flops=5e18)
    line = plan.smet_command(p, batch_size=512, seqlen=256, model_config="cfg.json")
    steps = int(line.split("--steps ")[1].split()[0])
    assert (steps - 1) * 512 * 256 < p.recommended.tokens <= steps * 512 * 256
    assert f"--density {p.recommended.density:.6g}" in line and "--model-config cfg.json" in line
