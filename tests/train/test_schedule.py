"""The training schedules equal transformers' cosine schedule with warm-up and a floor (kept hand-written only
because importing transformers' scheduler module costs every run a second and a bitsandbytes warning)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sparsetune.train.schedule import drop_fraction_at, lr_at


def transformers_factor(warmup: int, steps: int, floor: float):
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    placeholder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return get_cosine_with_min_lr_schedule_with_warmup(placeholder, warmup, steps, min_lr_rate=floor).lr_lambdas[0]


@pytest.mark.parametrize(("steps", "warmup", "floor"), [(300, 15, 0.1), (12, 0, 0.1), (60, 3, 0.0), (8, 2, 1.0)])
def test_lr_is_transformers_cosine_with_min_lr(steps, warmup, floor):
    cfg = SimpleNamespace(lr=3e-3, min_lr_ratio=floor, steps=steps, warmup=warmup)
    factor = transformers_factor(warmup, steps, floor)
    for step in range(steps):
        # transformers' warm-up gives step 0 the factor 0; here step s of the warm-up trains at (s + 1) / warmup
        want = cfg.lr * factor(step + 1 if step < warmup else step)
        assert lr_at(step, cfg) == pytest.approx(want, rel=1e-12, abs=1e-18), step


def test_lr_by_hand():
    cfg = SimpleNamespace(lr=1.0, min_lr_ratio=0.1, steps=12, warmup=2)
    assert [lr_at(s, cfg) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_at(7, cfg) == pytest.approx(0.55)  # halfway through the 10 cosine steps: (1 + 0.1) / 2
    assert lr_at(12, cfg) == pytest.approx(0.1)


def test_drop_fraction_is_transformers_cosine_without_warmup():
    cfg = SimpleNamespace(drop_fraction=0.3, drop_fraction_end=0.005, steps=40)
    factor = transformers_factor(0, 40, 0.005 / 0.3)
    for step in range(41):
        assert drop_fraction_at(step, cfg) == pytest.approx(0.3 * factor(step), rel=1e-12), step
    assert drop_fraction_at(20, cfg) == pytest.approx((0.3 + 0.005) / 2)
    assert math.isclose(drop_fraction_at(40, cfg), 0.005)
