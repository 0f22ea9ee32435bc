"""The settings of one `sparsetune seft` run: the schema behind its flags and recipe `seft` stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sparsetune.train.distill_config import DistillSettings
from sparsetune.train.granet.config import GranetSettings
from sparsetune.train.memory_config import cpu_block_cache_field
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.training_config import TrainingSettings, batch_size_field, steps_field


class SeftConfig(TrainingSettings, DeltaSettings, GranetSettings, DistillSettings):
    """The run's settings; the sparse-delta method's own (budget, schedule, base precision, merge, targets) come
    from `DeltaSettings` and apply to `--method seft` only, GraNet's from `GranetSettings` (`--method granet`),
    distillation's (every method) from `DistillSettings`, the training loop's from `TrainingSettings`."""

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
    skip_tokens: int = Field(
        0, ge=0, description="Plain text: skip this many leading tokens of the joined stream (e.g. calibration tokens)"
    )
    seqlen: int = Field(256, ge=8, description="Tokens per packed window; the length cap of instruction examples")
    batch_size: int = batch_size_field(8)
    steps: int = steps_field(300)
    cpu_block_cache_mb: float = cpu_block_cache_field(1)
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (cosine schedule with linear warmup)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
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
    stream: bool = Field(
        True,
        description="--base-dtype nf4: read the model block by block and quantize each block as it loads, so the "
        "full-precision model is never in memory (--no-stream loads it whole first; a start whose masks drifted "
        "from their targets, and an input that does not stream, always do)",
    )

    @model_validator(mode="after")
    def _validation_data(self) -> SeftConfig:
        if self.eval_every and self.val_data is None:
            raise ValueError("--eval-every needs --val-data")
        return self
