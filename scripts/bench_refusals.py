"""What a refused command costs as a whole process: wall time and peak RSS under /usr/bin/time -v (issue 33's
target: at most 1 s and 100 MB each, for a recipe alias bomb, an uncreatable -o parent and a binary --calib).

Each refusal runs `python -m sparsetune ...` with PYTHONPATH set to the tree, `--reps` times; one JSON line per
refusal gives the median wall time, the largest peak RSS, the exit code and the error line (`sparsetune --version`
is the floor, for comparison). `--tree` measures another checkout, e.g. the one before a change.

    .venv/bin/python scripts/bench_refusals.py
    .venv/bin/python scripts/bench_refusals.py --tree /path/to/old/checkout --out bench/results/refusals.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_WALL_S = 1.0
MAX_RSS_MB = 100.0

# Lists of 10 aliases of lists of 10 ..., six levels deep: a few hundred bytes that stand for millions of nodes.
ALIAS_BOMB = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)
)


def refusals(work: Path) -> dict[str, list[str]]:
    """name -> argv of `sparsetune`; files they need are written into `work`."""
    (work / "bomb.yaml").write_text(ALIAS_BOMB + "stages:\n  - prune: {model: smollm2, targets: *a6}\n")
    return {
        "version (the floor)": ["--version"],
        "run: recipe alias bomb": ["run", str(work / "bomb.yaml"), "-o", str(work / "out")],
        "prune: -o /proc/x/out": ["prune", "smollm2", "-o", "/proc/x/out"],
        "prune: -o under a regular file": ["prune", "smollm2", "-o", "/bin/ls/out"],
        "prune: --calib /bin/ls": ["prune", "smollm2", "--calib", "/bin/ls", "-o", str(work / "out")],
    }


def measure(tree: Path, argv: list[str], cwd: Path) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "sparsetune", *argv],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t0
    rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    code = re.search(r"Command exited with non-zero status (\d+)", proc.stderr)
    return {
        "exit": int(code.group(1)) if code else 0,
        "wall_s": wall,
        "peak_rss_mb": int(rss_kb.group(1)) / 1024 if rss_kb else None,
        "error": errors[0] if errors else None,
        "error_lines": len(errors),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, default=ROOT, help="source checkout to measure (default: this one)")
    p.add_argument("--reps", type=int, default=3, help="runs per refusal")
    p.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    args = p.parse_args()
    tree = args.tree.resolve()
    lines = []
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp:
        work = Path(tmp)
        for name, argv in refusals(work).items():
            before = sorted(work.rglob("*"))
            runs = [measure(tree, argv, work) for _ in range(args.reps)]
            wall = statistics.median(r["wall_s"] for r in runs)
            rss = max(r["peak_rss_mb"] or 0.0 for r in runs)
            row = {
                "date": time.strftime("%Y-%m-%d %H:%M"),
                "bench": "refusals",
                "refusal": name,
                "tree": str(tree),
                "exit": runs[0]["exit"],
                "error": runs[0]["error"],
                "error_lines": runs[0]["error_lines"],
                "wall_s": round(wall, 3),
                "peak_rss_mb": round(rss, 1),
                "reps": args.reps,
                "wrote_nothing": sorted(work.rglob("*")) == before,
                "within_target": wall <= MAX_WALL_S and rss <= MAX_RSS_MB,
            }
            print(json.dumps(row), flush=True)
            lines.append(row)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in lines)


if __name__ == "__main__":
    main()
