"""The distillation settings of every `seft` method (a block of fields `SeftConfig` inherits). Torch-free: the CLI
builds its flags from these Field descriptions."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sparsetune.reports import REPORT_FILE


class DistillSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    distill_from: str | None = Field(
        None,
        description="Teacher for --distill-loss: the dense model (default: the source model the input's "
        f"{REPORT_FILE} records)",
    )
    distill_loss: Literal["none", "kl", "squarehead"] = Field(
        "none",
        description="Distillation added to the cross-entropy: none; kl: KL(teacher || student) of the logits; "
        "squarehead: kl plus each decoder layer's normalised feature MSE (Kurtic et al. 2023)",
    )
    distill_weight: float = Field(1.0, ge=0, description="Weight of the distillation loss beside the cross-entropy")
    distill_temperature: float = Field(1.0, gt=0, description="Softmax temperature of the logit KL")
    teacher_dtype: Literal["bf16", "nf4"] = Field(
        "bf16", description="Precision of the teacher's weights: bf16, or nf4 (bitsandbytes 4-bit)"
    )

    @model_validator(mode="after")
    def _distill_consistent(self) -> DistillSettings:
        if self.distill_from is not None and self.distill_loss == "none":
            raise ValueError("--distill-from needs --distill-loss kl or squarehead")
        return self
