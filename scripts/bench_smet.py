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
intermediate 512) with the byte-level tokenizer (`--tokenizer bytes`, 259 ids), so its 1.05M sparse-eligible
weights are most of the model (66k embedding and lm_head weights), not a tenth of it as with a 49k vocabulary. C4
(the 2.2 MB local sample as UTF-8 bytes; 5% held out) in 128-byte windows, batch 8 (1,024 bytes a step), 4,000 steps
(two passes over the training windows; the validation loss falls to the end, so it is not an overfitting curve;
`--steps 2000` is one pass), lr 2e-3 with 5% warm-up and cosine decay, drop fraction 0.2 cosine-decayed to 0.005, an
update every 100 steps (39 updates), SMET's default 100-step warm-up, validation every 250 steps, `--spike-probe`.
Recorded per run: the spike ratio at every update from the training loss (mean of the 10 steps after it over the 10
steps up to it) and from the fixed probe batch (which the batch order cannot move; dense probes at the same steps),
the regrown/established |update| ratio at the first step after every update and its mean, the mean ratio at each of
the 10 steps after an update (naive DST jumps, SMET ramps), the final validation loss, the ITOP rate, and
`updates_after_flat`: the topology updates at or after the first 100-step window whose mean training loss is within
`--flat-tolerance` (3%) of the last window's. The summary checks the issue's targets: mean first-step ratio >= 3 for
naive DST and <= 1.5 for SMET; SMET's worst spike <= 1.02 and <= naive DST's (raw and on the probe); SMET's final
validation loss <= naive DST's and within 5% of dense; >= 10 updates after the loss flattened. `--summarize`
recomputes that line from the recorded rows. Then a spike-control row: every run reads the same batches at the same
steps, so dense's loss ratio around each update step (dense has none) is what the batches alone give, and each
sparse run's ratio over dense's at that step is what its topology update added. `--spike-control-from DIR` computes
that row from the run dirs of a `--keep-dir` run.

`--sweep` (with the long settings): naive DST (and whatever `--sweep-runs` adds) over lr x drop fraction x update
interval; one row per setting and a summary saying whether any setting shows a naive-DST spike (> 1.02 on the probe
batch, over the probe ratio of a dense run at the same lr and steps where one was swept: `--sweep --sweep-runs dense
--sweep-drop-fractions 0.2 --sweep-intervals 50` probes every step the interval-50 and interval-100 runs update at).

TIME (measured 2026-12-06, alone on 2 cores): 0.068 s a step dense, 0.084-0.089 s sparse: 5-6.5 min per run of
4,000 steps, about 30 min for the five runs; the sweep (`--sweep --steps 2000`) takes about 3-4 min a setting.

`--runs` also takes `smet-same-lr`: SMET's warm-up with the dense learning rate (`--lr-density-exponent 0`), which
differs from naive DST in the warm-up alone.

`--runs` also takes other growth for SMET (issue 35): `rigl` (`--growth gradient`), `ctre` (`--growth ctre`, CTRE's
cosine similarity of activations) and `ctre-sim` (with its random exploration); the long summary gives each one's
step time and final validation loss over `smet`'s (random growth), and checks CTRE's target of at most 1.1x its
mean step time (which includes the similarity pass at every update): `--long --runs smet,rigl,ctre,ctre-sim`.

    .venv/bin/python scripts/bench_smet.py                 # short suite: 160 steps per run (about 10 min each)
    .venv/bin/python scripts/bench_smet.py --steps 20      # quicker look
    .venv/bin/python scripts/bench_smet.py --long          # issue 22's long run; run it alone on the machine
    .venv/bin/python scripts/bench_smet.py --sweep --steps 2000  # naive DST (and dense) over lr x drop x interval
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
    # SMET's warm-up without its density-aware lr: differs from naive DST in the warm-up alone
    "smet-same-lr": ["--lr-density-exponent", "0"],
    # SMET with other growth (issue 35): RigL's dense gradient, CTRE's cosine similarity of activations (and its
    # simultaneous random exploration); `smet` itself is random growth (SET)
    "rigl": ["--growth", "gradient"],
    "ctre": ["--growth", "ctre"],
    "ctre-sim": ["--growth", "ctre-sim"],
}
GROWTH_RUNS = ("rigl", "ctre", "ctre-sim")  # compared with `smet` (random growth) in the long summary
DEFAULT_RUNS = "dense,smet,naive,static"
UPDATE_WINDOW = 10  # sparsetune.train.smet.UPDATE_WINDOW: the logged steps before and after an update
SPIKE = 1.02  # a spike ratio above this counts as a loss spike (SMET's target is at most this)
SHORT = {"preset": "small", "tokenizer": "smollm2", "data": "tinyshakespeare", "seqlen": 256, "batch_size": 8,
         "steps": 160, "lr": 3e-3, "update_interval": 40, "drop_fraction": 0.2, "eval_every": 0}  # fmt: skip
