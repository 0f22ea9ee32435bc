"""The stage contract: the sparsity report (`REPORT_FILE`) a model-making stage writes into its output dir.

`prune` writes it; `seft` and `smet-pretrain` write it too (seft carries its input's report forward, with one more
`finetune_history` entry); `export` copies it beside the exported weights. `eval`, `report`, `export`'s size
estimate, `seft`'s sparse start and the pipeline's gates read it. This module owns the file's name, its schema
version and its reading and writing; nothing else spells the name.

The file is JSON. Every report has the typed fields of `SparsityReport` (the flat copy of a prune run's summary
that older readers use, and `modules`: per-module zeros, numel and sparsity); each stage adds its own sections,
kept as they are. `schema_version` is `SCHEMA_VERSION`; files written before it existed have none and read as
version 1, the same layout. A reader refuses a newer version.

Torch-free: `--help` and the report command import this.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sparsetune.errors import SparsetuneError
from sparsetune.outputs import write_json

REPORT_FILE = "sparsity_report.json"
SCHEMA_VERSION = 1


class ModuleSparsity(BaseModel):
    """One pruned matrix: its zeros out of numel. Stages may add details (a solver's iterations, a warning)."""

    model_config = ConfigDict(extra="allow")

    zeros: int
    numel: int
    sparsity: float


class PruneSummary(BaseModel):
    """What a prune run did, in a few numbers: the report's `summary` (and `--json`), also copied flat into it."""

    model_config = ConfigDict(extra="allow")  # output, warnings, refine, method_choice are added as the run ends

    method: str
    pattern: str
    target_sparsity: float
    sparsity_before: float
    global_sparsity: float
    modules_pruned: int
    weights_pruned: int
    weights_targeted: int
    embedding_sparsity: float
    prune_s: float


class SparsityReport(BaseModel):
    """What every stage's report holds and its readers use; each stage's own sections pass through untouched."""

    model_config = ConfigDict(extra="allow")

    method: str | None = None
    pattern: str | None = None
    target_sparsity: float | None = None
    global_sparsity: float | None = None
    modules: dict[str, ModuleSparsity] | None = None
    schema_version: int = 1  # a file from before the field existed


def report_path(model_dir: str | Path) -> Path:
    return Path(model_dir).expanduser() / REPORT_FILE


def write_report(folder: str | Path, report: dict[str, Any]) -> None:
    """Write `report` (a stage's report, key order kept) as `folder`/REPORT_FILE with this schema version: the
    last key, unless the report carries its input's forward (seft)."""
    write_json(Path(folder) / REPORT_FILE, {**report, "schema_version": SCHEMA_VERSION})


def read_raw(model_dir: str | Path, fix: str) -> dict[str, Any] | None:
    """The report in `model_dir` as written (None when it has none). `fix` ends the error line of a file that is
    not a JSON object, naming what to do about it."""
    path = report_path(model_dir)
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SparsetuneError(f"{path} is not valid JSON ({err}); {fix}") from err
    if not isinstance(report, dict):
        raise SparsetuneError(f"{path} is not a JSON object; {fix}")
    version = report.get("schema_version", 1)
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise SparsetuneError(
            f"{path} has schema version {report['schema_version']}, newer than this sparsetune reads "
            f"({SCHEMA_VERSION}); upgrade sparsetune"
        )
    return report


def read_report(model_dir: str | Path, fix: str = "re-run the prune or remove the file") -> SparsityReport | None:
    """The typed report in `model_dir`, or None when it has none."""
    raw = read_raw(model_dir, fix)
    if raw is None:
        return None
    try:
        return SparsityReport.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise SparsetuneError(f"{report_path(model_dir)}: {where}: {first['msg']}; {fix}") from err


def recorded_sparsity(model_dir: str | Path) -> dict[str, float] | None:
    """Module name -> sparsity as the report in `model_dir` records it (entries without one skipped), or None
    without a readable report: an estimate, so a damaged report only costs its precision."""
    try:
        raw = read_raw(model_dir, "")
    except SparsetuneError:
        return None
    modules = raw.get("modules") if raw is not None else None
    if not isinstance(modules, dict):
        return None
    return {
        name: float(info["sparsity"])
        for name, info in modules.items()
        if isinstance(info, dict) and isinstance(info.get("sparsity"), int | float)
    }
