"""`sparsetune eval` as a library: evaluate one or more models and compare them in one table.

Rows are metrics, columns are models; every model after the first also shows its delta against the first.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import devices, loading, reports, structure
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate import harness, ppl
from sparsetune.evaluate.config import EvalConfig, EvalSettings
from sparsetune.input_formats import detect_format
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory, write_json

log = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def sparsity_info(spec: str) -> dict[str, Any] | None:
    """Method, pattern and sparsity from a pruned dir's sparsity report, or None for other models."""
    report = reports.read_report(spec)
    if report is None:
        return None
    keys = ("method", "pattern", "global_sparsity", "target_sparsity")
    return {key: getattr(report, key) for key in keys}


def check_model_spec(spec: str, seqlen: int | None) -> None:
    """Fail before any work for a model that cannot be evaluated: missing, no tokenizer, too short a context."""
    kind, location = loading.resolve_model_path(spec)
    if kind != "dir":
        return
    path = Path(location)
    path = Path(loading.wrapped_base(path) or path)  # a seft adapter is evaluated on the base it names
    if not (path / "config.json").exists():
        raise SparsetuneError(f"{path} has no config.json; pass a HF model dir (save_pretrained output)")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise SparsetuneError(
            f"model dir {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save one into it with tokenizer.save_pretrained(dir)"
        )
    if seqlen is not None:
        limit = int(loading.read_config(path).get("max_position_embeddings") or seqlen)
        ppl.resolve_seqlen(seqlen, limit)


def check_sources(settings: EvalSettings) -> None:
    """Read every perplexity source once, so a missing file fails before a model loads."""
    for source in settings.ppl:
        ppl.eval_text(source, settings.data_dir)


def perplexities(
    run: Any,
    tokenizer: Any,
    settings: EvalSettings,
    model_limit: int,
    token_ids: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Perplexity on every source of `settings`; `run(jobs)` computes a list of `ppl.PplJob`s (the in-memory loop
    one by one, or the streamed one in one pass over the weights). `token_ids` caches each source's (tokens,
    label) as in `evaluate_model`."""
    seqlen = ppl.resolve_seqlen(settings.seqlen, model_limit)
    token_ids = {} if token_ids is None else token_ids
    jobs = []
    for source in settings.ppl:
        if source not in token_ids:
            token_ids[source] = ppl.eval_source(tokenizer, source, settings.data_dir)  # (ids, label)
        ids, label = token_ids[source]
        limit = settings.limit_windows
        max_windows = ppl.protocol_for(source).max_windows
        if max_windows is not None:
            limit = min(limit or max_windows, max_windows)
        jobs.append(ppl.PplJob(ids, seqlen, settings.stride, limit, Path(label).name))
    results = {}
    for source, result in zip(settings.ppl, run(jobs) if jobs else [], strict=True):
        results[source] = result
        results[source]["dataset"] = token_ids[source][1]
    return results


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    settings: EvalSettings,
    tasks: harness.TaskSetup | None,
    token_ids: dict[str, Any] | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Perplexity on every source plus the lm-eval tasks, for one in-memory model.

    `token_ids` caches each source's (tokens, label) across calls (valid while the tokenizer is the same). The
    label names the data the figures come from (`wikitext2 (embedded sample)`); the results stay keyed by source.
    """

    def run(jobs: list[ppl.PplJob]) -> list[dict[str, Any]]:
        return [
            ppl.perplexity_on_ids(
                model, j.ids, j.seqlen, j.stride, j.limit_windows, settings.ppl_batch_size, show_progress, j.label
            )
            for j in jobs
        ]

    ppl_results = perplexities(run, tokenizer, settings, structure.max_positions(model), token_ids)
    return {"ppl": ppl_results, **evaluate_tasks(model, tokenizer, settings, tasks)}


def evaluate_tasks(
    model: nn.Module, tokenizer: Any, settings: EvalSettings, tasks: harness.TaskSetup | None
) -> dict[str, Any]:
    t0 = time.perf_counter()
    task_results = (
        harness.run_tasks(model, tokenizer, tasks, settings.num_fewshot, settings.limit, settings.batch_size)
        if tasks is not None and tasks.tasks
        else {}
    )
    return {"tasks": task_results, "tasks_s": round(time.perf_counter() - t0, 3)}


# ----- where the weights live: streamed for perplexity, whole (or offloaded) for lm-eval -------------------------

# lm-eval runs the whole model: its weights plus this share for activations, logits and lm-eval's own buffers.
TASK_MEMORY_OVERHEAD = 0.2
# Of the available RAM / free GPU memory, the share accelerate's offload may fill (the rest goes to disk).
OFFLOAD_MEMORY_SHARE = 0.7


