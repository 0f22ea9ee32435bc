"""The divergence guard's bounds: when a run's loss or weights count as diverged (the loop stops it then)."""

from __future__ import annotations

import math
from typing import Any

# The divergence guard. Fixed, not settings: a healthy run never comes near these bounds, and a diverged one
# crosses them by far (lr 1e9 puts weights near 1e9 after one AdamW step; lr 0.1 took SmolLM2's fine-tuning loss
# from 6.3 to 22 in one step, and it stayed above ln(vocab) = 10.8 for the rest of the run).

DIVERGENCE_STEPS = 10  # N: consecutive steps the loss must stay too high; also the window of the loss reference
DIVERGENCE_FACTOR = 2.0  # too high: above max(FACTOR x reference, reference + MARGIN nats), where the reference is
DIVERGENCE_MARGIN = 1.0  # the lowest mean of N consecutive step losses so far (robust to single easy batches);
# or, once some step's loss was MARGIN below ln(vocab), at or above ln(vocab): no better than uniform guessing. That
# catches a model destroyed within its first N steps, before a clean reference exists.
WEIGHT_LIMIT_FACTOR = 1000.0  # a trained tensor may not exceed 1000 x max(1, its largest |w| at the start)


def new_guard() -> dict[str, Any]:
    """The loss history the guard keeps (in TrainingState, so a resumed run judges exactly as an uninterrupted one)."""
    return {"recent": [], "reference": None, "lowest": math.inf, "strikes": 0}


def loss_bound(reference: float | None, lowest: float = math.inf, uniform: float | None = None) -> float:
    """The loss above which a step counts as diverging: DIVERGENCE_FACTOR / MARGIN over the reference (once N steps
    gave one), capped at `uniform` = ln(vocab) once the `lowest` step loss so far was MARGIN below it."""
    bound = math.inf if reference is None else max(DIVERGENCE_FACTOR * reference, reference + DIVERGENCE_MARGIN)
    if uniform is not None and lowest < uniform - DIVERGENCE_MARGIN:
        bound = min(bound, uniform)
    return bound
