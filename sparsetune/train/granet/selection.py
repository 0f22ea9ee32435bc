"""Which entries a GraNet update keeps, drops and grows: pure functions over flat tensors.

A mask is a flat bool tensor (True = active). Every choice is exact in count and deterministic: ties go to the
lower flat index (stable sorts), so every process and every resumed run chooses the same entries.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsetune.patterns import NMPattern
from sparsetune.train.granet.schedule import regrow_count


def top_entries(key: torch.Tensor, count: int, candidates: torch.Tensor) -> torch.Tensor:
    """The `count` candidates with the largest `key` (ties: the lower index), as a mask."""
    return _ranked(key, count, candidates, descending=True)


def bottom_entries(key: torch.Tensor, count: int, candidates: torch.Tensor) -> torch.Tensor:
    """The `count` candidates with the smallest `key` (ties: the lower index), as a mask."""
    return _ranked(key, count, candidates, descending=False)


def _ranked(key: torch.Tensor, count: int, candidates: torch.Tensor, descending: bool) -> torch.Tensor:
    chosen = torch.zeros_like(candidates)
    positions = candidates.nonzero().squeeze(1)
    if count <= 0 or positions.numel() == 0:
        return chosen
    order = torch.sort(key[positions], descending=descending, stable=True).indices
    chosen[positions[order[:count]]] = True
    return chosen


def prune_to(score: torch.Tensor, active: torch.Tensor, keep: int) -> torch.Tensor:
    """The mask that keeps the `keep` highest-scoring active entries (all of them when there are fewer)."""
    if keep >= int(active.sum()):
        return active.clone()
    return top_entries(score, keep, active)


def regenerate(score: torch.Tensor, active: torch.Tensor, grad_abs: torch.Tensor, count: int) -> torch.Tensor:
    """GraNet's zero-cost neuroregeneration: drop the `count` lowest-scoring active entries, then grow the `count`
    inactive entries (the just-dropped ones included, as in GraNet) with the largest |gradient|.

    An entry whose gradient is 0 never grows (it would stay at 0: no gradient would move it); when fewer than
    `count` entries have a gradient, the highest-scoring dropped entries stay instead, so the count is kept."""
    dropped = bottom_entries(score, count, active)
    after_drop = active & ~dropped
    grown = top_entries(grad_abs, count, ~after_drop & (grad_abs > 0))
    kept_back = top_entries(score, count - int(grown.sum()), dropped & ~grown)
    return after_drop | grown | kept_back


def nm_fill(first: torch.Tensor, key: torch.Tensor, pattern: NMPattern, shape: tuple[int, int]) -> torch.Tensor:
    """Exactly N entries in every group of M consecutive columns: the group's `first` entries rank above the
    others, and within each kind the larger `key` (ties: the lower index)."""
    rows, cols = shape
    groups = (rows, cols // pattern.m, pattern.m)
    by_key = torch.sort(key.float().view(groups), dim=2, descending=True, stable=True).indices
    first_sorted = torch.gather(first.view(groups).to(torch.uint8), 2, by_key)
    order = torch.gather(by_key, 2, torch.sort(first_sorted, dim=2, descending=True, stable=True).indices)
    mask = torch.zeros(groups, dtype=torch.bool, device=first.device)
    return mask.scatter_(2, order[..., : pattern.n], True).view(-1)


def regenerate_nm(
    score: torch.Tensor,
    active: torch.Tensor,
    grad_abs: torch.Tensor,
    count: int,
    pattern: NMPattern,
    shape: tuple[int, int],
) -> torch.Tensor:
    """Regeneration that keeps an N:M mask: drop the `count` lowest-scoring active entries, then refill every
    group to N with its inactive entries of the largest |gradient| (the just-dropped ones included; entries
    without a gradient last, the dropped ones among them first)."""
    dropped = bottom_entries(score, count, active)
    after_drop = active & ~dropped
    # refill order after the surviving entries: a gradient (largest first), then a dropped entry without one (it
    # keeps its value; highest score first, mapped into [-2, -1)), then any other entry without one (-3: it would
    # start at 0 and nothing would move it)
    score = score.float()
    back = -2.0 + 0.999 * score / (score.max() + 1e-30)
    key = torch.where(grad_abs > 0, grad_abs.float(), torch.where(dropped, back, -3.0))
    return nm_fill(after_drop, key, pattern, shape)


@dataclass
class LayerChange:
    """One matrix's mask after an update, and how many entries each phase removed or added."""

    active: torch.Tensor
    pruned: int = 0  # removed by pruning (and by imposing N:M)
    filled: int = 0  # added by imposing N:M on a group holding fewer than N
    dropped: int = 0  # removed by regeneration (an entry dropped and regrown in the same update is not counted)
    grown: int = 0  # added by regeneration


