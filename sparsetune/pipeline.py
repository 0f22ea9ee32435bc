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
`--recipe`. `plan_recipe` resolves variables, overrides and stage chaining into validated configs without
loading any model; `run_plan` runs them. Stage outputs go to OUT/<nn>-<name>; a stage that finished with the
same settings and the same input files is skipped on re-run, so a crashed pipeline resumes where it stopped.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig, SweepConfig
from sparsetune.evaluate.sweep import STATE_FILE as SWEEP_STATE_FILE
from sparsetune.export.config import ExportConfig
from sparsetune.outputs import check_parent_writable, write_json_atomic
from sparsetune.prune.config import PruneConfig
from sparsetune.train.common import CKPT_NAME
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet_config import SmetConfig

log = logging.getLogger(__name__)

STAGE_SCHEMAS: dict[str, type[BaseModel]] = {
    "prune": PruneConfig,
    "seft": SeftConfig,
    "smet-pretrain": SmetConfig,
    "eval": EvalConfig,
    "sweep": SweepConfig,
    "export": ExportConfig,
}
MODEL_STAGES = ("prune", "seft", "smet-pretrain", "export")  # stages whose output is a model
DISTRIBUTED_STAGES = ("prune", "seft", "smet-pretrain")  # share their work across launched processes
PREV = "@prev"
STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
RUN_FILE = "run.json"  # marks OUT as a sparsetune run dir: resuming into it needs no --overwrite
STATE_DIR = ".stages"
SUMMARY_FILE = "summary.json"
SPARSITY_REPORT = "sparsity_report.json"
# Settings that neither change a stage's result nor name its input (the input hash covers the model files).
UNHASHED = {"output", "model", "models", "resume", "device", "log_every", "checkpoint_every", "checkpoint_dir"}

Scalar = str | int | float | bool | None


