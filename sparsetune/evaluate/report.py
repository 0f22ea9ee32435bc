"""`sparsetune report DIR`: sparsity charts and a short Markdown summary of a pruned model dir.

Reads only the prune report (`sparsetune.reports`); the weights are not loaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from sparsetune import reports
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir

_BLOCK_MODULE = re.compile(r"layers\.(\d+)\.(.+)$")


def load_report(model_dir: str | Path) -> dict[str, Any]:
    path = reports.report_path(model_dir)
    report = reports.read_report(model_dir, fix="re-run the prune")
    if report is None:
        raise SparsetuneError(f"{path} not found; pass a dir written by `sparsetune prune`")
    if report.modules is None:
        raise SparsetuneError(f"{path} has no per-module statistics; re-run the prune with this sparsetune")
    return report.model_dump(mode="json", exclude_unset=True)


def module_table(report: dict[str, Any]) -> dict[str, dict[int, float]]:
    """{module kind (e.g. self_attn.q_proj): {block index: sparsity}}; modules outside blocks are skipped."""
    table: dict[str, dict[int, float]] = {}
    for name, stats in report["modules"].items():
        match = _BLOCK_MODULE.search(name)
        if match:
            table.setdefault(match.group(2), {})[int(match.group(1))] = float(stats["sparsity"])
    return table


def kind_totals(report: dict[str, Any]) -> dict[str, float]:
    """Sparsity of each module kind over all blocks (weighted by parameter count)."""
    zeros: dict[str, int] = {}
    numel: dict[str, int] = {}
    for name, stats in report["modules"].items():
        match = _BLOCK_MODULE.search(name)
        kind = match.group(2) if match else name
        zeros[kind] = zeros.get(kind, 0) + int(stats["zeros"])
        numel[kind] = numel.get(kind, 0) + int(stats["numel"])
    return {k: zeros[k] / numel[k] for k in zeros if numel[k]}


def _title(report: dict[str, Any]) -> str:
    return f"{report.get('method', '?')} {report.get('pattern', '')}, target {report.get('target_sparsity', 0):.2f}"


def _block_axes(ax: Any, block_ids: list[int], top: float, title: str) -> None:
    """What both charts share: decoder blocks along x, sparsity (0 to `top`) up, a title, a light grid."""
    ax.set_xlabel("decoder block")
    ax.set_ylabel("sparsity (fraction of zero weights)")
    ax.set_ylim(0, top)
    ax.set_xticks(block_ids)
    ax.set_xlim(min(block_ids, default=0) - 0.6, max(block_ids, default=0) + 0.6)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_blocks(report: dict[str, Any], path: Path) -> None:
    """Bar chart: sparsity of each decoder block, with the run's target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report.get("blocks") or []
    xs = [b["block"] for b in blocks]
    ys = [b["sparsity"] for b in blocks]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.32 * len(xs) + 2), 4.4))
    ax.bar(xs, ys, color="C0", label="block sparsity")
    ax.axhline(report.get("target_sparsity", 0), color="C3", linestyle="--", label="target")
    _block_axes(ax, xs, 1, f"Sparsity per decoder block ({_title(report)})")
    ax.legend(loc="upper right")
    _save(fig, path)


def plot_modules(report: dict[str, Any], path: Path) -> None:
    """Grouped bars: one group per block, one bar per module kind (q_proj, k_proj, ...), coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = module_table(report)
    kinds = list(table)
    block_ids = sorted({b for per_block in table.values() for b in per_block})
    width = 0.8 / max(1, len(kinds))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(block_ids) + 3), 4.8))
    for j, kind in enumerate(kinds):
        xs = [b - 0.4 + width * (j + 0.5) for b in block_ids if b in table[kind]]
        ys = [table[kind][b] for b in block_ids if b in table[kind]]
        ax.bar(xs, ys, width=width, color=f"C{j % 10}", label=kind.split(".")[-1])
    ax.axhline(report.get("target_sparsity", 0), color="black", linestyle="--", linewidth=1, label="target")
    _block_axes(ax, block_ids, 1.15, f"Sparsity per module ({_title(report)})")
    ax.legend(ncol=min(8, len(kinds) + 1), loc="upper center", fontsize="small")
    _save(fig, path)


def markdown_summary(report: dict[str, Any], model_dir: str) -> str:
    calib = report.get("calibration") or {}
    timings = report.get("timings") or {}
    lines = [
        f"# Sparsity report: {Path(model_dir).name}\n",
        f"- method: {report.get('method')}, pattern: {report.get('pattern')}",
        f"- target sparsity: {report.get('target_sparsity', 0):.4f}, achieved (targeted weights): "
        f"{report.get('global_sparsity', 0):.4f}",
        f"- modules pruned: {report.get('modules_pruned')}, weights pruned: {report.get('weights_pruned', 0):,} "
        f"of {report.get('weights_targeted', 0):,}",
        f"- embedding sparsity: {report.get('embedding_sparsity', 0):.4f}",
    ]
    if calib:
        lines.append(
            f"- calibration: {calib.get('source')}, {calib.get('samples')} x {calib.get('seqlen')} tokens, "
            f"{calib.get('sampling')} sampling, seed {calib.get('seed')}"
        )
    if "prune_s" in timings:
        lines.append(f"- prune time: {timings['prune_s']:.1f} s")
    lines += ["", "## Sparsity by module kind", "", "| module | sparsity |", "|---|---:|"]
    lines += [f"| {kind} | {value:.4f} |" for kind, value in kind_totals(report).items()]
    blocks = report.get("blocks") or []
    if blocks:
        values = [b["sparsity"] for b in blocks]
        lines += [
            "",
            f"Per block: min {min(values):.4f}, max {max(values):.4f} over {len(values)} blocks.",
            "",
            "![sparsity per block](block_sparsity.png)",
            "",
            "![sparsity per module](module_sparsity.png)",
        ]
    return "\n".join(lines) + "\n"


def default_output(model_dir: str) -> str:
    path = Path(model_dir).expanduser().resolve()
    return str(path.with_name(path.name + "-report"))


def run_report(model_dir: str, output: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write block_sparsity.png, module_sparsity.png and report.md for a pruned dir; returns the file paths."""
    report = load_report(model_dir)
    out = check_output_dir(output or default_output(model_dir), overwrite, inputs=(model_dir,))
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        plot_blocks(report, tmp / "block_sparsity.png")
        plot_modules(report, tmp / "module_sparsity.png")
        (tmp / "report.md").write_text(markdown_summary(report, model_dir))
    return {"output": str(out), "files": ["block_sparsity.png", "module_sparsity.png", "report.md"]}