def hub_snapshot(repo_id: str, trust_remote_code: bool = False) -> Path | None:
    """The local snapshot of a hub model's config, tokenizer and safetensors (downloaded when missing and the hub
    answers), or None when it cannot be had; the caller then loads the model the ordinary way."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"] + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; the ordinary load reports them
        log.info("no local snapshot of %s (%s): it loads whole", repo_id, loading.first_line(err))
        return None


def stream_location(spec: str, trust_remote_code: bool = False) -> Path | None:
    """The local HF dir whose safetensors shards can be streamed block by block (a plain dir, the bundled alias's
    cached dir, a hub snapshot), or None for the others: GGUF files, exported compressed dirs, seft adapter dirs
    (whose perplexity streams too: `ppl_stream_location`), checkpoints without safetensors. lm-eval's memory
    estimate reads these headers."""
    from sparsetune.streaming import SAFE_INDEX, SAFE_SINGLE

    kind, location = loading.resolve_model_path(spec)
    if kind == "bundled":
        path: Path | None = loading.bundled_model_dir()
    elif kind == "hub":
        path = hub_snapshot(location, trust_remote_code)
    elif kind == "dir":
        path = Path(location)
    else:
        return None
    if path is None or detect_format(path) is not None:  # an exported or adapter dir (check_model_spec ran first)
        return None
    if not (path / "config.json").is_file() or not ((path / SAFE_INDEX).is_file() or (path / SAFE_SINGLE).is_file()):
        return None
    return path


def ppl_stream_location(spec: str, trust_remote_code: bool = False) -> Path | None:
    """The local dir perplexity streams from: `stream_location`'s, or an exported compressed dir or a seft adapter
    dir whose base streams (`sparsetune.stream_inputs`); None for inputs that load whole."""
    location = stream_location(spec, trust_remote_code)
    if location is not None:
        return location
    from sparsetune import stream_inputs

    kind, path = loading.resolve_model_path(spec)
    if kind != "dir":
        return None
    source, _ = stream_inputs.stream_input(Path(path))
    if source is None or source.kind == "checkpoint":  # a plain dir stream_location refused: it loads whole
        return None
    return Path(path)


def model_bytes(location: Path, dtype: torch.dtype | None) -> int:
    """Bytes of a safetensors checkpoint's tensors once loaded in `dtype` (None: as stored), from the headers."""
    from sparsetune.streaming import CheckpointFiles

    total = 0
    for entry in CheckpointFiles(location).entries.values():
        if dtype is not None and entry.dtype.is_floating_point:
            total += entry.nbytes // entry.dtype.itemsize * dtype.itemsize
        else:
            total += entry.nbytes
    return total


@dataclass
class TaskPlacement:
    """How lm-eval gets the whole model: `in-memory`, or `offload` through accelerate's big-model inference."""

    mode: str = "in-memory"
    need_bytes: int | None = None  # weights in the compute dtype plus TASK_MEMORY_OVERHEAD; None: not estimated
    load_kwargs: dict[str, Any] = field(default_factory=dict)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def task_placement(spec: str, cfg: EvalSettings) -> TaskPlacement:
    """Before any model loads: does the whole model fit for lm-eval? If not, accelerate's offload (device_map
    "auto" within OFFLOAD_MEMORY_SHARE of the free memory, the rest in a temp folder on disk) runs it when the
    disk has room; otherwise one error says how much memory the task needs and how much there is."""
    import psutil

    location = stream_location(spec, cfg.trust_remote_code)
    if location is None:  # GGUF, exported or adapter dirs: no estimate from the headers; they load as before
        return TaskPlacement()
    dev = devices.resolve_device(cfg.device)
    dtype = devices.resolve_dtype(cfg.dtype, dev)
    weights = model_bytes(location, dtype)
    need = int(weights * (1 + TASK_MEMORY_OVERHEAD))
    ram = int(psutil.virtual_memory().available)
    gpu = int(torch.cuda.mem_get_info(dev)[0]) if dev.type == "cuda" else None
    fits = need <= ram if gpu is None else (need <= gpu and weights <= ram)  # whole loads pass through RAM
    if fits:
        return TaskPlacement("in-memory", need)
    folder = Path(tempfile.gettempdir())
    disk = shutil.disk_usage(folder).free
    if weights <= disk:
        max_memory: dict[Any, int] = {"cpu": int(ram * OFFLOAD_MEMORY_SHARE)}
        if gpu is not None:
            max_memory[dev.index or 0] = int(gpu * OFFLOAD_MEMORY_SHARE)
        return TaskPlacement("offload", need, {"device_map": "auto", "max_memory": max_memory})
    where = f"{_gb(ram)} of RAM available" + (f", {_gb(gpu)} free on {dev}" if gpu is not None else "")
    raise SparsetuneError(
        f"lm-eval tasks run the model whole: {spec} needs about {_gb(need)} ({_gb(weights)} of weights in "
        f"{str(dtype or 'its checkpoint dtype').replace('torch.', '')} plus {TASK_MEMORY_OVERHEAD:.0%}), and this "
        f"machine has {where} and {_gb(disk)} free in {folder} for accelerate's disk offload; free memory or disk "
        "space (TMPDIR names the offload folder), pass --dtype bfloat16, or drop --tasks (perplexity alone streams "
        "the model block by block)"
    )


