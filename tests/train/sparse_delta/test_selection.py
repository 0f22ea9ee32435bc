"""Sparse-delta selection: schedule, window statistics, drop/grow (unstructured and N:M)."""

from __future__ import annotations

import math

import torch

from sparsetune.patterns import NMPattern
from sparsetune.train.sparse_delta.selection import (
    WindowStats,
    in_window,
    replace_fraction_at,
    reselect,
    reselection_due,
    within_capacity,
)


def test_schedule_windows_and_reselections():
    total = 70
    due = [s for s in range(1, total + 1) if reselection_due(s, 20, total)]
    assert due == [20, 40, 60]
    window = [s for s in range(1, total + 1) if in_window(s, 20, 5, total)]
    assert window == [16, 17, 18, 19, 20, 36, 37, 38, 39, 40, 56, 57, 58, 59, 60]
    assert [s for s in range(1, 61) if reselection_due(s, 20, 60)] == [20, 40]  # none after the last step


def test_replace_fraction_schedule():
    assert replace_fraction_at(20, 20, 100, 0.2, "linear") == 1.0
    assert math.isclose(replace_fraction_at(40, 20, 100, 0.2, "linear"), 0.2 * 0.6)
    assert math.isclose(replace_fraction_at(60, 20, 100, 0.2, "cosine"), 0.2 * 0.5 * (1 + math.cos(0.6 * math.pi)))
    assert replace_fraction_at(100, 20, 100, 0.2, "linear") == 0.0


def test_window_stats_candidates_from_first_backward_and_sums():
    stats = WindowStats(3, (2, 4), torch.device("cpu"))
    g1 = torch.tensor([[0.1, -5.0, 0.2, 0.0], [3.0, 0.0, -4.0, 0.5]])
    g2 = torch.tensor([[9.0, 1.0, 0.0, 0.0], [1.0, 9.0, 2.0, 9.0]])
    stats(g1)
    stats(g2)
    assert sorted(stats.candidates.tolist()) == [1, 4, 6]  # top-3 |g| of the FIRST backward only
    order = torch.argsort(stats.candidates)
    assert torch.equal(stats.sum_g[order], torch.tensor([-5.0 + 1.0, 3.0 + 1.0, -4.0 + 2.0]))
    assert torch.equal(stats.sum_g2[order], torch.tensor([26.0, 10.0, 20.0]))
    assert torch.allclose(stats.row_g2, (g1**2 + g2**2).sum(1))
    assert torch.allclose(stats.col_g2, (g1**2 + g2**2).sum(0))
    est = stats.mean_g2_estimate((2, 4))
    total = (g1**2 + g2**2).sum()
    assert torch.isclose(est[0, 0], stats.row_g2[0] * stats.col_g2[0] / total)
    assert est.view(-1)[1] == 26.0  # exact at a candidate


def test_window_stats_candidates_only_where_eligible():
    eligible = torch.tensor([[True, False, True, True], [False, True, True, False]])
    stats = WindowStats(2, (2, 4), torch.device("cpu"), eligible=lambda: eligible)
    g = torch.tensor([[0.1, -5.0, 0.2, 0.0], [3.0, 0.0, -4.0, 0.5]])
    stats(g)
    # the largest |g| are at 1 and 4 (not eligible), then 6 (-4.0) and 2 (0.2)
    assert sorted(stats.candidates.tolist()) == [2, 6]
    assert torch.equal(stats.sum_g[torch.argsort(stats.candidates)], torch.tensor([0.2, -4.0]))
    # no re-prune without reactivation, so no row/column sums are kept
    assert stats.row_g2 is None and stats.col_g2 is None
    assert stats.nbytes() == 2 * 2 * 4 + 2 * 8


def _stats(candidates, sum_g, sum_g2=None):
    stats = WindowStats(len(candidates), (4, 8), torch.device("cpu"))
    stats.candidates = torch.tensor(candidates)
    stats.sum_g = torch.tensor(sum_g, dtype=torch.float32)
    stats.sum_g2 = torch.tensor(sum_g2 if sum_g2 else [v * v for v in sum_g], dtype=torch.float32)
    return stats


def test_reselect_drops_smallest_and_grows_largest_not_surviving():
    positions = torch.tensor([0, 5, 9, 12, 20], dtype=torch.int32)
    delta = torch.tensor([0.5, -0.01, 0.3, 0.02, -0.9])
    # candidates: 9 survives (excluded); 5 is dropped, so it may grow again
    stats = _stats([9, 30, 5, 17, 3], [10.0, -8.0, 1.0, 0.5, 7.0])
    change = reselect(positions, delta, stats, 2, window_steps=5)
    assert change.slots.tolist() == [1, 3]  # |delta| 0.01 and 0.02
    assert change.positions.tolist() == [30, 3]  # |sum g| 8 and 7, 9 excluded
    assert change.sum_g.tolist() == [-8.0, 7.0]
    assert change.observed.tolist() == [5, 5]
    assert change.dropped == 2


def test_reselect_full_replacement_takes_every_candidate():
    positions = torch.arange(4, dtype=torch.int32)
    stats = _stats([10, 11, 12, 2], [1.0, 2.0, 3.0, 4.0])
    change = reselect(positions, torch.zeros(4), stats, 4, 5)
    assert sorted(change.positions.tolist()) == [2, 10, 11, 12]
    assert sorted(change.slots.tolist()) == [0, 1, 2, 3]


def test_within_capacity_matches_greedy():
    torch.manual_seed(0)
    for _ in range(20):
        groups = torch.randint(0, 5, (30,))
        capacity = torch.randint(0, 4, (5,))
        room = capacity.clone()
        expected = []
        for g in groups.tolist():
            expected.append(bool(room[g] > 0))
            room[g] -= int(room[g] > 0)
        assert within_capacity(groups, capacity).tolist() == expected


def test_reselect_nm_respects_group_capacity_and_fills():
    # shape (1, 8), 2:4: groups {0..3}, {4..7}; capacity 2 each; k = 3
    positions = torch.tensor([0, 1, 4], dtype=torch.int32)
    delta = torch.tensor([0.01, 0.5, 0.02])
    stats = _stats([2, 3, 5], [9.0, 8.0, 1.0])
    stats.row_g2 = torch.zeros(1)
    fill = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 1.0]])
    change = reselect(positions, delta, stats, 2, 5, NMPattern(2, 4), torch.tensor([2, 2]), (1, 8), fill_scores=fill)
    # drop slots 0 (pos 0) and 2 (pos 4); survivor pos 1 leaves group 0 one place: 2 grows, 3 cannot;
    # 5 grows in group 1
    assert sorted(zip(change.slots.tolist(), change.positions.tolist(), strict=True)) == [(0, 2), (2, 5)]

    # all three asked to go; candidates 2, 3 fill group 0, so nothing else fits there: the dropped entry with
    # the largest |delta| that still fits (slot 2 at 4, group 1) stays, and only two slots are replaced
    stats = _stats([2, 3], [9.0, 8.0])
    change = reselect(positions, delta, stats, 3, 5, NMPattern(2, 4), torch.tensor([2, 2]), (1, 8), fill)
    assert sorted(zip(change.slots.tolist(), change.positions.tolist(), strict=True)) == [(0, 2), (1, 3)]
    assert change.dropped == 2
