"""The settings every training command shares (`seft` with each --method, `smet-pretrain`): batch, schedule,
optimizer, activation memory, logging and checkpoints. Each command's schema inherits them, so their help text
lives here once; `batch_size` and `steps` differ in their defaults only, so they are declared with a factory.

Torch-free: the CLI builds its flags from the Field descriptions, and `--help` must not import torch.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from sparsetune.settings import DataSettings, DeviceSettings
from sparsetune.train.memory_config import (
    activation_checkpointing_field,
    cpu_block_cache_field,
    loss_chunk_tokens_field,
)


def batch_size_field(default: int) -> Any:
    return Field(default, ge=1, description="Global batch: sequences per optimizer step over all processes")


def steps_field(default: int) -> Any:
    return Field(default, ge=1, description="Optimizer steps")


class TrainingSettings(DataSettings, DeviceSettings):
    # each command declares these with its own default and, for output, its own description
    output: str | None = None
    batch_size: int
    steps: int

    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (the batch is split into them)")
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear learning-rate warmup steps (default: 5% of --steps)"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of --lr")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    optim: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="Optimizer state: adamw (fp32 m, v) or adamw8bit (bitsandbytes blockwise 8-bit m, v)"
    )
    activation_checkpointing: bool = activation_checkpointing_field()
    loss_chunk_tokens: int = loss_chunk_tokens_field()
    cpu_block_cache_mb: float = cpu_block_cache_field(0)
    log_every: int = Field(1, ge=1, description="Write a train_log.jsonl line every N steps")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = off)")
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go (default: OUTPUT.ckpt next to the output dir)"
    )
    resume: bool = Field(False, description="Continue from the checkpoint in --checkpoint-dir")

    @model_validator(mode="after")
    def _schedule_consistent(self) -> TrainingSettings:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.warmup_steps is not None and 0 < self.steps <= self.warmup_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} must be below steps {self.steps}")
        return self

    @property
    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else self.steps // 20

    def checkpoint_path(self) -> str | None:
        """The checkpoint dir in use: --checkpoint-dir, else OUTPUT.ckpt when checkpointing or resuming."""
        if self.checkpoint_dir is not None:
            return self.checkpoint_dir
        if (self.checkpoint_every or self.resume) and self.output is not None:
            return self.output.rstrip("/") + ".ckpt"
        return None
