"""OWL (Yin et al. 2024): outlier-weighted layer-wise sparsity.

Blocks whose Wanda scores hold more outliers (scores above `m` x the block mean) keep more weights. The
outlier ratios D_l are min-max scaled to [0, 2*lambda], then shifted so the parameter-weighted mean density
is exactly 1 - S; a block's sparsity is 1 - its density.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern


def outlier_ratio(block_scores: Sequence[torch.Tensor], m: float) -> float:
    """Percentage of a block's Wanda scores above m x their mean (all its Linears taken together)."""
    flat = torch.cat([s.reshape(-1) for s in block_scores])
    return float((flat > m * flat.mean()).float().mean()) * 100.0


def block_sparsities(ratios: Sequence[float], sizes: Sequence[int], target: float, lam: float) -> list[float]:
    """Per-block sparsities whose size-weighted mean is exactly `target`, spread by 2*lam by outlier ratio."""
    d = torch.tensor(ratios, dtype=torch.float64)
    w = torch.tensor(sizes, dtype=torch.float64)
    span = float(d.max() - d.min())
    scaled = (d - d.min()) / span * (2 * lam) if span > 0 else torch.zeros_like(d)
    density = scaled - float((scaled * w).sum() / w.sum()) + (1.0 - target)
    if float(density.min()) <= 0.0 or float(density.max()) > 1.0:
        raise SparsetuneError(
            f"OWL with lambda={lam} at sparsity {target} gives a block density outside (0, 1]; lower --owl-lambda"
        )
    return [1.0 - float(x) for x in density]


def block_patterns(sparsities: Sequence[float], pattern: NMPattern) -> list[NMPattern]:
    """Mixed N:M for OWL: per-block N = M x density, rounded so the mean N stays the target's N."""
    want = [pattern.m * (1.0 - s) for s in sparsities]
    base = [min(pattern.m - 1, max(1, int(x))) for x in want]
    missing = round(pattern.n * len(want)) - sum(base)
    order = sorted(range(len(want)), key=lambda i: want[i] - base[i], reverse=missing > 0)
    for i in order[: abs(missing)]:
        base[i] = min(pattern.m - 1, max(1, base[i] + (1 if missing > 0 else -1)))
    if sum(base) != pattern.n * len(want):
        raise SparsetuneError(f"OWL cannot keep the mean of {pattern} with per-block N in [1, {pattern.m - 1}]")
    return [NMPattern(n, pattern.m) for n in base]
