"""SparseGPT (Frantar & Alistarh 2023): mask selection plus an OBS weight update from the input Hessian.

Linears that read the same input (q/k/v, gate/up) share one Hessian, so they are solved together: their rows are
stacked into one matrix (one Cholesky, one column loop), while the unstructured mask is still chosen per matrix,
as the reference does for each Linear on its own.
"""

from __future__ import annotations

import logging

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern

log = logging.getLogger(__name__)

NEEDS_CALIBRATION = True
MAX_DAMP_RETRIES = 6


def init_stats(in_features: int, device: torch.device) -> torch.Tensor:
    return torch.zeros(in_features, in_features, dtype=torch.float32, device=device)


def accumulate(hessian: torch.Tensor, x: torch.Tensor) -> None:
    """hessian (in, in) += X^T X over all tokens. The reference's 2/n scale cancels out of the solve."""
    x = x.reshape(-1, x.shape[-1]).float()
    hessian.addmm_(x.t(), x)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp*I)^-1. A failed Cholesky raises the dampening x10 and retries."""
    damp = percdamp * torch.mean(torch.diag(hessian))
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    for attempt in range(MAX_DAMP_RETRIES):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return upper
        log.warning(
            "SparseGPT: Hessian not positive definite at dampening %.3g (attempt %d); retrying with x10",
            float(damp),
            attempt + 1,
        )
        damp = damp * 10
    raise SparsetuneError(
        "SparseGPT: the Hessian stayed singular after raising the dampening "
        f"{MAX_DAMP_RETRIES} times; use more calibration samples or a larger --percdamp"
    )


def prune_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    target: float | NMPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    **_: object,
) -> list[torch.Tensor]:
    """Prune every weight of a group that shares `hessian`; returns the updated fp32 weights."""
    rows = [w.shape[0] for w in weights]
    W = torch.cat([w.float() for w in weights], dim=0)  # (sum rows, cols)
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = inverse_hessian_factor(H, percdamp)
    W = solve(W, Hinv, target, blocksize, segments=rows)
    return list(torch.split(W, rows, dim=0))


def lowest_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly the k smallest entries of a 1-D tensor (kthvalue is much faster than topk)."""
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k <= 0:
        return mask
    if k >= flat.numel():
        return ~mask
    threshold = torch.kthvalue(flat, k).values
    mask = flat < threshold
    missing = k - int(mask.sum())
    if missing > 0:  # ties at the threshold: take the first ones
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask


def _block_mask(
    scores: torch.Tensor, sparsity: float, segments: list[int], col_start: int, col_end: int
) -> torch.Tensor:
    """Prune the lowest `sparsity` fraction of each segment's (rows x block) scores (adaptive mask selection).

    Counts are cumulative over the blocks (round(s * rows * cols_so_far) minus what earlier blocks pruned), so
    each matrix ends with exactly round(s * numel) zeros.
    """
    mask = torch.zeros_like(scores, dtype=torch.bool)  # True = prune
    start = 0
    for n_rows in segments:
        k = round(sparsity * n_rows * col_end) - round(sparsity * n_rows * col_start)
        seg = scores[start : start + n_rows]
        mask[start : start + n_rows] = lowest_k(seg.reshape(-1), k).view_as(seg)
        start += n_rows
    return mask


def solve(
    W: torch.Tensor, Hinv: torch.Tensor, target: float | NMPattern, blocksize: int, segments: list[int]
) -> torch.Tensor:
    """Column-by-column OBS pruning of W (rows, cols) in blocks of `blocksize` columns, in place.

    The OBS step for column i is W[:, i:] -= err (outer) Hinv[i, i:] with err = (w - q) / Hinv[i, i], where q
    is w with its pruned rows zeroed. Since Hinv[i, i] = d, that step also turns column i itself into q
    (kept rows have err = 0 and stay untouched); pruned entries are set to exact zeros at the end of a block.
    """
    cols = W.shape[1]
    nm = target if isinstance(target, NMPattern) else None
    if nm is not None and blocksize % nm.m:
        blocksize = max(nm.m, blocksize - blocksize % nm.m)  # N:M groups must not straddle blocks
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # Work on the transposed block (b, rows) so that every column step touches contiguous memory.
        W1 = W[:, i1:i2].t().contiguous()  # (b, rows)
        Err1 = torch.empty_like(W1)  # (b, rows)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # (b,)
        if nm is None:
            prune = _block_mask(W1.t().pow(2) / d.pow(2).unsqueeze(0), float(target), segments, i1, i2).t()
        else:
            prune = torch.zeros_like(W1, dtype=torch.bool)
        prune = prune.contiguous()  # (b, rows)
        scale = prune.to(W1.dtype) / d.unsqueeze(1)  # (b, rows): 1/d where pruned, else 0
        for i in range(i2 - i1):
            if nm is not None and i % nm.m == 0:
                group = W1[i : i + nm.m].pow(2) / d[i : i + nm.m].pow(2).unsqueeze(1)  # (M, rows)
                drop = torch.topk(group, nm.m - nm.n, dim=0, largest=False).indices
                prune[i : i + nm.m].scatter_(0, drop, True)
                scale[i : i + nm.m] = prune[i : i + nm.m].to(W1.dtype) / d[i : i + nm.m].unsqueeze(1)
            err = torch.mul(W1[i], scale[i], out=Err1[i])
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
        W1.masked_fill_(prune, 0.0)
        W[:, i1:i2] = W1.t()
        W[:, i2:].addmm_(Err1.t(), Hinv[i1:i2, i2:], alpha=-1.0)
    return W
