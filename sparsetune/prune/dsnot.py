"""DSnoT (Zhang et al., ICLR 2024): training-free mask refinement on top of any prune method.

Each output row i of a pruned Linear has an expected reconstruction error (the mean output error over the
calibration tokens)

    e_i = sum_j (W_dense - W)_ij * mean_j

where W is the pruned weight and mean_j the mean input of feature j. DSnoT swaps weights inside a row to shrink
|e_i| without changing the row's number of non-zeros: each cycle it revives one pruned weight (the one with the
largest |c| / var among those whose contribution c_ij = W_dense_ij * mean_j has the sign of e_i, so reviving it
moves e_i toward 0) and prunes one kept weight (unstructured: the lowest Wanda score |W_ij| * ||x_j|| among those
whose c has the opposite sign; N:M: the lowest Wanda score in the revived weight's group of M, so every group keeps
its count). DSnoT never changes a kept weight's value; a revived weight takes its dense value.

A swap is made only when it shrinks |e_i| without flipping its sign (the paper's rule, plus the shrink test that
matters under N:M, where the pruned weight's contribution can have either sign). A rejected swap skips that revive
candidate and the row goes on; a row stops when |e_i| <= threshold or it runs out of candidates.

Where this differs from the public code (zyxxmu/DSnoT, `lib/prune.py`), on purpose:
- Its unstructured path accepts every swap while |e_i| > threshold (its `--without_same_sign` flag is `type=bool`, so
  the sign check is never on) and so always runs the 50 cycles. In a layer-wise check (16 Linears of SmolLM2-135M,
  C4 inputs, error ||X (W_dense - W)^T||^2 on held-out tokens, Wanda at 70%), that rule made the error 17% worse
  than Wanda alone and the rule here 4.5% better. Its N:M path accepts a swap that keeps the sign even when |e_i|
  grows, and stops a row at its first rejected swap.
- e is in per-token units (the mean input), not summed over a 2048-token sample, so the threshold does not depend on
  the calibration sequence length. The default, 0.1 / 2048, is the public code's 0.1 at its 2048-token samples.
- The prune choice uses the Wanda score for every base method (the public N:M path uses the base method's own score).

`DSnoT` puts the kernel on top of a base method with the method interface the engine calls (`NEEDS_CALIBRATION`,
`init_stats`, `accumulate`, `prune_group`). Its statistic is the tuple (base statistic, sum of x, sum of x^2, token
count): the engine all-reduces tuples element by element, so multi-process runs need nothing more.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern
from sparsetune.prune.config import DSNOT_MAX_CYCLES, DSNOT_THRESHOLD
from sparsetune.prune.engine import split_method_result

DEFAULT_MAX_CYCLES = DSNOT_MAX_CYCLES
DEFAULT_THRESHOLD = DSNOT_THRESHOLD
Values = Literal["updated", "dense"]


# ---- statistics -------------------------------------------------------------------------------------------------


def init_moments(in_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of x, sum of x^2, token count), in float64 so the variance E[x^2] - mean^2 keeps its digits."""
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    zeros = torch.zeros(in_features, dtype=dtype, device=device)
    return zeros, zeros.clone(), torch.zeros(1, dtype=dtype, device=device)


def accumulate_moments(moments: tuple[torch.Tensor, torch.Tensor, torch.Tensor], x: torch.Tensor) -> None:
    """Add the tokens of x (..., in) to the sums (fp32 per-batch sums, accumulated in float64)."""
    sum_x, sum_x2, count = moments
    x = x.reshape(-1, x.shape[-1]).float()
    sum_x.add_(x.sum(dim=0))
    sum_x2.add_(x.square().sum(dim=0))
    count.add_(x.shape[0])


