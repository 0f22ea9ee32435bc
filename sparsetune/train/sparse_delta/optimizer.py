"""AdamW over the entries of every DeltaLinear: per-entry step counts, compact fp32 (or 8-bit) m and v.

State per entry: m, v (fp32, or 8-bit blockwise through `sparse_optim.Moments`) and an int32 step count, so
bias correction is per entry. Weight decay acts on the delta: it pulls the weight back toward its base value.

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

from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_optim import Moments


class DeltaAdamW:
    def __init__(
        self,
        layers: dict[str, DeltaLinear],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
    ) -> None:
        self.layers = layers
        self.betas, self.eps, self.weight_decay, self.eight_bit = betas, eps, weight_decay, eight_bit
        self.param_groups: list[dict[str, Any]] = [{"lr": lr, "params": [layer.delta for layer in layers.values()]}]
        self.moments = {name: Moments(layer.k, layer.device, eight_bit) for name, layer in layers.items()}
        self.steps = {
            name: torch.zeros(layer.k, dtype=torch.int32, device=layer.device) for name, layer in layers.items()
        }

    def zero_grad(self, set_to_none: bool = True) -> None:
        for layer in self.layers.values():
            layer.delta.grad = None

    @torch.no_grad()
    def step(self) -> None:
        lr = self.param_groups[0]["lr"]
        b1, b2 = self.betas
        for name, layer in self.layers.items():
            g = layer.delta.grad
            if g is None or layer.k == 0:
                continue
            steps = self.steps[name]
            steps.add_(1)
            m, v = self.moments[name].load()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            t = steps.double()  # 1 - 0.999**t in float32 is off by ~1e-5 relative at small t
            m_hat = m / (1 - torch.pow(b1, t)).float()
            v_hat = v / (1 - torch.pow(b2, t)).float()
            layer.delta.mul_(1 - lr * self.weight_decay).sub_(lr * m_hat / (v_hat.sqrt() + self.eps))
            self.moments[name].store(m, v)

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
        self.steps[name][slots] = observed.to(torch.int32)

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
        steps = sum(t.numel() * t.element_size() for t in self.steps.values())
        return steps + sum(moments.nbytes() for moments in self.moments.values())

    def state_dict(self) -> dict[str, Any]:
        return {
            "lr": self.param_groups[0]["lr"],
            "eight_bit": self.eight_bit,
            "moments": {name: moments.state_dict() for name, moments in self.moments.items()},
            "steps": dict(self.steps),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if saved["eight_bit"] != self.eight_bit or set(saved["moments"]) != set(self.layers):
            raise ValueError("the optimizer state belongs to another configuration")
        self.param_groups[0]["lr"] = saved["lr"]
        for name, layer in self.layers.items():
            self.moments[name].load_state_dict(saved["moments"][name], layer.device)
            self.steps[name] = saved["steps"][name].to(device=layer.device, dtype=torch.int32)
