"""`sparsetune sweep`: prune + evaluate every (method, sparsity or N:M pattern) point of a grid.

It drives pruning and evaluation, so it sits with the other orchestration (sparsetune/pipeline.py), not under
evaluate/.

One base model is loaded and one calibration set is drawn; a CPU copy of the dense weights restores the model
between points. Finished points are saved one JSON file each in `OUTPUT.partial/`, so `--resume` skips them;
when the last point is done, sweep.json, sweep.md and sweep.png are written and the whole dir is renamed to
OUTPUT (an interrupted sweep never looks finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetune import loading
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate import harness
from sparsetune.evaluate.compare import check_model_spec, check_sources, evaluate_model, markdown_table, ppl_row_name
from sparsetune.evaluate.config import SweepConfig
from sparsetune.outputs import (
    check_output_dir,
    commit_output_dir,
    package_versions,
    peak_memory,
    replaceable_state,
    write_json,
)
from sparsetune.outputs import write_json_atomic as _write_json_atomic  # module-level: tests inject crashes
from sparsetune.prune import api as prune_api  # through the module: tests replace prune_and_report
from sparsetune.prune.config import PruneConfig

log = logging.getLogger(__name__)

STATE_FILE = "sweep_state.json"


@dataclass(frozen=True)
class Point:
    """One grid point: a method with an unstructured sparsity or an N:M pattern (dense: neither)."""

    method: str
    sparsity: float | None = None
    pattern: str | None = None
    refine: str = "none"  # mask refinement after the method: none, dsnot, dsnot-dense

    @property
    def key(self) -> str:
        if self.method == "dense":
            return "dense"
        suffix = "" if self.refine == "none" else f"+{self.refine}"
        return f"{self.method}{suffix}-{self.pattern.replace(':', 'of') if self.pattern else f'{self.sparsity:g}'}"

    @property
    def target_sparsity(self) -> float:
        if self.pattern:
            n, m = (int(x) for x in self.pattern.split(":"))
            return 1 - n / m
        return float(self.sparsity or 0.0)


def grid(cfg: SweepConfig) -> list[Point]:
    """The dense baseline, then per method (and refinement) every sparsity, then every pattern."""
    points = [Point("dense", 0.0)]
    for method in cfg.methods:
        for refine in cfg.refine:
            points += [Point(method, sparsity=s, refine=refine) for s in cfg.sparsities if s > 0]
            points += [Point(method, pattern=p, refine=refine) for p in cfg.patterns]
    return points


def prune_config(cfg: SweepConfig, point: Point) -> PruneConfig:
    return PruneConfig(
        model=cfg.model,
        method=point.method if point.method != "dense" else "wanda",
        sparsity=point.sparsity if point.pattern is None else None,
        pattern=point.pattern,
        calib=cfg.calib,
        calib_samples=cfg.calib_samples,
        calib_seqlen=cfg.calib_seqlen,
        seed=cfg.seed,
        calib_sampling=cfg.calib_sampling,
        calib_batch_size=cfg.calib_batch_size,
        data_dir=cfg.data_dir,
        dtype=cfg.dtype,
        device=cfg.device,
        refine="none" if point.refine == "none" else "dsnot",
        refine_values="dense" if point.refine == "dsnot-dense" else "updated",
    )


def sweep_identity(cfg: SweepConfig) -> str:
    """Hash of the settings every point depends on (not the grid itself: adding points may resume)."""
    skip = {"output", "resume", "methods", "sparsities", "patterns", "refine", "device", "data_dir"}
    relevant = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def prepare_workdir(cfg: SweepConfig, overwrite: bool) -> tuple[Path, Path]:
    """(final output dir, partial work dir), refusing clobbers and stale or mismatched partial sweeps."""
    out = check_output_dir(cfg.output, overwrite, inputs=(cfg.model,))
    work = out.with_name(out.name + ".partial")
    state_path = work / STATE_FILE
    if cfg.resume:
        if not state_path.exists():
            raise SparsetuneError(f"--resume: no unfinished sweep in {work}; run once without --resume")
        state = json.loads(state_path.read_text())
        if state.get("identity") != sweep_identity(cfg):
            raise SparsetuneError(
                f"{work} holds a sweep with other settings (model, calibration or evaluation); "
                "resume with the same flags, or drop --resume and pass --overwrite to start over"
            )
    elif work.exists():
        if not overwrite:
            raise SparsetuneError(
                f"{work} holds an unfinished sweep; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(work)
    (work / "points").mkdir(parents=True, exist_ok=True)
    if not state_path.exists():
        _write_json_atomic(state_path, {"identity": sweep_identity(cfg), "settings": cfg.model_dump(mode="json")})
    return out, work


def run_sweep(cfg: SweepConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole sweep: validate, load once, calibrate once, then prune/evaluate/restore per point."""
    if not cfg.ppl and not cfg.tasks:
        raise SparsetuneError("nothing to evaluate; pass --ppl wikitext2 and/or --tasks arc_easy,...")
    check_model_spec(cfg.model, cfg.seqlen)
    check_sources(cfg)
    points = grid(cfg)
    with harness.prepared_tasks(cfg.tasks, cfg.data_dir, cfg.include_path) as tasks:
        out, work = prepare_workdir(cfg, overwrite)
        done = {p.key for p in points if (work / "points" / f"{p.key}.json").exists()}
        todo = [p for p in points if p.key not in done]
        if done:
            log.info("resuming: %d of %d points already finished", len(done), len(points))
        if todo:
            _run_points(cfg, todo, tasks, work, show_progress)
        results = [json.loads((work / "points" / f"{p.key}.json").read_text()) for p in points]
    report = {
        "model": cfg.model,
        "points": results,
        "settings": cfg.model_dump(mode="json"),
        "memory": peak_memory(),
        "versions": package_versions(),
    }
    write_json(work / "sweep.json", report)
    (work / "sweep.md").write_text(markdown_sweep(report))
    plot_sweep(report, work / "sweep.png")
    (work / STATE_FILE).unlink()
    # --overwrite replaces the old result only now that the new one is complete, and never another run's
    commit_output_dir(work, out, replaceable_state(out, overwrite))
    report["output"] = str(out)
    return report


