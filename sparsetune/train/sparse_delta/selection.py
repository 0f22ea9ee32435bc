"""When and how entries move: the reselection schedule, the window statistics and the drop/grow kernel.

Schedule (steps count completed optimizer steps, 1-based): a reselection follows step s when s is a multiple of
`reselect_every` and s < total steps; its window is the `select_window` steps s - window + 1 .. s. On the window's
first backward each module takes its top-k positions by |dense gradient| as growth candidates (under N:M at most
N per group of M, so a full replacement can take them all); over the window it
sums g and g^2 for those candidates only. With reactivation on it also sums the rows and columns of g^2 (out + in
floats), from which the re-prune scores weights that are not candidates; with it off (`eligible` given) candidates
come only from the allowed positions and nothing is re-pruned, so those sums are not kept.

With gradient accumulation every micro-batch backward adds to the sums: sum g over a window is the sum of the
step gradients (when the loop scales each micro-batch loss by 1/accum), sum g^2 is over micro-batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparsetune.masks import nm_mask
from sparsetune.patterns import NMPattern


def reselection_due(step: int, every: int, total: int) -> bool:
    """True when a reselection follows optimizer step `step` (never after the last step: its grown entries
    could not train)."""
    return step % every == 0 and 0 < step < total


def in_window(step: int, every: int, window: int, total: int) -> bool:
    """True when optimizer step `step` (1-based, the one about to run) belongs to a selection window."""
    end = -(-step // every) * every  # the next multiple of `every` at or after `step`
    return end - window < step <= end and reselection_due(end, every, total)


def replace_fraction_at(step: int, every: int, total: int, fraction: float, schedule: str) -> float:
    """The fraction of entries replaced by the reselection after `step`: all at the first (the random start is
    replaced outright), then `fraction` decayed to 0 at `total` (linear or cosine)."""
    if step == every:
        return 1.0
    progress = step / total
    if schedule == "cosine":
        return fraction * 0.5 * (1 + math.cos(math.pi * progress))
    return fraction * (1 - progress)


class WindowStats:
    """Growth statistics of one module over one window (the observer a DeltaLinear calls in backward)."""

    def __init__(
        self,
        k: int,
        shape: tuple[int, int],
        device: torch.device,
        pattern: NMPattern | None = None,
        eligible: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        self.k, self.pattern = k, pattern
        # When given (reactivation off): bool (out, in) of the positions a candidate may take, asked for once per window
        self.eligible = eligible
        self.candidates: torch.Tensor | None = None  # flat positions, int64
        self.sum_g = torch.zeros(k, device=device)
        self.sum_g2 = torch.zeros(k, device=device)
        # the re-prune's statistics: only a run that may reactivate re-prunes
        self.row_g2 = torch.zeros(shape[0], device=device) if eligible is None else None
        self.col_g2 = torch.zeros(shape[1], device=device) if eligible is None else None
        self.backwards = 0
        self.reduce: Callable[[torch.Tensor], None] | None = None  # multi-process: mean all-reduce, in place

    def __call__(self, dense: torch.Tensor) -> None:
        g = dense.float()
        if self.reduce is not None:
            # Multi-process: the statistics are those of the global (mean) gradient, so every rank picks the same
            # candidates, the same growth and the same re-prune, and a run on N processes chooses as one process
            # does. This all-reduces one module's dense gradient per window backward (what DDP does every step), and
            # only during the window steps.
            g = g.clone() if g is dense else g
            self.reduce(g)
        flat = g.view(-1)
        if self.candidates is None:
            scored = flat.abs()
            if self.eligible is not None:
                scored = scored.masked_fill(~self.eligible().reshape(-1), -1)
            if self.pattern is not None:  # at most N candidates per group, so a full replacement fits N:M
                scored = scored.view(g.shape).masked_fill(~nm_mask(scored.view(g.shape), self.pattern), -1).view(-1)
            self.candidates = torch.topk(scored, self.k, sorted=False).indices
        picked = flat.index_select(0, self.candidates)
        self.sum_g.add_(picked)
        self.sum_g2.addcmul_(picked, picked)
        if self.row_g2 is not None and self.col_g2 is not None:
            squared = g.square()
            self.row_g2.add_(squared.sum(dim=1))
            self.col_g2.add_(squared.sum(dim=0))
        self.backwards += 1

    def state_dict(self) -> dict[str, object]:
        names = ("candidates", "sum_g", "sum_g2", "row_g2", "col_g2", "backwards")
        return {name: getattr(self, name) for name in names}

    def load_state_dict(self, state: dict[str, object]) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def nbytes(self) -> int:
        tensors = [self.sum_g, self.sum_g2, self.row_g2, self.col_g2, self.candidates]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def mean_g2_estimate(self, shape: tuple[int, int]) -> torch.Tensor:
        """Dense (out, in) estimate of sum g^2 over the window: exact at the candidates, elsewhere the rank-1
        (independence) estimate row_i * col_j / total from the row and column sums (kept when reactivation is on)."""
        assert self.row_g2 is not None and self.col_g2 is not None, "no row/column sums: this window does not re-prune"
        total = self.row_g2.sum()
        est = torch.outer(self.row_g2, self.col_g2) / total if total > 0 else torch.zeros(shape, device=total.device)
        if self.candidates is not None:
            est.view(-1).index_copy_(0, self.candidates, self.sum_g2)
        return est


def within_capacity(groups: torch.Tensor, capacity: torch.Tensor) -> torch.Tensor:
    """Bool per item (given in priority order): accepted by a greedy pass that takes an item while its group has
    room. Equivalent vectorised form: an item is accepted when fewer than capacity[group] items of its group
    come before it."""
    if groups.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=groups.device)
    order = torch.sort(groups, stable=True).indices  # by group, priority order kept inside each group
    sorted_groups = groups[order]
    first = torch.searchsorted(sorted_groups, sorted_groups, right=False)
    rank_in_group = torch.arange(groups.numel(), device=groups.device) - first
    accepted = torch.empty_like(groups, dtype=torch.bool)
    accepted[order] = rank_in_group < capacity[sorted_groups]
    return accepted


@dataclass
class Reselection:
    """One module's reselection: slots whose entry moves to `positions`, seeded from the window's sums.
    `observed` is the number of window steps a grown entry's statistics cover (0: no statistics)."""

    slots: torch.Tensor  # int64, entry slots that change
    positions: torch.Tensor  # int64, their new flat positions
    sum_g: torch.Tensor  # float32 per slot
    sum_g2: torch.Tensor
    observed: torch.Tensor  # int32 per slot: window steps behind sum_g / sum_g2
    dropped: int


