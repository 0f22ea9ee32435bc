"""ALPS (Meng, Behdin, Wang, Mazumder 2024): ADMM on the layer-wise reconstruction objective, then conjugate
gradient on the fixed support.

Linears that read one input (q/k/v, gate/up) share SparseGPT's Hessian H = sum X^T X and are solved together: their
rows are stacked into one matrix (one eigendecomposition, one or two GEMMs per step), while the unstructured support
is still chosen per matrix. Work happens in the normalised problem (rows = outputs):

    H <- H + percdamp * mean(diag H) * I,  d = sqrt(diag H),  Hn = H / (d d^T)  (unit diagonal),  Wn = W * d
    min 1/2 tr((Wn - Wn0) Hn (Wn - Wn0)^T)  subject to the sparsity pattern.

ADMM with the split Wn = D and the scaled dual U (the same iterates as the reference's unscaled V = rho U):

    B = (C + rho (D - U)) (Hn + rho I)^-1   with C = Wn0 Hn
    Z = B + U;  D = P(Z);  U = Z - D

P keeps the largest |Z|: all but exactly `prune_count(rows * cols, sparsity)` entries of each matrix (unstructured), or
the N largest of every M consecutive input columns of each row. (Hn + rho I)^-1 = Q diag(1 / (L + rho)) Q^T comes from
one fp64 eigendecomposition; a step applies it through Q (two GEMMs) or as an explicit matrix rebuilt when rho
changes (one GEMM; see `admm_support`), plus one selection.

rho starts at `alps_rho` (0.1). Every 3 steps s = the number of support entries that changed since the last
check, against k = the kept count: s/k > 0.1 -> rho x1.3; s/k > 0.005 -> x1.2; s >= 1 -> x1.1; s = 0 -> stop (the
support converged). `alps_rho_growth` g raises those factors to the power g (1 = the paper; larger settles in fewer
steps). As the public code does: while rho has never grown, a barely moving support means rho started too high, so
rho /= 5 (and the iterates restart when the support still moved a little); after 30 steps a change below 3e-4 k
also counts as converged; rho is capped at 1e6.

Then W = P(B)'s support is fixed and the kept weights are refined by `alps_cg_iter` steps of conjugate gradient on
Wn Hn = C restricted to the support (every row is its own system; pruned entries are never touched).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from sparsetune.masks import NMPattern, prune_count
from sparsetune.prune import magnitude, sparsegpt
from sparsetune.prune.sparsegpt import lowest_k

log = logging.getLogger(__name__)

NEEDS_CALIBRATION = True
init_stats = sparsegpt.init_stats  # the same Hessian X^T X, accumulated the same way
accumulate = sparsegpt.accumulate

CHECK_EVERY = 3  # steps between support checks (and rho updates)
GROWTH = (1.3, 1.2, 1.1)  # rho factors for support change s/k > 0.1, > 0.005, >= 1 entry
RHO_MAX = 1e6
SWITCH_ITER = 30  # after this many steps a support change below SUPPORT_TOL * k counts as converged
SUPPORT_TOL = 3e-4


def prune_group(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    target: float | NMPattern,
    percdamp: float = 0.01,
    alps_rho: float = 0.1,
    alps_rho_growth: float = 1.0,
    alps_max_iter: int = 300,
    alps_cg_iter: int = 10,
    **_: object,
) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    """Prune every weight of a group that shares `hessian`; returns the fp32 weights and one info dict per weight."""
    rows = [w.shape[0] for w in weights]
    nm = target if isinstance(target, NMPattern) else None
    cols = hessian.shape[0]
    prune_counts = [prune_count(r * cols, float(target)) for r in rows] if nm is None else []
    if nm is None and sum(prune_counts) == 0:
        nothing = {"iterations": 0, "rho": alps_rho, "converged": True, "support_change": 0.0}
        infos = [_info(nothing, cg_iterations=0, recon_error_admm=0.0, recon_error=0.0) for _ in rows]
        return [w.float().clone() for w in weights], infos
    dead = torch.diag(hessian) == 0
    if bool(dead.all()):  # no calibration signal at all: there is nothing to reconstruct
        warning = "ALPS: the input Hessian is all zero (no calibration signal reached this module); pruned by magnitude"
        return magnitude.prune_group(weights, None, target), [
            {"fallback": "magnitude", "warning": warning} for _ in rows
        ]

    # 1. Normalise: dampen, unit diagonal. Dead inputs are handled as SparseGPT does (their weights become 0).
    H = hessian.float().clone()
    H[dead, dead] = 1.0
    Wn0 = torch.cat([w.to(H.device, torch.float32) for w in weights], dim=0)  # (m, n), a fresh copy
    Wn0[:, dead] = 0.0
    damp = percdamp * float(torch.mean(torch.diag(H)))
    H.diagonal().add_(damp)
    d = torch.diag(H).sqrt()  # (n,)
    Hn = H.div_(d.unsqueeze(0)).div_(d.unsqueeze(1))
    Wn0.mul_(d)
    undamp = damp / d.pow(2)  # Hn - diag(undamp) is the undampened Hessian, normalised (for the reported error)

    # 2. N:M: permute the inputs so that member r of every group sits in column slab r (a cheap exact rank).
    perm = None
    if nm is not None:
        perm = _slab_permutation(cols, nm).to(H.device)
        Hn, Wn0, undamp = Hn[perm][:, perm], Wn0[:, perm], undamp[perm]
        kept = Wn0.numel() // nm.m * nm.n
        select: Any = _SlabSelect(Wn0.shape, nm, H.device)
    else:
        kept = Wn0.numel() - sum(prune_counts)
        select = _UnstructuredSelect(rows, prune_counts, cols, H.device)

    # 3. ADMM on the eigendecomposition of Hn (the one fp64 step); the final support comes from its last B.
    L, Q = torch.linalg.eigh(Hn.double())
    B, admm = admm_support(
        Wn0, Q.float(), L.clamp_min_(0.0).float(), select, kept, alps_rho, alps_rho_growth, alps_max_iter
    )
    support = _exact_support(B, rows, prune_counts) if nm is None else select(B.abs()).bool()
    X = B.masked_fill_(~support, 0.0)

    # 4. Conjugate gradient on the fixed support, then back to the model's layout.
    err_admm, err, steps = refine_on_support(X, Wn0, Hn, support, alps_cg_iter, undamp, admm["row_norms"], rows)
    if perm is not None:
        X = torch.empty_like(X).index_copy_(1, perm, X)
    X.div_(d)
    infos = [
        _info(admm, cg_iterations=steps, recon_error_admm=before, recon_error=after)
        for before, after in zip(err_admm, err, strict=True)
    ]
    log.debug(
        "ALPS %s x %d: %d ADMM steps (rho %.3g, converged %s), %d CG steps, relative error %s",
        rows,
        cols,
        admm["iterations"],
        admm["rho"],
        admm["converged"],
        steps,
        [round(e, 5) for e in err],
    )
    return list(torch.split(X, rows, dim=0)), infos


def _info(admm: dict[str, Any], **errors: Any) -> dict[str, Any]:
    """One module's entry in the report (the ADMM figures are shared by the group's matrices)."""
    return {
        "admm_iterations": admm["iterations"],
        "rho": admm["rho"],
        "support_converged": admm["converged"],
        "support_change": admm["support_change"],
        **errors,
    }


def explicit_inverse_pays(m: int, n: int) -> bool:
    """Whether the B-update of an (m, n) problem costs fewer flops with the explicit inverse: when n < CHECK_EVERY m,
    which is every group but a wide down_proj."""
    return n < CHECK_EVERY * m


@torch.no_grad()
def admm_support(
    Wn0: torch.Tensor,
    Q: torch.Tensor,
    L: torch.Tensor,
    select: Callable[..., torch.Tensor],
    kept: int,
    rho: float,
    rho_growth: float,
    max_iter: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Run the ADMM on Hn = Q diag(L) Q^T from Wn0 (m, n); returns its last B and what the report needs.

    Every buffer is allocated once. The B-update solves with (Hn + rho I)^-1 in one of two ways, whichever costs
    fewer flops over the CHECK_EVERY steps between changes of rho: through the eigenbasis (two GEMMs of m n^2 a
    step), or as the explicit n x n matrix Q diag(1 / (L + rho)) Q^T (one GEMM of m n^2 a step, plus n^3 whenever
    rho changes): `explicit_inverse_pays`.
    """
    growth = tuple(f**rho_growth for f in GROWTH)
    m, n = Wn0.shape
    explicit = explicit_inverse_pays(m, n)
    P0 = Wn0 @ Q  # Wn0 in the eigenbasis
    row_norms = (P0.pow(2) * L).sum(dim=1)  # tr(Wn0 Hn Wn0^T) per row, for the relative error
    CQ = P0.mul_(L)  # C Q = Wn0 Hn Q, for C = Wn0 Hn
    C = torch.mm(CQ, Q.t()) if explicit else CQ  # C in the basis the B-update works in
    del P0, CQ
    D = torch.empty_like(Wn0)
    U = torch.zeros_like(Wn0)
    Z = torch.empty_like(Wn0)
    B = Wn0.clone()
    T = torch.empty_like(Wn0)
    mask = select(Wn0.abs())  # 1.0 = kept. D0 = P(Wn0): Wanda's score, chosen over the matrix
    torch.mul(Wn0, mask, out=D)
    prev = mask.bool()  # the support at the last check

    def coefficients(rho: float) -> tuple[torch.Tensor, torch.Tensor]:
        inv = 1.0 / (L + rho)
        if explicit:  # (Hn + rho I)^-1 (the second slot is unused)
            return torch.mm(Q * inv, Q.t()), inv
        return rho * inv, inv  # B in the eigenbasis = (R Q) * rho inv + (C Q) * inv, for R = D - U

    a, b = coefficients(rho)
    grew = converged = False
    change = 1.0
    it = 0
    for it in range(1, max_iter + 1):
        torch.sub(D, U, out=Z)  # R = D - U, in Z's buffer (free until Z is recomputed)
        if explicit:  # B = (C + rho R) (Hn + rho I)^-1
            Z.mul_(rho).add_(C)
            torch.mm(Z, a, out=B)
        else:
            torch.mm(Z, Q, out=T)
            T.mul_(a).addcmul_(C, b)
            torch.mm(T, Q.t(), out=B)
        torch.add(B, U, out=Z)
        mask = select(torch.abs(Z, out=T), out=mask)
        torch.mul(Z, mask, out=D)
        torch.sub(Z, D, out=U)
        if it % CHECK_EVERY:
            continue
        changed = int(torch.count_nonzero(torch.ne(mask, prev)))
        change = changed / kept
        new_rho = rho
        if change > 0.1:
            new_rho, grew = rho * growth[0], True
        elif change > 0.005:
            new_rho, grew = rho * growth[1], True
        elif grew and changed > 0:
            new_rho = rho * growth[2]
        elif grew:
            converged = True
            break
        else:  # the support barely moves although rho never grew: rho started too high
            new_rho = rho / 5
            if changed > 0:  # and restart from the initial point, as the public code does
                mask = select(Wn0.abs(), out=mask)
                torch.mul(Wn0, mask, out=D)
                U.zero_()
        new_rho = min(new_rho, RHO_MAX)
        if new_rho != rho:
            U.mul_(rho / new_rho)  # the unscaled dual V = rho U is what carries over
            rho = new_rho
            a, b = coefficients(rho)
        prev.copy_(mask)
        if it >= SWITCH_ITER and change < SUPPORT_TOL:
            converged = True
            break
    return B, {"iterations": it, "rho": rho, "converged": converged, "support_change": change, "row_norms": row_norms}


