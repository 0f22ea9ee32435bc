"""`sparsetune run` and `sparsetune validate`: recipes that chain prune, seft, smet-pretrain, eval, sweep, export.

A recipe is one YAML file:

    name: prune-seft-export
    vars: {model: smollm2}                     # ${model} anywhere below; --set model=... replaces it
    stages:
      - prune: {model: "${model}", method: wanda, sparsity: 0.5}
      - seft: {data: alpaca, steps: 200}       # no model: reads the previous stage's output
      - eval: {models: ["${model}", "@prev"]}  # @prev / @<stage name>: an earlier stage's output
      - export: {format: sparse-bitmask}
    gates: {wikitext2_ppl_max: 90, sparsity_min: 0.5}

Each stage's settings are exactly those of its command: the same pydantic schema behind the flags and
`--recipe`. One table, `STAGES`, says per kind what its schema is, what it checks before any work, which library
function runs it and prints its summary, what it reads, and how it resumes; the CLI commands run through it too.
The YAML reader and the stage validation live in sparsetune/recipes.py, the checks in sparsetune/preflight.py, the
gates in sparsetune/gates.py.

This module imports no torch: planning, validating and the checks of a stage all run before the library is
imported (a refused command costs what `--version` does), and each stage imports its library when it runs.

`plan_recipe` resolves variables, overrides and stage chaining into validated configs without loading any
model; `run_plan` runs them. Stage outputs go to OUT/<nn>-<name>; a stage that finished with the same settings
and the same input files is skipped on re-run, so a crashed pipeline resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsetune import preflight, reports
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig, SweepConfig
from sparsetune.export.config import ExportConfig
from sparsetune.gates import check_gate_names, check_gates, eval_metrics
from sparsetune.outputs import check_parent_writable, write_json_atomic
from sparsetune.prune.config import PruneConfig
from sparsetune.recipes import (
    VAR,
    Located,
    merge_settings,
    parse_assignment,
    read_recipe,
    stage_entries,
    substitute,
    validate_stage,
)
from sparsetune.settings import without_renamed
from sparsetune.train.distill_config import DistillSettings
from sparsetune.train.granet.config import GranetSettings
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet_config import SmetConfig

log = logging.getLogger(__name__)

PREV = "@prev"
RUN_FILE = "run.json"  # marks OUT as a sparsetune run dir: resuming into it needs no --overwrite
STATE_DIR = ".stages"
SUMMARY_FILE = "summary.json"
# Settings that neither change a stage's result nor name its input (the input hash covers the model files).
UNHASHED = {
    "output", "model", "models", "resume", "device", "log_every", "checkpoint_every", "checkpoint_dir",
    "cpu_block_cache_mb",  # where the allocator puts tensors, not what a stage computes
}  # fmt: skip
# Settings that joined a stage kind's schema after run dirs were written: left out of its hash while at their
# default, so such a run dir resumes (a run that sets one runs the stage again).
ADDED_LATER: dict[str, set[str]] = {
    "seft": {*GranetSettings.model_fields, *DistillSettings.model_fields, "stream"},
}

Scalar = str | int | float | bool | None


def training_checkpoint(cfg: SeftConfig | SmetConfig, output: Path) -> tuple[Path, bool]:
    """(checkpoint dir, whether it holds a state the run can continue from)."""
    from sparsetune.train.checkpoint import CKPT_NAME  # the library (torch): only when a stage runs

    ckpt = Path(cfg.checkpoint_path() or (str(output) + ".ckpt")).expanduser().resolve()
    has_state = (ckpt / CKPT_NAME / "state.pt").exists() or (ckpt / f".{CKPT_NAME}.old" / "state.pt").exists()
    return ckpt, has_state and bool(cfg.checkpoint_every or cfg.resume)


def sweep_checkpoint(cfg: SweepConfig, output: Path) -> tuple[Path, bool]:
    from sparsetune.sweep import STATE_FILE  # the library (torch): only when a stage runs

    ckpt = output.with_name(output.name + ".partial")
    return ckpt, (ckpt / STATE_FILE).exists()


Runner = Callable[..., dict[str, Any]]  # run(cfg, overwrite=..., show_progress=...) -> report
Summary = Callable[[dict[str, Any]], None]  # prints the report as the command does


# Each stage kind's library: (run, summary), imported when the stage runs.
def prune_library() -> tuple[Runner, Summary]:
    from sparsetune.prune.api import print_summary, run_prune

    return run_prune, print_summary


def seft_library() -> tuple[Runner, Summary]:
    from sparsetune.train.seft import print_summary, run_seft

    return run_seft, print_summary


def smet_library() -> tuple[Runner, Summary]:
    from sparsetune.train.smet import print_summary, run_smet

    return run_smet, print_summary


def eval_library() -> tuple[Runner, Summary]:
    from sparsetune.evaluate.compare import print_comparison, run_eval

    return run_eval, print_comparison


def sweep_library() -> tuple[Runner, Summary]:
    from sparsetune.sweep import print_summary, run_sweep

    return run_sweep, print_summary


def export_library() -> tuple[Runner, Summary]:
    from sparsetune.export.writer import print_summary, run_export

    def run(cfg: ExportConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
        return run_export(cfg, overwrite=overwrite)  # export shows no progress bars

    return run, print_summary


@dataclass(frozen=True)
class StageKind:
    """One command, as the pipeline and the CLI run it."""

    schema: type[BaseModel]
    library: Callable[[], tuple[Runner, Summary]]  # imports the library (torch): (run, summary)
    check: Callable[[Any, bool], None]  # check(cfg, overwrite): output dir and local inputs, before the library
    reads: str | None = "model"  # the setting naming its input model(s): model, models (a list), or None
    makes_model: bool = True  # its output dir is a model a later stage can read
    distributed: bool = False  # under torchrun every process runs it (they share the work); else only rank 0
    checkpoint: Callable[[Any, Path], tuple[Path, bool]] | None = None  # (dir, resumable) of an interrupted run
    resumes: str = "from the checkpoint"  # the log line's words when it continues from that dir

    def run(self, cfg: Any, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
        return self.library()[0](cfg, overwrite=overwrite, show_progress=show_progress)

    def summary(self, report: dict[str, Any]) -> None:
        self.library()[1](report)


STAGES: dict[str, StageKind] = {
    "prune": StageKind(PruneConfig, prune_library, preflight.check_prune, distributed=True),
    "seft": StageKind(
        SeftConfig, seft_library, preflight.check_training, distributed=True, checkpoint=training_checkpoint
    ),
    "smet-pretrain": StageKind(
        SmetConfig, smet_library, preflight.check_training, reads=None, distributed=True, checkpoint=training_checkpoint
    ),
    "eval": StageKind(EvalConfig, eval_library, preflight.check_eval, reads="models", makes_model=False),
    "sweep": StageKind(
        SweepConfig,
        sweep_library,
        preflight.check_sweep,
        makes_model=False,
        checkpoint=sweep_checkpoint,
        resumes="the unfinished sweep",
    ),
    "export": StageKind(ExportConfig, export_library, preflight.check_stage_output),
}


class RecipeFile(BaseModel):
    """The top level of a recipe file (each stage's settings are checked against its command's schema)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="A short name for reports")
    description: str | None = Field(None, description="What the recipe is for")
    vars: dict[str, Scalar] = Field(default_factory=dict, description="Defaults of the ${name} variables")
    stages: list[Any] = Field(min_length=1, description="Ordered stages: one of " + ", ".join(STAGES))
    gates: dict[str, float] = Field(
        default_factory=dict, description="Checks on the result, e.g. wikitext2_ppl_max: 90, sparsity_min: 0.5"
    )


