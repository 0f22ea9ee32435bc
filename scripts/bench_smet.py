"""Benchmark `sparsetune smet-pretrain`: SMET vs naive DST vs static sparse vs dense AdamW, same steps and tokens.

Runs (each its own `sparsetune smet-pretrain` process, so peak RSS is per run; same seed, batch and steps, so every
run reads the same token windows in the same order):
  dense    density 1.0, torch AdamW
  smet     density 0.5, ERK, random growth, regrowth warm-up, lr / density
  naive    density 0.5, --regrow-warmup 0 --lr-density-exponent 0 (naive DST)
  static   density 0.5, --update-interval 0 (no topology updates)

Short suite (default): the `small` preset (Llama, hidden 256, 4 layers, untied 49152-token embeddings and lm_head),
the bundled SmolLM2 tokenizer, tinyshakespeare packed into 256-token windows (5% held out), batch 8, 160 steps,
an update every 40 steps with a 40-step warm-up. Reported per run: final validation loss, the largest loss spike
after a topology update, optimizer-state + gradient bytes for the sparse-eligible weights against dense AdamW's,
peak RSS, mean step time and its ratio to dense. One JSON line per run, then a summary line with the targets.

Long run (`--long`, issue 22: show the cold-start effect where it can show): the `mini` preset (hidden 128, 4 layers,
intermediate 512; 1.05M sparse-eligible weights beside 12.6M embedding and lm_head weights), C4 (the 498k-token local
sample; 5% held out) in 128-token windows, batch 8 (1,024 tokens a step), 2,500 steps (about 5 passes over the
sample), lr 2e-3 with 5% warm-up and cosine decay, drop fraction 0.2 cosine-decayed to 0.005, an update every 100
steps (24 updates), SMET's default 100-step warm-up, validation every 250 steps. Recorded per run: the spike ratio
at every update (mean training loss of the 10 steps after it over the 10 steps up to it), the regrown/established
|update| ratio at the first step after every update and its mean, the mean ratio at each of the 10 steps after an
update (naive DST jumps, SMET ramps), the final validation loss, the ITOP rate, and `updates_after_flat`: the
topology updates at or after the first 100-step window whose mean training loss is within `--flat-tolerance` (3%)
of the last window's. The summary checks the issue's targets: mean first-step ratio >= 3 for naive DST and <= 1.5
for SMET; SMET's worst spike <= 1.02 and <= naive DST's; SMET's final validation loss <= naive DST's and within 5%
of dense; >= 10 updates after the loss flattened. Then a spike-control row: every run reads the same batches at
the same steps, so dense's loss ratio around each update step (dense has none) is what the batches alone give, and
each sparse run's ratio over dense's at that step is what its topology update added (measured 2026-12-02, 2,000
steps: dense's own ratio reached 1.029 at step 1000 and exceeded 1.02 at 8.5% of all steps; SMET's raw worst 1.029
was 0.9995x dense's there). `--spike-control-from DIR` computes that row from the run dirs of a `--keep-dir` run.

`--sweep` (with the long settings): naive DST (and whatever `--sweep-runs` adds) over lr x drop fraction x update
interval; one row per setting and a summary saying whether any setting shows a naive-DST spike (> 1.02).

TIME (an ESTIMATE, not a measurement of the full run): a step of the long-run model costs about 1.36 s of CPU on one
thread, timed over a few steps while five other jobs shared the 2 cores (wall time then was about 4 s a step). On an
idle machine with 2 threads that suggests roughly 0.7-1.0 s a step, so about 30-45 min per long run of 2,500 steps,
2-3 hours for the four runs, and as much per 4 sweep settings (the default sweep is 8 naive-DST runs).

    .venv/bin/python scripts/bench_smet.py                 # short suite: 160 steps per run (about 10 min each)
    .venv/bin/python scripts/bench_smet.py --steps 20      # quicker look
    .venv/bin/python scripts/bench_smet.py --long          # issue 22's long run; run it alone on the machine
    .venv/bin/python scripts/bench_smet.py --long --sweep  # naive DST over lr x drop fraction x update interval
    .venv/bin/python scripts/bench_smet.py --long --keep-dir out/bench-smet   # keep every run's output dir
    .venv/bin/python scripts/bench_smet.py --long --spike-control-from out/bench-smet  # the control row only
"""

from __future__ import annotations

