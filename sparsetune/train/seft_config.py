"""The settings of one `sparsetune seft` run: the schema behind its flags and recipe `seft` stages."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from sparsetune.train.distill_config import DistillSettings
from sparsetune.train.granet.config import GranetSettings
from sparsetune.train.memory_config import activation_checkpointing_field, loss_chunk_tokens_field
from sparsetune.train.sparse_delta.config import DeltaSettings

METHODS = ("seft", "masked-ft", "lora-reprune", "granet")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class SeftConfig(DeltaSettings, GranetSettings, DistillSettings):
    """The run's settings; the sparse-delta method's own (budget, schedule, base precision, merge, targets) come
    from `DeltaSettings` and apply to `--method seft` only, GraNet's from `GranetSettings` (`--method granet`),
    distillation's (every method) from `DistillSettings`."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Pruned HF model dir (e.g. `sparsetune prune` output); its zeros are the mask")
    output: str | None = Field(None, description="Output dir for the fine-tuned sparse model")
    method: Literal["seft", "masked-ft", "lora-reprune", "granet"] = Field(
        "seft",
        description="seft: sparse-delta fine-tuning (a budget of trainable entries over the frozen pruned base, "
        "moved by periodic reselection, with a sensitivity re-prune); masked-ft: every active weight under a fixed "
        "mask; lora-reprune: LoRA, merge, re-prune with Wanda (LoRA*); granet: gradual pruning to --target-sparsity or "
        "--pattern with zero-cost neuroregeneration (GraNet), every active weight trained; the input may be dense",
    )
    data: str = Field(
        "c4",
        description="Training data: alpaca, c4, wikitext2, or a .txt/.jsonl/.json/.parquet file "
        "(Alpaca records get the prompt template and loss on the response only; text is packed into windows)",
    )
    val_data: str | None = Field(None, description="Validation data (same kinds as --data) for --eval-every")
    eval_every: int = Field(0, ge=0, description="Compute validation loss every N steps (0 = off)")
    val_batches: int = Field(4, ge=1, description="Batches of --val-data per validation")
    data_dir: str | None = Field(None, description="Local mirror dir for named datasets (or SPARSETUNE_DATA_DIR)")
    skip_tokens: int = Field(
        0, ge=0, description="Plain text: skip this many leading tokens of the joined stream (e.g. calibration tokens)"
    )
    seqlen: int = Field(256, ge=8, description="Tokens per packed window; the length cap of instruction examples")
    batch_size: int = Field(8, ge=1, description="Global batch: sequences per optimizer step over all processes")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step (the batch is split into them)")
    steps: int = Field(300, ge=1, description="Optimizer steps")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (cosine schedule with linear warmup)")
    warmup_steps: int | None = Field(
        None, ge=0, description="Linear learning-rate warmup steps (default: 5% of --steps)"
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of --lr")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    optim: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="Optimizer state: adamw (fp32 m, v) or adamw8bit (bitsandbytes blockwise 8-bit m, v)"
    )
    lora_r: int = Field(16, ge=1, description="lora-reprune: LoRA rank")
    lora_alpha: float = Field(32.0, gt=0, description="lora-reprune: LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="lora-reprune: LoRA dropout")
    reprune_samples: int = Field(
        32, ge=1, description="lora-reprune: training sequences used as Wanda calibration for the re-prune"
    )
    seed: int = Field(0, description="Seed for the data order and the entries' random start positions")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Weights dtype during training (the optimizer math is float32)"
    )
    device: str = Field("auto", description="Compute device: auto, cpu, cuda, cuda:N")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless you trust it)")
    activation_checkpointing: bool = activation_checkpointing_field()
    loss_chunk_tokens: int = loss_chunk_tokens_field()
    log_every: int = Field(1, ge=1, description="Write a train_log.jsonl line every N steps")
    checkpoint_every: int = Field(0, ge=0, description="Save a resumable checkpoint every N steps (0 = off)")
    checkpoint_dir: str | None = Field(
        None, description="Where checkpoints go (default: OUTPUT.ckpt next to the output dir)"
    )
    resume: bool = Field(False, description="Continue from the checkpoint in --checkpoint-dir")

    @model_validator(mode="after")
    def _run_consistent(self) -> SeftConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.eval_every and self.val_data is None:
            raise ValueError("--eval-every needs --val-data")
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