# --------------------------------------------------------------------------------------------- the plan


@dataclass
class Stage:
    index: int  # 1-based position in the recipe
    name: str
    kind: str
    config: BaseModel
    inputs: list[str]  # model specs the stage reads (resolved)
    output: Path

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.name}"

    def settings(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json", by_alias=True)


@dataclass
class Plan:
    recipe: str
    name: str
    out: Path
    stages: list[Stage]
    gates: dict[str, float]
    variables: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "name": self.name,
            "output": str(self.out),
            "vars": self.variables,
            "overrides": self.overrides,
            "stages": [
                {
                    "stage": s.dirname,
                    "kind": s.kind,
                    "inputs": s.inputs,
                    "output": str(s.output),
                    "settings": s.settings(),
                }
                for s in self.stages
            ],
            "gates": self.gates,
        }


def _apply_overrides(
    entries: list[tuple[str, str, dict[str, Any]]], gates: dict[str, Any], overrides: list[str]
) -> None:
    names = [e[0] for e in entries]
    schemas = {name: STAGES[kind].schema for name, kind, _ in entries}
    for text in overrides:
        key, value = parse_assignment(text, "override")
        stage_name, dot, setting = key.partition(".")
        if not dot or not setting:
            raise SparsetuneError(f"override {text!r} needs STAGE.KEY=VALUE, e.g. prune.sparsity=0.6")
        if stage_name != "gates" and stage_name not in names:
            raise SparsetuneError(
                f"override {text!r}: no stage named {stage_name!r}; stages are {', '.join(names)} (or gates)"
            )
        settings = gates if stage_name == "gates" else entries[names.index(stage_name)][2]
        base = dict(settings)
        if stage_name != "gates":  # a renamed setting's old name replaces its new one, and the other way round
            base = without_renamed(schemas[stage_name], base, {setting: setting})
        if value is None:  # key=null restores the command's default (or drops the gate)
            base.pop(setting, None)
            merged = base
        else:  # as a flag over a --recipe: a pattern replaces a sparsity
            merged = merge_settings(base, {setting: value})
        settings.clear()
        settings.update(merged)


