"""lm-eval tasks on an already-loaded model, online (lm-eval's own tasks) or offline (shipped task YAMLs).

The shipped YAMLs in `tasks/` copy lm-eval's arc_easy and piqa definitions but read the original data files
from the sparsetune data mirror. Their data paths hold a `${SPARSETUNE_DATA_DIR}` placeholder, filled in by
rendering them into a scratch dir that is handed to lm-eval's TaskManager as an include path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, hub
from sparsetune.errors import SparsetuneError

log = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).parent / "tasks"
PLACEHOLDER = "${SPARSETUNE_DATA_DIR}"
# Offline task name -> its folder under tasks/ (the YAML and any helper module in it).
OFFLINE_TASKS = {"arc_easy": "arc_easy", "piqa": "piqa"}
_MIRROR_PATH = re.compile(re.escape(PLACEHOLDER) + r"/(\S+)")


@dataclass
class TaskSetup:
    """The TaskManager to use plus where each task comes from (for the record in eval.json)."""

    manager: Any
    tasks: list[str]
    offline: dict[str, list[str]]  # task -> the mirror files it reads


def mirror_files(task: str) -> list[str]:
    """The mirror-relative data files a shipped offline task reads (from its YAML's placeholders)."""
    folder = TASKS_DIR / OFFLINE_TASKS[task]
    return [m for yaml_file in sorted(folder.glob("*.yaml")) for m in _MIRROR_PATH.findall(yaml_file.read_text())]


def render_offline_tasks(tasks: list[str], mirror: Path, into: Path) -> dict[str, list[str]]:
    """Copy the shipped folders of `tasks` into `into` with the placeholder replaced by the mirror dir.

    Raises SparsetuneError naming the expected path when a data file is missing from the mirror.
    """
    mirror = mirror.expanduser().resolve()
    used = {}
    for task in tasks:
        files = [mirror / rel for rel in mirror_files(task)]
        for path in files:
            if not path.exists():
                raise SparsetuneError(
                    f"mirror file {path} for task {task} is missing; add it or point --data-dir/"
                    f"{data.DATA_DIR_ENV} at a mirror laid out like shared/data"
                )
        src = TASKS_DIR / OFFLINE_TASKS[task]
        dst = into / OFFLINE_TASKS[task]
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.suffix in (".yaml", ".py"):
                (dst / f.name).write_text(f.read_text().replace(PLACEHOLDER, str(mirror)))
        used[task] = [str(p) for p in files]
    return used


def _manager(include_paths: list[Path], include_defaults: bool) -> Any:
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include_paths] or None
    return TaskManager(include_defaults=include_defaults, include_path=paths)


@contextlib.contextmanager
def prepared_tasks(
    tasks: list[str], data_dir: str | os.PathLike[str] | None = None, include_path: list[str] | None = None
) -> Iterator[TaskSetup]:
    """Resolve task names to a TaskManager, validating everything before any model runs.

    With a data mirror (`data_dir` or SPARSETUNE_DATA_DIR), arc_easy and piqa are the shipped offline copies;
    without one they are lm-eval's own (downloaded from the hub). User include paths come last, so their
    tasks override both. lm-eval's built-in index (slow to build: it reads every task YAML) is only loaded
    when a task is not found in the shipped and user dirs.
    """
    include = [Path(p).expanduser() for p in include_path or []]
    for path in include:
        if not path.is_dir():
            raise SparsetuneError(f"--include-path {path} is not a directory; pass a dir of lm-eval task YAMLs")
    if not tasks:
        yield TaskSetup(None, [], {})
        return
    mirror = data.mirror_dir(data_dir)
    offline_names = [t for t in tasks if t in OFFLINE_TASKS] if mirror is not None else []
    if len(offline_names) < len(tasks):
        hub.hub_reachable()  # lm-eval loads the other tasks' data with datasets: no hub -> its cache, no retries
    scratch = Path(tempfile.mkdtemp(prefix="sparsetune-tasks-"))
    try:
        offline = render_offline_tasks(offline_names, mirror, scratch) if mirror is not None else {}
        paths = ([scratch] if offline else []) + include
        manager = _manager(paths, include_defaults=False) if paths else None
        if manager is None or any(t not in manager.all_tasks for t in tasks):
            manager = _manager(paths, include_defaults=True)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            hint = _close_names(unknown[0], manager.all_tasks)
            raise SparsetuneError(
                f"unknown lm-eval task {', '.join(unknown)}{hint}; see `lm_eval ls tasks` for the names, "
                "or add your own task YAMLs with --include-path DIR"
            )
        yield TaskSetup(manager, list(tasks), offline)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _close_names(name: str, known: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, known, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _limit(limit: float | None) -> int | float | None:
    """lm-eval reads an int as a count and a float below 1 as a fraction."""
    if limit is None:
        return None
    return int(limit) if limit >= 1 else float(limit)


def run_tasks(
    model: nn.Module,
    tokenizer: Any,
    setup: TaskSetup,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
) -> dict[str, Any]:
    """Run lm-eval's `simple_evaluate` on the in-memory model; returns {task: {metric: value, ...}}."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not setup.tasks:
        return {}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    if getattr(model, "hf_device_map", None):
        # An accelerate-offloaded model reports the meta device; inputs go where its hooks compute.
        lm._device = execution_device(model)
    try:
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=setup.tasks,
            num_fewshot=num_fewshot,
            limit=_limit(limit),
            task_manager=setup.manager,
            log_samples=False,
        )
    except (OSError, ConnectionError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise SparsetuneError(
            f"lm-eval could not load the data of {', '.join(setup.tasks)} ({first}); for arc_easy and piqa set "
            f"--data-dir or {data.DATA_DIR_ENV} to a local mirror, or check your network"
        ) from err
    return summarize(out, setup)


def execution_device(model: nn.Module) -> torch.device:
    """Where an accelerate-dispatched model computes: its first GPU, else the CPU (offloaded weights included)."""
    for place in model.hf_device_map.values():
        if isinstance(place, int) or str(place).startswith(("cuda", "xpu", "mps")):
            return torch.device(f"cuda:{place}" if isinstance(place, int) else place)
    return torch.device("cpu")


def summarize(out: dict[str, Any], setup: TaskSetup) -> dict[str, Any]:
    """lm-eval's results, reshaped to {task: {metric: value, metric_stderr: value, n_samples, n_shot, source}}."""
    summary: dict[str, Any] = {}
    n_samples = out.get("n-samples", {})
    for task, metrics in out["results"].items():
        row: dict[str, Any] = {}
        for key, value in metrics.items():
            if "," not in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric}[{filt}]"
            row[name] = value
        if task in n_samples:
            row["n_samples"] = n_samples[task].get("effective")
        row["n_shot"] = out.get("n-shot", {}).get(task)
        row["source"] = "offline: " + ", ".join(setup.offline[task]) if task in setup.offline else "lm-eval"
        summary[task] = row
    return summary


def metric_names(task_row: dict[str, Any]) -> list[str]:
    """The headline metrics of a summarized task row (no stderr or bookkeeping keys)."""
    skip = {"n_samples", "n_shot", "source"}
    return [k for k, v in task_row.items() if k not in skip and "_stderr" not in k and isinstance(v, (int, float))]