LONG = {"preset": "mini", "tokenizer": "bytes", "data": "c4", "seqlen": 128, "batch_size": 8, "steps": 4000,
        "lr": 2e-3, "update_interval": 100, "drop_fraction": 0.2, "eval_every": 250}  # fmt: skip


def emit(row: dict, results: Path = RESULTS) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(line + "\n")


def command(extra: list[str], s: dict, long: bool, out: Path) -> list[str]:
    interval = str(s["update_interval"])
    cmd = [sys.executable, "-m", "sparsetune", "smet-pretrain", "--model-config", s["preset"], "--tokenizer",
           s["tokenizer"], "--data", s["data"], "--seqlen", str(s["seqlen"]), "--batch-size", str(s["batch_size"]),
           "--steps", str(s["steps"]), "--lr", str(s["lr"]), "--update-interval", interval, "--drop-fraction",
           str(s["drop_fraction"]), "--density", "0.5", "--eval-every", str(s["eval_every"]), "--val-batches", "8",
           "--seed", "0", "-o", str(out), "--overwrite", "--json"]  # fmt: skip
    # The bench's presets are tiny (activations of a few MB): checkpointing would only add a forward pass per step,
    # and every recorded row before issue 32 ran without it.
    cmd += ["--no-activation-checkpointing"]
    if not long:  # the short suite warms regrown weights up over one update interval; the long run keeps the default
        cmd += ["--regrow-warmup", interval]
    else:  # the long run also measures every update's spike on one fixed held-out batch
        cmd += ["--spike-probe"]
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
        "tokenizer": s["tokenizer"],
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
                "probe_spike_ratio": summary["probe_spike_ratio"],
                "probe_spike_ratios": summary["probe_spike_ratios"],
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
    # The same targets on the fixed probe batch (--spike-probe), which the batch order cannot move; dense's ratios
    # at the same steps are the floor a run without updates gives.
    probe = {name: row.get("probe_spike_ratio") for name, row in rows.items()}
    for name, worst in probe.items():
        if worst is not None:
            summary[f"{name}_worst_probe_spike"] = worst
    sp, npr = probe.get("smet"), probe.get("naive")
    summary["target_smet_probe_spike_le_1_02"] = check(sp <= SPIKE if sp is not None else None)
    summary["target_smet_probe_spike_le_naive"] = check(sp <= npr if sp is not None and npr is not None else None)
    summary["naive_probe_shows_spike"] = check(npr > SPIKE if npr is not None else None)
    if smet and naive:
        summary["target_smet_loss_le_naive"] = smet["final_val_loss"] <= naive["final_val_loss"]
    if "smet-same-lr" in rows and naive:  # the warm-up alone against naive DST (both at the dense lr)
        summary["smet_same_lr_loss_le_naive"] = rows["smet-same-lr"]["final_val_loss"] <= naive["final_val_loss"]
    if smet and dense:
        summary["smet_val_loss_vs_dense"] = round(smet["final_val_loss"] / dense["final_val_loss"], 4)
        summary["target_smet_loss_within_5pct_dense"] = summary["smet_val_loss_vs_dense"] <= 1.05
    for name in GROWTH_RUNS:  # issue 35: step time and val loss against random growth; CTRE's target: mean step
        # time (its similarity pass at every update included) at most 1.1x
        if name in rows and smet:
            row = rows[name]
            summary[f"{name}_step_vs_random"] = round(row["mean_step_s"] / smet["mean_step_s"], 3)
            summary[f"{name}_median_step_vs_random"] = round(row["median_step_s"] / smet["median_step_s"], 3)
            summary[f"{name}_val_loss_vs_random"] = round(row["final_val_loss"] / smet["final_val_loss"], 4)
            if name.startswith("ctre"):
                summary[f"target_{name}_step_le_1_1x_random"] = summary[f"{name}_step_vs_random"] <= 1.1
    dynamic = [r["updates_after_flat"] for n, r in rows.items() if n in ("smet", "naive")]
    summary["target_10_updates_after_flat"] = check(min(dynamic) >= 10 if dynamic else None)
    return summary