def _resolve_ref(spec: Any, outputs: dict[str, tuple[str, Path]], prev: str | None, where: str) -> Any:
    """'@prev' / '@name' -> that earlier stage's output dir."""
    if not isinstance(spec, str) or not spec.startswith("@"):
        return spec
    if spec == PREV:
        if prev is None:
            raise SparsetuneError(f"{where}: {PREV} has no earlier model-producing stage to refer to")
        return str(outputs[prev][1])
    name = spec[1:]
    if name not in outputs:
        raise SparsetuneError(
            f"{where}: {spec} names no earlier stage that writes a model "
            f"(earlier model stages: {', '.join(outputs) or 'none'}); a stage can only read what ran before it"
        )
    return str(outputs[name][1])


def _recipe_file(loc: Located) -> RecipeFile:
    if not isinstance(loc.data, dict):
        raise SparsetuneError(f"{loc.source} must be a YAML mapping with a `stages:` list")
    try:
        return RecipeFile.model_validate(loc.data)
    except ValidationError as err:
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        if first["type"] == "missing":
            raise SparsetuneError(
                f"{loc.source} has no `stages:` list; a run recipe lists stages like `stages: [{{prune: {{...}}}}]`"
            ) from err
        key_path = tuple(first["loc"])
        if first["type"] == "extra_forbidden":
            valid = ", ".join(RecipeFile.model_fields)
            raise SparsetuneError(f"{loc.where(key_path)}: unknown key {key_path[0]!r}; valid keys: {valid}") from err
        shown = ".".join(str(p) for p in key_path)
        raise SparsetuneError(f"{loc.where(key_path)}: {shown}: {first['msg']}") from err


def _variables(defaults: dict[str, Any], entries: list[tuple[str, str, dict[str, Any]]], set_vars: list[str]) -> dict:
    """The recipe's `vars` with `--set name=value` applied (only names the recipe defines or uses)."""
    variables = dict(defaults)
    referenced = set(VAR.findall(json.dumps([e[2] for e in entries])))
    for text in set_vars:
        name, value = parse_assignment(text, "--set")
        if name not in variables and name not in referenced:
            known = ", ".join(sorted(set(variables) | referenced)) or "none"
            raise SparsetuneError(f"--set {text!r}: the recipe has no variable {name!r} (it uses: {known})")
        variables[name] = value
    return variables


def _key_lines(loc: Located, i: int, kind: str, name: str, overridden: set[str]) -> Callable[[str], str]:
    """where(key): the recipe line of stage i's `key`, or the override that set it."""

    def where(key: str) -> str:
        return f"override {name}.{key}" if key in overridden else loc.where(("stages", i, kind, key))

    return where


