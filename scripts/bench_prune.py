"""Benchmark `sparsetune prune` against llm-compressor on the same tokens (the project's prune testbed).

Testbed: the bundled SmolLM2-135M in fp32 (converted once into a cached HF dir that both tools load);
calibration on the first 32 windows of 512 tokens of c4/c4_sample.jsonl (consecutive); evaluation on the
WikiText-2 raw test file tokenized once, first 32 non-overlapping 1024-token windows, ppl = exp(mean loss).
Every run is its own process; the pruning phase is timed inside it (model load excluded) and the whole
process wall time is reported beside it. One JSON line per run; time ratios compare runs of this invocation.

    make bench-env                      # once: .venv-bench with llm-compressor 0.14 (its own transformers)
    .venv/bin/python scripts/bench_prune.py [--quick] [--runs wanda-50,sparsegpt-2:4] [--no-llmc]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import CALIB_WINDOWS, EVAL_WINDOWS, Timer, peak_rss_gb, perplexity, testbed_ids  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUNS = ["wanda-50", "sparsegpt-50", "wanda-2:4", "sparsegpt-2:4"]


def _parse_run(run: str) -> tuple[str, str, float]:
    method, target = run.split("-", 1)
    if ":" in target:
        return method, target, 0.5
    return method, "unstructured", int(target) / 100


def worker(args: argparse.Namespace) -> None:
    """One sparsetune run in this process: load, prune (timed), then evaluate."""
    wall0 = time.perf_counter()
    import torch
    from safetensors.torch import load_file

    from sparsetune import loading
    from sparsetune.data import CalibrationSet, token_hash
    from sparsetune.prune.api import prune_and_report
    from sparsetune.prune.config import PruneConfig

    ids = load_file(args.ids)
    model, tok = loading.load_model(args.model, dtype="float32")
    if args.blocks:  # memory benchmarks: the peak is reached within the first blocks
        model.model.layers = model.model.layers[: args.blocks]
        model.config.num_hidden_layers = args.blocks
    embed_before = model.get_input_embeddings().weight.detach().clone()
    result: dict[str, object] = {}
    if args.method != "dense":
        target = {"pattern": args.pattern} if args.pattern != "unstructured" else {"sparsity": args.sparsity}
        extra = json.loads(args.extra)
        cfg = PruneConfig(model=args.model, method=args.method, sequential=not args.two_pass, **target, **extra)
        calib = CalibrationSet(ids["calib"], "c4", "consecutive", 0, token_hash(ids["calib"]))
        if cfg.calib == "self":
            from sparsetune.prune.api import make_calibration

            with Timer() as t:
                calib = make_calibration(model, tok, cfg)
            result["self_calibration_s"] = t.seconds
        with Timer() as t:
            report = prune_and_report(model, tok, cfg, calib, show_progress=False)
        result.update(prune_s=t.seconds, global_sparsity=report["global_sparsity"], down_stats=report["down_stats"])
        if "layerwise" in report:
            result["block_targets"] = report["layerwise"]["block_targets"]
        if "refine" in report:
            result["dsnot_swaps"] = report["refine"]["swaps"]
            result["refine_values"] = report["refine"]["values"]
        admm = [m["admm_iterations"] for m in report["modules"].values() if "admm_iterations" in m]
        if admm:
            errors = [m["recon_error"] for m in report["modules"].values() if "recon_error" in m]
            result["alps_admm_iterations"] = {"mean": sum(admm) / len(admm), "min": min(admm), "max": max(admm)}
            result["alps_mean_recon_error"] = sum(errors) / len(errors)
    result["peak_rss_gb"] = peak_rss_gb()
    result["embed_untouched"] = bool(torch.equal(model.get_input_embeddings().weight.detach(), embed_before))
    if not args.blocks:
        result["ppl"] = perplexity(model, ids["eval"])
    result["wall_s"] = time.perf_counter() - wall0
    print(json.dumps(result))


def _subprocess_json(cmd: list[str]) -> dict[str, object]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {
            "error": proc.stderr.strip().splitlines()[-1:] or ["failed"],
            "process_wall_s": time.perf_counter() - t0,
        }
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None)
    p.add_argument("--ids", default=None)
    p.add_argument("--method", default="wanda")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--two-pass", action="store_true")
    p.add_argument("--extra", default="{}", help="extra PruneConfig settings as JSON (worker)")
    p.add_argument("--blocks", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument(
        "--suite",
        default="llmc",
        choices=["llmc", "owl", "selfcalib", "offload", "table"],
        help="llmc: sparsetune vs llm-compressor; owl: 70%% with and without OWL; selfcalib: self vs C4 "
        "calibration at 50%%; offload: peak RSS with 128x2048 samples, activations in cpu vs disk; "
        "table: --methods x --targets x (plain, OWL) x (no refinement, DSnoT), ppl and prune time",
    )
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt,alps", help="table suite: methods")
    p.add_argument("--targets", default="0.5,0.6,0.7,0.8,2:4", help="table suite: sparsities and N:M patterns")
    p.add_argument(
        "--variants",
        default="plain,owl,dsnot,owl+dsnot",
        help="table suite: plain, owl, dsnot, owl+dsnot, dsnot-dense (--refine-values dense)",
    )
    p.add_argument("--runs", default=",".join(RUNS), help="comma list of METHOD-SPARSITY%% or METHOD-N:M")
    p.add_argument("--redo", action="store_true", help="table suite: re-measure rows already in --out")
    p.add_argument(
        "--since",
        default="",
        help="table suite: re-measure rows dated before this ('YYYY-MM-DD HH:MM'), e.g. on a new machine",
    )
    p.add_argument("--no-llmc", action="store_true", help="skip llm-compressor (no .venv-bench)")
    p.add_argument("--no-two-pass", action="store_true", help="skip the --no-sequential parity runs")
    p.add_argument("--quick", action="store_true", help="4 calibration and 2 eval windows: checks the plumbing")
    p.add_argument("--data-dir", default=os.environ.get("SPARSETUNE_DATA_DIR", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune.jsonl"))
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    from safetensors.torch import save_file

    from sparsetune import loading

    model_dir = str(loading.bundled_model_dir())
    _, tok = loading.load_model(model_dir, need_tokenizer=True)
    calib_n, eval_n = (4, 2) if args.quick else (CALIB_WINDOWS, EVAL_WINDOWS)
    data = Path(args.data_dir)
    calib, eval_ids = testbed_ids(
        tok, str(data / "c4/c4_sample.jsonl"), str(data / "wikitext-2-raw/wiki.test.raw"), calib_n, eval_n
    )
    cache = ROOT / "bench" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    ids_file = str(cache / f"testbed-ids-{calib_n}-{eval_n}.safetensors")
    save_file({"calib": calib, "eval": eval_ids}, ids_file)
    llmc_python = ROOT / ".venv-bench" / "bin" / "python"
    if args.suite == "llmc" and not args.no_llmc and not llmc_python.exists():
        sys.exit("llm-compressor venv missing: run `make bench-env` first, or pass --no-llmc")

    me = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model", model_dir, "--ids", ids_file]

    def emit(record: dict[str, object]) -> None:
        record = {"bench": "prune", "suite": args.suite, "quick": args.quick, **record}
        print(json.dumps(record), flush=True)
        _append(args.out, [record])  # each line lands at once, so an interrupted run keeps what it measured

    if args.suite != "llmc":
        other_suite(args, me, emit, model_dir, tok)
        return

    emit({"tool": "dense", **_subprocess_json([*me, "--method", "dense"])})
    for run in [r for r in args.runs.split(",") if r]:
        method, pattern, sparsity = _parse_run(run)
        common = ["--method", method, "--pattern", pattern, "--sparsity", str(sparsity)]
        ours = _subprocess_json([*me, *common])
        theirs = None
        if not args.no_llmc:
            theirs = _subprocess_json(
                [
                    str(llmc_python),
                    str(ROOT / "scripts" / "bench_prune_llmc_worker.py"),
                    "--model",
                    model_dir,
                    "--ids",
                    ids_file,
                    *common,
                ]
            )
            emit({"tool": "llm-compressor", "run": run, **theirs})
        variants = [("default", ours)]
        if method == "wanda":  # its default takes down_proj's statistic before gate/up are pruned; strict line too
            extra = json.dumps({"down_stats": "pruned"})
            variants.append(("strict-sequential", _subprocess_json([*me, *common, "--extra", extra])))
        for name, result in variants:
            record = {"tool": "sparsetune", "run": run, "sequential": True, "variant": name, **result}
            if theirs and "prune_s" in theirs and "prune_s" in result:
                record["time_ratio_vs_llmc"] = result["prune_s"] / theirs["prune_s"]
                record["ppl_vs_llmc"] = result["ppl"] / theirs["ppl"]
                record["rss_ratio_vs_llmc"] = result["peak_rss_gb"] / theirs["peak_rss_gb"]
            emit(record)
        if not args.no_two_pass:
            two = _subprocess_json([*me, *common, "--two-pass"])
            emit({"tool": "sparsetune", "run": run, "sequential": False, **two})


def _append(path: str, lines: list[dict[str, object]]) -> None:
    with open(path, "a") as f:
        for record in lines:
            f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), **record}) + "\n")


def other_suite(args: argparse.Namespace, me: list[str], emit, model_dir: str, tok) -> None:
    """The OWL, self-calibration and activation-offload measurements (sparsetune only)."""
    if args.suite == "owl":
        for method in ("wanda", "sparsegpt"):
            common = ["--method", method, "--sparsity", "0.7"]
            base = _subprocess_json([*me, *common])
            emit({"tool": "sparsetune", "run": f"{method}-70", **base})
            with_owl = _subprocess_json([*me, *common, "--extra", json.dumps({"owl": True})])
            if "ppl" in base and "ppl" in with_owl:
                with_owl["ppl_vs_uniform"] = with_owl["ppl"] / base["ppl"]
            emit({"tool": "sparsetune", "run": f"owl-{method}-70", **with_owl})
    elif args.suite == "selfcalib":
        import shutil

        from sparsetune.loading import cache_dir

        shutil.rmtree(cache_dir() / "self-calibration", ignore_errors=True)  # time one real generation
        n, seqlen = (4, 128) if args.quick else (32, 512)
        for method in ("wanda", "sparsegpt"):
            c4 = _subprocess_json([*me, "--method", method])
            emit({"tool": "sparsetune", "run": f"{method}-50-c4", **c4})
            extra = {"calib": "self", "calib_samples": n, "seqlen": seqlen}
            own = _subprocess_json([*me, "--method", method, "--extra", json.dumps(extra)])
            if "ppl" in c4 and "ppl" in own:
                own["ppl_vs_c4"] = own["ppl"] / c4["ppl"]
            emit({"tool": "sparsetune", "run": f"{method}-50-self", **own})
    elif args.suite == "table":
        table_suite(args, me, emit)
    else:  # offload: 128 x 2048 samples; the peak comes within the first blocks, so prune 3 of them
        from safetensors.torch import save_file

        from sparsetune.data import calibration_set

        n, seqlen = (8, 256) if args.quick else (128, 2048)
        data = Path(args.data_dir) / "c4" / "c4_sample.jsonl"
        calib = calibration_set(tok, str(data), n, seqlen, sampling="consecutive")
        big = str(ROOT / "bench" / "cache" / f"offload-ids-{n}-{seqlen}.safetensors")
        save_file({"calib": calib.input_ids, "eval": calib.input_ids[:1].clone()}, big)
        for mode in ("cpu", "disk"):
            extra = {"offload_activations": mode, "output": str(ROOT / "bench" / "cache" / "offload-out")}
            cmd = [*me[:-1], big, "--method", "wanda", "--blocks", "3", "--extra", json.dumps(extra)]
            emit({"tool": "sparsetune", "run": f"wanda-{n}x{seqlen}-{mode}", "blocks": 3, **_subprocess_json(cmd)})


def table_suite(args: argparse.Namespace, me: list[str], emit) -> None:
    """Every method x target x variant, one process each; prune time also as a ratio to plain Wanda's at the
    same target in this invocation (the `--method auto` rule compares against 3x that)."""
    wanda_s: dict[str, float] = {}
    done = {} if args.redo else _table_rows_done(args.out, args.since)
    for target in [t for t in args.targets.split(",") if t]:
        shape = ["--pattern", target] if ":" in target else ["--sparsity", target]
        reference = done.get((f"wanda-{target}", "plain"), {})
        if "prune_s" in reference:  # measured earlier: the reference even when this call skips plain Wanda
            wanda_s[target] = float(reference["prune_s"])  # type: ignore[arg-type]
        methods = [m for m in args.methods.split(",") if m]
        if "wanda" in methods:  # the reference time of this target comes first
            methods = ["wanda"] + [m for m in methods if m != "wanda"]
        for method in methods:
            for variant in [v for v in args.variants.split(",") if v]:
                extra: dict[str, object] = {}
                if "owl" in variant:
                    extra["owl"] = True
                if "dsnot" in variant:
                    extra["refine"] = "dsnot"
                if variant.endswith("dsnot-dense"):  # DSnoT's mask refined on the dense values
                    extra["refine_values"] = "dense"
                if (f"{method}-{target}", variant) in done:  # measured by an earlier invocation (same machine)
                    continue
                result = _subprocess_json([*me, "--method", method, *shape, "--extra", json.dumps(extra)])
                if method == "wanda" and variant == "plain" and "prune_s" in result:
                    wanda_s[target] = float(result["prune_s"])  # type: ignore[arg-type]
                if target in wanda_s and "prune_s" in result:
                    result["time_vs_wanda"] = float(result["prune_s"]) / wanda_s[target]  # type: ignore[arg-type]
                emit({"tool": "sparsetune", "run": f"{method}-{target}", "variant": variant, **result})


def _table_rows_done(out: str, since: str = "") -> dict[tuple[str, str], dict[str, object]]:
    """Full-size table rows already in the results file (dated `since` or later), so the table can be filled over
    several sessions."""
    rows: dict[tuple[str, str], dict[str, object]] = {}
    if Path(out).exists():
        for line in Path(out).read_text().splitlines():
            row = json.loads(line)
            if row.get("suite") == "table" and not row.get("quick") and "ppl" in row and row.get("date", "") >= since:
                rows[str(row["run"]), str(row["variant"])] = row
    return rows


if __name__ == "__main__":
    main()
