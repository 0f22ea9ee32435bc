"""Benchmark the 70% pipelines of issue 34 at one token budget: one-shot pruning then seft, GraNet, distillation.

Testbed: the bundled SmolLM2-135M (fp32). One-shot pruning calibrates on the first 32 x 512 tokens of the C4 sample
(consecutive); every training run reads the same C4 tokens past them (`--skip-tokens`), `--steps` (default 120)
x `--budget-multiplier` steps of 8 x 256 tokens, the same for all. Each run is a `sparsetune` process of its own
(peak RSS of the whole process, from wait4). Evaluation: WikiText-2 raw test, the first 32 non-overlapping
1024-token windows, and ARC-Easy (offline lm-eval task, `--arc-limit` documents, default 500). One JSON line per
measurement is appended to bench/results/granet.jsonl, then one summary line.

Pipelines (`--pipelines`, default all):
    1  one-shot `prune --method auto --sparsity 0.7` (ALPS) then `seft` (its default method, cross-entropy;
       `--oneshot-method masked-ft` trains every active weight instead, for 1 and 2)
    2  the same with distillation from the dense model (`--distill-loss`, default squarehead)
    3  GraNet from dense to 70%: `seft <dense> --method granet --target-sparsity 0.7`
    4  GraNet from a one-shot 50% (`--start50-method`, default auto) to 70%
    5  GraNet with distillation, from the start of 3 or 4 (`--pipeline5-start`; default: whichever of 3 and 4 has
       the lower perplexity among the rows recorded with these settings, else the one-shot 50%)
The starts (dense, one-shot 70%, one-shot 50%) are evaluated once each and recorded as rows too.

Summary: the best pipeline, its perplexity over pipeline 1's (target <= 0.7), the dense perplexity and the best
over 2x dense (moonshot: <= 1 within 4x the budget), every distilled run's step time over the same method's without
(target <= 1.5) and its peak-RSS growth against the teacher's weight bytes (target: not above).

    .venv/bin/python scripts/bench_granet.py                          # all five (hours alone: ~20 min a run)
    .venv/bin/python scripts/bench_granet.py --budget-multiplier 4    # the moonshot budget
    .venv/bin/python scripts/bench_granet.py --pipelines 1,3 --lr 3=2e-4
    .venv/bin/python scripts/bench_granet.py --quick                  # tiny random Llama, 4 steps: the plumbing
    .venv/bin/python scripts/bench_granet.py --summarize              # the summary from recorded rows
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import bench_common  # noqa: E402
from bench_common import (  # noqa: E402
    CALIB_WINDOWS,
    ROOT,
    evaluate,
    prune_testbed,
    sparsetune_measured,
    testbed_prune_dir,
    training_schedule,
    wikitext_eval_ids,
)

RESULTS = ROOT / "bench" / "results" / "granet.jsonl"
SHARED = ROOT.parent / "shared" / "data"
TARGET_SPARSITY = 0.7

# The `sparsetune seft` flags of issue 34 this bench passes (GraNet and distillation), in one place.
FLAGS = {
    "method": "--method",
    "target_sparsity": "--target-sparsity",
    "granet_interval": "--granet-interval",
    "granet_end": "--granet-end",
    "granet_score": "--granet-score",
    "granet_scope": "--granet-scope",
    "distill_from": "--distill-from",
    "distill_loss": "--distill-loss",
    "distill_weight": "--distill-weight",
    "teacher_dtype": "--teacher-dtype",
}
# The fields of the run's --json summary this bench reads: the distillation block and its entries.
REPORT = {
    "distillation": "distillation",
    "teacher_weight_bytes": "teacher_weight_bytes",
    "teacher_s_per_step": "teacher_s_per_step",
    "teacher_step_share": "teacher_step_share",
    "teacher_dtype": "teacher_dtype",
    "granet": "granet",
}
# seft's default method and rate as bench_seft measured them best at the Wanda 70% start; GraNet trains every
# active weight like masked-ft, at masked-ft's measured rate there.
SEFT_FLAGS = ["--method", "seft", "--delta-rank", "16"]
QUICK_DELTA_RANK = "2"  # the tiny model's matrices hold fewer non-zeros at 70% than rank 16's budget
LEARNING_RATES = {"1": 1e-3, "2": 1e-3, "3": 1e-4, "4": 1e-4, "5": 1e-4}
DEFAULT_LEARNING_RATES = dict(LEARNING_RATES)
PIPELINES = ("1", "2", "3", "4", "5")
DISTILLED = ("2", "5")  # the pipelines that distil from the dense model
REFERENCE_RUN = "auto70-seft"  # pipeline 1 at its defaults: what the 0.7x target is measured against


def set_results(path: Path) -> None:
    global RESULTS
    RESULTS = path.expanduser().resolve()


def emit(row: dict[str, object]) -> None:
    """Print one JSON line and append it to bench/results/granet.jsonl as it lands."""
    bench_common.append_row(RESULTS, row)


def recorded_rows(match: dict[str, object]) -> dict[str, dict[str, object]]:
    return bench_common.recorded_rows(RESULTS, match)


def base_settings(args: argparse.Namespace) -> dict[str, object]:
    """The settings every row of one comparison shares (rows of other settings are never mixed into a summary)."""
    return {
        "suite": "pipelines70",
        "quick": args.quick,
        "steps": args.steps * args.budget_multiplier,
        "budget_multiplier": args.budget_multiplier,
        "batch_size": args.batch_size,
        "seqlen": args.seqlen,
        "eval_windows": args.eval_windows,
        "arc_limit": args.arc_limit,
    }


def granet_suffix(args: argparse.Namespace) -> str:
    """GraNet settings other than the CLI's defaults, in the run names (so rows of other settings stay apart)."""
    given = [(k, getattr(args, k)) for k in ("granet_score", "granet_scope", "granet_interval", "granet_end")]
    return "".join(f"-{k.removeprefix('granet_')}{v}" for k, v in given if v is not None)