def _stage_inputs(
    name: str,
    kind: str,
    settings: dict[str, Any],
    outputs: dict[str, tuple[str, Path]],
    prev: str | None,
    where: Callable[[str], str],
    at: str,
) -> list[str]:
    """Fill in the stage's input model(s) (default: the previous model stage's output; @refs resolved) and
    return them. `where(key)` names the recipe line of a key, `at` the stage's own line and label."""
    key = STAGES[kind].reads
    if key is None:  # smet-pretrain builds its model from scratch
        return []
    if settings.get(key) is None:
        if prev is None:
            makers = ", ".join(k for k, s in STAGES.items() if s.makes_model and s.distributed)
            raise SparsetuneError(
                f"{at} has no input model: it comes before any {makers} stage; move it after one, or set {name}.{key}"
            )
        settings[key] = PREV
    if key == "model":
        settings[key] = _resolve_ref(settings[key], outputs, prev, where(key))
        return [settings[key]]
    if isinstance(settings[key], str):
        settings[key] = [settings[key]]
    if not isinstance(settings[key], list):
        return []  # the schema will reject it
    settings[key] = [_resolve_ref(m, outputs, prev, where(key)) for m in settings[key]]
    return list(settings[key])


def plan_recipe(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    set_vars: list[str] | None = None,
) -> Plan:
    """Read, resolve and validate a recipe into a Plan. Loads no model and writes nothing."""
    overrides = list(overrides or [])
    loc = read_recipe(path)
    top = _recipe_file(loc)
    entries = stage_entries(loc, list(STAGES))
    gates: dict[str, Any] = dict(top.gates)
    before = {name: dict(settings) for name, _, settings in entries}
    _apply_overrides(entries, gates, overrides)
    variables = _variables(top.vars, entries, list(set_vars or []))

    out_path = Path(out).expanduser().resolve() if out is not None else Path("OUT")
    outputs: dict[str, tuple[str, Path]] = {}  # model-producing stage name -> (kind, output dir)
    prev: str | None = None
    stages: list[Stage] = []
    for i, (name, kind, raw) in enumerate(entries):
        label = f"stage {i + 1} ({kind})"
        where = _key_lines(loc, i, kind, name, {k for k, v in raw.items() if before[name].get(k, object()) != v})
        settings = {key: substitute(value, variables, where(key)) for key, value in raw.items()}
        if "output" in settings:
            raise SparsetuneError(
                f"{where('output')}: {label} sets output, but `sparsetune run` writes every stage to "
                "OUT/<nn>-<name>; remove it"
            )
        inputs = _stage_inputs(name, kind, settings, outputs, prev, where, f"{loc.where(('stages', i))}: {label}")
        if kind == "seft" and prev is not None and outputs[prev][0] == "export" and inputs == [str(outputs[prev][1])]:
            raise SparsetuneError(
                f"{loc.where(('stages', i))}: {label} reads the export of stage {prev!r}; fine-tune before "
                "exporting (move the export stage after seft)"
            )
        output = out_path / f"{i + 1:02d}-{name}"
        settings["output"] = str(output)
        config = validate_stage(STAGES[kind].schema, settings, where, label)
        stages.append(Stage(i + 1, name, kind, config, inputs, output))
        if STAGES[kind].makes_model:
            outputs[name] = (kind, output)
            prev = name

    evals = [s.config for s in stages if s.kind == "eval"]
    gate_names = loc.data.get("gates") or {}
    check_gate_names(
        gates,
        evals[-1] if evals else None,
        has_model=any(STAGES[s.kind].makes_model for s in stages),
        where=lambda key: loc.where(("gates", key)) if key in gate_names else f"override gates.{key}",
    )
    bounds = {key: float(value) for key, value in gates.items()}
    return Plan(str(path), top.name or Path(path).stem, out_path, stages, bounds, variables, overrides)


def model_sparsity(model_dir: Path) -> float | None:
    report = reports.read_report(model_dir)
    return None if report is None else report.global_sparsity


# --------------------------------------------------------------------------------------------- running


