"""The settings of sparse-delta fine-tuning (`sparsetune seft --method seft`): budget, schedule, base precision.

Torch-free: the CLI builds its flags from these Field descriptions, and `--help` must not import torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from sparsetune.patterns import check_regexes
from sparsetune.settings import Settings

Fraction = Annotated[float, Field(ge=0, le=1)]
Schedule = Literal["linear", "cosine"]  # how --replace-fraction decays


class DeltaSettings(Settings):
    delta_rank: int = Field(
        16,
        ge=1,
        description="Budget: as many trainable entries as a LoRA of this rank on the same modules, "
        "sum of R*(in+out) (ignored when --delta-density is given)",
    )
    delta_density: float | None = Field(
        None, gt=0, lt=1, description="Budget as a fraction of the targeted weights instead of --delta-rank"
    )
    reselect_every: int = Field(20, ge=1, description="Replace a fraction of the entries every N optimizer steps")
    select_window: int = Field(
        5, ge=1, description="Steps before each reselection whose gradients score the growth candidates"
    )
    replace_fraction: Fraction = Field(
        0.2,
        description="Fraction of entries replaced at the second reselection, decayed to 0 at the end "
        "(the first replaces all: entries start at random positions)",
    )
    replace_schedule: Schedule = Field(
        "linear", description="Decay of --replace-fraction over training: linear or cosine"
    )
    reactivate: bool = Field(
        False,
        description="Let entries grow on pruned (zero) positions, SEFT's reactivation: each one re-prunes the least "
        "sensitive base weight without an entry. Off by default: the re-prune cost more than the reactivated "
        "entries gained in every measured run (README); off, entries grow only on the input's non-zeros and nothing "
        "is re-pruned",
    )
    base_dtype: Literal["auto", "bf16", "fp32", "nf4"] = Field(
        "auto",
        description="Precision of the frozen base weights: auto (the input's), bf16, fp32, or nf4 "
        "(bitsandbytes 4-bit, dequantized in the forward pass); deltas and optimizer state stay fp32",
    )
    merge: bool = Field(
        True, description="Write the merged model (base plus deltas); --no-merge writes only seft_adapter.safetensors"
    )
    targets: list[str] = Field(
        default_factory=list,
        description="Regexes of Linear names to train (default: every Linear inside the decoder blocks)",
    )
    ignore: list[str] = Field(default_factory=list, description="Regexes of Linear names never to train")

    @field_validator("targets", "ignore")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return check_regexes(value, "target")

    @model_validator(mode="after")
    def _consistent(self) -> DeltaSettings:
        # A non-default rank beside a density is a contradiction; the default rank beside one is what a dumped
        # recipe.yaml of a density run holds (every setting is written), and reads back as that run.
        default_rank = type(self).model_fields["delta_rank"].default
        if self.delta_density is not None and "delta_rank" in self.model_fields_set and self.delta_rank != default_rank:
            raise ValueError("give --delta-rank or --delta-density, not both")
        if self.select_window > self.reselect_every:
            raise ValueError(
                f"select_window {self.select_window} is longer than reselect_every {self.reselect_every}; "
                "the window must fit between two reselections"
            )
        return self
