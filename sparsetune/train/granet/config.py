"""The settings of `seft --method granet` (a block of fields `SeftConfig` inherits). Torch-free: the CLI builds its
flags from these Field descriptions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparsetune.errors import as_value_error
from sparsetune.patterns import parse_pattern

END_FRACTION = 0.75  # default end of pruning: this fraction of the run, leaving the rest to recover at s_f


class GranetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target_sparsity: float | None = Field(
        None, gt=0, lt=1, description="granet: the final sparsity of the trained matrices (or --pattern)"
    )
    pattern: str | None = Field(
        None,
        description="granet: the final N:M pattern instead of --target-sparsity, e.g. 2:4 (N kept of every M "
        "input columns); the schedule prunes unstructured up to the pattern's sparsity and imposes it at its last "
        "pruning step",
    )
    initial_sparsity: float | None = Field(
        None, ge=0, lt=1, description="granet: the sparsity of the first pruning step (default: the input's)"
    )
    granet_start: int = Field(0, ge=0, description="granet: the step of the first pruning step")
    granet_end: int | None = Field(
        None,
        ge=0,
        description="granet: the step by which the final sparsity is reached (default: 75% of --steps); "
        "regeneration goes on after it",
    )
    granet_interval: int = Field(10, ge=1, description="granet: steps between mask updates (GraNet's update frequency)")
    granet_score: Literal["magnitude", "wanda"] = Field(
        "magnitude",
        description="granet: what pruning and dropping rank by: magnitude |W|, or wanda |W|*||X|| (input norms "
        "summed over the batches of every update)",
    )
    granet_scope: Literal["layer", "global"] = Field(
        "layer",
        description="granet: one sparsity per matrix (layer), or one threshold over all of them (global; with "
        "wanda it compares matrices whose inputs differ in scale, and may empty whole matrices)",
    )
    granet_regrow_fraction: float = Field(
        0.5,
        ge=0,
        le=1,
        description="granet: fraction of each matrix's remaining weights an update drops by score and regrows by "
        "gradient magnitude (at step 0 of the cosine decay)",
    )
    granet_regrow_fraction_end: float = Field(
        0.005, ge=0, le=1, description="granet: the regrow fraction the cosine decay ends at, at the last step"
    )

    @property
    def granet_end_step(self) -> int:
        """The end of pruning: --granet-end, else 75% of the run (never before the start, never the last step)."""
        if self.granet_end is not None:
            return self.granet_end
        steps = int(getattr(self, "steps", 1))
        return max(self.granet_start, min(int(END_FRACTION * steps), steps - 1))

    @model_validator(mode="after")
    def _granet_consistent(self) -> GranetSettings:
        method = getattr(self, "method", "granet")
        names = ("target_sparsity", "pattern", "initial_sparsity")
        given = [f"--{n.replace('_', '-')}" for n in names if getattr(self, n) is not None]
        if method != "granet":
            if given:
                raise ValueError(f"{given[0]} applies to --method granet only")
            return self
        if (self.target_sparsity is None) == (self.pattern is None):
            raise ValueError("--method granet needs --target-sparsity or --pattern N:M (one of them)")
        nm = as_value_error(parse_pattern, self.pattern) if self.pattern is not None else None
        if self.pattern is not None and nm is None:
            raise ValueError("--pattern must be N:M, e.g. 2:4")
        final = nm.sparsity if nm is not None else self.target_sparsity
        if self.initial_sparsity is not None and final is not None and self.initial_sparsity > final:
            raise ValueError(f"--initial-sparsity {self.initial_sparsity} is above the final sparsity {final:g}")
        steps = int(getattr(self, "steps", 1))
        end = self.granet_end_step
        if end < self.granet_start:
            raise ValueError(f"--granet-end {end} is before --granet-start {self.granet_start}")
        if end >= steps:
            raise ValueError(
                f"--granet-end {end} must be below --steps {steps}: the final sparsity is reached at a mask update, "
                "and none follows the last step"
            )
        return self