def _run_points(cfg, todo, tasks, work, show_progress) -> None:
    """Load the base model once, draw one calibration set, and evaluate every point still to do."""
    t0 = time.perf_counter()
    model, tokenizer = loading.load_model(cfg.model, dtype=cfg.dtype, device=cfg.device)
    log.info("loaded %s in %.1f s", cfg.model, time.perf_counter() - t0)
    calibrated = {p.key for p in todo if p.method != "dense" and prune_api.needs_calibration(prune_config(cfg, p))}
    needs_calib = [p for p in todo if p.key in calibrated]
    calib = prune_api.make_calibration(model, tokenizer, prune_config(cfg, needs_calib[0])) if needs_calib else None
    dense = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    token_ids: dict[str, tuple[torch.Tensor, str]] = {}
    for i, point in enumerate(todo):
        log.info("point %d/%d: %s", i + 1, len(todo), point.key)
        t0 = time.perf_counter()
        prune_report = None
        if point.method != "dense":
            prune_report = prune_api.prune_and_report(
                model, tokenizer, prune_config(cfg, point), calib, show_progress=False
            )
        prune_s = time.perf_counter() - t0
        measured = evaluate_model(model, tokenizer, cfg, tasks, token_ids, show_progress=show_progress)
        result = {
            "key": point.key,
            "method": point.method,
            "refine": point.refine,
            "pattern": point.pattern or ("dense" if point.method == "dense" else "unstructured"),
            "target_sparsity": point.target_sparsity,
            "global_sparsity": prune_report["global_sparsity"] if prune_report else 0.0,
            "prune_s": round(prune_s, 3),
            "calibration": calib.describe() if calib is not None and point.key in calibrated else None,
            **measured,
        }
        _write_json_atomic(work / "points" / f"{point.key}.json", result)
        if point.method != "dense":
            model.load_state_dict(dense)


# ---- sweep.md and sweep.png -------------------------------------------------------------------------------------


