"""A restructure changes no figure: prune, eval, export and a short seft run, this checkout against another, whole
processes alternated (A B A B) in one sitting, with every output compared bit for bit.

    git worktree add /tmp/before <rev>
    python scripts/bench_before_after.py --baseline-tree /tmp/before [--repeats 2] [--seft-steps 5]

One JSON line per run (wall seconds and peak RSS of the whole process, from wait4), then one summary line per
command: the median time ratio (this / baseline) and whether the outputs are identical. Both trees run in this
venv, the baseline's package put first on PYTHONPATH. Rows append to bench/results/before_after.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "before_after.jsonl"
SHARED = ROOT.parent / "shared" / "data"
# Report fields that record when, how long or with how much memory a run went: not compared.
UNTIMED_DROP = {"timings", "memory", "created", "versions"}


def _timed(key: str) -> bool:
    return key in UNTIMED_DROP or key.endswith("_s") or key == "seconds" or "rss" in key


def emit(row: dict[str, object]) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    with RESULTS.open("a") as f:
        f.write(line + "\n")


def run(args: list[str], tree: Path | None) -> tuple[float, int]:
    """`python -m sparsetune ARGS` with the package of `tree` (None: this checkout): wall seconds, peak RSS bytes."""
    env = {**os.environ, "PYTHONPATH": str(tree or ROOT)}
    if SHARED.is_dir():
        env.setdefault("SPARSETUNE_DATA_DIR", str(SHARED))
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "sparsetune", *args], stdout=subprocess.DEVNULL, stderr=err, env=env
        )
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            sys.stderr.write(err.read()[-3000:])
            raise SystemExit(f"failed: sparsetune {' '.join(args)} (tree {tree or ROOT})")
    return wall, int(usage.ru_maxrss) * 1024


def _untimed(value: object) -> object:
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if not _timed(k)}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


def digest(folder: Path, side_dir: Path) -> dict[str, str]:
    """sha256 of every file below `folder`: JSON files without their timing fields, text with the side's own
    scratch path replaced (reports and recipes name their inputs)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.suffix in {".json", ".jsonl", ".yaml", ".md", ".txt"}:
            text = data.decode().replace(str(side_dir), "<work>")
            if path.suffix in {".json", ".jsonl"}:
                lines = text.splitlines() if path.suffix == ".jsonl" else [text]
                text = json.dumps([_untimed(json.loads(line)) for line in lines if line.strip()], sort_keys=True)
            data = text.encode()
        out[str(path.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def commands(work: Path, side: str, seft_steps: int) -> list[tuple[str, list[str], Path]]:
    """(name, CLI args, output dir) of each measured command; later ones read the first's output."""
    calib = str(SHARED / "c4" / "c4_sample.jsonl")
    wiki = str(SHARED / "wikitext-2-raw" / "wiki.test.raw")
    pruned, evaluated, exported, tuned = (work / side / n for n in ("prune", "eval", "export", "seft"))
    return [
        ("prune", ["prune", "smollm2", "--method", "wanda", "--sparsity", "0.5", "--calib", calib,
                   "--calib-samples", "32", "--seqlen", "512", "-o", str(pruned), "--overwrite"], pruned),
        ("eval", ["eval", str(pruned), "--ppl", wiki, "--seqlen", "1024", "--limit-windows", "32",
                  "-o", str(evaluated), "--overwrite"], evaluated),
        ("export", ["export", str(pruned), "--format", "sparse-bitmask", "-o", str(exported), "--overwrite"], exported),
        ("seft", ["seft", str(pruned), "--data", "c4", "--steps", str(seft_steps), "--batch-size", "8",
                  "--seqlen", "256", "-o", str(tuned), "--overwrite"], tuned),
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-tree", required=True, help="a checkout of the revision to compare against")
    parser.add_argument("--repeats", type=int, default=2, help="alternated pairs per command")
    parser.add_argument("--seft-steps", type=int, default=5)
    parser.add_argument("--only", default="prune,eval,export,seft", help="what to measure (prune runs anyway)")
    parser.add_argument("--work", default=None, help="scratch dir (default: a temp dir)")
    args = parser.parse_args()
    baseline = Path(args.baseline_tree).resolve()
    wanted = set(args.only.split(","))
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        for side in ("this", "baseline"):
            (work / side).mkdir()
        sides = {"this": None, "baseline": baseline}
        plans = {side: commands(work, side, args.seft_steps) for side in sides}
        for i, (name, _, _) in enumerate(plans["this"]):
            if name not in wanted:
                if name == "prune":  # the input of the others: run once a side, not measured
                    for side, tree in sides.items():
                        run(plans[side][i][1], tree)
                continue
            times: dict[str, list[float]] = {side: [] for side in sides}
            for repeat in range(args.repeats):
                for side, tree in sides.items():
                    _, argv, _ = plans[side][i]
                    wall, rss = run(argv, tree)
                    times[side].append(wall)
                    emit({"bench": "before_after", "command": name, "side": side, "repeat": repeat,
                          "wall_s": round(wall, 2), "peak_rss_bytes": rss})  # fmt: skip
            ratios = [a / b for a, b in zip(times["this"], times["baseline"], strict=True)]
            ours = digest(plans["this"][i][2], work / "this")
            theirs = digest(plans["baseline"][i][2], work / "baseline")
            differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            weights = [k for k in ours.keys() | theirs.keys() if k.endswith(".safetensors")]
            same_weights = all(ours.get(k) == theirs.get(k) for k in weights)
            emit({
                "bench": "before_after", "summary": True, "command": name, "baseline": str(baseline),
                "median_wall_this_s": round(statistics.median(times["this"]), 2),
                "median_wall_baseline_s": round(statistics.median(times["baseline"]), 2),
                "time_ratio_median": round(statistics.median(ratios), 3), "outputs_identical": not differ,
                "weights_identical": same_weights, "files_differing": differ,
            })  # fmt: skip


if __name__ == "__main__":
    main()
