"""AdamW with compact state for sparse weights held as dense parameters (`smet-pretrain`, `seft --method masked-ft`).

A sparse weight stays an ordinary dense `nn.Parameter` (zeros at inactive positions, so the model is a plain HF
model), plus a compact index set of its active positions. Its gradient is gathered to a compact vector of active
entries by a post-accumulate hook, which frees the dense `.grad` right after autograd writes it, so no dense
gradient buffer survives between layers or steps. Adam's m and v exist only for active entries (fp32, or 8-bit
blockwise through bitsandbytes; the per-entry AdamW core of `adamw.py`).

Per-entry step counters without per-entry bytes: entries are kept grouped in *cohorts* by the optimizer step at
which they became active (the initial entries are cohort 0, every topology update appends one cohort of grown
entries and removes the dropped ones). An entry's local step is `step - birth` of its cohort, so bias correction of a
regrown entry starts fresh at 1, and its update is ramped by min(t_local / regrow_warmup, 1) and multiplied by
`regrow_lr_scale`. Both multiply the update only; the stored moments are never scaled.

Cohorts also say which entries a topology update just regrew (the newest cohort, born at the last update) and which
were established before it, so `step()` can measure, for the first `measure_steps` steps after an update, the mean
|actual weight change| of each group (`update_magnitudes`): the cold-start effect the warm-up exists to remove.

Multi-process: every `step()` averages the compact and dense gradients over ranks with one all-reduce.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsetune import distributed
from sparsetune.train.adamw import Moments, adam_direction, bias_corrections


@dataclass
class SparseWeight:
    """A dense parameter whose active positions are `index` (flat, int32 to halve its bytes)."""

    name: str
    param: nn.Parameter
    index: torch.Tensor
    lr_scale: float = 1.0

    @classmethod
    def from_mask(cls, name: str, param: nn.Parameter, mask: torch.Tensor, lr_scale: float = 1.0) -> SparseWeight:
        flat = mask.reshape(-1).to(param.device)
        with torch.no_grad():
            param.view(-1).masked_fill_(~flat, 0)
        index = flat.nonzero().squeeze(1).to(torch.int32)
        return cls(name, param, index, lr_scale)

    @property
    def active(self) -> torch.Tensor:
        """Flat positions of the active entries (int64), in slot order."""
        return self.index.long()

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def density(self) -> float:
        return self.nnz / self.param.numel()

    def mask(self) -> torch.Tensor:
        m = torch.zeros(self.param.numel(), dtype=torch.bool, device=self.param.device)
        m[self.active] = True
        return m.view_as(self.param)


def _compact_into(t: torch.Tensor, keep: torch.Tensor, tail: torch.Tensor | float) -> None:
    """In place: t[:kept] = t[keep] (order preserved), t[kept:] = tail."""
    kept = int(keep.sum())
    t[:kept] = t[keep]
    t[kept:] = tail


class SparseState:
    """Compact optimizer state of one sparse weight: moments, cohorts, the gradient and (with `track_updates`) the
    summed update."""

    def __init__(self, weight: SparseWeight, eight_bit: bool, track_updates: bool) -> None:
        device = weight.param.device
        self.moments = Moments(weight.nnz, device, eight_bit)
        self.cohort_sizes = [weight.nnz]
        self.cohort_births = [0]
        self.grad: torch.Tensor | None = None
        self.tracked = torch.zeros(weight.nnz, device=device) if track_updates else None

    def local_steps(self, step: int, device: torch.device) -> torch.Tensor:
        births = torch.tensor(self.cohort_births, dtype=torch.float32, device=device)
        sizes = torch.tensor(self.cohort_sizes, device=device)
        return torch.repeat_interleave(step - births, sizes)

    def regrown(self, device: torch.device) -> torch.Tensor:
        """True for entries grown by a topology update (cohorts born after step 0)."""
        flags = torch.tensor([b > 0 for b in self.cohort_births], device=device)
        return torch.repeat_interleave(flags, torch.tensor(self.cohort_sizes, device=device))

    def newest_cohort_size(self, birth: int) -> int:
        """How many entries were grown at step `birth` if the newest cohort (the tail of the slots) was, else 0."""
        return self.cohort_sizes[-1] if self.cohort_births[-1] == birth else 0


class SparseAdamW:
    """AdamW over sparse weights (compact state) and ordinary dense parameters (dense state).

    `param_groups[i]["lr"]` is the base learning rate; a sparse weight's step uses `lr * weight.lr_scale`.
    """

    def __init__(
        self,
        sparse_weights: list[SparseWeight],
        dense_params: list[nn.Parameter],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        regrow_warmup: int = 0,
        regrow_lr_scale: float = 1.0,
        eight_bit: bool = False,
        track_updates: bool = False,
        measure_steps: int = 0,
    ) -> None:
        self.weights = {w.name: w for w in sparse_weights}
        self.dense_params = list(dense_params)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.regrow_warmup, self.eight_bit = regrow_warmup, eight_bit
        self.regrow_lr_scale = regrow_lr_scale
        # "lr" is the loop's to set before every step (`schedule.lr_at`)
        self.param_groups: list[dict[str, Any]] = [
            {"name": "sparse", "lr": 0.0, "params": [w.param for w in sparse_weights]},
            {"name": "dense", "lr": 0.0, "params": self.dense_params},
        ]
        self.step_count = 0
        self.measure_steps = measure_steps
        self.update_magnitudes: dict[str, Any] | None = None
        self.sparse_state = {w.name: SparseState(w, eight_bit, track_updates) for w in sparse_weights}
        self.dense_state = [Moments(p.numel(), p.device, eight_bit) for p in self.dense_params]
        self._dense_grad_mode = False
        self._hooks = [w.param.register_post_accumulate_grad_hook(self._compact_hook(w)) for w in sparse_weights]

    # -- gradients --------------------------------------------------------------------------------------------

    def _compact_hook(self, weight: SparseWeight) -> Any:
        state_of = self.sparse_state

        def hook(param: torch.Tensor) -> None:
            if self._dense_grad_mode or param.grad is None:
                return
            state = state_of[weight.name]
            g = param.grad.view(-1).index_select(0, weight.active).float()
            state.grad = g if state.grad is None else state.grad.add_(g)
            param.grad = None

        return hook

    @contextlib.contextmanager
    def dense_grads(self) -> Iterator[None]:
        """Let `.grad` of the sparse weights fill densely (growth scoring at a topology step only)."""
        self._dense_grad_mode = True
        try:
            yield
        finally:
            self._dense_grad_mode = False
            for w in self.weights.values():
                w.param.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for state in self.sparse_state.values():
            state.grad = None
        for p in self.dense_params:
            p.grad = None

    def _all_reduce_grads(self) -> None:
        """Average the compact and dense gradients over processes (every rank holds one for every tensor)."""
        if distributed.world_size() == 1:
            return
        grads = []
        for name, w in self.weights.items():
            state = self.sparse_state[name]
            if state.grad is None:
                state.grad = torch.zeros(w.nnz, device=w.param.device)
            grads.append(state.grad)
        for p in self.dense_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        distributed.mean_in_place(grads)

    # -- the update -------------------------------------------------------------------------------------------

    def last_update_step(self) -> int | None:
        """The optimizer step after which the latest topology update grew entries (its cohorts' birth), or None."""
        births = [s.cohort_births[-1] for s in self.sparse_state.values() if s.cohort_births[-1] > 0]
        return max(births) if births else None

    @torch.no_grad()
    def step(self) -> None:
        self._all_reduce_grads()
        self.step_count += 1
        t = self.step_count
        sparse_lr, dense_lr = self.param_groups[0]["lr"], self.param_groups[1]["lr"]
        birth = self.last_update_step() if self.measure_steps else None
        measure = birth is not None and t - birth <= self.measure_steps
        # [sum |change| of regrown entries, their count, the same for established entries], over all sparse weights
        sums = [0.0, 0, 0.0, 0]
        self.update_magnitudes = None
        for name, w in self.weights.items():
            state = self.sparse_state[name]
            if state.grad is None or w.nnz == 0:
                continue
            device = w.param.device
            local = state.local_steps(t, device)
            scale = None
            if self.regrow_warmup > 0 or self.regrow_lr_scale != 1.0:
                ramp = torch.full_like(local, self.regrow_lr_scale)
                if self.regrow_warmup > 0:
                    ramp.mul_((local / self.regrow_warmup).clamp(max=1.0))
                scale = torch.where(state.regrown(device), ramp, torch.ones_like(ramp))
            flat = w.param.view(-1)
            idx = w.active
            old = flat.index_select(0, idx).float()
            m, v = state.moments.load()
            new = self._adamw(old, state.grad, m, v, local, sparse_lr * w.lr_scale, self.weight_decay, scale)
            state.moments.store(m, v)
            flat.index_copy_(0, idx, new.to(flat.dtype))
            if measure:
                change = (flat.index_select(0, idx).float() - old).abs()  # the stored change, after any rounding
                established = w.nnz - state.newest_cohort_size(birth)
                sums[0] += float(change[established:].sum(dtype=torch.float64))
                sums[1] += w.nnz - established
                sums[2] += float(change[:established].sum(dtype=torch.float64))
                sums[3] += established
            if state.tracked is not None:
                state.tracked.add_(new - old)
        for p, moments in zip(self.dense_params, self.dense_state, strict=True):
            if p.grad is None:
                continue
            m, v = moments.load()
            decay = self.weight_decay if p.dim() >= 2 else 0.0  # no decay on norms and biases
            local = torch.full((), float(t), device=p.device)
            new = self._adamw(p.float().view(-1), p.grad.float().view(-1), m, v, local, dense_lr, decay, None)
            moments.store(m, v)
            p.copy_(new.view_as(p).to(p.dtype))
        if measure and sums[1] and sums[3]:
            regrown, established = sums[0] / sums[1], sums[2] / sums[3]
            self.update_magnitudes = {
                "steps_since_update": t - birth,
                "regrown_abs_update": regrown,
                "established_abs_update": established,
                "regrown_update_ratio": regrown / established if established > 0 else None,
            }

    def _adamw(
        self,
        w: torch.Tensor,
        g: torch.Tensor,
        m: torch.Tensor,
        v: torch.Tensor,
        local_step: torch.Tensor,
        lr: float,
        decay: float,
        scale: torch.Tensor | None,
    ) -> torch.Tensor:
        """One AdamW step on flat fp32 tensors; m and v are updated in place. Returns the new weights."""
        bias1, bias2 = bias_corrections(local_step, self.betas)
        m_hat, denominator = adam_direction(m, v, g, bias1, bias2, self.betas, self.eps)
        update = m_hat / denominator
        if scale is not None:
            update.mul_(scale)
        return w * (1 - lr * decay) - lr * update

    # -- topology ---------------------------------------------------------------------------------------------

    def tracked_update(self, name: str) -> torch.Tensor:
        """The summed weight change of every active entry since the last `reset_tracking` (slot order)."""
        tracked = self.sparse_state[name].tracked
        if tracked is None:
            raise RuntimeError("this optimizer was built with track_updates=False")
        return tracked

    def reset_tracking(self) -> None:
        for state in self.sparse_state.values():
            if state.tracked is not None:
                state.tracked.zero_()

    @torch.no_grad()
    def swap_entries(self, name: str, drop_slots: torch.Tensor, grow_positions: torch.Tensor) -> None:
        """Deactivate the entries in `drop_slots` and activate `grow_positions` (as many): the dropped weights
        become 0, the grown ones start at 0 with zero moments and a fresh step counter (a new cohort)."""
        w, state = self.weights[name], self.sparse_state[name]
        if drop_slots.numel() != grow_positions.numel():
            raise ValueError(f"{name}: dropping {drop_slots.numel()} entries but growing {grow_positions.numel()}")
        if drop_slots.numel() == 0:
            return
        device = w.param.device
        flat = w.param.view(-1)
        flat.index_fill_(0, w.active[drop_slots.to(device)], 0)
        flat.index_fill_(0, grow_positions.to(device), 0)
        keep = torch.ones(w.nnz, dtype=torch.bool, device=device)
        keep[drop_slots.to(device)] = False
        k = grow_positions.numel()
        # Kept entries move to the front in slot order and the grown ones fill the tail (a new cohort), inside the
        # existing tensors: re-allocating every index and moment tensor at each update fragments the CPU heap.
        _compact_into(w.index, keep, grow_positions.to(device=device, dtype=torch.int32))
        m, v = state.moments.load()
        _compact_into(m, keep, 0.0)
        _compact_into(v, keep, 0.0)
        state.moments.store(m, v)
        if state.tracked is not None:
            _compact_into(state.tracked, keep, 0.0)
        kept = [int(c.sum()) for c in keep.split(state.cohort_sizes)]
        cohorts = [(n, b) for n, b in zip(kept, state.cohort_births, strict=True) if n > 0]
        cohorts.append((k, self.step_count))
        state.cohort_sizes = [n for n, _ in cohorts]
        state.cohort_births = [b for _, b in cohorts]
        state.grad = None

    # -- checkpoints and reporting ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        sparse = {}
        for name, w in self.weights.items():
            s = self.sparse_state[name]
            entry: dict[str, Any] = {
                "index": w.index,
                "cohort_sizes": list(s.cohort_sizes),
                "cohort_births": list(s.cohort_births),
                "moments": s.moments.state_dict(),
            }
            if s.tracked is not None:
                entry["tracked"] = s.tracked
            sparse[name] = entry
        return {
            "step": self.step_count,
            "lrs": [g["lr"] for g in self.param_groups],
            "eight_bit": self.eight_bit,
            "sparse": sparse,
            "dense": [m.state_dict() for m in self.dense_state],
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["eight_bit"] != self.eight_bit or set(saved["sparse"]) != set(self.weights):
            raise ValueError("the optimizer state belongs to another configuration")
        self.step_count = int(saved["step"])
        for group, lr in zip(self.param_groups, saved["lrs"], strict=True):
            group["lr"] = lr
        for name, entry in saved["sparse"].items():
            w, s = self.weights[name], self.sparse_state[name]
            device = w.param.device
            w.index = entry["index"].to(device=device, dtype=torch.int32)
            s.cohort_sizes = [int(n) for n in entry["cohort_sizes"]]
            s.cohort_births = [int(b) for b in entry["cohort_births"]]
            s.moments.load_state_dict(entry["moments"], device)
            if s.tracked is not None:
                s.tracked = entry["tracked"].to(device)
            s.grad = None
        for moments, state, p in zip(self.dense_state, saved["dense"], self.dense_params, strict=True):
            moments.load_state_dict(state, p.device)

    def memory_report(self) -> dict[str, Any]:
        """Bytes of optimizer state and gradient held for the sparse weights, per layer and in total, beside what
        dense AdamW with the same state precision would hold (its moments plus a dense gradient)."""
        per_entry_state = 2 if self.eight_bit else 8
        layers = []
        for name, w in self.weights.items():
            s = self.sparse_state[name]
            cohort_bytes = 16 * len(s.cohort_sizes)
            state_bytes = s.moments.nbytes() + cohort_bytes + (s.tracked.numel() * 4 if s.tracked is not None else 0)
            grad_bytes = w.nnz * 4
            dense_bytes = w.param.numel() * (per_entry_state + w.param.element_size())
            layers.append(
                {
                    "name": name,
                    "numel": w.param.numel(),
                    "active": w.nnz,
                    "density": round(w.density, 6),
                    "optimizer_state_bytes": state_bytes,
                    "gradient_bytes": grad_bytes,
                    "index_bytes": w.index.numel() * w.index.element_size(),
                    "dense_adamw_bytes": dense_bytes,
                }
            )
        total = {k: sum(layer[k] for layer in layers) for k in ("optimizer_state_bytes", "gradient_bytes")}
        total["index_bytes"] = sum(layer["index_bytes"] for layer in layers)
        dense_total = sum(layer["dense_adamw_bytes"] for layer in layers)
        sparse_total = total["optimizer_state_bytes"] + total["gradient_bytes"]
        return {
            "optimizer_state_bytes": total["optimizer_state_bytes"],
            "gradient_bytes": total["gradient_bytes"],
            "index_bytes": total["index_bytes"],
            "dense_adamw_state_and_grad_bytes": dense_total,
            "state_and_grad_vs_dense": round(sparse_total / dense_total, 4) if dense_total else math.nan,
            "dense_params_state_bytes": sum(m.nbytes() for m in self.dense_state),
            "layers": layers,
        }

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def untrained_zeros(optimizer: SparseAdamW, weight: SparseWeight) -> int:
    """Active entries of a SparseWeight that hold exactly 0 and never had a non-zero gradient (Adam's v is 0): grown
    at 0 where no gradient reaches (in tiny models, a unit whose output nothing reads). Unlike weights that
    overflowed or cancelled to 0, they are no sign of divergence."""
    _, v = optimizer.sparse_state[weight.name].moments.load()  # per slot, in the order of weight.active
    values = weight.param.detach().view(-1)[weight.active]
    return int(((values == 0) & (v == 0)).sum())