class _UnstructuredSelect:
    """Keep-mask of |Z| (1.0 kept, 0.0 pruned: a float mask multiplies faster) for stacked matrices: in matrix i
    the `prune_counts[i]` smallest entries are dropped, through `kth_smallest` with a fixed random sample per matrix.
    Entries tied with the threshold are all dropped, which only matters for exact zeros; the final support is exact.
    """

    def __init__(self, rows: list[int], prune_counts: list[int], cols: int, device: torch.device) -> None:
        self.rows, self.counts = rows, prune_counts
        generator = torch.Generator().manual_seed(0)  # only the speed depends on the sample, never the result
        self.samples = [torch.randint(r * cols, (min(SAMPLE, r * cols),), generator=generator).to(device) for r in rows]

    def __call__(self, A: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(A) if out is None else out
        start = 0
        for n_rows, k, sample in zip(self.rows, self.counts, self.samples, strict=True):
            seg, seg_out = A[start : start + n_rows], out[start : start + n_rows]
            if k == 0:
                seg_out.fill_(1.0)
            else:
                torch.gt(seg, kth_smallest(seg.reshape(-1), k, sample), out=seg_out)
            start += n_rows
        return out


SAMPLE = 16384  # entries sampled to bracket the k-th smallest: the bracket then holds about 4% of a matrix
BRACKET_SIGMAS = 5.0  # its half-width, in standard deviations of the sample's quantile estimate


def kth_smallest(values: torch.Tensor, k: int, sample: torch.Tensor | None = None) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a 1-D tensor, exactly.

    kthvalue over a whole matrix costs more than one of ADMM's GEMMs. With `sample` (indices into `values`), the
    sample's quantiles around k/n give a bracket [lo, hi]; when fewer than k entries are <= lo and at least k are
    <= hi, the answer is the (k - below)-th smallest entry inside the bracket, and only those go through kthvalue.
    Otherwise (a rare unlucky sample, or many ties) it falls back to kthvalue over everything.
    """
    n = values.numel()
    if sample is not None and 0 < sample.numel() < n:
        s, q = sample.numel(), k / n
        spread = BRACKET_SIGMAS * math.sqrt(q * (1 - q) / s) + 1 / s
        lo_rank, hi_rank = math.floor((q - spread) * s), math.ceil((q + spread) * s)
        if lo_rank >= 1 and hi_rank <= s:
            picked = values[sample]
            lo = torch.kthvalue(picked, lo_rank).values
            hi = torch.kthvalue(picked, hi_rank).values
            below_band = values <= lo
            below = int(torch.count_nonzero(below_band))
            if below < k:
                inside = values[torch.le(values, hi).logical_xor_(below_band)]
                if below + inside.numel() >= k:
                    return torch.kthvalue(inside, k - below).values
    return torch.kthvalue(values, k).values


def _slab_permutation(cols: int, nm: NMPattern) -> torch.Tensor:
    """Column order putting member r of every N:M group in slab r: new column r * (cols / M) + j = old j * M + r."""
    return torch.arange(cols).view(cols // nm.m, nm.m).t().reshape(-1)


class _SlabSelect:
    """Keep-mask (1.0 kept) for N:M in slab layout: exactly the N largest of every group (ties: the earlier member
    wins). A rank from M(M-1)/2 slab comparisons is several times cheaper than topk/kthvalue over groups of M.
    """

    def __init__(self, shape: torch.Size, nm: NMPattern, device: torch.device) -> None:
        self.nm, self.width = nm, shape[1] // nm.m
        self.beaten = [torch.empty(shape[0], self.width, device=device) for _ in range(nm.m)]
        self.cmp = torch.empty(shape[0], self.width, device=device)

    def __call__(self, A: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty_like(A) if out is None else out
        g, m = self.width, self.nm.m
        slabs = [A[:, r * g : (r + 1) * g] for r in range(m)]
        for r, beaten in enumerate(self.beaten):  # beaten[r]: how many members of its group beat member r
            beaten.fill_(r)  # as if every earlier member won; each pair below corrects that
        for i in range(m):
            for j in range(i + 1, m):
                torch.gt(slabs[j], slabs[i], out=self.cmp)  # 1.0 where j beats i (a tie goes to i)
                self.beaten[i].add_(self.cmp)
                self.beaten[j].sub_(self.cmp)
        for r in range(m):
            torch.lt(self.beaten[r], self.nm.n, out=out[:, r * g : (r + 1) * g])
        return out


def _exact_support(B: torch.Tensor, rows: list[int], prune_counts: list[int]) -> torch.Tensor:
    """The final unstructured support: exactly prune_counts[i] smallest |B| dropped per matrix (ties by position)."""
    support = torch.empty_like(B, dtype=torch.bool)
    A = B.abs()
    start = 0
    for n_rows, k in zip(rows, prune_counts, strict=True):
        seg = A[start : start + n_rows]
        support[start : start + n_rows] = ~lowest_k(seg.reshape(-1), k).view_as(seg)
        start += n_rows
    return support


@torch.no_grad()
def refine_on_support(
    X: torch.Tensor,
    Wn0: torch.Tensor,
    Hn: torch.Tensor,
    support: torch.Tensor,
    steps: int,
    undamp: torch.Tensor,
    row_norms: torch.Tensor,
    rows: list[int],
) -> tuple[list[float], list[float], int]:
    """Conjugate gradient on X Hn = Wn0 Hn over the kept entries, in place on X (pruned entries stay exactly 0).

    Each row is its own system and CG lowers each row's dampened objective monotonically; a row whose error with
    the undampened H still ends higher (through the dampening or rounding) keeps its start. Returns each matrix's
    relative reconstruction error before and after, tr((W - W0) H (W - W0)^T) / tr(W0 H W0^T) with the undampened
    H, and the number of steps taken.
    """
    X0 = X.clone()
    Delta = torch.sub(Wn0, X)
    G = Delta @ Hn  # the residual Wn0 Hn - X Hn on every entry (it also gives the error)
    err_before = _row_errors(Delta, G, undamp)
    R = G * support
    P = R.clone()
    AP = torch.empty_like(P)
    rz = (R * R).sum(dim=1)
    taken = 0
    for _ in range(steps):
        if not bool((rz > 0).any()):
            break
        torch.mm(P, Hn, out=AP)
        pap = (P * AP).sum(dim=1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), 0.0).unsqueeze(1)
        X.addcmul_(P, alpha)
        G.addcmul_(AP, alpha, value=-1.0)
        torch.mul(G, support, out=R)
        rz_new = (R * R).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), 0.0).unsqueeze(1)
        P.mul_(beta).add_(R)
        rz = rz_new
        taken += 1
    torch.sub(Wn0, X, out=Delta)
    err_after = _row_errors(Delta, G, undamp)
    worse = err_after > err_before
    if bool(worse.any()):
        X[worse] = X0[worse]
        err_after = torch.where(worse, err_before, err_after)
    X.masked_fill_(~support, 0.0)  # exact +0.0: sparse formats store no sign
    denom = row_norms - (Wn0.pow(2) * undamp).sum(dim=1)

    def relative(errors: torch.Tensor) -> list[float]:
        out = []
        for e, n in zip(errors.split(rows), denom.split(rows), strict=True):
            total = float(n.sum())
            out.append(float(e.sum()) / total if total > 0 else 0.0)
        return out

    return relative(err_before), relative(err_after), taken


def _row_errors(Delta: torch.Tensor, G: torch.Tensor, undamp: torch.Tensor) -> torch.Tensor:
    """Per row: Delta H Delta^T with the undampened (normalised) H, from G = Delta Hn with the dampened Hn."""
    return (Delta * G).sum(dim=1) - (Delta.pow(2) * undamp).sum(dim=1)