def recorded_rows(results: Path, suite: str, match: dict, key: str) -> dict:
    """The latest recorded row of `suite` per `key` value whose fields equal `match` (so a summary can follow a run
    made in parts)."""
    rows: dict = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if row.get("suite") == suite and "run" in row and all(row.get(k) == v for k, v in match.items()):
                rows[row[key]] = row
    return rows


LONG_KEYS = ("preset", "tokenizer", "data", "seqlen", "batch_size", "steps", "lr", "update_interval", "drop_fraction")
SWEEP_KEYS = ("preset", "tokenizer", "data", "seqlen", "batch_size", "steps")


def spike_control(out: Path, names: list[str], interval: int) -> dict | None:
    """The spike ratio with the data's own share taken out. Every run reads the same batches at the same steps, so
    the dense run's ratio around step u (it has no topology update) is what the batches alone give; a run's ratio at
    u over dense's is what its update added. Also the noise floor: the share of all steps where dense's own ratio
    exceeds SPIKE. Needs the runs' train logs (their output dirs), dense's among them; None without it."""
    from sparsetune.train.smet import probe_spike_ratios, update_spike_ratios  # torch: only the summary needs it

    losses, probes = {}, {}
    for name in names:
        log = out / name / "train_log.jsonl"
        if log.is_file():
            rows = [json.loads(line) for line in log.read_text().splitlines()]
            losses[name] = {r["step"]: r["loss"] for r in rows if "loss" in r}
            probes[name] = {r["step"]: r["probe_loss"] for r in rows if "probe_loss" in r}
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
    # The same on the fixed probe batch (--spike-probe): the batches cannot move it, training at this lr still can.
    dense_probe = probes.pop("dense", {})
    if dense_probe:
        dense_p = probe_spike_ratios(dense_probe, steps)
        row["dense_probe_ratios"] = [round(r, 4) if r is not None else None for r in dense_p]
        row["dense_probe_worst_ratio"] = round(max(r for r in dense_p if r is not None), 4)
        for name, probe in probes.items():
            if not probe:
                continue
            own = probe_spike_ratios(probe, steps)
            over = [r / d if r is not None and d is not None else None for r, d in zip(own, dense_p, strict=True)]
            row[f"{name}_probe_ratios_over_dense"] = [round(x, 4) if x is not None else None for x in over]
            row[f"{name}_probe_worst_ratio_over_dense"] = round(max(x for x in over if x is not None), 4)
        if "smet" in probes and probes["smet"]:
            worst = row["smet_probe_worst_ratio_over_dense"]
            row["target_smet_probe_spike_over_dense_le_1_02"] = worst <= SPIKE
            if probes.get("naive"):
                row["target_smet_probe_spike_over_dense_le_naive"] = worst <= row["naive_probe_worst_ratio_over_dense"]
    return row


def sweep(args: argparse.Namespace, base: dict, out: Path) -> None:
    grid = itertools.product(
        [float(x) for x in args.sweep_lrs.split(",")],
        [float(x) for x in args.sweep_drop_fractions.split(",")],
        [int(x) for x in args.sweep_intervals.split(",")],
    )
    for lr, drop, interval in grid:
        s = {**base, "lr": lr, "drop_fraction": drop, "update_interval": interval}
        for name in args.sweep_runs.split(","):
            label = f"{name}-lr{lr:g}-drop{drop:g}-every{interval}"
            row = {**run(label, RUNS[name], s, args, out), "run": name, "label": label, "suite": "sweep"}
            emit(row, args.results)
    emit(sweep_summary(sweep_rows(base, args.results), base["steps"]), args.results)


def sweep_rows(base: dict, results: Path) -> list[dict]:
    """The latest recorded sweep row of each setting (its label) at these steps and data."""
    return list(recorded_rows(results, "sweep", {k: base[k] for k in SWEEP_KEYS}, "label").values())