import argparse
import itertools
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
UPDATE_WINDOW = 10  # sparsetune.train.smet.UPDATE_WINDOW: the logged steps before and after an update
SPIKE = 1.02  # a spike ratio above this counts as a loss spike (SMET's target is at most this)
SHORT = {"preset": "small", "data": "tinyshakespeare", "seqlen": 256, "batch_size": 8, "steps": 160, "lr": 3e-3,
         "update_interval": 40, "drop_fraction": 0.2, "eval_every": 0}  # fmt: skip
LONG = {"preset": "mini", "data": "c4", "seqlen": 128, "batch_size": 8, "steps": 2500, "lr": 2e-3,
        "update_interval": 100, "drop_fraction": 0.2, "eval_every": 250}  # fmt: skip


def emit(row: dict, results: Path = RESULTS) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(line + "\n")


def command(extra: list[str], s: dict, long: bool, out: Path) -> list[str]:
    interval = str(s["update_interval"])
    cmd = [sys.executable, "-m", "sparsetune", "smet-pretrain", "--model-config", s["preset"], "--tokenizer",
           "smollm2", "--data", s["data"], "--seqlen", str(s["seqlen"]), "--batch-size", str(s["batch_size"]),
           "--steps", str(s["steps"]), "--lr", str(s["lr"]), "--update-interval", interval, "--drop-fraction",
           str(s["drop_fraction"]), "--density", "0.5", "--eval-every", str(s["eval_every"]), "--val-batches", "8",
           "--seed", "0", "-o", str(out), "--overwrite", "--json"]  # fmt: skip
    if not long:  # the short suite warms regrown weights up over one update interval; the long run keeps the default
        cmd += ["--regrow-warmup", interval]
    return cmd + extra  # later flags win: the run's own settings (e.g. naive's --regrow-warmup 0)


def flat_from(losses: dict[int, float], tolerance: float, window: int = 100) -> int | None:
    """The first step of the first `window`-step block whose mean training loss is within `tolerance` of the last
    block's (the loss has flattened from there on), or None when the log is too short."""
    steps = sorted(losses)
    blocks = [steps[i : i + window] for i in range(0, len(steps) - window + 1, window)]
    if len(blocks) < 2:
        return None
    means = [sum(losses[s] for s in b) / len(b) for b in blocks]
    return next(b[0] for b, m in zip(blocks, means, strict=True) if m <= means[-1] * (1 + tolerance))


def update_effects(log: list[dict], updates: list[int]) -> dict:
    """From a train log: the mean regrown/established update ratio at each of the steps after an update."""
    by_since: dict[int, list[float]] = {}
    for row in log:
        since, ratio = row.get("steps_since_update"), row.get("regrown_update_ratio")
        if since and ratio is not None:
            by_since.setdefault(since, []).append(ratio)
    ramp = [round(sum(v) / len(v), 4) for _, v in sorted(by_since.items())] if updates else []
    return {"update_ratio_by_step_after_update": ramp}