class RecipeFile(BaseModel):
    """The top level of a recipe file (each stage's settings are checked against its command's schema)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="A short name for reports")
    description: str | None = Field(None, description="What the recipe is for")
    vars: dict[str, Scalar] = Field(default_factory=dict, description="Defaults of the ${name} variables")
    stages: list[Any] = Field(min_length=1, description="Ordered stages: one of " + ", ".join(STAGE_SCHEMAS))
    gates: dict[str, float] = Field(
        default_factory=dict, description="Checks on the result, e.g. wikitext2_ppl_max: 90, sparsity_min: 0.5"
    )


# --------------------------------------------------------------------------------------------- reading YAML


@dataclass
class Located:
    """Parsed YAML plus the line of every key and list item, for errors that point into the file."""

    data: Any
    lines: dict[tuple[Any, ...], int]
    source: str

    def where(self, path: tuple[Any, ...]) -> str:
        """'recipe r.yaml line 7' for the deepest known prefix of `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return f"{self.source} line {self.lines[path[:end]]}"
        return self.source


def _record_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            lines[key_path] = key_node.start_mark.line + 1
            _record_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines)


# Aliases (&name / *name) let a few hundred bytes of YAML stand for billions of nodes; everything after
# parsing (line recording, ${var} substitution, validation) walks the expanded tree. So the expansion, not
# the file size, is bounded: a long recipe written out in full costs time in proportion to its size and is
# accepted; aliases may add at most this much on top of what is written.
MAX_ALIAS_NODES = 100_000
MAX_ALIAS_CHARS = 10_000_000  # one long string referenced many times


def alias_growth(root: yaml.Node) -> tuple[int, int]:
    """(nodes, scalar characters) that aliases add when `root` is expanded, counted without expanding it.

    PyYAML's composer makes each alias the very node object of its anchor, so the document is a graph of
    shared nodes: one memoised walk gives every node's expanded size. Raises ValueError on a recursive alias.
    """
    sizes: dict[int, tuple[int, int] | None] = {}  # id(node) -> expanded (nodes, chars); None while being walked
    written = [0, 0]  # the same counts with every node once

    def expanded(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise ValueError("an alias refers to a node that contains it")
            return sizes[key]
        sizes[key] = None
        own = (1, len(node.value)) if isinstance(node, yaml.ScalarNode) else (1, 0)
        written[0], written[1] = written[0] + own[0], written[1] + own[1]
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        nodes, chars = own
        for child in children:
            child_nodes, child_chars = expanded(child)
            nodes, chars = nodes + child_nodes, chars + child_chars
        sizes[key] = (nodes, chars)
        return nodes, chars

    nodes, chars = expanded(root)
    return nodes - written[0], chars - written[1]


def read_recipe(path: str | os.PathLike[str]) -> Located:
    p = Path(path)
    if not p.is_file():
        raise SparsetuneError(f"recipe {p} not found; pass an existing YAML file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SparsetuneError(
            f"recipe {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "pass a YAML file saved as UTF-8"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml's parser when present: 10x faster
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(node, p)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SparsetuneError(f"recipe {p}{where} is not valid YAML; fix the syntax") from err
    except RecursionError:
        raise SparsetuneError(f"recipe {p} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return Located(data if data is not None else {}, lines, f"recipe {p}")


def _check_aliases(node: yaml.Node, path: Path) -> None:
    try:
        nodes, chars = alias_growth(node)
    except ValueError:
        raise SparsetuneError(
            f"recipe {path}: an alias (*name) refers to a mapping or list that contains it; write the value out"
        ) from None
    if nodes > MAX_ALIAS_NODES or chars > MAX_ALIAS_CHARS:
        size = f"{nodes:,} nodes" if nodes > MAX_ALIAS_NODES else f"{chars:,} characters"
        raise SparsetuneError(
            f"recipe {path}: its aliases (*name) expand to {size} more than the file holds "
            f"(at most {MAX_ALIAS_NODES:,} nodes and {MAX_ALIAS_CHARS:,} characters); "
            "use fewer or less nested aliases, or write the settings out"
        )


def is_pipeline(data: Any) -> bool:
    return isinstance(data, dict) and "stages" in data


def parse_assignment(text: str, what: str) -> tuple[str, Any]:
    """'prune.sparsity=0.6' -> ('prune.sparsity', 0.6); the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SparsetuneError(f"{what} {text!r} is not KEY=VALUE; write it like prune.sparsity=0.6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, int) and ":" in raw:  # YAML 1.1 reads 2:4 as the base-60 number 124
        value = raw.strip()
    return key.strip(), value


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


def _stage_entries(loc: Located) -> list[tuple[str, str, dict[str, Any]]]:
    """[(name, kind, settings)] from the `stages` list, with names unique (eval, eval-2, ...)."""
    entries = []
    used: dict[str, int] = {}
    kinds = ", ".join(STAGE_SCHEMAS)
    for i, item in enumerate(loc.data["stages"]):
        where = loc.where(("stages", i))
        if not isinstance(item, dict):
            raise SparsetuneError(f"{where}: a stage is a mapping like `- prune: {{sparsity: 0.5}}`")
        found = [k for k in item if k in STAGE_SCHEMAS]
        extra = [k for k in item if k not in STAGE_SCHEMAS and k != "name"]
        if extra:
            raise SparsetuneError(
                f"{loc.where(('stages', i, extra[0]))}: unknown stage kind {extra[0]!r}; use one of {kinds}"
            )
        if len(found) != 1:
            raise SparsetuneError(f"{where}: each stage needs exactly one of {kinds} (found {len(found)})")
        kind = found[0]
        settings = item[kind] if item[kind] is not None else {}
        if not isinstance(settings, dict):
            raise SparsetuneError(f"{loc.where(('stages', i, kind))}: {kind} settings must be a mapping")
        name = item.get("name")
        if name is None:
            used[kind] = used.get(kind, 0) + 1
            name = kind if used[kind] == 1 else f"{kind}-{used[kind]}"
        elif not isinstance(name, str) or not STAGE_NAME.match(name):
            raise SparsetuneError(
                f"{loc.where(('stages', i, 'name'))}: stage name {name!r} must be lower-case letters, digits, - or _"
            )
        if name in [e[0] for e in entries]:
            raise SparsetuneError(f"{where}: two stages are named {name!r}; give each a unique `name`")
        entries.append((name, kind, dict(settings)))
    return entries


def _apply_overrides(
    entries: list[tuple[str, str, dict[str, Any]]], gates: dict[str, Any], overrides: list[str]
) -> None:
    names = [e[0] for e in entries]
    for text in overrides:
        key, value = parse_assignment(text, "override")
        stage_name, dot, setting = key.partition(".")
        if not dot or not setting:
            raise SparsetuneError(f"override {text!r} needs STAGE.KEY=VALUE, e.g. prune.sparsity=0.6")
        if stage_name == "gates":
            if value is None:
                gates.pop(setting, None)
            else:
                gates[setting] = value
            continue
        if stage_name not in names:
            raise SparsetuneError(
                f"override {text!r}: no stage named {stage_name!r}; stages are {', '.join(names)} (or gates)"
            )
        settings = entries[names.index(stage_name)][2]
        if value is None:  # key=null restores the command's default
            settings.pop(setting, None)
            continue
        settings[setting] = value
        # sparsity and pattern exclude each other: setting one on the command line replaces the other
        other = {"sparsity": "pattern", "pattern": "sparsity"}.get(setting)
        if entries[names.index(stage_name)][1] == "prune" and other:
            settings.pop(other, None)


def _substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """${name} -> its value; a string that is only `${name}` takes the variable's type (0.6 stays a float)."""
    if isinstance(value, str):
        whole = VAR.fullmatch(value)
        names = VAR.findall(value)
        for name in names:
            if name not in variables:
                known = ", ".join(sorted(variables)) or "none"
                raise SparsetuneError(
                    f"{where}: variable ${{{name}}} is not defined; add it under `vars:` "
                    f"or pass --set {name}=VALUE (defined: {known})"
                )
        if whole:
            return variables[whole.group(1)]
        return VAR.sub(lambda m: str(variables[m.group(1)]), value)
    if isinstance(value, list):
        return [_substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, variables, where) for k, v in value.items()}
    return value


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


def _validate_stage(kind: str, settings: dict[str, Any], loc: Located, i: int, overridden: set[str]) -> BaseModel:
    schema = STAGE_SCHEMAS[kind]
    try:
        return schema.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        label = f"stage {i + 1} ({kind})"
        where = f"override {kind}.{key}" if key in overridden else loc.where(("stages", i, kind, key))
        if first["type"] == "extra_forbidden":
            valid = ", ".join(sorted(f.alias or n for n, f in schema.model_fields.items() if n != "output"))
            raise SparsetuneError(f"{where}: {label}: unknown key {key!r}; valid keys: {valid}") from err
        msg = first["msg"].removeprefix("Value error, ")
        shown = ".".join(str(p) for p in first["loc"])
        raise SparsetuneError(f"{where}: {label}: {shown + ': ' if shown else ''}{msg}") from err


def plan_recipe(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    overrides: list[str] | None = None,
    set_vars: list[str] | None = None,
) -> Plan:
    """Read, resolve and validate a recipe into a Plan. Loads no model and writes nothing."""
    overrides = list(overrides or [])
    loc = read_recipe(path)
    if not isinstance(loc.data, dict):
        raise SparsetuneError(f"{loc.source} must be a YAML mapping with a `stages:` list")
    try:
        top = RecipeFile.model_validate(loc.data)
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

    entries = _stage_entries(loc)
    gates: dict[str, Any] = dict(top.gates)
    before = {name: dict(settings) for name, _, settings in entries}
    _apply_overrides(entries, gates, overrides)

    variables: dict[str, Any] = dict(top.vars)
    referenced = set(VAR.findall(json.dumps([e[2] for e in entries])))
    for text in set_vars or []:
        name, value = parse_assignment(text, "--set")
        if name not in variables and name not in referenced:
            known = ", ".join(sorted(set(variables) | referenced)) or "none"
            raise SparsetuneError(f"--set {text!r}: the recipe has no variable {name!r} (it uses: {known})")
        variables[name] = value

    out_path = Path(out).expanduser().resolve() if out is not None else Path("OUT")
    outputs: dict[str, tuple[str, Path]] = {}  # model-producing stage name -> (kind, output dir)
    prev: str | None = None
    stages: list[Stage] = []
    for i, (name, kind, raw) in enumerate(entries):
        overridden = {k for k, v in raw.items() if before[name].get(k, object()) != v}
        settings = {}
        for key, value in raw.items():
            where = f"override {name}.{key}" if key in overridden else loc.where(("stages", i, kind, key))
            settings[key] = _substitute(value, variables, where)
        if "output" in settings:
            raise SparsetuneError(
                f"{loc.where(('stages', i, kind, 'output'))}: stage {i + 1} ({kind}) sets output, but `sparsetune "
                f"run` writes every stage to OUT/<nn>-<name>; remove it"
            )
        output = out_path / f"{i + 1:02d}-{name}"
        label = f"stage {i + 1} ({kind})"
        missing_input = (
            f"{loc.where(('stages', i))}: {label} has no input model: it comes before any "
            f"{', '.join(MODEL_STAGES[:3])} stage; move it after one, or set {name}.model"
        )
        if kind in ("prune", "seft", "export", "sweep"):
            where = loc.where(("stages", i, kind, "model"))
            if settings.get("model") is None:
                if prev is None:
                    raise SparsetuneError(missing_input)
                settings["model"] = PREV
            settings["model"] = _resolve_ref(settings["model"], outputs, prev, where)
            inputs = [settings["model"]]
        elif kind == "eval":
            where = loc.where(("stages", i, kind, "models"))
            if settings.get("models") is None:
                if prev is None:
                    raise SparsetuneError(missing_input.replace(f"{name}.model", f"{name}.models"))
                settings["models"] = [PREV]
            if isinstance(settings["models"], str):
                settings["models"] = [settings["models"]]
            if isinstance(settings["models"], list):
                settings["models"] = [_resolve_ref(m, outputs, prev, where) for m in settings["models"]]
            inputs = list(settings["models"]) if isinstance(settings["models"], list) else []
        else:  # smet-pretrain builds its model from scratch
            inputs = []
        reads_prev = prev is not None and settings.get("model") == str(outputs[prev][1])
        if kind == "seft" and reads_prev and prev is not None and outputs[prev][0] == "export":
            raise SparsetuneError(
                f"{loc.where(('stages', i))}: {label} reads the export of stage {prev!r}; fine-tune before "
                "exporting (move the export stage after seft)"
            )
        settings["output"] = str(output)
        config = _validate_stage(kind, settings, loc, i, overridden)
        stages.append(Stage(i + 1, name, kind, config, inputs, output))
        if kind in MODEL_STAGES:
            outputs[name] = (kind, output)
            prev = name

    _check_gates(gates, stages, loc)
    bounds = {key: float(value) for key, value in gates.items()}
    return Plan(str(path), top.name or Path(path).stem, out_path, stages, bounds, variables, overrides)