@contextlib.contextmanager
def _loaded_whole(spec: str, cfg: EvalConfig, placement: TaskPlacement) -> Iterator[tuple[nn.Module, Any]]:
    """The whole model (in memory, or offloaded by accelerate into a temp folder removed afterwards)."""
    kwargs = dict(placement.load_kwargs)
    folder = None
    if placement.mode == "offload":
        folder = tempfile.mkdtemp(prefix="sparsetune-offload-")
        kwargs["offload_folder"] = folder
        log.info(
            "%s needs about %s for lm-eval, more than fits: accelerate offloads what does not fit to %s",
            spec,
            _gb(placement.need_bytes or 0),
            folder,
        )
    try:
        model, tokenizer = loading.load_model(
            spec, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code, **kwargs
        )
        try:
            if tokenizer is None:
                raise SparsetuneError(f"model {spec} has no tokenizer; save one into the model dir")
            yield model, tokenizer
        finally:
            del model, tokenizer
            gc.collect()
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def streamed_perplexities(location: Path, cfg: EvalConfig, show_progress: bool) -> tuple[dict[str, Any], float]:
    """(perplexity on every source, seconds to set up) with the weights streamed block by block from `location`."""
    from sparsetune import stream_inputs

    t0 = time.perf_counter()
    dev = devices.resolve_device(cfg.device)
    source, why = stream_inputs.stream_input(location)  # a plain, exported or seft adapter dir
    if source is None:
        raise SparsetuneError(f"{location} does not stream: {why}")
    tokenizer = loading.load_tokenizer(str(source.model_dir), cfg.trust_remote_code)
    streamed = stream_inputs.open_streamed(source, devices.resolve_dtype(cfg.dtype, dev), cfg.trust_remote_code)
    setup_s = time.perf_counter() - t0

    def run(jobs: list[ppl.PplJob]) -> list[dict[str, Any]]:
        return ppl.streamed_perplexities(streamed, jobs, cfg.ppl_batch_size, show_progress, device=dev)

    return perplexities(run, tokenizer, cfg, structure.max_positions(streamed.model)), setup_s