def sweep_summary(rows: list[dict], steps: int) -> dict:
    """Per naive-DST setting: its worst spike on the training loss and on the probe batch, and, where a dense run at
    the same lr probed the same steps, the worst probe ratio over dense's at the same step (what the updates added
    beyond what training at that lr does to a fixed batch anyway)."""
    dense = {row["lr"]: row for row in rows if row["run"] == "dense"}
    settings, found = [], []
    for row in rows:
        if row["run"] == "dense":
            continue
        item = {
            "run": row["run"],
            "lr": row["lr"],
            "drop_fraction": row["drop_fraction"],
            "update_interval": row["update_interval"],
            "worst_spike": row["spike_ratio"],
            "worst_probe_spike": row.get("probe_spike_ratio"),
            "mean_first_step_update_ratio": row["mean_first_step_update_ratio"],
            "final_val_loss": row["final_val_loss"],
        }
        control = dense.get(row["lr"])
        if control is not None and row.get("probe_spike_ratios"):
            probed = range(control["update_interval"], control["steps"], control["update_interval"])  # as smet.py
            at = dict(zip(probed, control["probe_spike_ratios"], strict=True))
            over = [
                r / at[u]
                for u, r in zip(row["update_steps"], row["probe_spike_ratios"], strict=True)
                if r and at.get(u)
            ]
            item["worst_probe_spike_over_dense"] = round(max(over), 4) if over else None
        settings.append(item)
        shown = item.get("worst_probe_spike_over_dense", item["worst_probe_spike"])
        if row["run"] == "naive" and shown is not None and shown > SPIKE:
            found.append(item)
    summary = {"bench": "smet", "suite": "sweep", "summary": True, "steps": steps, "settings": settings}
    summary["dense_worst_probe_spike"] = {str(lr): row.get("probe_spike_ratio") for lr, row in dense.items()}
    summary["naive_spike_found"] = bool(found)
    summary["naive_spike_settings"] = found
    if not found:
        summary["note"] = (
            f"no setting of the sweep shows a naive-DST loss spike above {SPIKE} on the probe batch (over dense's "
            "ratio at the same step where a dense run at that lr was swept); the regrown/established "
            "update-magnitude ratio is the evidence of the cold-start mechanism"
        )
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--long", action="store_true", help="issue 22's long run (mini preset, C4 bytes, 4,000 steps)")
    parser.add_argument("--preset")
    parser.add_argument("--data")
    parser.add_argument("--seqlen", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--drop-fraction", type=float)
    parser.add_argument("--update-interval", type=int, help="short suite: also the regrowth warm-up T_w")
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"any of {', '.join(RUNS)}")
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
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="--long: only the summary line, from the recorded rows of these settings",
    )
    args = parser.parse_args()
    args.long = args.long or args.sweep
    base = dict(LONG if args.long else SHORT)
    for key in base:
        if getattr(args, key, None) is not None:
            base[key] = getattr(args, key)
    with tempfile.TemporaryDirectory(prefix="bench-smet-") as tmp:
        out = Path(args.keep_dir) if args.keep_dir else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.sweep and not args.summarize:
            sweep(args, base, out)
            return
        if args.summarize and args.sweep:
            emit(sweep_summary(sweep_rows(base, args.results), base["steps"]), args.results)
            return
        if args.summarize:
            rows = recorded_rows(args.results, "long", {k: base[k] for k in LONG_KEYS}, "run")
            if not rows:
                print(
                    f"error: {args.results} holds no long-run row with these settings; run --long first",
                    file=sys.stderr,
                )
                sys.exit(2)
            emit(long_summary(rows, base["steps"]), args.results)
            return
        if args.spike_control_from:
            control = spike_control(Path(args.spike_control_from), list(RUNS), base["update_interval"])
            if control is None:
                missing = f"no dense/train_log.jsonl under {args.spike_control_from}"
                print(f"error: {missing}; give the --keep-dir of a --long run", file=sys.stderr)
                sys.exit(2)
            emit(control, args.results)
            return
        unknown = [name for name in args.runs.split(",") if name not in RUNS]
        if unknown:
            print(f"error: --runs {','.join(unknown)}: not a run; choose from {', '.join(RUNS)}", file=sys.stderr)
            sys.exit(2)
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
