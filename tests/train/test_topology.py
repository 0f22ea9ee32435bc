"""Sparse topology: ERK densities, drop and grow choices, the ITOP bitmap."""

from __future__ import annotations

import pytest
import torch

from sparsetune.train import topology


def test_erk_densities_hit_the_budget_and_cap_at_one():
    shapes = {"tiny": (8, 8), "wide": (64, 1024), "square": (512, 512)}
    d = topology.erk_densities(shapes, 0.3)
    total = sum(a * b for a, b in shapes.values())
    assert sum(d[n] * a * b for n, (a, b) in shapes.items()) == pytest.approx(0.3 * total)
    assert d["tiny"] == 1.0  # would exceed 1
    assert d["wide"] > d["square"]  # (n_in + n_out) / (n_in * n_out) is larger for the thin layer


def test_drop_takes_the_lowest_scores_and_grow_the_highest_outside_the_active():
    score = torch.tensor([0.5, -3.0, 0.1, 2.0, 0.2])
    assert sorted(topology.drop(score, 2).tolist()) == [1, 2]  # slots of the two smallest scores
    grads = torch.tensor([[9.0, 1.0, 8.0], [2.0, 7.0, 3.0]])
    active = torch.tensor([0, 4])  # the positions of 9 and 7 are active: they cannot grow again
    assert sorted(topology.grow(grads, 2, exclude=active).tolist()) == [2, 5]  # 8.0 and 3.0


def test_grow_random_is_seeded_and_avoids_active():
    active = torch.arange(0, 100, 2)
    a = topology.grow_random(100, 20, active, torch.Generator().manual_seed(3))
    b = topology.grow_random(100, 20, active, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert all(p % 2 == 1 for p in a.tolist())


def test_itop_bitmap_packs_like_numpy_and_counts_exactly():
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(0)
    for numel in (1, 7, 8, 9, 1003):
        union = torch.zeros(numel, dtype=torch.bool)
        bitmap = topology.empty_bitmap(numel)
        for _ in range(3):  # three layouts marked one after the other: the bitmap holds their union
            mask = torch.rand(numel, generator=g) < 0.3
            topology.mark_bits(bitmap, mask.nonzero().squeeze(1))
            union |= mask
        assert bitmap.numel() == (numel + 7) // 8
        assert bitmap.tolist() == np.packbits(union.numpy(), bitorder="little").tolist()
        assert torch.equal(topology.unpack_bits(bitmap, numel), union)
        assert topology.count_bits(bitmap, chunk=2) == int(union.sum())
