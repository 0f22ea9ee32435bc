"""`sparsetune eval` as a library: evaluate one or more models and compare them in one table.

Rows are metrics, columns are models; every model after the first also shows its delta against the first.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from sparsetune import models
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate import harness, ppl
from sparsetune.evaluate.config import EvalConfig, EvalSettings
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory, write_json

log = logging.getLogger(__name__)

REPORT_FILE = "sparsity_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def sparsity_info(spec: str) -> dict[str, Any] | None:
    """Method, pattern and sparsity from a pruned dir's sparsity_report.json, or None for other models."""
    path = Path(spec).expanduser() / REPORT_FILE
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SparsetuneError(f"{path} is not readable JSON ({err}); re-run the prune or remove the file") from err
    return {
        "method": report.get("method"),
        "pattern": report.get("pattern"),
        "global_sparsity": report.get("global_sparsity"),
        "target_sparsity": report.get("target_sparsity"),
    }


def check_model_spec(spec: str, seqlen: int | None) -> None:
    """Fail before any work for a model that cannot be evaluated: missing, no tokenizer, too short a context."""
    kind, location = models.resolve_model_path(spec)
    if kind != "dir":
        return
    path = Path(location)
    path = Path(models.seft_adapter_base(path) or path)  # a seft adapter is evaluated on the base it names
    if not (path / "config.json").exists():
        raise SparsetuneError(f"{path} has no config.json; pass a HF model dir (save_pretrained output)")
    if not any((path / name).exists() for name in TOKENIZER_FILES):
        raise SparsetuneError(
            f"model dir {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "save one into it with tokenizer.save_pretrained(dir)"
        )
    if seqlen is not None:
        limit = int(models.read_config(path).get("max_position_embeddings") or seqlen)
        ppl.resolve_seqlen(seqlen, limit)


def check_sources(settings: EvalSettings) -> None:
    """Read every perplexity source once, so a missing file fails before a model loads."""
    for source in settings.ppl:
        ppl.eval_text(source, settings.data_dir)


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
    seqlen = ppl.resolve_seqlen(settings.seqlen, models.max_positions(model))
    token_ids = {} if token_ids is None else token_ids
    ppl_results = {}
    for source in settings.ppl:
        if source not in token_ids:
            token_ids[source] = ppl.eval_source(tokenizer, source, settings.data_dir)  # (ids, label)
        ids, label = token_ids[source]
        limit = settings.limit_windows
        max_windows = ppl.protocol_for(source).max_windows
        if max_windows is not None:
            limit = min(limit or max_windows, max_windows)
        ppl_results[source] = ppl.perplexity_on_ids(
            model,
            ids,
            seqlen,
            settings.stride,
            limit,
            settings.ppl_batch_size,
            show_progress,
            label=Path(label).name,
        )
        ppl_results[source]["dataset"] = label
    t0 = time.perf_counter()
    task_results = (
        harness.run_tasks(model, tokenizer, tasks, settings.num_fewshot, settings.limit, settings.batch_size)
        if tasks is not None and tasks.tasks
        else {}
    )
    return {"ppl": ppl_results, "tasks": task_results, "tasks_s": round(time.perf_counter() - t0, 3)}


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
    results = []
    with harness.prepared_tasks(cfg.tasks, cfg.data_dir, cfg.include_path) as tasks:
        for spec, info in zip(cfg.models, infos, strict=True):
            t0 = time.perf_counter()
            model, tokenizer = models.load_model(
                spec, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code
            )
            load_s = time.perf_counter() - t0
            if tokenizer is None:
                raise SparsetuneError(f"model {spec} has no tokenizer; save one into the model dir")
            measured = evaluate_model(model, tokenizer, cfg, tasks, show_progress=show_progress)
            results.append({"model": spec, "sparsity": info, "load_s": round(load_s, 3), **measured})
            del model, tokenizer
            gc.collect()
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
