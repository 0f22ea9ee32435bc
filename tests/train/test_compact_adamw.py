"""SparseAdamW (compact state for sparse weights held as dense parameters), against torch's AdamW and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsetune.train import topology
from sparsetune.train.compact_adamw import SparseAdamW, SparseWeight


def sparse_adamw(weights: list[SparseWeight], dense: list[nn.Parameter], lr: float, **kwargs) -> SparseAdamW:
    """A SparseAdamW at learning rate `lr` (the training loop sets it before every step)."""
    opt = SparseAdamW(weights, dense, **kwargs)
    for group in opt.param_groups:
        group["lr"] = lr
    return opt


def quadratic_loss(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (lin(x) - y).pow(2).mean()


def make_problem(seed: int = 0, shape=(12, 16)) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(shape, generator=g))
    x = torch.randn(32, shape[1], generator=g)
    y = torch.randn(32, shape[0], generator=g)
    mask = torch.rand(shape, generator=g) < 0.5
    return lin, x, y, mask


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_adamw_on_the_active_entries(weight_decay):
    """Sparse AdamW == torch AdamW fed the masked gradient of the masked weight, entry for entry."""
    lin, x, y, mask = make_problem()
    ref = nn.Linear(16, 12, bias=False)
    with torch.no_grad():
        ref.weight.copy_(lin.weight * mask)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=weight_decay, foreach=False)
    opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [], lr=1e-2, weight_decay=weight_decay)
    for _ in range(7):
        quadratic_loss(lin, x, y).backward()
        assert lin.weight.grad is None  # compacted and freed by the hook
        assert opt.sparse_state["w"].grad.shape == (int(mask.sum()),)
        opt.step()
        opt.zero_grad()
        quadratic_loss(ref, x, y).backward()
        ref.weight.grad.mul_(mask)
        ref_opt.step()
        ref_opt.zero_grad()
    assert torch.allclose(lin.weight, ref.weight, atol=1e-6, rtol=0)
    assert int((lin.weight != 0).sum()) <= int(mask.sum())
    assert torch.equal(lin.weight[~mask], torch.zeros(int((~mask).sum())))


def test_dense_params_follow_torch_adamw():
    lin, x, y, mask = make_problem()
    bias = nn.Parameter(torch.zeros(12))
    ref_bias = nn.Parameter(torch.zeros(12))
    opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [bias], lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref_bias], lr=1e-2, weight_decay=0.0, foreach=False)  # no decay on 1-D params
    for _ in range(5):
        ((lin(x).detach() + ref_bias - y).pow(2).mean()).backward()  # before the sparse weight moves
        ((lin(x) + bias - y).pow(2).mean()).backward()
        opt.step()
        opt.zero_grad()
        ref_opt.step()
        ref_opt.zero_grad()
    assert torch.allclose(bias, ref_bias, atol=1e-6)


def test_gradient_accumulation_sums_compact_gradients():
    lin, x, y, mask = make_problem()
    opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [], lr=1e-2)
    quadratic_loss(lin, x[:16], y[:16]).backward()
    quadratic_loss(lin, x[16:], y[16:]).backward()
    accumulated = opt.sparse_state["w"].grad.clone()
    opt.zero_grad()
    with opt.dense_grads():
        (quadratic_loss(lin, x[:16], y[:16]) + quadratic_loss(lin, x[16:], y[16:])).backward()
        dense = lin.weight.grad.clone()
    assert lin.weight.grad is None
    assert opt.sparse_state["w"].grad is None  # dense_grads() bypasses the compact buffer
    assert torch.allclose(accumulated, dense.view(-1)[mask.view(-1).nonzero().squeeze(1)], atol=1e-6)


def constant_gradient_run(regrow_warmup: int, steps_after: int, b1=0.9, b2=0.999, lr=0.1, regrow_lr_scale=1.0):
    """Weight w, loss = sum(w * c): the gradient is the constant c. Returns the per-step updates of a regrown entry,
    its moments, its gradient, and the per-step updates of an entry active from the start."""
    w = nn.Parameter(torch.zeros(2, 4))
    c = torch.tensor([[0.5, -2.0, 1.0, 3.0], [1.5, 0.25, -1.0, 2.0]])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, 1] = True
    weight = SparseWeight.from_mask("w", w, mask)
    opt = sparse_adamw(
        [weight], [], lr=lr, betas=(b1, b2), eps=1e-12, regrow_warmup=regrow_warmup, regrow_lr_scale=regrow_lr_scale
    )
    for _ in range(5):
        (w * c).sum().backward()
        opt.step()
        opt.zero_grad()
    # drop the entry at (0, 0) (slot 0) and grow (1, 3) (flat position 7)
    opt.swap_entries("w", torch.tensor([0]), torch.tensor([7]))
    assert float(w.detach()[0, 0]) == 0.0 and float(w.detach()[1, 3]) == 0.0
    updates, moments, kept_updates = [], [], []
    for _ in range(steps_after):
        before, kept_before = float(w.detach()[1, 3]), float(w.detach()[0, 1])
        (w * c).sum().backward()
        opt.step()
        opt.zero_grad()
        updates.append(float(w.detach()[1, 3]) - before)
        kept_updates.append(float(w.detach()[0, 1]) - kept_before)
        m, v = opt.sparse_state["w"].moments.load()
        moments.append((float(m[-1]), float(v[-1])))
    return updates, moments, float(c[1, 3]), kept_updates


def test_regrown_entry_warmup_follows_the_formula():
    """update_t = -lr * min(t / T_w, 1) * m_hat / sqrt(v_hat) with m_hat = g, v_hat = g^2 under a constant gradient
    (fresh bias correction from t = 1, no off-by-one), and the stored moments are never scaled by the ramp."""
    tw, lr, b1, b2 = 4, 0.1, 0.9, 0.999
    updates, moments, g, _ = constant_gradient_run(tw, 7, b1, b2, lr)
    for t, (upd, (m, v)) in enumerate(zip(updates, moments, strict=True), start=1):
        assert upd == pytest.approx(-lr * min(t / tw, 1.0) * math.copysign(1.0, g), rel=1e-5)
        assert m == pytest.approx(g * (1 - b1**t), rel=1e-5)
        assert v == pytest.approx(g * g * (1 - b2**t), rel=1e-5)


def test_without_warmup_a_regrown_entry_takes_full_steps():
    updates, _, g, _ = constant_gradient_run(0, 3)
    assert updates == pytest.approx([-0.1 * math.copysign(1.0, g)] * 3, rel=1e-5)


def test_regrow_lr_scale_multiplies_only_regrown_updates():
    """A regrown entry steps scale * lr (times the warm-up ramp); an entry active from the start keeps lr."""
    updates, moments, g, kept = constant_gradient_run(2, 4, lr=0.1, regrow_lr_scale=5.0)
    ramp = [0.5, 1.0, 1.0, 1.0]
    assert updates == pytest.approx([-0.5 * r * math.copysign(1.0, g) for r in ramp], rel=1e-5)
    assert kept == pytest.approx([0.1] * 4, rel=1e-4)  # gradient c[0, 1] = -2: steps of +lr, not scaled
    assert moments[0][0] == pytest.approx(g * 0.1, rel=1e-5)  # the moments are not scaled


def test_swap_keeps_count_and_other_entries_state():
    lin, x, y, mask = make_problem()
    weight = SparseWeight.from_mask("w", lin.weight, mask)
    opt = sparse_adamw([weight], [], lr=1e-2, track_updates=True)
    for _ in range(3):
        quadratic_loss(lin, x, y).backward()
        opt.step()
        opt.zero_grad()
    nnz = weight.nnz
    before_pos = weight.active.clone()
    m_before, _ = opt.sparse_state["w"].moments.load()
    m_before = m_before.clone()
    drop_slots = torch.tensor([0, 5, 9])
    grow_pos = topology.grow(torch.rand(lin.weight.numel()), 3, exclude=weight.active)
    opt.swap_entries("w", drop_slots, grow_pos)
    assert weight.nnz == nnz
    assert not set(grow_pos.tolist()) & set(before_pos.tolist())
    keep = torch.ones(nnz, dtype=torch.bool)
    keep[drop_slots] = False
    assert torch.equal(weight.active[: nnz - 3], before_pos[keep])
    m_after, v_after = opt.sparse_state["w"].moments.load()
    assert torch.equal(m_after[: nnz - 3], m_before[keep])
    assert torch.equal(m_after[nnz - 3 :], torch.zeros(3)) and torch.equal(v_after[nnz - 3 :], torch.zeros(3))
    assert torch.equal(lin.weight.view(-1)[before_pos[drop_slots]], torch.zeros(3))
    assert opt.sparse_state["w"].cohort_sizes == [nnz - 3, 3]
    assert opt.sparse_state["w"].cohort_births == [0, 3]
    assert float(opt.tracked_update("w")[: nnz - 3].abs().sum()) > 0
    opt.reset_tracking()
    assert float(opt.tracked_update("w").abs().sum()) == 0


def test_state_dict_round_trip_continues_identically():
    runs = []
    for restore in (False, True):
        lin, x, y, mask = make_problem()
        opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [], lr=1e-2, regrow_warmup=3)
        for step in range(6):
            if step == 2:
                opt.swap_entries(
                    "w", torch.tensor([1, 2]), topology.grow(torch.arange(192.0), 2, opt.weights["w"].active)
                )
            if step == 4 and restore:
                saved = {k: v for k, v in opt.state_dict().items()}
                weights = lin.weight.detach().clone()
                lin2, *_ = make_problem()
                opt = sparse_adamw([SparseWeight.from_mask("w", lin2.weight, mask)], [], lr=1e-2, regrow_warmup=3)
                with torch.no_grad():
                    lin2.weight.copy_(weights)
                opt.load_state_dict(saved)
                lin = lin2
            quadratic_loss(lin, x, y).backward()
            opt.step()
            opt.zero_grad()
        runs.append(lin.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


def test_eight_bit_state_is_a_quarter_and_still_trains():
    losses, state_bytes = {}, {}
    for eight_bit in (False, True):
        lin, x, y, mask = make_problem(shape=(64, 128))
        opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [], lr=1e-2, eight_bit=eight_bit)
        first = float(quadratic_loss(lin, x, y))
        for _ in range(30):
            quadratic_loss(lin, x, y).backward()
            opt.step()
            opt.zero_grad()
        losses[eight_bit] = (first, float(quadratic_loss(lin, x, y)))
        state_bytes[eight_bit] = opt.memory_report()["optimizer_state_bytes"]
    assert losses[True][1] < 0.8 * losses[True][0]
    assert losses[True][1] == pytest.approx(losses[False][1], rel=0.1)
    assert state_bytes[True] < 0.3 * state_bytes[False]


def test_memory_report_counts_only_active_entries():
    lin, x, y, _ = make_problem(shape=(256, 512))
    mask = topology.random_layout((256, 512), 256 * 256, torch.Generator().manual_seed(0))
    opt = sparse_adamw([SparseWeight.from_mask("w", lin.weight, mask)], [], lr=1e-2)
    report = opt.memory_report()
    assert report["optimizer_state_bytes"] >= 256 * 256 * 8
    assert report["gradient_bytes"] == 256 * 256 * 4
    assert report["dense_adamw_state_and_grad_bytes"] == 256 * 512 * 12
    assert report["state_and_grad_vs_dense"] <= 0.5 + 0.02


def scalar_adam_updates(grads: list[float], lr: float, b1: float, b2: float, eps: float) -> list[float]:
    """Plain-Python AdamW (no decay) on one scalar: the weight change of every step."""
    m = v = 0.0
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        out.append(-lr * (m / (1 - b1**t)) / (math.sqrt(v / (1 - b2**t)) + eps))
    return out


@pytest.mark.parametrize("regrow_warmup", [0, 4])
def test_regrown_update_ratio_matches_a_hand_computed_adam_step(regrow_warmup):
    """Established entries see gradients of alternating sign (+1, -1, ...), so their momentum nearly cancels; the
    entry regrown after step 4 starts with zero moments and gradient +1. First step after the update (global t=5):
    established m_5 = 0.1 * (1 - 0.9 + 0.81 - 0.729 + 0.6561) = 0.08371, m_hat = 0.08371 / (1 - 0.9^5) = 0.204415,
    v_hat = 1, so |update| = 0.204415 lr; the regrown entry has m_hat = 1, v_hat = 1, |update| = lr. Ratio (naive
    DST) = 0.40951 / 0.08371 = 4.89201; with a warm-up over 4 steps the regrown update is lr / 4: ratio 1.22300."""
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-12
    w = nn.Parameter(torch.zeros(2, 4))
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask.view(-1)[[0, 1, 2]] = True
    opt = sparse_adamw(
        [SparseWeight.from_mask("w", w, mask)],
        [],
        lr=lr,
        betas=(b1, b2),
        eps=eps,
        regrow_warmup=regrow_warmup,
        measure_steps=2,
    )
    signs = [1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0]

    def step(t: int) -> None:
        c = torch.zeros(8)
        c[[1, 2]] = torch.tensor([signs[t - 1], -signs[t - 1]])  # established: alternating, opposite signs
        c[0] = 0.5  # the entry dropped after step 4
        c[7] = 1.0  # the entry grown after step 4: a steady gradient
        (w.view(-1) * c).sum().backward()
        opt.step()
        opt.zero_grad()

    for t in range(1, 5):
        step(t)
        assert opt.update_magnitudes is None  # no topology update yet
    opt.swap_entries("w", torch.tensor([0]), torch.tensor([7]))
    established = scalar_adam_updates(signs, lr, b1, b2, eps)
    for t in (5, 6):
        step(t)
        local = t - 4
        ramp = min(local / regrow_warmup, 1.0) if regrow_warmup else 1.0
        regrown = abs(scalar_adam_updates([1.0] * local, lr, b1, b2, eps)[-1]) * ramp
        measured = opt.update_magnitudes
        assert measured["steps_since_update"] == local
        assert measured["regrown_abs_update"] == pytest.approx(regrown, rel=1e-5)
        assert measured["established_abs_update"] == pytest.approx(abs(established[t - 1]), rel=1e-5)
        assert measured["regrown_update_ratio"] == pytest.approx(regrown / abs(established[t - 1]), rel=1e-5)
        if t == 5:  # the hand computation in the docstring
            assert abs(established[4]) == pytest.approx(0.204415 * lr, rel=1e-5)
            expected = 4.89201 if regrow_warmup == 0 else 1.22300
            assert measured["regrown_update_ratio"] == pytest.approx(expected, rel=1e-5)
    step(7)
    assert opt.update_magnitudes is None  # measured for measure_steps=2 steps only