# --------------------------------------------------------------------------------------------- gates


def metric_key(text: str) -> str:
    """A metric name safe for gate keys: 'exact_match[strict]' -> 'exact_match_strict'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def ppl_metric(source: str) -> str:
    return f"{metric_key(Path(source).stem)}_ppl"


def _gate_metric(key: str) -> tuple[str, str]:
    for bound in ("_min", "_max"):
        if key.endswith(bound) and len(key) > len(bound):
            return key[: -len(bound)], bound[1:]
    raise SparsetuneError(f"gate {key!r} must end in _min or _max, e.g. wikitext2_ppl_max or sparsity_min")


def _check_gates(gates: dict[str, Any], stages: list[Stage], loc: Located) -> None:
    """Every gate must name a metric the plan will measure: sparsity, or one of the last eval stage's."""
    evals = [s for s in stages if s.kind == "eval"]
    has_model = any(s.kind in MODEL_STAGES for s in stages)
    last = evals[-1].config if evals else None
    ppl_names = [ppl_metric(s) for s in last.ppl] if isinstance(last, EvalConfig) else []
    task_names = list(last.tasks) if isinstance(last, EvalConfig) else []
    compares = isinstance(last, EvalConfig) and len(last.models) > 1
    for key, bound in gates.items():
        where = loc.where(("gates", key)) if key in (loc.data.get("gates") or {}) else f"override gates.{key}"
        try:
            metric, _ = _gate_metric(key)
            float(bound)
        except (SparsetuneError, TypeError, ValueError) as err:
            problem = err if isinstance(err, SparsetuneError) else f"gate {key!r}: the bound must be a number"
            raise SparsetuneError(f"{where}: {problem}") from err
        base = metric.removesuffix("_vs_baseline")
        if base != metric and not compares:
            raise SparsetuneError(
                f"{where}: gate {key!r} compares against a baseline, but the last eval stage evaluates one model; "
                "list the baseline first in its models"
            )
        known = ["sparsity"] if has_model else []
        ok = (base == "sparsity" and has_model and base == metric) or base in ppl_names
        ok = ok or any(base.startswith(f"{metric_key(t)}_") for t in task_names)
        if not ok:
            known += ppl_names + [f"{metric_key(t)}_<metric>" for t in task_names]
            raise SparsetuneError(
                f"{where}: gate {key!r} names a metric the recipe does not measure; "
                f"measured: {', '.join(known) or 'none (add an eval stage)'}"
            )


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Metrics of the last model of an eval report, plus `<metric>_vs_baseline` against the first model."""
    from sparsetune.evaluate.harness import metric_names

    def flat(result: dict[str, Any]) -> dict[str, float]:
        values = {ppl_metric(source): float(v["ppl"]) for source, v in result["ppl"].items()}
        for task, row in result["tasks"].items():
            for metric in metric_names(row):
                values[f"{metric_key(task)}_{metric_key(metric)}"] = float(row[metric])
        if result.get("sparsity") and result["sparsity"].get("global_sparsity") is not None:
            values["sparsity"] = float(result["sparsity"]["global_sparsity"])
        return values

    models = report["models"]
    final = flat(models[-1])
    if len(models) > 1:
        base = flat(models[0])
        for name, value in list(final.items()):
            if name in base and name != "sparsity" and base[name]:
                final[f"{name}_vs_baseline"] = value / base[name]
    return final


def model_sparsity(model_dir: Path) -> float | None:
    path = model_dir / SPARSITY_REPORT
    if not path.is_file():
        return None
    value = json.loads(path.read_text()).get("global_sparsity")
    return None if value is None else float(value)


def check_gates(gates: dict[str, float], metrics: dict[str, float]) -> list[dict[str, Any]]:
    results = []
    for key, bound in gates.items():
        metric, side = _gate_metric(key)
        value = metrics.get(metric)
        passed = value is not None and (value >= bound if side == "min" else value <= bound)
        results.append({"gate": key, "metric": metric, "bound": bound, "value": value, "passed": passed})
    return results


# --------------------------------------------------------------------------------------------- running


def fingerprint(spec: str) -> str:
    """A cheap identity of a model input: file names, sizes and mtimes of a dir or file; else the spec itself.

    A stage whose output is rewritten gets new mtimes, so every later stage that reads it runs again.
    """
    from sparsetune import models

    path = Path(spec).expanduser()
    if spec in models.BUNDLED_ALIASES:
        try:
            path = models.bundled_gguf_path()
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
    cfg = stage.config
    same = previous is not None and all(previous.get(k) == v for k, v in hashes.items())
    ckpt: Path | None = None
    if isinstance(cfg, SeftConfig | SmetConfig):
        ckpt = Path(cfg.checkpoint_path() or (str(stage.output) + ".ckpt")).expanduser().resolve()
        has_state = (ckpt / CKPT_NAME / "state.pt").exists() or (ckpt / f".{CKPT_NAME}.old" / "state.pt").exists()
        if has_state and same and (cfg.checkpoint_every or cfg.resume):
            log.info("%s: resuming from the checkpoint in %s", stage.dirname, ckpt)
            return cfg.model_copy(update={"resume": True}), None
    elif isinstance(cfg, SweepConfig):
        ckpt = stage.output.with_name(stage.output.name + ".partial")
        if (ckpt / SWEEP_STATE_FILE).exists() and same:
            log.info("%s: resuming the unfinished sweep in %s", stage.dirname, ckpt)
            return cfg.model_copy(update={"resume": True}), None
    stale = ckpt if ckpt is not None and ckpt.exists() and ckpt.is_relative_to(out) else None
    return (cfg.model_copy(update={"resume": False}) if hasattr(cfg, "resume") else cfg), stale


def _run_stage(kind: str, cfg: Any, show_progress: bool) -> dict[str, Any]:
    """Call the library function of one stage. The stage dir is ours (inside OUT), so it may be replaced."""
    if kind == "prune":
        from sparsetune.prune.api import run_prune

        return run_prune(cfg, overwrite=True, show_progress=show_progress)
    if kind == "seft":
        from sparsetune.train.finetune import run_seft

        return run_seft(cfg, overwrite=True, show_progress=show_progress)
    if kind == "smet-pretrain":
        from sparsetune.train.smet import run_smet

        return run_smet(cfg, overwrite=True, show_progress=show_progress)
    if kind == "eval":
        from sparsetune.evaluate.compare import run_eval

        return run_eval(cfg, overwrite=True, show_progress=show_progress)
    if kind == "sweep":
        from sparsetune.evaluate.sweep import run_sweep

        return run_sweep(cfg, overwrite=True, show_progress=show_progress)
    from sparsetune.export.writer import run_export

    return run_export(cfg, overwrite=True)


def stage_metrics(stage: Stage, report: dict[str, Any]) -> dict[str, float]:
    if stage.kind == "eval":
        return eval_metrics(report)
    if stage.kind in MODEL_STAGES:
        sparsity = model_sparsity(stage.output)
        return {} if sparsity is None else {"sparsity": sparsity}
    return {}


def print_stage(stage: Stage, report: dict[str, Any]) -> None:
    """The stage's own summary table, as its command prints it."""
    if stage.kind == "prune":
        from sparsetune.prune.api import print_summary

        print_summary(report)
    elif stage.kind == "seft":
        from sparsetune.train.finetune import print_summary as print_seft

        print_seft(report)
    elif stage.kind == "smet-pretrain":
        from sparsetune.train.smet import print_summary as print_smet

        print_smet(report)
    elif stage.kind == "eval":
        from sparsetune.evaluate.compare import print_comparison

        print_comparison(report)
    elif stage.kind == "export":
        print(
            f"exported as {report['format']}: {report['disk_bytes'] / 1e6:.1f} MB, "
            f"sparsity {report.get('global_sparsity', float('nan')):.4f}"
        )
    elif stage.kind == "sweep":
        print(f"sweep of {len(report['points'])} points written to {report['output']}")