def reselect(
    positions: torch.Tensor,
    delta: torch.Tensor,
    stats: WindowStats,
    n_replace: int,
    window_steps: int,
    pattern: NMPattern | None = None,
    group_capacity: torch.Tensor | None = None,
    shape: tuple[int, int] | None = None,
    fill_scores: torch.Tensor | None = None,
) -> Reselection:
    """Drop the `n_replace` entries with the smallest |delta|; grow as many candidates with the largest |sum g|
    that are not surviving entries.

    Under N:M (`pattern`, `group_capacity` = the input's non-zeros per group of M columns, `shape`) no group may
    hold more entries than its capacity, since every entry is a non-zero of the result. When the candidates
    cannot fill every dropped slot, the dropped entries with the largest |delta| stay (most kept first), and any
    slot still open takes the free position with the largest `fill_scores` (e.g. |base|), with fresh state.
    """
    positions = positions.long()
    k = positions.numel()
    n_replace = min(n_replace, k)
    by_size = torch.sort(delta.detach().abs(), stable=True).indices  # ascending |delta|
    drop = by_size[:n_replace]
    survive = torch.ones(k, dtype=torch.bool, device=positions.device)
    survive[drop] = False
    surviving = positions[survive]

    cand = stats.candidates if stats.candidates is not None else positions.new_zeros(0)
    eligible = ~torch.isin(cand, surviving)
    cand, sum_g, sum_g2 = cand[eligible], stats.sum_g[eligible], stats.sum_g2[eligible]
    order = torch.sort(sum_g.abs(), descending=True, stable=True).indices
    cand, sum_g, sum_g2 = cand[order], sum_g[order], sum_g2[order]

    if pattern is None:
        grow = cand[:n_replace]
        grow_g, grow_g2 = sum_g[:n_replace], sum_g2[:n_replace]
        undrop = drop.new_zeros(0)
        fill = positions.new_zeros(0)
    else:
        assert group_capacity is not None and shape is not None
        cols = shape[1]

        def group_of(p: torch.Tensor) -> torch.Tensor:
            return (p // cols) * (cols // pattern.m) + (p % cols) // pattern.m

        room = group_capacity.clone()
        room.index_add_(0, group_of(surviving), torch.full_like(surviving, -1))
        take = within_capacity(group_of(cand), room).nonzero().squeeze(1)[:n_replace]
        grow, grow_g, grow_g2 = cand[take], sum_g[take], sum_g2[take]
        room.index_add_(0, group_of(grow), torch.full_like(grow, -1))
        # not enough candidates fit: keep the dropped entries with the largest |delta|, while their group has room
        short = n_replace - grow.numel()
        largest_dropped = drop.flip(0)
        largest_dropped = largest_dropped[~torch.isin(positions[largest_dropped], grow)]  # not grown again
        keep = within_capacity(group_of(positions[largest_dropped]), room).nonzero().squeeze(1)[:short]
        undrop = largest_dropped[keep]
        room.index_add_(0, group_of(positions[undrop]), torch.full_like(undrop, -1))
        short -= undrop.numel()
        fill = positions.new_zeros(0)
        if short > 0:
            assert fill_scores is not None
            occupied = torch.cat([surviving, grow, positions[undrop]])
            scores = fill_scores.reshape(-1).clone().float()
            scores[occupied] = -math.inf
            free = torch.sort(scores, descending=True, stable=True).indices
            free = free[scores[free] > -math.inf]
            fill = free[within_capacity(group_of(free), room).nonzero().squeeze(1)[:short]]

    kept_back = torch.isin(drop, undrop)
    slots = drop[~kept_back][: grow.numel() + fill.numel()]
    new_positions = torch.cat([grow, fill])
    zeros = torch.zeros(fill.numel(), device=delta.device)
    observed = torch.cat(
        [
            torch.full((grow.numel(),), window_steps, dtype=torch.int32, device=delta.device),
            torch.zeros(fill.numel(), dtype=torch.int32, device=delta.device),
        ]
    )
    return Reselection(
        slots=slots,
        positions=new_positions,
        sum_g=torch.cat([grow_g, zeros]),
        sum_g2=torch.cat([grow_g2, zeros]),
        observed=observed,
        dropped=int(slots.numel()),
    )
