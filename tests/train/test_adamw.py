"""The per-entry AdamW core: bias corrections per step count and Adam's moment update, against closed forms."""

from __future__ import annotations

import pytest
import torch

from sparsetune.train.adamw import adam_direction, bias_corrections


def test_bias_corrections_follow_each_entrys_step_count():
    steps = torch.tensor([1, 2, 10, 1000])
    bias1, bias2 = bias_corrections(steps, (0.9, 0.999))
    assert bias1.dtype == bias2.dtype == torch.float32
    assert bias1.tolist() == pytest.approx([1 - 0.9**t for t in (1, 2, 10, 1000)], rel=1e-7)
    # computed in float64: 1 - 0.999 in float32 arithmetic would be off by ~1e-5 relative
    assert float(bias2[0]) == pytest.approx(0.001, rel=1e-6)


def test_adam_direction_updates_the_moments_in_place_and_returns_the_bias_corrected_step():
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v = torch.tensor([0.5, -1.0]), torch.tensor([0.25, 2.0])
    g = torch.tensor([2.0, 4.0])
    bias1, bias2 = torch.tensor([1 - b1**3, 1 - b1]), torch.tensor([1 - b2**3, 1 - b2])
    m_hat, denominator = adam_direction(m, v, g, bias1, bias2, (b1, b2), eps)
    want_m = [b1 * 0.5 + (1 - b1) * 2.0, b1 * -1.0 + (1 - b1) * 4.0]
    want_v = [b2 * 0.25 + (1 - b2) * 4.0, b2 * 2.0 + (1 - b2) * 16.0]
    assert m.tolist() == pytest.approx(want_m) and v.tolist() == pytest.approx(want_v)
    assert m_hat.tolist() == pytest.approx([want_m[0] / (1 - b1**3), want_m[1] / (1 - b1)])
    want_denominator = [(want_v[0] / (1 - b2**3)) ** 0.5 + eps, (want_v[1] / (1 - b2)) ** 0.5 + eps]
    assert denominator.tolist() == pytest.approx(want_denominator)
