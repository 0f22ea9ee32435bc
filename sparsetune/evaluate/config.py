"""Settings of `sparsetune eval`, `sparsetune sweep` and `sparsetune report`: the schemas behind their flags
and behind recipe `eval` / `sweep` / `report` stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from sparsetune.errors import as_value_error
from sparsetune.patterns import check_sparsity, parse_pattern
from sparsetune.prune.registry import METHOD_NAMES
from sparsetune.settings import CalibrationSettings, LoadSettings, Settings


class EvalSettings(LoadSettings):
    """What to measure on a model: perplexity sources and lm-eval tasks (shared by eval and sweep)."""

    ppl: list[str] = Field(
        default_factory=lambda: ["wikitext2"],
        description="Perplexity sources: wikitext2, c4, or a local .txt/.jsonl/.json/.parquet file; none to skip",
    )
    seqlen: int | None = Field(
        None, ge=2, description="Tokens per perplexity window (default: 2048, capped at the model's max positions)"
    )
    stride: int | None = Field(
        None, ge=1, description="Sliding-window perplexity: start a window every STRIDE tokens (default: disjoint)"
    )
    limit_windows: int | None = Field(None, ge=1, description="Evaluate only the first N perplexity windows")
    ppl_batch_size: int = Field(1, ge=1, description="Perplexity windows per forward pass")
    tasks: list[str] = Field(
        default_factory=list,
        description="lm-eval tasks, e.g. arc_easy,piqa (offline copies from the data mirror when one is set)",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples per lm-eval task (task default: 0)")
    limit: float | None = Field(
        None, gt=0, description="lm-eval documents per task: a count, or a fraction below 1 (for quick checks)"
    )
    batch_size: int = Field(8, ge=1, description="lm-eval batch size")
    include_path: list[str] = Field(
        default_factory=list, description="Extra dirs of lm-eval task YAMLs, exactly as lm-eval's --include_path"
    )

    @field_validator("ppl")
    @classmethod
    def _none_means_empty(cls, value: list[str]) -> list[str]:
        return [] if [v.lower() for v in value] == ["none"] else value


class EvalConfig(EvalSettings):
    models: list[str] = Field(
        min_length=1, description="Models to compare (the first is the baseline): dirs, hub ids, .gguf, aliases"
    )
    output: str | None = Field(None, description="Write eval.json and eval.md into this dir")


class SweepConfig(CalibrationSettings, EvalSettings):
    model: str = Field(description="The dense base model: HF dir, hub id, .gguf file, or bundled alias")
    output: str = Field(description="Output dir for sweep.json, sweep.md, sweep.png and the per-point results")
    methods: list[Literal[METHOD_NAMES]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["wanda", "sparsegpt", "magnitude"], description="Pruning methods to sweep"
    )
    sparsities: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.6, 0.7], description="Unstructured sparsities to sweep"
    )
    patterns: list[str] = Field(default_factory=list, description="N:M patterns to sweep as well, e.g. 2:4,4:8")
    refine: list[Literal["none", "dsnot", "dsnot-dense"]] = Field(
        default_factory=lambda: ["none"],
        description="Mask refinements to sweep for every pruned point: none, dsnot, dsnot-dense (DSnoT with "
        "prune's --refine-values dense); none,dsnot = with and without",
    )
    calib: str = Field("c4", description="Calibration data (one set, reused by every point): c4, wikitext2, a file")
    resume: bool = Field(False, description="Continue an interrupted sweep, skipping the points already finished")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"give at least one method of {', '.join(METHOD_NAMES)}")
        return list(dict.fromkeys(value))

    @field_validator("refine")
    @classmethod
    def _some_refine(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one of none, dsnot")
        return list(dict.fromkeys(value))

    @field_validator("sparsities")
    @classmethod
    def _sparsity_range(cls, value: list[float]) -> list[float]:
        return sorted({as_value_error(check_sparsity, v) for v in value})

    @field_validator("patterns", mode="before")
    @classmethod
    def _pattern_form(cls, value: object) -> object:
        if not isinstance(value, list):
            return value
        return list(dict.fromkeys(str(as_value_error(parse_pattern, v)) for v in value))


class ReportConfig(Settings):
    model: str = Field(description="A pruned model dir holding its sparsity report (`sparsetune prune` output)")
    output: str | None = Field(None, description="Output dir for the PNGs and report.md (default: MODEL-report)")