def run_plan(plan: Plan, overwrite: bool = False, verbose_output: bool = True) -> dict[str, Any]:
    """Run every stage in order, skipping stages already finished with the same settings and inputs.

    Under `torchrun` / `accelerate launch` the prune, seft and smet-pretrain stages run on every process (they
    share the work); eval, sweep and export run on rank 0 while the others wait, and only rank 0 writes the
    run's own files. Returns the run summary (also written to OUT/summary.json): per-stage status and timings,
    the final metrics and the gate results.
    """
    from sparsetune.distributed import dist_context, launched_distributed

    ctx = dist_context() if launched_distributed() else None
    main = ctx is None or ctx.is_main

    def barrier() -> None:
        if ctx is not None:
            ctx.barrier()

    check_run_dir(plan, overwrite)
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
            if main or stage.kind in DISTRIBUTED_STAGES:
                try:
                    report = _run_stage(stage.kind, cfg, show_progress=verbose_output and main)
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
                    print_stage(stage, report)
                write_json_atomic(marker, row)
            barrier()
            if not main:  # eval metrics were measured on rank 0
                row = {**(_read_json(marker) or row), "status": "finished"}
            del report
            gc.collect()
        stage_rows.append(row)
        if stage.kind == "eval":
            eval_seen = dict(row.get("metrics", {}))
        elif stage.kind in MODEL_STAGES:
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


