"""GraNet's schedules as pure functions of the step (torch-free).

Steps count optimizer steps done (the loop's 1-based `step` after a step); step 0 is the model as loaded.

- Updates happen at `start + k * interval` (k = 0, 1, ...), for as long as training runs. Those up to `end` prune:
  with n = (end - start) // interval pruning updates after the first, the k-th sets the sparsity to
  s_k = s_f + (s_i - s_f) * (1 - k / n)^3 (Zhu & Gupta's cubic schedule, as GraNet's `pruning`), so the first holds
  s_i and the last (at start + n * interval <= end) reaches s_f exactly.
- Every update at step >= 1 also regenerates (drop and regrow) a fraction of each layer's remaining weights. The
  fraction decays by cosine over the whole run, GraNet's `CosineDecay` (torch's CosineAnnealingLR with
  T_max = the run's steps): f_t = f_end + (f_0 - f_end) * (1 + cos(pi * t / steps)) / 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GranetSchedule:
    initial_sparsity: float  # s_i
    final_sparsity: float  # s_f
    start: int
    end: int
    interval: int
    steps: int  # the run's optimizer steps: the period of the regeneration fraction's cosine
    regrow_fraction: float = 0.5  # f_0
    regrow_fraction_end: float = 0.005  # f_end

    @property
    def pruning_updates(self) -> int:
        """n: pruning updates after the first one."""
        return max(0, (self.end - self.start) // self.interval)

    @property
    def last_prune_step(self) -> int:
        return self.start + self.pruning_updates * self.interval

    def update_due(self, step: int) -> bool:
        """Whether an update (pruning and/or regeneration) follows step `step`."""
        return step >= self.start and (step - self.start) % self.interval == 0

    def prunes_at(self, step: int) -> bool:
        return self.update_due(step) and step <= self.last_prune_step

    def sparsity_at(self, step: int) -> float:
        """The sparsity the schedule asks for after step `step`: s_i before the start, s_f from the last pruning
        update on, the cubic in between (constant between updates)."""
        if step < self.start:
            return self.initial_sparsity
        n = self.pruning_updates
        k = min((step - self.start) // self.interval, n)
        if n == 0 or k == n:
            return self.final_sparsity
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - k / n) ** 3

    def regrow_fraction_at(self, step: int) -> float:
        """The fraction of each layer's remaining weights an update after step `step` drops and regrows."""
        cosine = (1 + math.cos(math.pi * step / self.steps)) / 2
        return self.regrow_fraction_end + (self.regrow_fraction - self.regrow_fraction_end) * cosine

    def is_final(self, step: int) -> bool:
        """The pruning update that reaches the final sparsity (and, for an N:M target, imposes the pattern)."""
        return self.prunes_at(step) and step == self.last_prune_step


def regrow_count(active: int, fraction: float) -> int:
    """Entries a regeneration drops (and regrows) out of `active`: ceil(fraction * active), as GraNet's
    `magnitude_death`. The tiny epsilon keeps 0.5 * 10 == 5 despite float error."""
    return min(active, math.ceil(fraction * active - 1e-9))


def keep_count(numel: int, sparsity: float) -> int:
    """Entries a matrix (or all of them, for a global threshold) of `numel` keeps at `sparsity`: all but
    int(numel * sparsity), as every sparsetune pruner counts (`masks.prune_count`)."""
    return numel - int(numel * sparsity + 1e-9)