def input_moments(sum_x: torch.Tensor, sum_x2: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and (population) variance of the input over every calibration token."""
    n = count.clamp_min(1)
    mean = sum_x / n
    return mean, (sum_x2 / n - mean.square()).clamp_min(0.0)


# ---- the kernel -------------------------------------------------------------------------------------------------


def _best(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices of the k largest finite scores, best first, and how many are finite."""
    values, indices = torch.topk(score, k, dim=1)
    return indices, torch.isfinite(values).sum(dim=1)


def _pick(
    lists_up: tuple[torch.Tensor, torch.Tensor],
    lists_down: tuple[torch.Tensor, torch.Tensor],
    up: torch.Tensor,
    at_up: torch.Tensor,
    at_down: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the next candidate of the list for the error's sign, and whether that list still has one."""
    (idx_up, n_up), (idx_down, n_down) = lists_up, lists_down
    at = torch.where(up, at_up, at_down)
    slot = at.clamp_max(idx_up.shape[1] - 1).unsqueeze(1)
    idx = torch.where(up, idx_up.gather(1, slot).squeeze(1), idx_down.gather(1, slot).squeeze(1))
    return idx, at < torch.where(up, n_up, n_down)


@torch.no_grad()
def refine_mask(
    dense: torch.Tensor,
    pruned: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    norm: torch.Tensor,
    pattern: NMPattern | None = None,
    max_cycles: int = DEFAULT_MAX_CYCLES,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """DSnoT on one weight matrix: the refined keep-mask (True = kept), swaps per row, and the cycles run.

    Args:
        dense: the weight before pruning (rows, cols).
        pruned: the pruned weight the error is measured against (rows, cols); its non-zeros are the initial mask.
        mean, var: per-input-feature mean and variance of the input (cols,).
        norm: the Wanda norm ||x_j||_2 over the calibration tokens (cols,).
        pattern: N:M pattern to keep inside its groups (None: unstructured, any column of the row).
        max_cycles: at most this many swap attempts per row.
        threshold: a row stops once its |expected error| is at most this.
    """
    W = dense.float()
    P = pruned.float()
    rows, cols = W.shape
    keep = P != 0  # (rows, cols)
    mean = mean.to(W.device, torch.float32)
    norm = norm.to(W.device, torch.float32)
    var = var.to(W.device, torch.float32)
    var = var.clamp_min(max(1e-6 * float(var.mean()), 1e-20))  # a noise floor for (near-)constant features
    c_revive = W * mean  # (rows, cols): what reviving W_ij takes off e_i
    c_prune = P * mean  # (rows, cols): what pruning a kept W_ij adds to e_i
    e = (c_revive - c_prune).sum(dim=1)  # (rows,)
    k = min(max_cycles, cols)
    inf = torch.tensor(float("inf"), device=W.device)

    # Revive candidates, best first: pruned weights whose c has the error's sign, largest |c| / var first.
    ratio = c_revive / var
    revive_up = _best(torch.where(~keep & (c_revive > 0), ratio, -inf), k)  # used while e > 0
    revive_down = _best(torch.where(~keep & (c_revive < 0), -ratio, -inf), k)  # used while e <= 0
    del ratio
    score = P.abs() * norm  # Wanda score of the weights as they are
    if pattern is None:  # prune candidates: kept weights whose c has the opposite sign, lowest score first
        prune_up = _best(torch.where(keep & (c_prune < 0), -score, -inf), k)
        prune_down = _best(torch.where(keep & (c_prune > 0), -score, -inf), k)
        revived = None
    else:
        revived = torch.zeros_like(keep)  # a weight revived in this refinement is never pruned again
        offsets = torch.arange(pattern.m, device=W.device)

    row = torch.arange(rows, device=W.device)
    pointer = torch.zeros(4, rows, dtype=torch.long, device=W.device)  # revive up/down, prune up/down
    swaps = torch.zeros(rows, dtype=torch.long, device=W.device)
    active = e.abs() > threshold
    cycles = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        cycles += 1
        up = e > 0
        grow, grow_ok = _pick(revive_up, revive_down, up, pointer[0], pointer[1])
        if revived is None:
            drop, drop_ok = _pick(prune_up, prune_down, up, pointer[2], pointer[3])
        else:  # the lowest-score weight still kept (and not revived here) in the revived weight's group
            group = (grow - grow % pattern.m).unsqueeze(1) + offsets  # (rows, M)
            candidate = keep.gather(1, group) & ~revived.gather(1, group)
            slot = torch.where(candidate, score.gather(1, group), inf).argmin(dim=1, keepdim=True)
            drop, drop_ok = group.gather(1, slot).squeeze(1), candidate.any(dim=1)
        e_after = e - c_revive[row, grow] + c_prune[row, drop]
        shrinks = (e_after.abs() < e.abs()) & (torch.sign(e_after) == torch.sign(e))  # no overshoot past 0
        swap = active & grow_ok & drop_ok & shrinks
        keep[row[swap], grow[swap]] = True
        keep[row[swap], drop[swap]] = False
        if revived is not None:
            revived[row[swap], grow[swap]] = True
        e = torch.where(swap, e_after, e)
        swaps += swap
        tried = active & grow_ok
        pointer[0] += tried & up
        pointer[1] += tried & ~up
        if revived is None:
            pointer[2] += swap & up
            pointer[3] += swap & ~up
            active &= drop_ok
        active &= grow_ok & (e.abs() > threshold)
    return keep, swaps, cycles


def expected_error(dense: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """e_i = sum_j (W_dense - W)_ij * mean_j per row (rows,)."""
    return ((dense.float() - weight.float()) * mean.to(weight.device, torch.float32)).sum(dim=1)


@torch.no_grad()
def refine_weight(
    dense: torch.Tensor, pruned: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, norm: torch.Tensor,
    pattern: NMPattern | None = None, values: Values = "updated", **limits: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:  # fmt: skip
    """Refine a base method's output `pruned` (fp32); returns the refined fp32 weight and what was done.
    `limits` (max_cycles, threshold) go to `refine_mask`.

    Kept weights keep `pruned`'s values, a revived weight takes its dense value. `values` matters only when the base
    method changed kept values (SparseGPT, ALPS):
    - "updated": DSnoT reasons about the weights as they are: the error includes the base's updates, and a kept
      weight's contribution and Wanda score use its updated value.
    - "dense": the mask is refined as if the base had only chosen it (dense values on its mask, like the public
      code), and the refined mask is then applied to the base's output.
    """
    keep0 = pruned != 0
    reasoned = pruned if values == "updated" else dense.float().masked_fill(~keep0, 0.0)
    keep, swaps, cycles = refine_mask(dense, reasoned, mean, var, norm, pattern, **limits)
    refined = torch.where(keep, torch.where(keep0, pruned.float(), dense.float()), 0.0)  # +0.0, never -0.0
    info = {
        "dsnot_swaps": int(swaps.sum()),
        "dsnot_cycles": cycles,
        "dsnot_error_before": float(expected_error(dense, pruned, mean).abs().mean()),
        "dsnot_error_after": float(expected_error(dense, refined, mean).abs().mean()),
    }
    return refined, info


# ---- on top of a base method --------------------------------------------------------------------------------------


class DSnoT:
    """A prune method: run `base`, then refine the masks of the targets in `refine` (`structure.Target`s; None:
    every target)."""

    NEEDS_CALIBRATION = True

    def __init__(
        self,
        base: Any,
        refine: list[Any] | None = None,
        max_cycles: int = DEFAULT_MAX_CYCLES,
        threshold: float = DEFAULT_THRESHOLD,
        values: Values = "updated",
    ) -> None:
        self.base, self.refine = base, refine
        self.max_cycles, self.threshold, self.values = max_cycles, threshold, values
        self.base_updated_values = False  # set once a refined module's kept values differ from the dense ones

    def init_stats(self, in_features: int, device: torch.device) -> tuple[Any, ...]:
        return (self.base.init_stats(in_features, device), *init_moments(in_features, device))

    def accumulate(self, stats: tuple[Any, ...], x: torch.Tensor) -> None:
        self.base.accumulate(stats[0], x)
        accumulate_moments(stats[1:], x)

    def _selected(self, weights: list[torch.Tensor]) -> list[bool]:
        if self.refine is None:
            return [True] * len(weights)
        # The engine passes each target's own weight view; its storage address identifies the target.
        chosen = {target.weight().data_ptr() for target in self.refine}
        return [w.data_ptr() in chosen for w in weights]

    def prune_group(
        self, weights: list[torch.Tensor], stats: tuple[Any, ...], target: float | NMPattern, **options: Any
    ) -> tuple[list[torch.Tensor], list[dict[str, Any] | None]]:
        """The base method's prune_group (which must not modify `weights`), then DSnoT on the selected ones."""
        selected = self._selected(weights)  # before the base runs: the engine has not written anything yet
        pruned, infos = split_method_result(self.base.prune_group(weights, stats[0], target, **options))
        mean, var = input_moments(*stats[1:])
        norm = stats[2].clamp_min(0.0).sqrt()
        pattern = target if isinstance(target, NMPattern) else None
        out, out_infos = [], []
        for dense, new, info, chosen in zip(weights, pruned, infos, selected, strict=True):
            if not chosen:
                out.append(new)
                out_infos.append(info)
                continue
            new = new.float()
            if not self.base_updated_values:
                kept = new != 0
                self.base_updated_values = not torch.equal(new[kept], dense.float()[kept])
            limits = {"max_cycles": self.max_cycles, "threshold": self.threshold}
            refined, details = refine_weight(dense, new, mean, var, norm, pattern, self.values, **limits)
            out.append(refined)
            out_infos.append({**(info or {}), **details})
        return out, out_infos


def refine_selection(targets: list[tuple[str, Any]], patterns: list[str]) -> list[tuple[str, Any]]:
    """The targeted Linears that `--refine-targets` selects (all of them without patterns); refuses no match."""
    if not patterns:
        return list(targets)
    compiled = [re.compile(p) for p in patterns]
    chosen = [(name, m) for name, m in targets if any(p.search(name) for p in compiled)]
    if not chosen:
        example = targets[0][0] if targets else "model.layers.0.self_attn.q_proj"
        raise SparsetuneError(
            f"--refine-targets {','.join(patterns)} matched none of the {len(targets)} Linears being pruned "
            f"(e.g. {example}); use regexes such as 'self_attn' or 'mlp', or drop --refine-targets"
        )
    return chosen


def report_section(cfg: Any, refiner: DSnoT, refined: list[str], module_info: dict[str, dict[str, Any]]) -> dict:
    """The `refine` section of the prune report."""
    infos = [module_info[name] for name in refined if "dsnot_swaps" in module_info.get(name, {})]
    return {
        "method": "dsnot",
        "targets": list(cfg.refine_targets) or "all",
        "max_cycles": cfg.refine_max_cycles,
        "threshold": cfg.refine_threshold,
        # Which value variant ran: the setting, and whether it mattered (only when the base updates kept values).
        "values": cfg.refine_values,
        "base_updated_values": refiner.base_updated_values,
        "modules_refined": len(infos),
        "swaps": sum(i["dsnot_swaps"] for i in infos),
    }