def layer_update(
    score: torch.Tensor,
    active: torch.Tensor,
    grad_abs: torch.Tensor | None,
    keep: int | None,
    regrow: float,
    shape: tuple[int, int],
    pattern: NMPattern | None = None,
    impose_pattern: bool = False,
    pattern_imposed: bool = False,
) -> LayerChange:
    """One matrix's GraNet update: prune to `keep` active entries (None: no pruning) or impose `pattern`
    (`impose_pattern`, with |gradient| choosing the entries that fill groups holding fewer than N), then regenerate
    ceil(`regrow` x the active count); under an imposed pattern (`pattern_imposed`) regeneration keeps it."""
    change = LayerChange(active)
    before = int(active.sum())
    if impose_pattern:
        assert pattern is not None
        fill_key = grad_abs if grad_abs is not None else torch.zeros_like(score)
        new = nm_fill(active, torch.where(active, score, fill_key.to(score.dtype)), pattern, shape)
        change.pruned = int((active & ~new).sum())
        change.filled = int((new & ~active).sum())
        active = new
    elif keep is not None:
        active = prune_to(score, active, keep)
        change.pruned = before - int(active.sum())
    count = regrow_count(int(active.sum()), regrow)
    if count > 0:
        if grad_abs is None:
            raise ValueError("regeneration needs the gradient")
        if pattern_imposed or impose_pattern:
            assert pattern is not None
            new = regenerate_nm(score, active, grad_abs, count, pattern, shape)
        else:
            new = regenerate(score, active, grad_abs, count)
        change.dropped = int((active & ~new).sum())
        change.grown = int((new & ~active).sum())
        active = new
    change.active = active
    return change


def _float_of(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def global_keep_counts(active_scores: Callable[[str], torch.Tensor], names: list[str], keep: int) -> dict[str, int]:
    """Per matrix, how many of its active entries one global threshold keeps, `keep` in all: every entry scoring
    above the threshold, and of those scoring exactly at it as many as needed, in the order of `names`.

    `active_scores(name)` gives a matrix's active entries' scores (float32, >= 0), computed again on each call so
    no model-sized copy exists. The threshold is found by bisection over float32 bit patterns (which order as their
    values for non-negative floats): the smallest threshold above which at most `keep` entries score."""

    def above(threshold: float) -> int:
        return sum(int((active_scores(n) > threshold).sum()) for n in names)

    low, high = 0, 0x7F800000  # +0.0 .. +inf
    if above(0.0) <= keep:
        high = 0
    while low < high:
        mid = (low + high) // 2
        if above(_float_of(mid)) <= keep:
            high = mid
        else:
            low = mid + 1
    threshold = _float_of(high)
    counts: dict[str, int] = {}
    ties_left = keep - above(threshold)
    for name in names:
        scores = active_scores(name)
        ties = min(ties_left, int((scores == threshold).sum()))
        counts[name] = int((scores > threshold).sum()) + ties
        ties_left -= ties
    return counts
