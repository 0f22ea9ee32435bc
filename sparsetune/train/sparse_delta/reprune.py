"""The sensitivity re-prune: keep every module's non-zero count (and every N:M group's) at the input's.

After a reselection a module's non-zeros are its base non-zeros (input non-zeros not re-pruned) plus its
reactivated entries (entries on positions the base reads as 0). Per group (the whole matrix when unstructured,
every M consecutive input columns of a row under N:M):
- above the input's count: re-prune the excess among base non-zeros that carry no entry, lowest sensitivity
  first;
- below it (reactivated entries were dropped back to 0): restore the re-pruned weights without an entry, highest
  sensitivity first. A restored weight takes back its input value exactly, since the base is never changed.

Sensitivity is the empirical-Fisher saliency theta^2 * E[g^2] (the loss change OBD/Fisher pruning predicts for
removing theta; for one batch it ranks as |theta * g|). E[g^2] comes from the window with no extra pass: exact
at the growth candidates, elsewhere the rank-1 estimate row_i * col_j / total of the window's summed g^2 (the
independence estimate of a non-negative matrix from its marginals; it keeps per-row and per-column gradient
scale, which a per-module constant or plain |theta| would not). A zero estimate falls back to |theta|.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsetune.patterns import NMPattern

TIE_BREAK = 1e-30  # makes theta^2 decide where the gradient estimate is 0


def sensitivity(theta: torch.Tensor, g2_estimate: torch.Tensor) -> torch.Tensor:
    """theta^2 * (E[g^2] + tiny): higher = removing it costs more."""
    t2 = theta.float().square()
    return t2 * (g2_estimate + TIE_BREAK)


@dataclass
class RepruneResult:
    repruned: torch.Tensor  # new flat positions re-pruned now (int64)
    restored: torch.Tensor  # flat positions given back their input value (int64)


def _pick_per_group(keys: torch.Tensor, counts: torch.Tensor, largest: bool) -> torch.Tensor:
    """Flat positions of the `counts[g]` smallest (or largest) keys of each row g of `keys` (groups, size);
    positions whose key is +/-inf (not eligible) are never picked (the caller guarantees enough eligible)."""
    groups, size = keys.shape
    need = int(counts.max()) if counts.numel() else 0
    if need <= 0:
        return torch.zeros(0, dtype=torch.int64, device=keys.device)
    if groups == 1:
        top = torch.topk(keys[0], need, largest=largest).indices
        return top[: int(counts[0])]
    order = torch.sort(keys, dim=1, descending=largest, stable=True).indices[:, :need]
    chosen = torch.arange(need, device=keys.device)[None, :] < counts[:, None]
    return (order + torch.arange(groups, device=keys.device)[:, None] * size)[chosen]


def reprune(
    input_nonzero: torch.Tensor,
    repruned: torch.Tensor,
    entries: torch.Tensor,
    scores: torch.Tensor,
    pattern: NMPattern | None,
) -> RepruneResult:
    """Positions to re-prune and to restore so every group's non-zeros equal the input's.

    Args:
        input_nonzero: bool (out, in), the input model's non-zeros.
        repruned: int64 flat positions re-pruned so far.
        entries: flat positions of the entries (any int dtype).
        scores: (out, in) sensitivity, higher = keep.
        pattern: N:M groups along the input dim, or None for one group per matrix.
    """
    rows, cols = input_nonzero.shape
    size = pattern.m if pattern is not None else rows * cols
    was_repruned = torch.zeros(rows * cols, dtype=torch.bool, device=input_nonzero.device)
    was_repruned[repruned] = True
    has_entry = torch.zeros_like(was_repruned)
    has_entry[entries.long()] = True
    base_nonzero = input_nonzero.reshape(-1) & ~was_repruned
    support = base_nonzero | has_entry
    excess = (support.view(-1, size).sum(1) - input_nonzero.reshape(-1, size).sum(1)).long()  # per group

    flat_scores = scores.reshape(-1).float()
    removable = base_nonzero & ~has_entry
    remove_keys = torch.where(removable, flat_scores, math.inf).view(-1, size)
    removed = _pick_per_group(remove_keys, excess.clamp(min=0), largest=False)
    restorable = was_repruned & ~has_entry
    restore_keys = torch.where(restorable, flat_scores, -math.inf).view(-1, size)
    restored = _pick_per_group(restore_keys, (-excess).clamp(min=0), largest=True)
    return RepruneResult(repruned=removed, restored=restored)


def apply_reprune(repruned: torch.Tensor, result: RepruneResult) -> torch.Tensor:
    """The new sorted re-pruned set: old minus restored plus newly re-pruned."""
    kept = repruned[~torch.isin(repruned, result.restored)]
    return torch.sort(torch.cat([kept, result.repruned])).values


def support_counts(
    input_nonzero: torch.Tensor, repruned: torch.Tensor, entries: torch.Tensor, pattern: NMPattern | None
) -> torch.Tensor:
    """Non-zeros per group (one value when unstructured): base non-zeros plus positions carrying an entry."""
    rows, cols = input_nonzero.shape
    size = pattern.m if pattern is not None else rows * cols
    return support_mask(input_nonzero, repruned, entries).view(-1, size).sum(1)


def support_mask(input_nonzero: torch.Tensor, repruned: torch.Tensor, entries: torch.Tensor) -> torch.Tensor:
    """Flat bool mask of a module's support: input non-zeros not re-pruned, plus every position carrying an entry."""
    support = input_nonzero.reshape(-1).clone()
    support[repruned] = False
    support[entries.long()] = True
    return support
