"""AdamW over the entries of every DeltaLinear: per-entry step counts, compact fp32 (or 8-bit) m and v.

State per entry: m, v (fp32, or 8-bit blockwise through `train.adamw`, the per-entry AdamW core shared with
SMET's compact state) and a step count, so bias
correction is per entry. The step counts take one byte per entry (`StepCounts`): entries that arrive together
share one count, so each entry stores the id (uint8) of its cohort and the module keeps each cohort's start. That
keeps the state at 9 bytes per entry (13 with the gradient) against a LoRA's 8 (12), instead of 12 (16) with an
int32 count. Weight decay acts on the delta: it pulls the weight back toward its base value.

A reselection rewrites only the slots it changes (`reseed`): kept entries' m, v and step are untouched in fp32.
With 8-bit moments the blocks holding a changed slot are re-quantized, so kept neighbours in those 256-entry
blocks may move by one quantization step.

Seeding a grown entry from a window of W steps: m = (1 - b1^W) * mean g, v = (1 - b2^W) * mean g^2, step = W.
These are the moments Adam would hold after W equal-weighted observations, so the bias-corrected m-hat and
v-hat equal the window means exactly, and the next steps weight them as W earlier observations. (Seeding the raw
means with step 0 would divide them by 1 - b2 = 0.001 at the next step; with step = W unchanged moments they
would be ~200x too small at b2 = 0.999.) An entry without statistics starts at m = v = 0, step 0.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsetune.train.adamw import Moments, adam_direction, bias_corrections
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear


class StepCounts:
    """Per-entry AdamW step counts of one module, one byte per entry.

    Entry i has taken `clock - starts[ids[i]]` steps, where `clock` counts the module's optimizer steps. Entries
    given a count together (the start, every reselection's grown entries, its filled ones) share a cohort, so a
    module holds a few cohorts, at most 256. When all 256 are live, the two oldest merge (the oldest takes the
    second oldest's start): its entries' bias correction then reads the younger age, a change that matters only
    for cohorts younger than about 1/(1 - beta2) steps, which 256 live cohorts at any usual reselection interval are
    not.
    """

    MAX_COHORTS = 256

    def __init__(self, k: int, device: torch.device) -> None:
        self.ids = torch.zeros(k, dtype=torch.uint8, device=device)
        self.starts = torch.zeros(1, dtype=torch.int64, device=device)
        self.clock = 0

    def values(self) -> torch.Tensor:
        """Every entry's step count (int64)."""
        return self.clock - self.starts[self.ids.long()]

    def bias_corrections(self, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per entry 1 - b1^t and 1 - b2^t (float32), computed once per cohort and gathered: no per-entry power."""
        ids = self.ids.long()
        bias1, bias2 = bias_corrections(self.clock - self.starts, betas)
        return bias1[ids], bias2[ids]

    def advance(self) -> None:
        self.clock += 1

    def assign(self, slots: torch.Tensor, counts: torch.Tensor) -> None:
        """Give the entries in `slots` the step counts `counts` (one cohort per distinct count)."""
        for count in torch.unique(counts).tolist():
            cohort = self._cohort(self.clock - int(count))
            self.ids[slots[counts == count]] = cohort

    def _cohort(self, start: int) -> int:
        """The id of the cohort starting at `start`: an existing one, a free one, or one freed by a merge."""
        live = torch.bincount(self.ids.long(), minlength=self.starts.numel()) > 0
        same = ((self.starts == start) & live).nonzero()
        if same.numel():
            return int(same[0])
        free = (~live).nonzero()
        if free.numel():
            cohort = int(free[0])
        elif self.starts.numel() < self.MAX_COHORTS:
            cohort = self.starts.numel()
            self.starts = torch.cat([self.starts, self.starts.new_zeros(1)])
        else:
            order = torch.argsort(self.starts, stable=True)  # oldest first: merge the oldest into the second oldest
            cohort, into = int(order[0]), int(order[1])
            self.ids[self.ids == cohort] = into
        self.starts[cohort] = start
        return cohort

    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size() + self.starts.numel() * self.starts.element_size()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"ids": self.ids, "starts": self.starts, "clock": torch.tensor(self.clock)}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        self.ids = state["ids"].to(device=device, dtype=torch.uint8)
        self.starts = state["starts"].to(device=device, dtype=torch.int64)
        self.clock = int(state["clock"])


class DeltaAdamW:
    def __init__(
        self,
        layers: dict[str, DeltaLinear],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
    ) -> None:
        self.layers = layers
        self.betas, self.eps, self.weight_decay, self.eight_bit = betas, eps, weight_decay, eight_bit
        # "lr" is the loop's to set before every step (`schedule.lr_at`)
        self.param_groups: list[dict[str, Any]] = [{"lr": 0.0, "params": [layer.delta for layer in layers.values()]}]
        self.moments = {name: Moments(layer.k, layer.device, eight_bit) for name, layer in layers.items()}
        self.steps = {name: StepCounts(layer.k, layer.device) for name, layer in layers.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layer in self.layers.values():
            layer.delta.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        for name, layer in self.layers.items():
            g = layer.delta.grad
            if g is None or layer.k == 0:
                continue
            self.steps[name].advance()
            m, v = self.moments[name].load()
            bias1, bias2 = self.steps[name].bias_corrections(self.betas)
            m_hat, denominator = adam_direction(m, v, g, bias1, bias2, self.betas, self.eps)
            layer.delta.mul_(1 - lr * self.weight_decay).sub_(lr * m_hat / denominator)
            self.moments[name].store(m, v)

    def step_counts(self, name: str) -> torch.Tensor:
        """Module `name`'s per-entry step counts (int64, slot order)."""
        return self.steps[name].values()

    @torch.no_grad()
    def reseed(
        self, name: str, slots: torch.Tensor, sum_g: torch.Tensor, sum_g2: torch.Tensor, observed: torch.Tensor
    ) -> None:
        """Fresh state for the entries now in `slots`: seeded from `observed` window steps' sums of g and g^2."""
        if slots.numel() == 0:
            return
        b1, b2 = self.betas
        w = observed.double().clamp(min=1)
        seen = observed > 0
        mean_g = torch.where(seen, sum_g / w.float(), 0.0)
        mean_g2 = torch.where(seen, sum_g2 / w.float(), 0.0)
        m, v = self.moments[name].load()
        m[slots] = mean_g * (1 - torch.pow(b1, observed.double())).float()
        v[slots] = mean_g2 * (1 - torch.pow(b2, observed.double())).float()
        self.moments[name].store(m, v)
        self.steps[name].assign(slots, observed)

    # -- reporting and resume ---------------------------------------------------------------------------------

    def grad_bytes(self) -> int:
        """Bytes of the gradient tensors that exist now (delta.grad)."""
        return sum(
            layer.delta.grad.numel() * layer.delta.grad.element_size()
            for layer in self.layers.values()
            if layer.delta.grad is not None
        )

    def state_bytes(self) -> int:
        """Bytes of the optimizer state tensors: m, v (and 8-bit absmax), step counts."""
        steps = sum(counts.nbytes() for counts in self.steps.values())
        return steps + sum(moments.nbytes() for moments in self.moments.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.param_groups[0]["lr"],
            "eight_bit": self.eight_bit,
            "moments": {name: moments.state_dict() for name, moments in self.moments.items()},
            "steps": {name: counts.state_dict() for name, counts in self.steps.items()},
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["eight_bit"] != self.eight_bit or set(saved["moments"]) != set(self.layers):
            raise ValueError("the optimizer state belongs to another configuration")
        self.param_groups[0]["lr"] = saved["lr"]
        for name, layer in self.layers.items():
            self.moments[name].load_state_dict(saved["moments"][name], layer.device)
            self.steps[name].load_state_dict(saved["steps"][name], layer.device)
