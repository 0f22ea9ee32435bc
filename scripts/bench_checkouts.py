"""Compare two source trees of sparsetune on the same CLI runs: wall time and bit-identical outputs.

Used to show that a restructure changed nothing users can see: the same prune, eval and export commands run
from the BEFORE tree and the AFTER tree, interleaved A/B/B/A so a busy machine slows both alike. Each run is a
whole process (`python -m sparsetune ...` with PYTHONPATH set to the tree), so import, load, calibration and
save are all in the figure. One JSON line per measurement, then one summary line per command with the ratio
of the best times (after / before) and whether every output tensor and the eval figures were identical.

    .venv/bin/python scripts/bench_checkouts.py --before /path/to/old/checkout --after .
    .venv/bin/python scripts/bench_checkouts.py --before OLD --after . --quick     # tiny settings, checks plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def commands(quick: bool) -> dict[str, list[str]]:
    """Named CLI runs; `{out}` is the run's output dir, `{wanda}` the wanda run's output dir of the same tree."""
    calib = ["--calib-samples", "4" if quick else "32", "--seqlen", "128" if quick else "512"]
    windows = ["--limit-windows", "2" if quick else "8", "--seqlen", "256" if quick else "1024"]
    return {
        "prune-magnitude-50": ["prune", "smollm2", "--method", "magnitude", "--sparsity", "0.5", "-o", "{out}"],
        "prune-wanda-50": ["prune", "smollm2", "--method", "wanda", "--sparsity", "0.5", *calib, "-o", "{out}"],
        "prune-sparsegpt-2:4": ["prune", "smollm2", "--method", "sparsegpt", "--pattern", "2:4", *calib, "-o", "{out}"],
        "eval-ppl": ["eval", "{wanda}", "--ppl", "wikitext2", *windows, "-o", "{out}"],
        "export-sparse-bitmask": ["export", "{wanda}", "--format", "sparse-bitmask", "-o", "{out}"],
    }


def run(tree: Path, argv: list[str]) -> float:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(  # cwd is the tree: `python -m` puts the cwd first on sys.path
        [sys.executable, "-m", "sparsetune", *argv], env=env, cwd=tree, capture_output=True, text=True
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv)} failed in {tree}:\n{proc.stderr[-2000:]}")
    return seconds


def output_differences(a: Path, b: Path) -> list[str]:
    """What differs between two runs' outputs: safetensors tensors (bit for bit) and eval.json's figures (timings
    aside). Empty when identical."""
    files = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    if files != sorted(p.relative_to(b) for p in b.rglob("*.safetensors")):
        return ["safetensors file names"]
    diffs = []
    for rel in files:
        ta, tb = load_file(a / rel), load_file(b / rel)
        diffs += [
            f"{rel}:{k}" for k in sorted(ta.keys() | tb.keys()) if k not in ta or k not in tb or not ta[k].equal(tb[k])
        ]
    if (a / "eval.json").exists():
        diffs += _json_differences(_figures(a / "eval.json"), _figures(b / "eval.json"), "eval.json")
    return diffs


def _json_differences(x: object, y: object, where: str) -> list[str]:
    if isinstance(x, dict) and isinstance(y, dict):
        return [d for k in sorted(x.keys() | y.keys()) for d in _json_differences(x.get(k), y.get(k), f"{where}.{k}")]
    if isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        return [d for i, (u, v) in enumerate(zip(x, y, strict=True)) for d in _json_differences(u, v, f"{where}[{i}]")]
    return [] if x == y else [f"{where}: {x!r} vs {y!r}"]


def prune_seconds(out: Path) -> float | None:
    """The pruning itself (the report's prune_s), without process start, load and save."""
    report = out / "sparsity_report.json"
    return json.loads(report.read_text())["timings"].get("prune_s") if report.exists() else None


# eval.json fields that measure the run (time, memory, where) rather than the model.
VARIABLE_KEYS = {"load_s", "tasks_s", "seconds", "tokens_per_s", "output", "peak_rss_bytes", "model", "path"}


def _figures(path: Path) -> object:
    """eval.json without anything that measures time or names the path."""

    def strip(x: object) -> object:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VARIABLE_KEYS}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads(path.read_text()))


def check_tree(tree: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(tree))
    where = subprocess.run(
        [sys.executable, "-c", "import sparsetune; print(sparsetune.__file__)"],
        env=env,
        cwd=tree,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not where.startswith(str(tree)):
        raise SystemExit(f"error: PYTHONPATH={tree} imports sparsetune from {where}; pass a source checkout")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, required=True, help="source checkout before the change")
    p.add_argument("--after", type=Path, default=ROOT, help="source checkout after the change (default: this one)")
    p.add_argument("--only", default="", help="comma list of command names to run (default: all)")
    p.add_argument("--quick", action="store_true", help="tiny calibration and eval: checks the plumbing")
    p.add_argument("--rounds", type=int, default=1, help="rounds of before/after/after/before per command")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = p.parse_args()
    trees = {"before": args.before.resolve(), "after": args.after.resolve()}
    for tree in trees.values():
        check_tree(tree)
    cmds = commands(args.quick)
    if args.only:
        cmds = {k: v for k, v in cmds.items() if k in args.only.split(",")}
    lines: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-checkouts-") as tmp:
        work = Path(tmp)
        best: dict[tuple[str, str], float] = {}
        for name, argv in cmds.items():
            for rep, label in enumerate(["before", "after", "after", "before"] * args.rounds):
                out = work / f"{label}-{name}-{rep}"
                wanda = work / f"{label}-prune-wanda-50-0" if label == "before" else work / f"{label}-prune-wanda-50-1"
                filled = [a.format(out=out, wanda=wanda) for a in argv]
                seconds = run(trees[label], filled)
                row = {"bench": "checkouts", "command": name, "tree": label, "rep": rep, "seconds": round(seconds, 2)}
                if (inner := prune_seconds(out)) is not None:
                    row["prune_s"] = inner
                    best[name + ":prune_s", label] = min(best.get((name + ":prune_s", label), float("inf")), inner)
                print(json.dumps(row), flush=True)
                lines.append(row)
                best[name, label] = min(best.get((name, label), float("inf")), seconds)
            differences = output_differences(work / f"before-{name}-0", work / f"after-{name}-1")
            summary = {
                "bench": "checkouts",
                "command": name,
                "best_before_s": round(best[name, "before"], 2),
                "best_after_s": round(best[name, "after"], 2),
                "ratio_after_over_before": round(best[name, "after"] / best[name, "before"], 3),
                "outputs_identical": not differences,
                "differences": differences[:10],
                "quick": args.quick,
            }
            if (name + ":prune_s", "before") in best:
                b, a = best[name + ":prune_s", "before"], best[name + ":prune_s", "after"]
                summary |= {"best_prune_s_before": b, "best_prune_s_after": a, "prune_s_ratio": round(a / b, 3)}
            print(json.dumps(summary), flush=True)
            lines.append(summary)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


if __name__ == "__main__":
    main()