# --------------------------------------------------------------------------------------------- single commands


def command_settings(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """A command's `--recipe`: a flat mapping of its settings, `{kind: {...}}`, or a run recipe with one `kind`
    stage (variables take their defaults; `@` references are left for the MODEL argument)."""
    loc = read_recipe(path)
    data = loc.data
    if not isinstance(data, dict):
        raise SparsetuneError(f"{loc.source} must be a YAML mapping of settings")
    if not is_pipeline(data):
        return dict(data[kind]) if isinstance(data.get(kind), dict) else dict(data)
    entries = [(i, e) for i, e in enumerate(data["stages"]) if isinstance(e, dict) and kind in e]
    if len(entries) != 1:
        raise SparsetuneError(
            f"{loc.source} has {len(entries)} {kind} stages; a command's --recipe needs exactly one "
            "(run multi-stage recipes with `sparsetune run`)"
        )
    i, entry = entries[0]
    variables = dict(data.get("vars") or {})
    settings = {
        key: _substitute(value, variables, loc.where(("stages", i, kind, key)))
        for key, value in (entry[kind] or {}).items()
    }
    for key in ("model", "models"):
        value = settings.get(key)
        if (isinstance(value, str) and value.startswith("@")) or (
            isinstance(value, list) and any(isinstance(v, str) and v.startswith("@") for v in value)
        ):
            settings.pop(key)  # an earlier stage's output: the command line names the model instead
    return settings
