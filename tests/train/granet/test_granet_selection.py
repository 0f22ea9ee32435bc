"""Which entries GraNet's updates keep, drop and grow, on hand-made tensors with the expected positions worked out
by hand in the comments."""

from __future__ import annotations

import torch

from sparsetune.patterns import NMPattern
from sparsetune.train.granet.selection import (
    bottom_entries,
    global_keep_counts,
    layer_update,
    nm_fill,
    prune_to,
    regenerate,
    regenerate_nm,
    top_entries,
)

# flat positions:      0     1    2    3     4    5    6     7
WEIGHT = torch.tensor([0.9, -0.1, 0.0, 0.4, -0.3, 0.0, 0.7, -0.05])
GRAD = torch.tensor([0.2, -0.6, 0.5, 0.0, 0.1, -0.8, 0.3, 0.9])
ACTIVE = WEIGHT != 0  # positions 0, 1, 3, 4, 6, 7


def positions(mask: torch.Tensor) -> list[int]:
    return mask.nonzero().squeeze(1).tolist()


def test_prune_keeps_the_largest_magnitudes():
    # active |w|: 0.9 (0), 0.1 (1), 0.4 (3), 0.3 (4), 0.7 (6), 0.05 (7): the top 4 are 0, 6, 3, 4
    assert positions(prune_to(WEIGHT.abs(), ACTIVE, 4)) == [0, 3, 4, 6]
    assert positions(prune_to(WEIGHT.abs(), ACTIVE, 9)) == [0, 1, 3, 4, 6, 7]  # never grows


def test_drop_and_grow():
    # drop 3 of 6 (ceil(0.5 * 6)): the lowest |w| are 0.05 (7), 0.1 (1), 0.3 (4) -> {0, 3, 6} stay;
    # grow 3 among the inactive {1, 2, 4, 5, 7} by |g|: 0.9 (7), 0.8 (5), 0.6 (1) -> {0, 1, 3, 5, 6, 7}.
    # 1 and 7 were dropped and grown back (they stay), so the update moved one entry: 4 out, 5 in.
    new = regenerate(WEIGHT.abs(), ACTIVE, GRAD.abs(), 3)
    assert positions(new) == [0, 1, 3, 5, 6, 7]
    change = layer_update(WEIGHT.abs(), ACTIVE, GRAD.abs(), None, 0.5, (2, 4))
    assert positions(change.active) == [0, 1, 3, 5, 6, 7]
    assert (change.pruned, change.dropped, change.grown) == (0, 1, 1)


def test_entries_without_a_gradient_never_grow():
    # drop 3: 7, 1, 4 (as above); only 5 (|g| 0.8) and 2 (0.5) of the inactive {1, 2, 4, 5, 7} have a gradient now;
    # the third slot goes back to the best dropped entry, 4 (|w| 0.3 beats 0.1 and 0.05): {0, 2, 3, 4, 5, 6}
    grad = torch.tensor([0.2, 0.0, 0.5, 0.0, 0.0, -0.8, 0.3, 0.0])
    assert positions(regenerate(WEIGHT.abs(), ACTIVE, grad.abs(), 3)) == [0, 2, 3, 4, 5, 6]
    # N:M: group 1 (4-7) dropped 5 and 7 and only 6 has a gradient: 6 grows, then dropped 7 stays before 4
    weight = torch.tensor([0.9, 0.0, 0.2, 0.0, 0.0, 0.5, 0.0, 0.6])
    grad = torch.tensor([0.0, 0.3, 0.1, 0.7, 0.0, 0.0, 0.2, 0.0])
    new = regenerate_nm(weight.abs(), weight != 0, grad.abs(), 3, NMPattern(2, 4), (1, 8))
    # drop 3 lowest |w|: 2 (0.2), 5 (0.5), 7 (0.6); group 0 keeps 0, grows 3 (0.7); group 1 grows 6, keeps 7 back
    assert positions(new) == [0, 3, 6, 7]


def test_prune_then_regenerate_in_one_update():
    # prune to 4: {0, 3, 4, 6}; regrow ceil(0.25 * 4) = 1: drop 4 (|w| 0.3), grow the largest |g| among
    # {1, 2, 4, 5, 7}: 7 (0.9) -> {0, 3, 6, 7}
    change = layer_update(WEIGHT.abs(), ACTIVE, GRAD.abs(), 4, 0.25, (2, 4))
    assert positions(change.active) == [0, 3, 6, 7]
    assert (change.pruned, change.dropped, change.grown) == (2, 1, 1)