def fingerprint(spec: str) -> str:
    """A cheap identity of a model input: file names, sizes and mtimes of a dir or file; else the spec itself.

    A stage whose output is rewritten gets new mtimes, so every later stage that reads it runs again.
    """
    from sparsetune.loading import BUNDLED_ALIASES, bundled_gguf_path  # the library: only when a recipe runs

    path = Path(spec).expanduser()
    if spec in BUNDLED_ALIASES:
        try:
            path = bundled_gguf_path()
        except SparsetuneError:
            return spec
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        items = [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    elif path.is_file():
        items = [(path.name, path.stat().st_size, path.stat().st_mtime_ns)]
    else:
        return spec  # a hub id: its name (and the hub's revision pinning) is the identity we have
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


def stage_hashes(stage: Stage) -> dict[str, str]:
    settings = {k: v for k, v in stage.settings().items() if k not in UNHASHED}
    fields = STAGES[stage.kind].schema.model_fields
    for name in ADDED_LATER.get(stage.kind, set()) & settings.keys():
        if settings[name] == fields[name].default:
            del settings[name]
    # a renamed setting counts under its old name, so a run dir from before the rename resumes (where the unit
    # changed too, as smet's warmup, the value differs and the stage runs again)
    for old, new in getattr(STAGES[stage.kind].schema, "RENAMED", {}).items():
        if new in settings:
            settings[old] = settings.pop(new)
    settings_hash = hashlib.sha256(json.dumps([stage.kind, settings], sort_keys=True).encode()).hexdigest()[:16]
    input_hash = hashlib.sha256(json.dumps([fingerprint(s) for s in stage.inputs]).encode()).hexdigest()[:16]
    return {"settings_hash": settings_hash, "input_hash": input_hash}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def check_run_dir(plan: Plan, overwrite: bool) -> None:
    """OUT may be new, a previous run of a recipe (resumed), or anything else only with --overwrite."""
    out = plan.out
    for stage in plan.stages:
        for spec in stage.inputs:
            src = Path(spec).expanduser().resolve()
            if src.exists() and not src.is_relative_to(out) and out.is_relative_to(src):  # OUT is (inside) the input
                raise SparsetuneError(
                    f"output dir {out} is inside the input {src}; choose another -o (sparsetune never overwrites "
                    "its input)"
                )
    if out.exists() and not out.is_dir():
        raise SparsetuneError(f"output path {out} is a file, not a directory; choose another -o")
    check_parent_writable(out / STATE_DIR if out.is_dir() else out)  # OUT, or where it will be made, is writable
    if out.is_dir() and any(out.iterdir()) and not (out / RUN_FILE).exists() and not overwrite:
        raise SparsetuneError(
            f"output dir {out} already exists and is not a `sparsetune run` dir; pass --overwrite or choose another -o"
        )


def _resume_decision(
    stage: Stage, previous: dict[str, Any] | None, hashes: dict[str, str], out: Path
) -> tuple[BaseModel, Path | None]:
    """(config to run, stale checkpoint to remove first). A training stage or sweep interrupted with nothing it
    depends on changed continues from its own checkpoint; otherwise a stale checkpoint inside OUT is removed
    so the stage starts clean (one outside OUT is the user's: the stage will refuse it with a clear error)."""
    cfg, kind = stage.config, STAGES[stage.kind]
    same = previous is not None and all(previous.get(k) == v for k, v in hashes.items())
    ckpt, resumable = kind.checkpoint(cfg, stage.output) if kind.checkpoint else (None, False)
    if resumable and same:
        log.info("%s: resuming %s in %s", stage.dirname, kind.resumes, ckpt)
        return cfg.model_copy(update={"resume": True}), None
    stale = ckpt if ckpt is not None and ckpt.exists() and ckpt.is_relative_to(out) else None
    return (cfg.model_copy(update={"resume": False}) if "resume" in type(cfg).model_fields else cfg), stale


def stage_metrics(stage: Stage, report: dict[str, Any]) -> dict[str, float]:
    if stage.kind == "eval":
        return eval_metrics(report)
    if STAGES[stage.kind].makes_model:
        sparsity = model_sparsity(stage.output)
        return {} if sparsity is None else {"sparsity": sparsity}
    return {}


def run_plan(plan: Plan, overwrite: bool = False, verbose_output: bool = True) -> dict[str, Any]:
    """Run every stage in order, skipping stages already finished with the same settings and inputs.

    Under `torchrun` / `accelerate launch` the prune, seft and smet-pretrain stages run on every process (they
    share the work); eval, sweep and export run on rank 0 while the others wait, and only rank 0 writes the
    run's own files. Returns the run summary (also written to OUT/summary.json): per-stage status and timings,
    the final metrics and the gate results.
    """
    check_run_dir(plan, overwrite)  # before the library import: a refused OUT costs no torch import
    from sparsetune.distributed import dist_context, launched_distributed  # the library (torch)

    ctx = dist_context() if launched_distributed() else None
    main = ctx is None or ctx.is_main

    def barrier() -> None:
        if ctx is not None:
            ctx.barrier()

    barrier()  # every rank has checked OUT before rank 0 creates it
    out = plan.out
    if main:
        (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / RUN_FILE, {"plan": plan.as_dict(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    stage_rows: list[dict[str, Any]] = []
    metrics: dict[str, float] = {}
    eval_seen: dict[str, float] | None = None
    t_run = time.perf_counter()
    for stage in plan.stages:
        barrier()  # the previous stage's files and marker are complete on every rank's view
        marker = out / STATE_DIR / f"{stage.dirname}.json"
        previous = _read_json(marker)
        hashes = stage_hashes(stage)
        finished = (
            previous is not None
            and previous.get("status") == "finished"
            and all(previous.get(k) == v for k, v in hashes.items())
            and stage.output.exists()
        )
        if finished and not overwrite:
            assert previous is not None
            log.info("%s: already finished with the same settings and input; skipped", stage.dirname)
            row = {**previous, "status": "skipped"}
        else:
            cfg, stale = _resume_decision(stage, None if overwrite else previous, hashes, out)
            barrier()  # every rank has decided before rank 0 removes anything
            if main:
                if stale is not None:
                    shutil.rmtree(stale)
                write_json_atomic(marker, {"stage": stage.dirname, "kind": stage.kind, "status": "running", **hashes})
                if verbose_output:
                    print(f"== {stage.dirname} ({stage.kind}) -> {stage.output}", flush=True)
            barrier()
            t0 = time.perf_counter()
            report = None
            kind = STAGES[stage.kind]
            if main or kind.distributed:
                try:  # the stage dir is ours (inside OUT), so it may be replaced
                    report = kind.run(cfg, overwrite=True, show_progress=verbose_output and main)
                except SparsetuneError as err:
                    raise SparsetuneError(f"stage {stage.dirname}: {err}") from err
            barrier()
            seconds = round(time.perf_counter() - t0, 3)
            row = {
                "stage": stage.dirname,
                "kind": stage.kind,
                "status": "finished",
                **hashes,
                "seconds": seconds,
                "output": str(stage.output),
                "metrics": stage_metrics(stage, report) if report is not None else {},
            }
            if main:
                if verbose_output and report is not None:
                    kind.summary(report)
                write_json_atomic(marker, row)
            barrier()
            if not main:  # eval metrics were measured on rank 0
                row = {**(_read_json(marker) or row), "status": "finished"}
            del report
            gc.collect()
        stage_rows.append(row)
        if stage.kind == "eval":
            eval_seen = dict(row.get("metrics", {}))
        elif STAGES[stage.kind].makes_model:
            metrics.update(row.get("metrics", {}))
    if eval_seen is not None:  # the last eval's numbers; sparsity of the final model stage wins over eval's
        metrics = {**eval_seen, **metrics}
    gates = check_gates(plan.gates, metrics)
    summary = {
        "recipe": plan.recipe,
        "name": plan.name,
        "output": str(out),
        "stages": [
            {k: r.get(k) for k in ("stage", "kind", "status", "seconds", "output", "metrics")} for r in stage_rows
        ],
        "metrics": metrics,
        "gates": gates,
        "passed": all(g["passed"] for g in gates),
        "wall_s": round(time.perf_counter() - t_run, 3),
        "rank": 0 if ctx is None else ctx.rank,
    }
    if main:
        write_json_atomic(out / SUMMARY_FILE, summary)
    return summary