def run(name: str, extra: list[str], s: dict, args: argparse.Namespace, out: Path) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ)
    if SHARED.is_dir():  # the named dataset resolves to the local mirror when there is one
        env.setdefault("SPARSETUNE_DATA_DIR", str(SHARED))
    done = subprocess.run(command(extra, s, args.long, out / name), capture_output=True, text=True, cwd=ROOT, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"{name} failed ({done.returncode})")
    summary = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    row = {
        "bench": "smet",
        "suite": "long" if args.long else "short",
        "run": name,
        "preset": s["preset"],
        "data": s["data"],
        "seqlen": s["seqlen"],
        "batch_size": s["batch_size"],
        "lr": s["lr"],
        "update_interval": s["update_interval"],
        "drop_fraction": s["drop_fraction"],
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
    if args.long:
        log = [json.loads(line) for line in (out / name / "train_log.jsonl").read_text().splitlines()]
        report = json.loads((out / name / "sparsity_report.json").read_text())
        updates = [t["step"] for t in report["topology_history"]]
        flat = flat_from({r["step"]: r["loss"] for r in log}, args.flat_tolerance)
        row.update(
            {
                "update_steps": updates,
                "spike_ratios": summary["spike_ratios"],
                "first_step_update_ratios": summary["first_step_update_ratios"],
                "mean_first_step_update_ratio": summary["mean_first_step_update_ratio"],
                **update_effects(log, updates),
                "itop_rate": summary["itop_rate"],
                "itop_bitmap_bytes": summary["itop_bitmap_bytes"],
                "flat_from_step": flat,
                "updates_after_flat": sum(u >= flat for u in updates) if flat is not None else 0,
                "val_losses": [[r["step"], round(r["val_loss"], 4)] for r in log if "val_loss" in r],
            }
        )
    return row


def short_summary(rows: dict, steps: int) -> dict:
    dense = rows["dense"]
    summary = {"bench": "smet", "suite": "short", "summary": True, "steps": steps}
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
    return summary


def long_summary(rows: dict, steps: int) -> dict:
    """The issue-22 targets, each None when a run it needs was not part of this invocation."""
    smet, naive, dense = rows.get("smet"), rows.get("naive"), rows.get("dense")
    summary: dict = {"bench": "smet", "suite": "long", "summary": True, "steps": steps}
    for name, row in rows.items():
        summary[f"{name}_final_val_loss"] = row["final_val_loss"]
        if row["topology_updates"]:
            summary[f"{name}_worst_spike"] = row["spike_ratio"]
            summary[f"{name}_mean_first_step_update_ratio"] = row["mean_first_step_update_ratio"]
            summary[f"{name}_updates_after_flat"] = row["updates_after_flat"]
            summary[f"{name}_itop_rate"] = row["itop_rate"]

    def check(ok: bool | None) -> bool | None:
        return None if ok is None else bool(ok)

    nr = naive["mean_first_step_update_ratio"] if naive else None
    sr = smet["mean_first_step_update_ratio"] if smet else None
    summary["target_naive_update_ratio_ge_3"] = check(nr >= 3 if nr is not None else None)
    summary["target_smet_update_ratio_le_1_5"] = check(sr <= 1.5 if sr is not None else None)
    ss, ns = (smet or {}).get("spike_ratio"), (naive or {}).get("spike_ratio")
    summary["target_smet_spike_le_1_02"] = check(ss <= SPIKE if ss is not None else None)
    summary["target_smet_spike_le_naive"] = check(ss <= ns if ss is not None and ns is not None else None)
    summary["naive_shows_spike"] = check(ns > SPIKE if ns is not None else None)
    if smet and naive:
        summary["target_smet_loss_le_naive"] = smet["final_val_loss"] <= naive["final_val_loss"]
    if smet and dense:
        summary["smet_val_loss_vs_dense"] = round(smet["final_val_loss"] / dense["final_val_loss"], 4)
        summary["target_smet_loss_within_5pct_dense"] = summary["smet_val_loss_vs_dense"] <= 1.05
    dynamic = [r["updates_after_flat"] for n, r in rows.items() if n in ("smet", "naive")]
    summary["target_10_updates_after_flat"] = check(min(dynamic) >= 10 if dynamic else None)
    return summary


def spike_control(out: Path, names: list[str], interval: int) -> dict | None:
    """The spike ratio with the data's own share taken out. Every run reads the same batches at the same steps, so
    the dense run's ratio around step u (it has no topology update) is what the batches alone give; a run's ratio at
    u over dense's is what its update added. Also the noise floor: the share of all steps where dense's own ratio
    exceeds SPIKE. Needs the runs' train logs (their output dirs), dense's among them; None without it."""
    from sparsetune.train.smet import update_spike_ratios  # torch comes with it: only the summary needs it

    losses = {}
    for name in names:
        log = out / name / "train_log.jsonl"
        if log.is_file():
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            losses[name] = {r["step"]: r["loss"] for r in rows if "loss" in r}
    if "dense" not in losses:
        return None
    dense = losses.pop("dense")
    last = max(dense)
    steps = list(range(interval, last - UPDATE_WINDOW + 1, interval))
    dense_ratios = update_spike_ratios(dense, steps)
    every_step = update_spike_ratios(dense, list(range(UPDATE_WINDOW, last - UPDATE_WINDOW + 1)))
    floor = [r for r in every_step if r is not None]
    row: dict = {
        "bench": "smet",
        "suite": "long",
        "spike_control": True,
        "steps": last,
        "at_steps": steps,
        "dense_ratios": [round(r, 4) if r is not None else None for r in dense_ratios],
        "dense_worst_ratio": round(max(r for r in dense_ratios if r is not None), 4),
        "dense_share_of_steps_above_spike": round(sum(r > SPIKE for r in floor) / len(floor), 4),
        "dense_ratio_p95_all_steps": round(sorted(floor)[int(0.95 * (len(floor) - 1))], 4),
    }
    for name, loss in losses.items():
        own = update_spike_ratios(loss, steps)
        over = [r / d if r is not None and d is not None else None for r, d in zip(own, dense_ratios, strict=True)]
        row[f"{name}_ratios_over_dense"] = [round(x, 4) if x is not None else None for x in over]
        row[f"{name}_worst_ratio_over_dense"] = round(max(x for x in over if x is not None), 4)
    if "smet" in losses:
        worst = row["smet_worst_ratio_over_dense"]
        row["target_smet_spike_over_dense_le_1_02"] = worst <= SPIKE
        if "naive" in losses:
            row["target_smet_spike_over_dense_le_naive"] = worst <= row["naive_worst_ratio_over_dense"]
    return row


def sweep(args: argparse.Namespace, base: dict, out: Path) -> None:
    grid = itertools.product(
        [float(x) for x in args.sweep_lrs.split(",")],
        [float(x) for x in args.sweep_drop_fractions.split(",")],
        [int(x) for x in args.sweep_intervals.split(",")],
    )
    found, settings = [], []
    for lr, drop, interval in grid:
        s = {**base, "lr": lr, "drop_fraction": drop, "update_interval": interval}
        for name in args.sweep_runs.split(","):
            label = f"{name}-lr{lr:g}-drop{drop:g}-every{interval}"
            row = {**run(label, RUNS[name], s, args, out), "run": name, "label": label, "suite": "sweep"}
            emit(row, args.results)
            settings.append(
                {
                    "run": name,
                    "lr": lr,
                    "drop_fraction": drop,
                    "update_interval": interval,
                    "worst_spike": row["spike_ratio"],
                    "mean_first_step_update_ratio": row["mean_first_step_update_ratio"],
                    "updates_after_flat": row["updates_after_flat"],
                }
            )
            if name == "naive" and row["spike_ratio"] is not None and row["spike_ratio"] > SPIKE:
                found.append(settings[-1])
    summary = {"bench": "smet", "suite": "sweep", "summary": True, "steps": base["steps"], "settings": settings}
    summary["naive_spike_found"] = bool(found)
    summary["naive_spike_settings"] = found
    if not found:
        summary["note"] = (
            f"no setting of the sweep shows a naive-DST loss spike above {SPIKE}; "
            "the regrown/established update-magnitude ratio is the evidence of the cold-start mechanism"
        )
    emit(summary, args.results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="issue 22's long run (mini preset, C4, 2,500 steps)")
    parser.add_argument("--preset")
    parser.add_argument("--data")
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--drop-fraction", type=float)
    parser.add_argument("--update-interval", type=int, help="short suite: also the regrowth warm-up T_w")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--flat-tolerance", type=float, default=0.03)
    parser.add_argument("--sweep", action="store_true", help="lr x drop fraction x update interval (long settings)")
    parser.add_argument("--sweep-runs", default="naive")
    parser.add_argument("--sweep-lrs", default="1e-3,3e-3")
    parser.add_argument("--sweep-drop-fractions", default="0.2,0.5")
    parser.add_argument("--sweep-intervals", default="50,100")
    parser.add_argument("--keep-dir", help="keep every run's output dir here (default: a temp dir, removed)")
    parser.add_argument(
        "--spike-control-from",
        help="only the spike control row, from the run dirs a --long --keep-dir run kept (dense's among them)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSONL file the rows are appended to")
    args = parser.parse_args()
    args.long = args.long or args.sweep
    base = dict(LONG if args.long else SHORT)
    for key in base:
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    with tempfile.TemporaryDirectory(prefix="bench-smet-") as tmp:
        out = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.sweep:
            sweep(args, base, out)
            return
        if args.spike_control_from:
            control = spike_control(Path(args.spike_control_from), list(RUNS), base["update_interval"])
            if control is None:
                missing = f"no dense/train_log.jsonl under {args.spike_control_from}"
                print(f"error: {missing}; give the --keep-dir of a --long run", file=sys.stderr)
                sys.exit(2)
            emit(control, args.results)
            return
        rows = {}
        for name in args.runs.split(","):
            rows[name] = run(name, RUNS[name], base, args, out)
            emit(rows[name], args.results)
        control = spike_control(out, list(rows), base["update_interval"]) if args.long else None
    if args.long:
        emit(long_summary(rows, base["steps"]), args.results)
        if control:
            emit(control, args.results)
    elif "dense" in rows:
        emit(short_summary(rows, base["steps"]), args.results)


if __name__ == "__main__":
    main()
