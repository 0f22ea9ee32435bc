"""The schedules of a training run, pure functions of the step: the learning rate and SMET's drop fraction."""

from __future__ import annotations

import math
from typing import Protocol


class Schedule(Protocol):
    """The settings the schedules read (SeftConfig and SmetConfig both have them)."""

    lr: float
    min_lr_ratio: float
    steps: int
    drop_fraction: float
    drop_fraction_end: float

    @property
    def warmup(self) -> int: ...


# Hand-written rather than transformers' get_cosine_with_min_lr_schedule_with_warmup, which gives the same values
# (tests/train/test_schedule.py compares them; its warm-up reads one step later, see lr_at): importing it pulls in
# transformers.trainer_utils, peft and bitsandbytes, about 1 s more per run and a bitsandbytes warning on every
# seft and smet-pretrain run that does not already load them.


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio (step is 0-based; the first step already trains
    at lr / warmup, where transformers' warm-up starts at 0)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def drop_fraction_at(step: int, cfg: Schedule) -> float:
    """Cosine decay of the drop fraction from --drop-fraction to --drop-fraction-end over the run."""
    return cfg.drop_fraction_end + 0.5 * (cfg.drop_fraction - cfg.drop_fraction_end) * (
        1 + math.cos(math.pi * step / cfg.steps)
    )