def start_names(args: argparse.Namespace) -> dict[str, str]:
    return {"dense": "dense", "oneshot70": "auto70-oneshot", "oneshot50": f"{args.start50_method}50-oneshot"}


def pipeline5_start(args: argparse.Namespace, rows: dict[str, dict[str, object]]) -> str:
    """`dense` or `oneshot50`: as asked, else the start of whichever of 3 and 4 measured the lower perplexity."""
    if args.pipeline5_start != "best":
        return args.pipeline5_start
    names = run_names(args, "oneshot50")
    measured = {s: rows[names[p]]["wikitext2_ppl"] for p, s in (("3", "dense"), ("4", "oneshot50")) if names[p] in rows}
    return min(measured, key=measured.get) if measured else "oneshot50"


def run_names(args: argparse.Namespace, start5: str) -> dict[str, str]:
    """Pipeline id -> its run name (what rows are keyed by)."""
    loss, suffix = args.distill_loss, granet_suffix(args)
    if args.distill_weight is not None:
        loss += f"-w{args.distill_weight:g}"
    from50 = f"granet-{args.start50_method}50{suffix}"
    oneshot = f"auto70-{args.oneshot_method}"
    names = {
        "1": oneshot,
        "2": f"{oneshot}-distill-{loss}",
        "3": f"granet-dense{suffix}",
        "4": from50,
        "5": f"{f'granet-dense{suffix}' if start5 == 'dense' else from50}-distill-{loss}",
    }
    # A learning rate other than the default is part of the run's name (rows of other rates stay apart).
    return {p: n + ("" if LEARNING_RATES[p] == DEFAULT_LEARNING_RATES[p] else f"-lr{LEARNING_RATES[p]:g}")
            for p, n in names.items()}  # fmt: skip


def pipeline_flags(pid: str, args: argparse.Namespace, teacher: str) -> list[str]:
    """The method flags of pipeline `pid` (the data and schedule flags come from `training_schedule`)."""
    if pid in ("1", "2") and args.oneshot_method != "seft":
        flags = [FLAGS["method"], args.oneshot_method]
    elif pid in ("1", "2"):
        flags = list(SEFT_FLAGS)
        if args.quick:
            flags[flags.index("--delta-rank") + 1] = QUICK_DELTA_RANK
    else:
        flags = [FLAGS["method"], "granet", FLAGS["target_sparsity"], str(TARGET_SPARSITY)]
        for key in ("granet_score", "granet_scope", "granet_interval", "granet_end"):
            if getattr(args, key) is not None:
                flags += [FLAGS[key], str(getattr(args, key))]
    if pid in DISTILLED:
        flags += [FLAGS["distill_from"], teacher, FLAGS["distill_loss"], args.distill_loss]
        flags += [FLAGS["teacher_dtype"], args.teacher_dtype]
        if args.distill_weight is not None:
            flags += [FLAGS["distill_weight"], str(args.distill_weight)]
    return flags


