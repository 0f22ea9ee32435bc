"""The settings of one prune run: the schema behind `sparsetune prune` flags and recipe `prune` stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sparsetune.errors import as_value_error
from sparsetune.patterns import NMPattern, check_regexes, check_sparsity, parse_pattern
from sparsetune.prune.registry import METHOD_NAMES, spoken_list
from sparsetune.settings import CalibrationSettings, LoadSettings

# DSnoT defaults live here, not in prune/dsnot.py, so the schema (and so `--help`) imports no torch.
DSNOT_MAX_CYCLES = 50  # the paper's
DSNOT_THRESHOLD = 0.1 / 2048  # the public code's 0.1 on sums over 2048-token samples, per token


class PruneConfig(CalibrationSettings, LoadSettings):
    RENAMED = {"seqlen": "calib_seqlen"}  # `--seqlen` until the release after next (sweep's name: one per idea)

    model: str = Field(description="HF model dir, hub id, .gguf file, or bundled alias (smollm2, llama)")
    output: str | None = Field(None, description="Output dir for the pruned model")
    method: Literal[("auto", *METHOD_NAMES)] = Field(  # type: ignore[valid-type]
        "auto",
        description=f"Pruning method: {spoken_list()}; auto = the one (with OWL and DSnoT "
        "settings) that measured best at this sparsity within 3x Wanda's prune time (prints its choice)",
    )
    sparsity: float | None = Field(
        None, description="Unstructured sparsity in [0, 1), the fraction of weights set to zero (default: 0.5)"
    )
    pattern: str | None = Field(None, description="N:M pattern instead of --sparsity: N kept of every M input columns")
    calib: str = Field(
        "c4",
        description="Calibration data: c4, wikitext2, alpaca, self (sampled from the model), "
        "or a .txt/.jsonl/.json/.parquet file",
    )
    self_temperature: float = Field(1.0, gt=0, description="Sampling temperature for --calib self")
    targets: list[str] = Field(
        default_factory=list,
        description="Regexes of Linear names to prune (default: every Linear inside the decoder blocks)",
    )
    ignore: list[str] = Field(default_factory=list, description="Regexes of Linear names never to prune")
    sequential: bool = Field(
        True,
        description="True-sequential one-pass engine; --no-sequential takes every statistic from the dense block",
    )
    down_stats: Literal["auto", "dense", "pruned"] = Field(
        "auto",
        description="Sequential engine: down_proj's statistic from act(gate)*up before gate/up are pruned (dense) "
        "or after (pruned, strict true-sequential); auto = dense for wanda, pruned for sparsegpt and alps",
    )
    untie_embeddings: bool = Field(
        False, description="Allow pruning lm_head when it shares its weight with the embeddings (unties a copy)"
    )
    owl: bool = Field(False, description="OWL: per-block sparsity from Wanda outlier ratios (mean stays the target)")
    owl_m: float = Field(5.0, gt=0, description="OWL outlier threshold: scores above M x the block mean")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="OWL spread: block densities span 2 x lambda")
    block_sparsity: list[float] | None = Field(
        None, description="Explicit per-block sparsity list (one per decoder block; recipes only)"
    )
    offload_activations: Literal["cpu", "disk"] = Field(
        "cpu", description="Where calibration activations live between blocks: cpu (RAM) or disk (memory-mapped)"
    )
    stream: bool = Field(
        True,
        description="Stream the weights block by block from the input's safetensors to the output's shards, so "
        "memory holds one block (--no-stream loads the whole model; --device-map, --calib self, .gguf, exported "
        "and seft-adapter inputs always do)",
    )
    checkpoint_dir: str | None = Field(None, description="Save progress here after every finished block")
    resume: bool = Field(False, description="Continue from the last finished block in --checkpoint-dir")
    device_map: str | None = Field(
        None, description="auto: place blocks across GPUs and CPU with accelerate (models bigger than one device)"
    )
    percdamp: float = Field(
        0.01, gt=0, description="SparseGPT and ALPS dampening, a fraction of the mean Hessian diagonal"
    )
    blocksize: int = Field(128, ge=1, description="SparseGPT column block size")
    alps_rho: float = Field(
        0.1, gt=0, description="ALPS: starting ADMM penalty rho (Hessian normalised to unit diagonal)"
    )
    alps_rho_growth: float = Field(
        1.0,
        gt=0,
        description="ALPS: pace of rho's growth; the paper's factors x1.3/x1.2/x1.1 per 3 steps are raised to this "
        "power (above 1: fewer steps, a slightly worse support; below 1: more steps)",
    )
    alps_max_iter: int = Field(
        300, ge=1, description="ALPS: most ADMM steps per group (it stops when the support settles)"
    )
    alps_cg_iter: int = Field(
        10, ge=0, description="ALPS: conjugate-gradient steps refining the kept weights on the final support (0: none)"
    )
    moe_calibrate: Literal["routed", "all"] = Field(
        "routed",
        description="Mixture-of-Experts statistics: routed = each expert is calibrated on the tokens the router sends "
        "it, each weighted by its routing weight; all = every calibration token goes through every expert, for "
        "statistics only (the model's output still uses the router), so rarely routed experts get calibrated too. "
        "An expert no token reaches is pruned by magnitude, with a warning naming it",
    )
    refine: Literal["none", "dsnot"] = Field(
        "none",
        description="Mask refinement after the method: dsnot swaps weights within each row (N:M: within groups) "
        "to shrink the expected output error, keeping every row's non-zero count; none",
    )
    refine_targets: list[str] = Field(
        default_factory=list,
        description="Regexes of the pruned Linears to refine (default: every pruned Linear)",
    )
    refine_max_cycles: int = Field(DSNOT_MAX_CYCLES, ge=1, description="DSnoT: at most this many swaps per row")
    refine_threshold: float = Field(
        DSNOT_THRESHOLD,
        ge=0,
        description="DSnoT: a row stops once |expected output error| per token is at most this "
        "(the paper's 0.1 on 2048-token sums)",
    )
    refine_values: Literal["updated", "dense"] = Field(
        "updated",
        description="DSnoT with a method that updates kept weights (SparseGPT, ALPS): updated = measure the error of "
        "the updated weights; dense = refine the mask on the dense weights, then apply it to the updated ones. "
        "A revived weight takes its dense value",
    )

    @field_validator("sparsity")
    @classmethod
    def _sparsity_range(cls, value: float | None) -> float | None:
        return None if value is None else as_value_error(check_sparsity, value)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern_form(cls, value: object) -> str | None:
        parsed = as_value_error(parse_pattern, value)
        return None if parsed is None else str(parsed)

    @field_validator("block_sparsity")
    @classmethod
    def _block_range(cls, value: list[float] | None) -> list[float] | None:
        return None if value is None else [as_value_error(check_sparsity, v) for v in value]

    @field_validator("refine_targets")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return check_regexes(value, "refine target")

    @model_validator(mode="after")
    def _one_target(self) -> PruneConfig:
        if self.pattern is not None and self.sparsity is not None:
            raise ValueError("give either sparsity or pattern, not both")
        if self.pattern is None and self.sparsity is None:
            self.sparsity = 0.5
        if self.block_sparsity is not None and (self.owl or self.pattern is not None):
            raise ValueError("block_sparsity is an unstructured per-block list; drop owl/pattern to use it")
        if self.refine_targets and self.refine == "none":
            raise ValueError("refine_targets does nothing without refine: dsnot; add --refine dsnot or drop it")
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("--resume needs --checkpoint-dir")
        return self

    @property
    def nm(self) -> NMPattern | None:
        return parse_pattern(self.pattern)

    @property
    def dense_down_stats(self) -> bool:
        """Wanda does not compensate for pruning error, and its down_proj scores are better from the dense
        gate/up output (bench/results/prune.jsonl, suite llmc, run wanda-2:4: variant default against
        strict-sequential); SparseGPT's and ALPS's updates need the real input."""
        if self.down_stats == "auto":
            return self.method == "wanda"
        return self.down_stats == "dense"

    @property
    def target_sparsity(self) -> float:
        nm = self.nm
        return nm.sparsity if nm is not None else float(self.sparsity or 0.0)
