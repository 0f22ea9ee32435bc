"""A minimal single-process driver of the method: the loop the tests run end to end (the CLI has its own)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.method import SparseDelta


@dataclass
class FitResult:
    losses: list[float] = field(default_factory=list)
    reselections: list[dict[str, Any]] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)  # measured after the last backward, before zero_grad


def fit(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    settings: DeltaSettings,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    eight_bit: bool = False,
    on_reselection: Callable[[SparseDelta, dict[str, Any]], None] | None = None,
) -> tuple[SparseDelta, FitResult]:
    """Train `steps` optimizer steps on `batches` (cycled; each a dict of model inputs with labels)."""
    method = SparseDelta(model, settings, steps, lr=lr, seed=seed, eight_bit=eight_bit)
    result = FitResult()
    for step in range(1, steps + 1):
        method.before_step(step)
        loss = model(**batches[(step - 1) % len(batches)]).loss
        loss.backward()
        result.memory = method.memory_report()
        method.optimizer.step()
        row = method.after_step(step)
        method.optimizer.zero_grad()
        result.losses.append(float(loss.detach()))
        if row is not None:
            result.reselections.append(row)
            if on_reselection is not None:
                on_reselection(method, row)
    return method, result