def run_fields(summary: dict[str, object]) -> dict[str, object]:
    """The run report's measured fields: memory, step time, and the teacher's share where it distilled."""
    distill = summary.get(REPORT["distillation"]) or {}
    granet = summary.get(REPORT["granet"]) or {}
    return {
        "tokens": summary.get("tokens"),
        "trainable_params": summary.get("trainable_params"),
        "grad_bytes": summary.get("grad_bytes"),
        "optimizer_state_bytes": summary.get("optimizer_state_bytes"),
        "report_peak_rss_bytes": summary.get("peak_rss_bytes"),  # the run's own, taken before it saves
        "mean_step_s": summary.get("mean_step_s"),
        "final_loss": summary.get("final_loss"),
        "teacher_dtype": distill.get(REPORT["teacher_dtype"]),
        "teacher_weight_bytes": distill.get(REPORT["teacher_weight_bytes"]),
        "teacher_s_per_step": distill.get(REPORT["teacher_s_per_step"]),
        "teacher_step_share": distill.get(REPORT["teacher_step_share"]),
        "granet": granet or None,
    }


def tiny_dense(work: Path) -> Path:
    """--quick's dense model: a random-initialised 2-block Llama with the bundled tokenizer."""
    dense = work / "tiny-llama-dense"
    if (dense / "config.json").exists():
        return dense
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsetune import loading

    _, tok = loading.load_model("smollm2", dtype="float32", device="cpu")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(dense)
    tok.save_pretrained(dense)
    return dense


def prune_start(
    args: argparse.Namespace, work: Path, calib_windows: int, start: str, dense: str
) -> tuple[Path, dict[str, object]]:
    """The one-shot start `oneshot70` (auto) or `oneshot50` (--start50-method), pruned once (kept in --work), and its
    row's prune fields (the wall time only when it was pruned now)."""
    sparsity = TARGET_SPARSITY if start == "oneshot70" else 0.5
    method = "auto" if start == "oneshot70" else args.start50_method
    cached = (testbed_prune_dir(work, calib_windows, sparsity, method, dense) / "sparsity_report.json").exists()
    tree = Path(args.tree).resolve() if args.tree else None
    with bench_common.Timer() as t:
        path = prune_testbed(work, calib_windows, sparsity, method, dense, tree)
    return path, {"prune_method": method, "sparsity": sparsity, "prune_wall_s": None if cached else round(t.seconds, 1)}


