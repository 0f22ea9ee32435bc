"""Sensitivity re-prune: exact counts per matrix and per N:M group, lowest sensitivity removed, restores."""

from __future__ import annotations

import torch

from sparsetune.patterns import NMPattern
from sparsetune.train.sparse_delta.reprune import apply_reprune, reprune, sensitivity, support_counts


def _brute_force(input_nz, repruned, entries, scores, size):
    """Per group, in plain Python: remove the lowest-score removable weights or restore the highest."""
    nz, sc = input_nz.reshape(-1).tolist(), scores.reshape(-1).tolist()
    rep, ent = set(repruned.tolist()), set(entries.tolist())
    removed, restored = set(), set()
    for start in range(0, len(nz), size):
        group = range(start, start + size)
        support = sum(1 for p in group if (nz[p] and p not in rep) or p in ent)
        excess = support - sum(nz[p] for p in group)
        if excess > 0:
            pool = sorted((sc[p], p) for p in group if nz[p] and p not in rep and p not in ent)
            removed |= {p for _, p in pool[:excess]}
        elif excess < 0:
            pool = sorted((-sc[p], p) for p in group if p in rep and p not in ent)
            restored |= {p for _, p in pool[:-excess]}
    return removed, restored


def _case(seed, rows, cols, pattern):
    g = torch.Generator().manual_seed(seed)
    if pattern is None:
        input_nz = torch.rand(rows, cols, generator=g) > 0.5
    else:
        keep = torch.rand(rows, cols // pattern.m, pattern.m, generator=g).argsort(dim=2)[..., : pattern.n]
        input_nz = torch.zeros(rows, cols // pattern.m, pattern.m, dtype=torch.bool)
        input_nz.scatter_(2, keep, True)
        input_nz = input_nz.view(rows, cols)
    flat_nz = input_nz.view(-1).nonzero().squeeze(1)
    flat_zero = (~input_nz).view(-1).nonzero().squeeze(1)
    repruned = flat_nz[torch.randperm(flat_nz.numel(), generator=g)[:3]].sort().values
    # entries: some on non-zeros, some reactivating zeros, one on a re-pruned position
    on_nz = flat_nz[torch.randperm(flat_nz.numel(), generator=g)[:6]]
    on_zero = flat_zero[torch.randperm(flat_zero.numel(), generator=g)[:5]]
    entries = torch.unique(torch.cat([on_nz, on_zero, repruned[:1]])).to(torch.int32)
    scores = torch.rand(rows, cols, generator=g)
    return input_nz, repruned, entries, scores


def test_matches_brute_force_and_keeps_counts_exact():
    checked = {None: 0, "2:4": 0}
    for seed in range(12):
        for pattern in (None, NMPattern(2, 4)):
            if pattern is not None:
                input_nz, repruned, entries, scores = _case(seed, 4, 8, pattern)
            else:
                input_nz, repruned, entries, scores = _case(seed, 6, 10, None)
            if pattern is not None:  # the selection never puts more entries in a group than its N non-zeros
                per_group: dict[int, int] = {}
                kept = []
                for p in entries.tolist():
                    if per_group.get(p // 4, 0) < 2:
                        kept.append(p)
                        per_group[p // 4] = per_group.get(p // 4, 0) + 1
                entries = torch.tensor(kept, dtype=torch.int32)
            size = pattern.m if pattern else input_nz.numel()
            result = reprune(input_nz, repruned, entries, scores, pattern)
            want_removed, want_restored = _brute_force(input_nz, repruned, entries, scores, size)
            assert set(result.repruned.tolist()) == want_removed
            assert set(result.restored.tolist()) == want_restored
            new = apply_reprune(repruned, result)
            counts = support_counts(input_nz, new, entries, pattern)
            assert torch.equal(counts, input_nz.reshape(-1, size).sum(1))
            assert not torch.isin(new, entries.long()[~torch.isin(entries.long(), repruned)]).any()
            checked[str(pattern) if pattern else None] += 1
    assert checked[None] == 12 and checked["2:4"] == 12, checked


def test_restore_when_reactivations_were_dropped():
    input_nz = torch.tensor([[True, True, False, False]])
    repruned = torch.tensor([0, 1])  # two re-pruned for two reactivations that have since been dropped
    entries = torch.tensor([2], dtype=torch.int32)  # one reactivation left
    scores = torch.tensor([[5.0, 7.0, 0.0, 0.0]])
    result = reprune(input_nz, repruned, entries, scores, None)
    assert result.restored.tolist() == [1] and result.repruned.numel() == 0
    assert apply_reprune(repruned, result).tolist() == [0]


def test_sensitivity_is_fisher_saliency_with_magnitude_tiebreak():
    theta = torch.tensor([1.0, -2.0, 0.5, 3.0])
    g2 = torch.tensor([4.0, 1.0, 0.0, 0.0])
    s = sensitivity(theta, g2)
    assert s[:2].tolist() == [4.0, 4.0]  # theta^2 * E[g^2]
    assert s[3] > s[2] > 0  # no gradient estimate: |theta| decides