def test_ties_go_to_the_lower_index():
    equal = torch.full((6,), 0.5)
    everything = torch.ones(6, dtype=torch.bool)
    assert positions(top_entries(equal, 2, everything)) == [0, 1]
    assert positions(bottom_entries(equal, 2, everything)) == [0, 1]
    assert positions(prune_to(equal, everything, 4)) == [0, 1, 2, 3]


def test_nm_fill_keeps_first_entries_then_the_largest_keys():
    first = torch.tensor([True, True, True, False, True, False, False, False])
    key = torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2, 0.4, 0.8, 0.0])
    # group 0 (0-3) has three first entries: the two largest keys 0.5 (1), 0.3 (2);
    # group 1 (4-7) has one: 4, then the largest key of the others, 0.8 (6)
    assert positions(nm_fill(first, key, NMPattern(2, 4), (1, 8))) == [1, 2, 4, 6]


def test_regeneration_keeps_n_of_m():
    weight = torch.tensor([0.9, 0.0, 0.2, 0.0, 0.0, 0.5, 0.0, 0.6])  # 2:4: {0, 2} and {5, 7}
    grad = torch.tensor([0.0, 0.3, 0.1, 0.7, 0.9, 0.0, 0.2, 0.1])
    # drop 2 (ceil(0.5 * 4)): |w| 0.2 (2) and 0.5 (5); refill each group to 2 by |g| among its inactive:
    # group 0 keeps 0 and takes 3 (0.7); group 1 keeps 7 and takes 4 (0.9)
    new = regenerate_nm(weight.abs(), weight != 0, grad.abs(), 2, NMPattern(2, 4), (1, 8))
    assert positions(new) == [0, 3, 4, 7]


def test_imposing_the_pattern_at_the_final_step():
    # unstructured start: group 0 holds 3 active (0.9, 0.4 and 0.1 at 0, 3, 1), group 1 holds 3 (0.3, 0.7, 0.05)
    # 2:4 keeps the two largest of each group: {0, 3} and {4, 6}; no regeneration (fraction 0)
    change = layer_update(WEIGHT.abs(), ACTIVE, GRAD.abs(), None, 0.0, (2, 4), NMPattern(2, 4), impose_pattern=True)
    assert positions(change.active) == [0, 3, 4, 6]
    assert (change.pruned, change.filled) == (2, 0)
    # a group holding fewer than N fills from the largest |g| of its inactive entries: group 0 holds only 0 and
    # takes 1 (|g| 0.6 beats 0.5 and 0.0); group 1 holds exactly 4 and 5
    sparse = torch.tensor([True, False, False, False, True, True, False, False])
    change = layer_update(WEIGHT.abs(), sparse, GRAD.abs(), None, 0.0, (2, 4), NMPattern(2, 4), impose_pattern=True)
    assert positions(change.active) == [0, 1, 4, 5]
    assert change.filled == 1


def test_global_threshold_counts():
    scores = {"a": torch.tensor([0.1, 0.5, 0.5, 0.9]), "b": torch.tensor([0.5, 0.2])}
    names = ["a", "b"]

    def counts(keep):
        return global_keep_counts(lambda n: scores[n], names, keep)

    # all six by score: 0.9 (a), 0.5 (a), 0.5 (a), 0.5 (b), 0.2 (b), 0.1 (a); ties at 0.5 fill in the order a, b
    assert counts(4) == {"a": 3, "b": 1}
    assert counts(2) == {"a": 2, "b": 0}
    assert counts(5) == {"a": 3, "b": 2}
    assert counts(6) == {"a": 4, "b": 2}
    assert counts(0) == {"a": 0, "b": 0}


def test_global_threshold_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(size, generator=g).round(decimals=2) for n, size in (("x", 300), ("y", 200), ("z", 50))}
    names = list(scores)
    for keep in (0, 1, 37, 275, 549, 550):
        got = global_keep_counts(lambda n: scores[n], names, keep)
        # brute force: rank every entry by (score descending, matrix order), keep the first `keep`
        ranked = sorted(
            ((-float(s), names.index(n)) for n in names for s in scores[n]),
        )[:keep]
        expected = {n: sum(1 for _, i in ranked if i == names.index(n)) for n in names}
        assert got == expected, keep