def pipelines_suite(args: argparse.Namespace, work: Path) -> None:
    from sparsetune import loading

    tree = Path(args.tree).resolve() if args.tree else None
    calib_windows = 4 if args.quick else CALIB_WINDOWS
    dense = str(tiny_dense(work)) if args.quick else "smollm2"
    base = base_settings(args)
    recorded = recorded_rows(base)
    _, tok = loading.load_model(dense, dtype="float32", device="cpu")
    wiki = Path(os.environ["SPARSETUNE_DATA_DIR"]) / "wikitext-2-raw" / "wiki.test.raw"
    eval_ids = wikitext_eval_ids(tok, str(wiki), args.eval_windows)
    wanted = args.pipelines.split(",")

    # The starts each asked pipeline needs, pruned (cached on disk) and evaluated once (cached in the results).
    needs = {"dense"} | {"oneshot70" for p in wanted if p in ("1", "2")} | {"oneshot50" for p in wanted if p == "4"}
    if "5" in wanted:
        needs.add(pipeline5_start(args, recorded))
    names = start_names(args)
    starts: dict[str, str] = {}
    for start in ("dense", "oneshot70", "oneshot50"):
        if start not in needs:
            continue
        row = {**base, "run": names[start]}
        if start == "dense":
            starts[start] = dense
            target = None
        else:
            path, row_prune = prune_start(args, work, calib_windows, start, dense)
            starts[start] = str(path)
            row |= row_prune
            target = row_prune["sparsity"]
        if names[start] not in recorded:  # the starts are deterministic: evaluate each once
            recorded[names[start]] = {**row, "start": True, **evaluate(starts[start], eval_ids, args.arc_limit, target)}
            emit(recorded[names[start]])

    schedule = training_schedule(base["steps"], args.batch_size, args.seqlen, calib_windows)
    rows: dict[str, dict[str, object]] = {}
    for pid in PIPELINES:
        if pid not in wanted:
            continue
        start5 = pipeline5_start(args, recorded | rows)
        name = run_names(args, start5)[pid]
        start = {"1": "oneshot70", "2": "oneshot70", "3": "dense", "4": "oneshot50", "5": start5}[pid]
        if start not in starts:  # pipeline 5's start, chosen only now (3 or 4 ran in this sitting)
            starts[start] = dense if start == "dense" else str(prune_start(args, work, calib_windows, start, dense)[0])
        out = work / f"p{pid}-{name}-{base['steps']}steps"
        summary, wall, rss = sparsetune_measured(
            "seft", starts[start], "-o", str(out), *pipeline_flags(pid, args, dense), *schedule,
            "--lr", str(LEARNING_RATES[pid]), "--overwrite", "--json", tree=tree,
        )  # fmt: skip
        row = {**base, "run": name, "pipeline": pid, "start_run": names[start], "lr": LEARNING_RATES[pid]}
        row |= {"distill_loss": args.distill_loss if pid in DISTILLED else "none"}
        row |= {"omp_num_threads": os.environ.get("OMP_NUM_THREADS")}  # set when two sittings share the cores
        row |= {"peak_rss_bytes": rss, "wall_s": round(wall, 1), **run_fields(summary)}
        row |= evaluate(out, eval_ids, args.arc_limit, TARGET_SPARSITY)
        rows[name] = row
        emit(row)
    pipelines_summary(args, base, rows)


def pipelines_summary(args: argparse.Namespace, base: dict[str, object], rows: dict[str, dict[str, object]]) -> None:
    """The issue's targets, from this sitting's rows and earlier ones with the same settings."""
    this_sitting = set(rows)
    rows = recorded_rows(base) | rows
    names = run_names(args, pipeline5_start(args, rows))
    trained = {pid: rows[name] for pid, name in names.items() if name in rows}
    if not trained:
        return
    best = min(trained, key=lambda pid: trained[pid]["wikitext2_ppl"])
    checks: dict[str, object] = {
        "pipelines": {pid: names[pid] for pid in trained},
        "ppl": {pid: r["wikitext2_ppl"] for pid, r in trained.items()},
        "arc_easy_acc": {pid: r.get("arc_easy_acc") for pid, r in trained.items()},
        "best_pipeline": best,
        "best_run": names[best],
        "best_ppl": trained[best]["wikitext2_ppl"],
        "best_arc_easy_acc": trained[best].get("arc_easy_acc"),
        "all_sparsity_exact": all(r.get("sparsity_exact") for r in trained.values()),
    }
    # the target's reference: pipeline 1 as the issue names it, seft's default method at its default rate
    reference = rows.get(REFERENCE_RUN)
    if reference is not None:
        ratio = trained[best]["wikitext2_ppl"] / reference["wikitext2_ppl"]
        checks |= {"reference_run": REFERENCE_RUN, "reference_ppl": reference["wikitext2_ppl"]}
        checks |= {"best_over_pipeline1_ppl": round(ratio, 4), "best_within_0_7x_pipeline1": ratio <= 0.7}
    dense = rows.get(start_names(args)["dense"])
    if dense is not None:
        over = trained[best]["wikitext2_ppl"] / (2 * dense["wikitext2_ppl"])
        checks |= {"dense_ppl": dense["wikitext2_ppl"], "best_over_2x_dense_ppl": round(over, 4)}
        checks["moonshot_met"] = over <= 1 and args.budget_multiplier <= 4
    plain_of = {"2": "1", "5": {"dense": "3", "oneshot50": "4"}[pipeline5_start(args, rows)]}
    for pid, plain in plain_of.items():
        if pid not in trained or plain not in trained:
            continue
        d, p = trained[pid], trained[plain]
        step_ratio = (d.get("mean_step_s") or 0) / (p.get("mean_step_s") or 1)
        growth = d["peak_rss_bytes"] - p["peak_rss_bytes"]
        teacher = d.get("teacher_weight_bytes")
        checks[f"distill{pid}"] = {
            "against": plain,
            "step_time_ratio": round(step_ratio, 4),
            "step_time_within_1_5x": step_ratio <= 1.5,
            "teacher_step_share": d.get("teacher_step_share"),
            "peak_rss_growth_bytes": growth,
            "teacher_weight_bytes": teacher,
            "rss_growth_within_teacher_bytes": teacher is not None and growth <= teacher,
        }
    checks["runs_from_earlier_sittings"] = sorted(set(checks["pipelines"].values()) - this_sitting)
    emit({**base, "summary": True, **checks})