def _metric_columns(points: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    """(column title, kind, name): each perplexity source, then each task's headline metrics."""
    columns: list[tuple[str, str, str | None]] = []
    for p in points:
        for source, v in p["ppl"].items():
            if (ppl_row_name(source, v), "ppl", source) not in columns:
                columns.append((ppl_row_name(source, v), "ppl", source))
        for task, row in p["tasks"].items():
            for metric in harness.metric_names(row):
                if (f"{task} {metric}", task, metric) not in columns:
                    columns.append((f"{task} {metric}", task, metric))
    return columns


def _value(point: dict[str, Any], kind: str, name: str | None) -> float | None:
    if kind == "ppl":
        return point["ppl"].get(name, {}).get("ppl")
    return point["tasks"].get(kind, {}).get(name)


def markdown_sweep(report: dict[str, Any]) -> str:
    points = report["points"]
    columns = _metric_columns(points)
    header = ["method", "pattern", "refine", "target", "sparsity"] + [c[0] for c in columns]
    rows = []
    for p in points:
        refine = p.get("refine", "none") if p["method"] != "dense" else "-"  # points saved before refine: none
        cells = [p["method"], p["pattern"], refine, f"{p['target_sparsity']:.2f}", f"{p['global_sparsity']:.4f}"]
        for _, kind, name in columns:
            v = _value(p, kind, name)
            cells.append("-" if v is None else f"{v:.2f}" if kind == "ppl" else f"{v:.4f}")
        rows.append(cells)
    s = report["settings"]
    return (
        f"# sparsetune sweep: {report['model']}\n\n"
        + markdown_table(header, rows)
        + f"\nCalibration: {s['calib']}, {s['calib_samples']} samples x {s['calib_seqlen']} tokens, seed {s['seed']}"
        " (one set shared by every point).\n\n![perplexity vs sparsity](sweep.png)\n"
    )


def print_summary(report: dict[str, Any]) -> None:
    """The sweep table (sweep.md without the plot) on the terminal."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = Console()
    console.print(Markdown(markdown_sweep(report).split("![")[0]))
    console.print(f"wrote {report['output']}/sweep.json, sweep.md, sweep.png")


PATTERN_MARKERS = ("s", "^", "D", "v", "P", "X")


def _label(point: dict[str, Any]) -> str:
    """A plot line's name: the method, plus the refinement when one ran (e.g. wanda+dsnot)."""
    refine = point.get("refine", "none")
    return point["method"] if refine == "none" else f"{point['method']}+{refine}"


def plot_sweep(report: dict[str, Any], path: Path) -> None:
    """One panel per metric: the metric against sparsity, one line per method (dense point included);
    N:M points are separate markers (one marker shape per pattern) in the method's colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["points"]
    columns = _metric_columns(points)
    dense = next((p for p in points if p["method"] == "dense"), None)
    methods = list(dict.fromkeys(_label(p) for p in points if p["method"] != "dense"))
    patterns = list(dict.fromkeys(p["pattern"] for p in points if p["pattern"] not in ("dense", "unstructured")))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(columns), figsize=(6.4 * len(columns), 4.8), squeeze=False)
    for ax, (title, kind, name) in zip(axes[0], columns, strict=True):
        for method in methods:
            line = [p for p in points if _label(p) == method and p["pattern"] == "unstructured"]
            if dense is not None:
                line = [dense, *line]
            xs = [p["target_sparsity"] for p in line]
            ys = [_value(p, kind, name) for p in line]
            ax.plot(xs, ys, marker="o", color=colors[method], label=f"{method} (unstructured)")
            for j, pattern in enumerate(patterns):
                hit = [p for p in points if _label(p) == method and p["pattern"] == pattern]
                if hit:
                    ax.scatter(
                        [hit[0]["target_sparsity"]],
                        [_value(hit[0], kind, name)],
                        marker=PATTERN_MARKERS[j % len(PATTERN_MARKERS)],
                        s=70,
                        color=colors[method],
                        edgecolors="black",
                        label=f"{method} {pattern}",
                        zorder=3,
                    )
        if dense is not None:
            ax.axhline(_value(dense, kind, name), color="gray", linestyle="--", linewidth=1, label="dense")
        if kind == "ppl":
            ax.set_yscale("log")
            ax.set_ylabel("perplexity (log scale, lower is better)")
        else:
            ax.set_ylabel(f"{name} (higher is better)")
        ax.set_xlabel("sparsity (fraction of pruned weights)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"sparsetune sweep: {Path(report['model']).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
