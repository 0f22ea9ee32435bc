"""DeltaAdamW: equals torch AdamW, per-entry bias correction, reseeding leaves kept entries untouched."""

from __future__ import annotations

import torch
from torch import nn

from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.optimizer import DeltaAdamW


def delta_adamw(layers: dict[str, DeltaLinear], lr: float, **kwargs) -> DeltaAdamW:
    """A DeltaAdamW at learning rate `lr` (the training loop sets it before every step)."""
    opt = DeltaAdamW(layers, **kwargs)
    opt.param_groups[0]["lr"] = lr
    return opt


def _layers(k: int = 10) -> dict[str, DeltaLinear]:
    torch.manual_seed(0)
    return {"a": DeltaLinear(nn.Linear(8, 4), k, torch.float32), "b": DeltaLinear(nn.Linear(4, 4), 3, torch.float32)}


def test_matches_torch_adamw_with_weight_decay():
    layers = _layers()
    opt = delta_adamw(layers, lr=0.01, weight_decay=0.1)
    ref_params = [nn.Parameter(torch.zeros(layer.k)) for layer in layers.values()]
    ref = torch.optim.AdamW(ref_params, lr=0.01, weight_decay=0.1)
    torch.manual_seed(1)
    for _ in range(6):
        for layer, p in zip(layers.values(), ref_params, strict=True):
            g = torch.randn(layer.k)
            layer.delta.grad, p.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    for layer, p in zip(layers.values(), ref_params, strict=True):
        torch.testing.assert_close(layer.delta.detach(), p.detach(), rtol=1e-5, atol=1e-7)
    assert opt.step_counts("a").tolist() == [6] * 10


def test_reseed_keeps_kept_entries_and_seeds_grown_from_window_means():
    layers = _layers()
    opt = delta_adamw(layers, lr=0.01)
    for _ in range(3):
        for layer in layers.values():
            layer.delta.grad = torch.randn(layer.k)
        opt.step()
    m_before, v_before = (t.clone() for t in opt.moments["a"].load())
    steps_before = opt.step_counts("a").clone()
    slots = torch.tensor([2, 7])
    sum_g, sum_g2 = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 5.0])
    opt.reseed("a", slots, sum_g, sum_g2, torch.tensor([5, 5], dtype=torch.int32))
    m, v = opt.moments["a"].load()
    kept = torch.ones(10, dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(m[kept], m_before[kept]) and torch.equal(v[kept], v_before[kept])
    assert torch.equal(opt.step_counts("a")[kept], steps_before[kept])
    assert opt.step_counts("a")[slots].tolist() == [5, 5]
    b1, b2 = opt.betas
    # bias-corrected moments of a grown entry equal the window means
    torch.testing.assert_close(m[slots] / (1 - b1**5), sum_g / 5)
    torch.testing.assert_close(v[slots] / (1 - b2**5), sum_g2 / 5)


def test_per_entry_bias_correction():
    layer = DeltaLinear(nn.Linear(2, 2), 2, torch.float32)
    opt = delta_adamw({"x": layer}, lr=0.1, eps=0.0)
    opt.reseed("x", torch.tensor([1]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0], dtype=torch.int32))
    opt.steps["x"].assign(torch.tensor([0]), torch.tensor([9]))  # entry 0 has seen 9 steps of zero gradient (m = v
    # = 0), entry 1 is new
    layer.delta.grad = torch.tensor([2.0, 2.0])
    opt.step()
    b1, b2 = opt.betas
    # entry 0 at step 10: m = 0.1*2, v = 0.001*4, m_hat/sqrt(v_hat) = (0.2/(1-b1^10)) / sqrt(0.004/(1-b2^10))
    want0 = -0.1 * (0.2 / (1 - b1**10)) / (0.004 / (1 - b2**10)) ** 0.5
    torch.testing.assert_close(layer.delta.detach(), torch.tensor([want0, -0.1]))


def test_memory_bytes_are_the_tensors():
    layers = _layers()
    opt = delta_adamw(layers, lr=0.01)
    assert opt.grad_bytes() == 0
    layers["a"].delta.grad = torch.zeros(10)
    assert opt.grad_bytes() == 40
    # m, v fp32 and a one-byte cohort id per entry, plus one int64 start per cohort (one per module so far)
    assert opt.state_bytes() == (10 + 3) * (4 + 4 + 1) + 2 * 8


def test_eight_bit_moments_step_and_bytes():
    layers = _layers(k=300)
    opt = delta_adamw(layers, lr=0.01, eight_bit=True)
    for layer in layers.values():
        layer.delta.grad = torch.randn(layer.k)
    opt.step()
    assert layers["a"].delta.abs().max() > 0
    # per entry 1 byte m + 1 byte v + 1 byte cohort id, plus one fp32 absmax per 256-entry block for m and for v,
    # plus one int64 cohort start per module
    assert opt.state_bytes() == 300 * 3 + 2 * 2 * 4 + 3 * 3 + 2 * 1 * 4 + 2 * 8


def test_step_counts_take_one_byte_and_recycle_or_merge_cohorts():
    from sparsetune.train.sparse_delta.optimizer import StepCounts

    counts = StepCounts(6, torch.device("cpu"))
    for _ in range(4):
        counts.advance()
    counts.assign(torch.tensor([1, 2, 4]), torch.tensor([2, 0, 2]))  # two cohorts: 2 steps and 0 steps old
    assert counts.values().tolist() == [4, 2, 0, 4, 2, 4] and counts.ids.dtype == torch.uint8
    counts.advance()
    counts.assign(torch.tensor([2]), torch.tensor([3]))  # the 0-step cohort is empty now: its id is reused
    assert counts.values().tolist() == [5, 3, 3, 5, 3, 5] and counts.starts.numel() == 3
    full = StepCounts(300, torch.device("cpu"))
    for i in range(1, 300):  # one cohort per entry: past 256, the oldest merges into the second oldest
        full.advance()
        full.assign(torch.tensor([i]), torch.tensor([0]))
    ages = full.values()
    assert full.starts.numel() == 256
    # 44 merges (steps 256-299) moved entries 0-43 up the chain into entry 44's cohort (start 44, 255 steps old)
    assert ages[:45].tolist() == [255] * 45
    assert ages[45:].tolist() == list(range(254, -1, -1))
