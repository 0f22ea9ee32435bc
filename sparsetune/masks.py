"""Mask operations over weight tensors: unstructured (per row or per matrix) and N:M, plus sparsity stats.

Conventions: a mask is a bool tensor, True = keep. N:M means N kept in every group of M consecutive input
columns (dim 1 of a Linear weight of shape [out, in]); 2:4 is the Ampere/Hopper sparse tensor core pattern.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsetune.errors import SparsetuneError

# Defined torch-free in patterns (the settings schemas import them); re-exported here for the kernels.
from sparsetune.patterns import NMPattern, check_sparsity, parse_pattern  # noqa: F401


def prune_count(n: int, sparsity: float) -> int:
    """How many of n entries to prune. The small epsilon keeps 0.7 * 10 == 7 despite float error."""
    return int(n * sparsity + 1e-9)


def row_mask(scores: torch.Tensor, sparsity: float, exact_total: bool = False) -> torch.Tensor:
    """Keep all but the `prune_count(cols)` lowest scores of every row (Wanda's per-output comparison).

    With `exact_total`, the matrix loses exactly round(rows * cols * sparsity) entries: every row prunes
    floor(that / rows), and the rows whose next-lowest score is smallest prune one more.
    """
    rows, cols = scores.shape
    if not exact_total:
        k, extra = prune_count(cols, sparsity), 0
    else:
        total = round(rows * cols * sparsity)
        k, extra = divmod(total, rows)
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k + (extra > 0) == 0:
        return mask
    low = torch.topk(scores, k + (extra > 0), dim=1, largest=False)  # ascending per row
    mask.scatter_(1, low.indices[:, :k], False)
    if extra:
        rows_plus_one = torch.topk(low.values[:, k], extra, largest=False).indices
        mask[rows_plus_one, low.indices[rows_plus_one, k]] = False
    return mask


def matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the `prune_count(numel)` lowest scores of the whole tensor (one threshold per matrix)."""
    k = prune_count(scores.numel(), sparsity)
    mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if k > 0:
        idx = torch.topk(scores.reshape(-1), k, largest=False).indices
        mask[idx] = False
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Keep the N highest scores in every group of M consecutive columns of every row."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise SparsetuneError(f"{cols} columns are not divisible by M={pattern.m}")
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)  # (rows, groups, M)
    keep = torch.topk(groups, pattern.n, dim=2).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, keep, True)
    return mask.view(rows, cols)


def nm_violations(weight: torch.Tensor, pattern: NMPattern) -> int:
    """Number of M-groups holding more than N non-zeros."""
    rows, cols = weight.shape
    if cols % pattern.m:
        return rows * -(-cols // pattern.m)
    nonzero = (weight != 0).reshape(rows, cols // pattern.m, pattern.m).sum(dim=2)
    return int((nonzero > pattern.n).sum())


def zero_count(weight: torch.Tensor) -> int:
    """Entries equal to zero (-0.0 included). Not `(w == 0).sum()`: summing a bool tensor makes an int64 copy of
    it, 8 bytes per weight (1.2 GB for a 150M-entry embedding table)."""
    return weight.numel() - int(torch.count_nonzero(weight))


def tensor_sparsity(weight: torch.Tensor) -> float:
    return zero_count(weight) / max(1, weight.numel())


def sparsity_stats(modules: dict[str, nn.Module | torch.Tensor]) -> dict[str, object]:
    """Per-module and parameter-weighted global sparsity of the given modules' weights (or weight tensors)."""
    per_module = {}
    zeros = total = 0
    for name, mod in modules.items():
        w = (mod if isinstance(mod, torch.Tensor) else mod.weight).detach()
        z = zero_count(w)
        per_module[name] = {"shape": list(w.shape), "zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
        zeros += z
        total += w.numel()
    return {"global_sparsity": zeros / max(1, total), "zeros": zeros, "numel": total, "modules": per_module}