def run_eval(cfg: EvalConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune eval` flow: validate everything, then load and evaluate each model in turn."""
    if not cfg.ppl and not cfg.tasks:
        raise SparsetuneError("nothing to evaluate; pass --ppl wikitext2 and/or --tasks arc_easy,...")
    out = check_output_dir(cfg.output, overwrite, inputs=tuple(cfg.models)) if cfg.output else None
    infos = []
    for spec in cfg.models:
        check_model_spec(spec, cfg.seqlen)
        infos.append(sparsity_info(spec))
    check_sources(cfg)
    placements = [task_placement(spec, cfg) if cfg.tasks else TaskPlacement() for spec in cfg.models]
    results = []
    with harness.prepared_tasks(cfg.tasks, cfg.data_dir, cfg.include_path) as tasks:
        for spec, info, placement in zip(cfg.models, infos, placements, strict=True):
            entry: dict[str, Any] = {"model": spec, "sparsity": info}
            location = ppl_stream_location(spec, cfg.trust_remote_code) if cfg.ppl else None
            if location is not None:
                log.info("%s: perplexity with the weights streamed block by block from %s", spec, location)
                ppl_results, load_s = streamed_perplexities(location, cfg, show_progress)
                entry.update(weights="streamed", load_s=round(load_s, 3), ppl=ppl_results, tasks={}, tasks_s=0.0)
                if cfg.tasks:
                    with _loaded_whole(spec, cfg, placement) as (model, tokenizer):
                        entry.update(evaluate_tasks(model, tokenizer, cfg, tasks))
            else:
                if cfg.ppl:
                    log.info("%s: perplexity with the whole model in memory (this input does not stream)", spec)
                t0 = time.perf_counter()
                with _loaded_whole(spec, cfg, placement) as (model, tokenizer):
                    load_s = time.perf_counter() - t0
                    measured = evaluate_model(model, tokenizer, cfg, tasks, show_progress=show_progress)
                entry.update(
                    weights="in-memory" if placement.mode == "in-memory" else "offload", load_s=round(load_s, 3)
                )
                entry.update(measured)
            if cfg.tasks:
                entry["tasks_weights"] = placement.mode
            results.append(entry)
        offline = tasks.offline
    report = {
        "models": results,
        "settings": cfg.model_dump(mode="json"),
        "offline_tasks": offline,
        "memory": peak_memory(),
        "versions": package_versions(),
    }
    if out is not None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            write_json(tmp / "eval.json", report)
            (tmp / "eval.md").write_text(markdown_report(report))
        report["output"] = str(out)
    return report


# ---- the comparison table ----------------------------------------------------------------------------------------


def model_label(spec: str, specs: list[str]) -> str:
    """A short column name: the dir's base name unless two models share it."""
    name = Path(spec).name or spec
    return name if sum(Path(s).name == name for s in specs) == 1 else spec


def metric_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[float | None], int]]:
    """(row name, value per model, decimals) for every perplexity source and task metric, in first-seen order."""
    names: dict[str, int] = {}
    for r in results:
        for source, v in r["ppl"].items():
            names.setdefault(ppl_row_name(source, v), 2)
        for task, row in r["tasks"].items():
            for metric in harness.metric_names(row):
                names.setdefault(f"{task} {metric}", 4)

    def value(r: dict[str, Any], row: str) -> float | None:
        if row.startswith("ppl "):
            hit = [v["ppl"] for s, v in r["ppl"].items() if ppl_row_name(s, v) == row]
            return hit[0] if hit else None
        for task, metrics in r["tasks"].items():
            for metric in harness.metric_names(metrics):
                if f"{task} {metric}" == row:
                    return float(metrics[metric])
        return None

    return [(row, [value(r, row) for r in results], digits) for row, digits in names.items()]


def ppl_row_name(source: str, result: dict[str, Any]) -> str:
    """`ppl wikitext2`, `ppl wikitext2 (embedded sample)` or `ppl my.txt` (a file's base name)."""
    return f"ppl {Path(result.get('dataset') or source).name}"


def info_rows(results: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """Method, pattern and sparsity rows (shown only when some model has a sparsity report)."""
    if not any(r["sparsity"] for r in results):
        return []

    def cell(r: dict[str, Any], key: str) -> str:
        info = r["sparsity"]
        if not info:
            return "dense"
        value = info.get(key)
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    return [
        (key.replace("global_", ""), [cell(r, key) for r in results])
        for key in ("method", "pattern", "global_sparsity")
    ]


def format_cell(values: list[float | None], i: int, digits: int) -> str:
    v = values[i]
    if v is None:
        return "-"
    text = f"{v:.{digits}f}"
    if i > 0 and values[0] is not None:
        text += f" ({v - values[0]:+.{digits}f})"
    return text


def comparison_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison: metrics down, models across, deltas against the first model."""
    results = report["models"]
    specs = [r["model"] for r in results]
    header = ["metric"] + [model_label(s, specs) for s in specs]
    rows = [[name, *cells] for name, cells in info_rows(results)]
    for name, values, digits in metric_rows(results):
        rows.append([name] + [format_cell(values, i, digits) for i in range(len(values))])
    return header, rows


def print_comparison(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = comparison_table(report)
    title = "sparsetune eval" + (" (deltas vs the first model)" if len(report["models"]) > 1 else "")
    table = Table(title=title)
    table.add_column(header[0])
    for name in header[1:]:
        table.add_column(name, justify="right")
    for row in rows:
        table.add_row(*row)
    console = Console()
    console.print(table)
    if "output" in report:
        console.print(f"wrote {report['output']}/eval.json and eval.md")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_report(report: dict[str, Any]) -> str:
    header, rows = comparison_table(report)
    s = report["settings"]
    parts = ["# sparsetune eval\n\n", markdown_table(header, rows)]
    if len(report["models"]) > 1:
        parts.append("\nDeltas in parentheses are against the first model.\n")
    parts.append("\n## Models\n")
    parts += [f"- `{r['model']}`\n" for r in report["models"]]
    parts.append("\n## Settings\n")
    first_ppl = next((v for r in report["models"] for v in r["ppl"].values()), None)
    if first_ppl is not None:
        parts.append(
            f"- perplexity: {first_ppl['protocol']} windows of {first_ppl['seqlen']} tokens"
            + (f", stride {first_ppl['stride']}" if first_ppl["stride"] else "")
            + f", {first_ppl['windows']} windows\n"
        )
    if s["tasks"]:
        parts.append(
            f"- lm-eval tasks: {', '.join(s['tasks'])}; num_fewshot {s['num_fewshot'] or 0}; limit {s['limit']}\n"
        )
        for task, files in report.get("offline_tasks", {}).items():
            parts.append(f"- {task}: offline task, data from {', '.join(files)}\n")
    parts.append("\n## Versions\n")
    parts += [f"- {k} {v}\n" for k, v in report["versions"].items()]
    return "".join(parts)
