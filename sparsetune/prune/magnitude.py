"""Magnitude pruning: score |W|. No calibration data.

Unstructured uses one threshold per whole matrix, as the Wanda reference repo does for its magnitude baseline.
"""

from __future__ import annotations

import torch

from sparsetune.masks import NMPattern, matrix_mask, nm_mask

NEEDS_CALIBRATION = False


def init_stats(in_features: int, device: torch.device) -> None:
    return None


def accumulate(stats: None, x: torch.Tensor) -> None:
    return None


def prune_group(weights: list[torch.Tensor], stats: None, target: float | NMPattern, **_: object) -> list[torch.Tensor]:
    """Return each weight (fp32) with its lowest-|W| entries zeroed."""
    pruned = []
    for w in weights:
        w = w.float()
        scores = w.abs()
        mask = nm_mask(scores, target) if isinstance(target, NMPattern) else matrix_mask(scores, target)
        pruned.append(w.masked_fill(~mask, 0.0))  # +0.0, never -0.0: sparse formats store no sign
    return pruned
