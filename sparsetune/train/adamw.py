"""The AdamW core shared by the optimizers over compact per-entry state (`compact_adamw.SparseAdamW` for SMET and
masked-ft, `sparse_delta.optimizer.DeltaAdamW` for the sparse deltas): m and v per entry (fp32, or 8-bit
blockwise), per-entry bias corrections from per-entry step counts, the moment update; and torch's dense AdamW for
the dense methods.

An entry's step count is that of its cohort (the entries that started together), so bias correction restarts at 1
for entries that (re)start. The two optimizers keep their cohorts in the layout their topology changes suit: SMET
compacts its slots, so its cohorts are contiguous slot ranges (sizes and births); the sparse deltas change slots in
place, so each entry keeps a one-byte cohort id (`StepCounts`).
"""

from __future__ import annotations

from typing import Any

import torch

BLOCKSIZE_8BIT = 256  # bitsandbytes' block size for 8-bit optimizer state


def bias_corrections(steps: torch.Tensor, betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - b1^t and 1 - b2^t (float32) for the step counts `steps`, computed in float64: 1 - 0.999^t in float32 is
    off by ~1e-5 relative at small t."""
    b1, b2 = betas
    t = steps.double()
    return (1 - torch.pow(b1, t)).float(), (1 - torch.pow(b2, t)).float()


def adam_direction(
    m: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    bias1: torch.Tensor,
    bias2: torch.Tensor,
    betas: tuple[float, float],
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's moment update with gradient `g` (m and v in place, flat fp32), then the bias-corrected m-hat and the
    denominator sqrt(v-hat) + eps: the step is lr * m-hat / denominator."""
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    return m / bias1, (v / bias2).sqrt_().add_(eps)


class Moments:
    """Adam's m and v for one tensor (flat): fp32, or 8-bit blockwise (signed map for m, unsigned for v)."""

    def __init__(self, n: int, device: torch.device, eight_bit: bool) -> None:
        self.eight_bit = eight_bit
        self.store(torch.zeros(n, device=device), torch.zeros(n, device=device))

    def store(self, m: torch.Tensor, v: torch.Tensor) -> None:
        if self.eight_bit:
            self.m, self.m_absmax = _quantize(m, signed=True)
            self.v, self.v_absmax = _quantize(v, signed=False)
        else:
            self.m, self.v = m, v

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eight_bit:
            return _dequantize(self.m, self.m_absmax, signed=True), _dequantize(self.v, self.v_absmax, signed=False)
        return self.m, self.v

    def nbytes(self) -> int:
        tensors = [self.m, self.v] + ([self.m_absmax, self.v_absmax] if self.eight_bit else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.eight_bit:
            return {"m": self.m, "v": self.v, "m_absmax": self.m_absmax, "v_absmax": self.v_absmax}
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, torch.Tensor], device: torch.device) -> None:
        for k, t in state.items():
            setattr(self, k, t.to(device))


_CODES: dict[tuple[bool, str], torch.Tensor] = {}


def _code(signed: bool, device: torch.device) -> torch.Tensor:
    key = (signed, str(device))
    if key not in _CODES:
        from bitsandbytes.functional import create_dynamic_map

        _CODES[key] = create_dynamic_map(signed=signed).to(device)
    return _CODES[key]


def _quantize(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from bitsandbytes.functional import quantize_blockwise

    if x.numel() == 0:
        return torch.zeros(0, dtype=torch.uint8, device=x.device), torch.zeros(0, device=x.device)
    q, state = quantize_blockwise(x.contiguous(), code=_code(signed, x.device), blocksize=BLOCKSIZE_8BIT)
    return q, state.absmax


def _dequantize(q: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_blockwise

    if q.numel() == 0:
        return torch.zeros(0, device=q.device)
    return dequantize_blockwise(q, absmax=absmax, code=_code(signed, q.device), blocksize=BLOCKSIZE_8BIT).float()


def dense_adamw(params: Any, cfg: Any) -> Any:
    """torch's AdamW over `params` (tensors or groups), or bitsandbytes' AdamW8bit with --optim adamw8bit. Their
    "lr" is the loop's to set before every step (`schedule.lr_at`)."""
    kwargs = {"betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb  # slow to import: only for the 8-bit state

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)
