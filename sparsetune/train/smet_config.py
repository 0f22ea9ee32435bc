"""The settings of one `sparsetune smet-pretrain` run: the schema behind its flags and recipe `smet-pretrain` stages."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from sparsetune.train.training_config import TrainingSettings, batch_size_field, steps_field

PRESETS = ("tiny", "mini", "small", "llama-60m", "llama-130m", "llama-350m", "llama-1b")


class SmetConfig(TrainingSettings):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())
    # `--warmup-ratio R` until the release after next: seft's name and unit, R x steps warmup steps
    RENAMED = {"warmup_ratio": "warmup_steps"}

    model_config_name: str = Field(
        "tiny",
        alias="model_config",
        description="Llama architecture: a preset (tiny, mini, small, llama-60m, llama-130m, llama-350m, llama-1b) "
        "or a config.json path",
    )
    tokenizer: str = Field(
        "smollm2",
        description="Tokenizer: smollm2 (bundled), bytes (byte-level, 259 ids: a model whose cost is its decoder "
        "blocks, not its embeddings), an HF id or a local dir",
    )
    data: str = Field(
        "tinyshakespeare",
        description="Training text: c4, tinyshakespeare, wikitext2, or a .txt/.jsonl/.json/.parquet file",
    )
    val_fraction: float = Field(
        0.05, ge=0, lt=0.5, description="Fraction of the packed windows held out for validation loss"
    )
    output: str | None = Field(None, description="Output dir for the trained sparse LlamaForCausalLM")
    density: Annotated[float, Field(gt=0, le=1)] | Literal["auto"] = Field(
        0.5,
        description="Fraction of sparse-layer weights that are active (1.0 = dense training), or auto: the "
        "loss-optimal density of the data-constrained sparse scaling law (`sparsetune plan`) for this model, "
        "--unique-tokens and steps x batch x seqlen tokens",
    )
    unique_tokens: float | None = Field(
        None,
        gt=0,
        description="With --density auto: unique tokens of training data (default: the training windows' tokens)",
    )
    init: Literal["erk", "uniform"] = Field("erk", description="Initial sparse layout across layers")
    growth: Literal["random", "gradient", "ctre", "ctre-sim"] = Field(
        "random",
        description="Growth: random (SET-style), gradient (RigL-style, largest |dense gradient|), ctre (CTRE: "
        "largest |cosine similarity| of the activations of the two neurons a connection joins, on one seeded "
        "micro-batch; no gradient) or ctre-sim (CTRE with its simultaneous random exploration)",
    )
    update_interval: int = Field(100, ge=0, description="Topology update every N steps (0 = static sparse)")
    drop_fraction: float = Field(0.2, ge=0, lt=1, description="Fraction of active weights dropped at the first update")
    drop_fraction_end: float = Field(0.005, ge=0, lt=1, description="Drop fraction at the end (cosine decay)")
    regrow_warmup: int = Field(
        100, ge=0, description="Ramp a regrown weight's update over this many steps (0 = off, naive DST)"
    )
    lr_density_exponent: float = Field(
        1.0, ge=0, description="Sparse layers train with lr / density^e (0 = the same lr as dense layers)"
    )
    lr: float = Field(1e-3, gt=0, description="Peak learning rate (cosine schedule)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay (2-D weights only)")
    batch_size: int = batch_size_field(16)
    seqlen: int = Field(256, ge=8, description="Tokens per training window")
    steps: int = steps_field(1000)
    seed: int = Field(0, description="Seed for initialisation, layout, data order and random growth")
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights dtype: auto = bfloat16 on GPU, float32 on CPU"
    )
    eval_every: int = Field(0, ge=0, description="Compute validation loss every N steps (0 = only at the end)")
    val_batches: int = Field(4, ge=1, description="Batches of held-out windows per validation")
    spike_probe: bool = Field(
        False,
        description="Around every topology update (10 steps before, 10 after) also log the loss of one fixed "
        "held-out batch, and report the spike ratios it gives: free of the batch-to-batch noise of the "
        "training loss (20 extra forward passes per update)",
    )
    trust_remote_code: bool = Field(False, description="Allow tokenizer code from the hub (off unless you trust it)")

    @model_validator(mode="after")
    def _consistent(self) -> SmetConfig:
        if self.drop_fraction_end > self.drop_fraction:
            raise ValueError("drop_fraction_end must not exceed drop_fraction (the fraction decays)")
        if self.unique_tokens is not None and self.density != "auto":
            raise ValueError("unique_tokens is read by --density auto only; drop it or pass --density auto")
        if self.spike_probe and self.val_fraction == 0:
            raise ValueError("spike_probe measures a held-out batch; give a --val-fraction above 0")
        return self

    @property
    def sparse(self) -> bool:
        if self.density == "auto":
            raise RuntimeError("internal error: --density auto is resolved when the model is built")
        return self.density < 1.0

    @property
    def tokens(self) -> int:
        """Tokens the run trains on: steps x batch size x sequence length."""
        return self.steps * self.batch_size * self.seqlen

    @classmethod
    def renamed_value(cls, old: str, value: Any, data: dict[str, Any]) -> Any:
        """`warmup_ratio` R (a fraction of the steps in [0, 1)) -> int(R x steps) warmup steps, as it ran."""
        try:
            ratio = -1.0 if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            ratio = -1.0
        if not 0 <= ratio < 1:
            raise ValueError(f"warmup_ratio {value!r} must be a fraction in [0, 1); or give warmup_steps instead")
        steps = data.get("steps", cls.model_fields["steps"].default)
        return int(ratio * steps) if isinstance(steps, int) else None  # a bad --steps is reported as itself