def refuse(message: str) -> None:
    """Bad input: one `error:` line, exit 2, nothing written."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)


def override_learning_rates(spec: str) -> None:
    """`--lr 1=3e-4,3=2e-4`: replace the default learning rate of the numbered pipelines."""
    for item in filter(None, spec.split(",")):
        pid, _, value = item.partition("=")
        if pid not in LEARNING_RATES:
            refuse(f"--lr names an unknown pipeline {pid!r}; pipelines: {', '.join(PIPELINES)}")
        LEARNING_RATES[pid] = float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default=",".join(PIPELINES), help="which of 1-5 to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 4 steps: check the script runs")
    parser.add_argument("--steps", type=int, default=120, help="steps of the 1x budget (default 120)")
    parser.add_argument("--budget-multiplier", type=int, default=1, help="the budget's multiple: steps x this")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--arc-limit", type=float, default=500, help="ARC-Easy documents (0: skip)")
    parser.add_argument("--lr", default="", help="learning-rate overrides by pipeline, e.g. 1=3e-4,3=2e-4")
    parser.add_argument(
        "--oneshot-method", choices=["seft", "masked-ft"], default="seft", help="the training method of 1 and 2"
    )
    parser.add_argument("--distill-loss", choices=["squarehead", "kl"], default="squarehead")
    parser.add_argument("--distill-weight", type=float, default=None, help="(default: the CLI's)")
    parser.add_argument("--teacher-dtype", choices=["bf16", "nf4"], default="bf16")
    parser.add_argument("--start50-method", choices=["auto", "wanda"], default="auto", help="4/5's one-shot 50%%")
    parser.add_argument("--pipeline5-start", choices=["best", "dense", "oneshot50"], default="best")
    parser.add_argument("--granet-score", choices=["magnitude", "wanda"], default=None, help="(default: the CLI's)")
    parser.add_argument("--granet-scope", choices=["layer", "global"], default=None, help="(default: the CLI's)")
    parser.add_argument("--granet-interval", type=int, default=None, help="(default: the CLI's)")
    parser.add_argument("--granet-end", type=int, default=None, help="(default: the CLI's, 75%% of the steps)")
    parser.add_argument("--tree", default=None, help="run the sparsetune CLI of this checkout (default: this one)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "cache" / "granet"), help="where models are written")
    parser.add_argument("--results", default=str(RESULTS), help="the JSONL file rows are appended to")
    parser.add_argument("--summarize", action="store_true", help="only the summary line, from recorded rows")
    args = parser.parse_args()
    unknown = set(args.pipelines.split(",")) - set(PIPELINES)
    if unknown:
        refuse(f"--pipelines names {sorted(unknown)}; pipelines: {', '.join(PIPELINES)}")
    set_results(Path(args.results))
    override_learning_rates(args.lr)
    if args.quick:
        args.steps, args.budget_multiplier, args.batch_size, args.seqlen, args.eval_windows = 4, 1, 2, 64, 2
        args.arc_limit = 4 if args.arc_limit == parser.get_default("arc_limit") else args.arc_limit
        args.granet_interval = args.granet_interval or 1  # a mask update at every one of the 4 steps
    os.environ.setdefault("SPARSETUNE_DATA_DIR", str(SHARED))
    work = Path(args.work).resolve() / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    if args.summarize:
        pipelines_summary(args, base_settings(args), {})
    else:
        pipelines_suite(args, work)


if __name__ == "__main__":
    main()
