"""Benchmark `sparsetune smet-pretrain`: SMET vs naive DST vs static sparse vs dense AdamW, same steps and tokens.

Setting: the `small` preset (Llama, hidden 256, 4 layers, untied 49152-token embeddings and lm_head), the bundled
SmolLM2 tokenizer, tinyshakespeare packed into 256-token windows (5% held out for validation), batch 8.
Runs (each its own `sparsetune smet-pretrain` process, so peak RSS is per run):
  dense    density 1.0, torch AdamW
  smet     density 0.5, ERK, random growth, regrowth warm-up, lr / density
  naive    density 0.5, --regrow-warmup 0 --lr-density-exponent 0 (naive DST)
  static   density 0.5, --update-interval 0 (no topology updates)
Reported per run: final validation loss, the largest loss spike after a topology update (mean training loss of
the 10 steps after an update over the 10 before), optimizer-state + gradient bytes for the sparse-eligible weights
against dense AdamW's, peak RSS, mean step time and its ratio to dense (all measured in this one invocation).
One JSON line per run, then a summary line with the targets.

    .venv/bin/python scripts/bench_smet.py                 # 160 steps per run (about 10 min each on 2 cores)
    .venv/bin/python scripts/bench_smet.py --steps 20      # quicker look
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "smet.jsonl"
SHARED = ROOT.parent / "shared" / "data"
RUNS = {
    "dense": ["--density", "1.0"],
    "smet": [],
    "naive": ["--regrow-warmup", "0", "--lr-density-exponent", "0"],
    "static": ["--update-interval", "0"],
}


def emit(row: dict) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(line + "\n")


def run(name: str, extra: list[str], args: argparse.Namespace, out: Path) -> dict:
    interval = str(args.update_interval)
    cmd = [sys.executable, "-m", "sparsetune", "smet-pretrain", "--model-config", args.preset, "--tokenizer",
           "smollm2", "--data", args.data, "--seqlen", "256", "--batch-size", str(args.batch_size), "--steps",
           str(args.steps), "--lr", str(args.lr), "--update-interval", interval, "--regrow-warmup", interval,
           "--density", "0.5", "--eval-every", "0", "--val-batches", "8", "--seed", "0", "-o", str(out / name),
           "--json", *extra]  # fmt: skip
    t0 = time.perf_counter()
    env = dict(os.environ)
    if SHARED.is_dir():  # the named dataset resolves to the local mirror when there is one
        env.setdefault("SPARSETUNE_DATA_DIR", str(SHARED))
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{name} failed ({done.returncode})")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    return {
        "bench": "smet",
        "run": name,
        "preset": args.preset,
        "data": args.data,
        "steps": summary["steps"],
        "tokens": summary["tokens"],
        "final_val_loss": summary["final_val_loss"],
        "final_train_loss": summary["final_loss"],
        "spike_ratio": summary["spike_ratio"],
        "topology_updates": summary["topology_updates"],
        "sparse_state_and_grad_bytes": summary["optimizer_state_bytes"] + summary["gradient_bytes"],
        "state_and_grad_vs_dense_adamw": summary["state_and_grad_vs_dense"],
        "peak_rss_gb": round(summary["peak_rss_bytes"] / 2**30, 3),
        "mean_step_s": round(summary["mean_step_s"], 4),
        "median_step_s": round(summary["median_step_s"], 4),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--data", default="tinyshakespeare")
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--update-interval", type=int, default=40, help="also the regrowth warm-up T_w")
    parser.add_argument("--runs", default=",".join(RUNS))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-smet-") as tmp:
        for name in args.runs.split(","):
            rows[name] = run(name, RUNS[name], args, Path(tmp))
            emit(rows[name])
    if "dense" in rows:
        dense = rows["dense"]
        summary = {"bench": "smet", "summary": True, "steps": args.steps}
        for name, row in rows.items():
            summary[f"{name}_step_vs_dense"] = round(row["mean_step_s"] / dense["mean_step_s"], 3)
            summary[f"{name}_median_step_vs_dense"] = round(row["median_step_s"] / dense["median_step_s"], 3)
            summary[f"{name}_val_loss_vs_dense"] = round(row["final_val_loss"] / dense["final_val_loss"], 4)
        if "smet" in rows:
            smet = rows["smet"]
            summary["target_memory"] = smet["state_and_grad_vs_dense_adamw"] <= 0.5 + 0.02
            summary["target_step_time"] = summary["smet_step_vs_dense"] <= 1.15
            summary["target_spike"] = smet["spike_ratio"] is not None and smet["spike_ratio"] <= 1.1
            summary["target_loss_within_5pct"] = summary["smet_val_loss_vs_dense"] <= 1.05
            if "static" in rows:
                summary["target_beats_static"] = smet["final_val_loss"] < rows["static"]["final_val_loss"]
            if "naive" in rows:
                summary["naive_spike_ratio"] = rows["naive"]["spike_ratio"]
        emit(summary)


if __name__ == "__main__":
    main()
