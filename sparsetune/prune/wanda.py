"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row (or each N:M group).

The statistic is the per-input-column sum of squared activations over all calibration tokens. The reference
keeps a running mean over samples; a constant factor does not change any per-row ranking, so the plain sum is
kept (it also all-reduces exactly across processes).
"""

from __future__ import annotations

import torch

from sparsetune.masks import NMPattern, nm_mask, row_mask

NEEDS_CALIBRATION = True


def init_stats(in_features: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(in_features, dtype=torch.float32, device=device)


def accumulate(stats: torch.Tensor, x: torch.Tensor) -> None:
    """stats (in,) += sum over tokens of x**2, for x of shape (..., in)."""
    x = x.reshape(-1, x.shape[-1]).float()
    stats.add_(x.pow(2).sum(dim=0))


def scores(weight: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return weight.float().abs() * stats.sqrt().unsqueeze(0)  # (out, in)


def prune_group(
    weights: list[torch.Tensor],
    stats: torch.Tensor,
    target: float | NMPattern,
    exact_total: bool = False,
    **_: object,
) -> list[torch.Tensor]:
    """Return each weight (fp32) with its lowest-scoring entries zeroed (per row, or per N:M group).

    `exact_total` prunes exactly round(numel * sparsity) per matrix (rows differ by at most one), which
    non-uniform per-block sparsities (OWL) need to hit the global target.
    """
    pruned = []
    for w in weights:
        s = scores(w, stats)
        mask = nm_mask(s, target) if isinstance(target, NMPattern) else row_mask(s, target, exact_total)
        pruned.append(w.float().masked_fill(~mask, 0.0))  # +0.0, never -0.0: sparse formats store no sign
    return pruned
