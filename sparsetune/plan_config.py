"""The settings of `sparsetune plan`: the schema behind its flags (help text lives here, once)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PlanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    params: str | None = Field(
        None,
        description="Dense-equivalent parameter count (1.2e8, 120M, 1.2B), or a model dir (its safetensors) or a "
        "Llama config.json to count from; the law's active parameters are this x density",
    )
    unique_tokens: float | None = Field(None, description="Unique tokens of training data you have, e.g. 1.3e10")
    tokens: float | None = Field(
        None, description="Tokens to train on (repeats included: epochs = tokens / unique tokens); or give --flops"
    )
    flops: float | None = Field(
        None, description="Training compute budget (6 x active parameters x tokens); or give --tokens"
    )
    density: float | None = Field(None, description="Also predict this density (0, 1] (1 = dense)")
    plot: str | None = Field(None, description="Write a PNG of predicted loss against density here")
    batch_size: int = Field(512, ge=1, description="Batch size of the recommended smet-pretrain command line")
    seqlen: int = Field(256, ge=1, description="Sequence length of the recommended smet-pretrain command line")
