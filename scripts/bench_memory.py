"""Memory benchmark of the streamed weights (issue 32): whole processes under /usr/bin/time -v.

Suites (one JSON line per measurement, appended to bench/results/memory.jsonl):

- `random`: a random-initialised Llama checkpoint in bf16 (generated here block by block, deleted afterwards),
  `prune --method wanda --sparsity 0.5 --dtype bfloat16 --calib c4 --calib-samples 4 --seqlen 128` streamed and
  with `--no-stream` (the whole model in RAM, as before), alternated; `--config 3b` is the issue's table row.
- `large`: the same for a checkpoint larger than this machine's RAM (`--config 13b`: 26 GB): streamed prune, then
  `export --format sparse-bitmask` and `eval --ppl` on 4 windows of 128 tokens, each a whole process, then the
  pruned dir loaded in plain transformers (accelerate offload, since it does not fit) for one forward pass.
- `seft-nf4`: the random checkpoint pruned by magnitude to 50% (streamed), then `seft --base-dtype nf4 --steps 1
  --batch-size 1 --seqlen 128 --dtype bfloat16` with its base quantized block by block as it loads (streamed) and
  with `--no-stream` (the whole model in RAM, then quantized), alternated; the summary sets the streamed peak
  beside the NF4 base's and one block's size (the issue's target: the NF4 base plus two blocks plus activations)
  and gives what the peak holds beyond the NF4 base plus two blocks. The streamed run's end merges and writes one
  block at a time too, so the merge is no longer its peak.
- `bundled`: the bundled SmolLM2-135M: streamed vs `--no-stream` prune time and RSS (Wanda 50%, 32 x 512 C4
  tokens), llm-compressor's Wanda 50% and SparseGPT 70% beside them (.venv-bench, `make bench-env`), and the
  outputs of every setting of tests/data/llama_prune_reference.json plus ALPS 70% compared tensor by tensor.

Each row has peak RSS (the process's maximum resident set, from the kernel), wall time, and the bytes the process
read and wrote through read/write calls (/proc/self/io rchar / wchar, page-cache hits included).

    .venv/bin/python scripts/bench_memory.py --suite random --config 3b     # about 8 min, alone on the machine
    .venv/bin/python scripts/bench_memory.py --suite large --config 13b     # about 40 min, 60 GB of free disk
    .venv/bin/python scripts/bench_memory.py --suite bundled
    .venv/bin/python scripts/bench_memory.py --suite seft-nf4 --config 3b
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "memory.jsonl"
GIB = 2**30  # the peaks are /usr/bin/time's kB / 1024**2: sizes set beside them use the same unit
CONFIGS = {  # hidden, intermediate, layers (vocab: the bundled tokenizer's 49,152)
    "tiny": (256, 512, 4),
    "small": (1024, 2816, 8),
    "1b": (2048, 5632, 22),
    "3b": (3072, 8192, 26),
    "13b": (5120, 13824, 40),
}
PRUNE_ARGS = ["--method", "wanda", "--sparsity", "0.5", "--dtype", "bfloat16", "--calib", "c4"]
PRUNE_ARGS += ["--calib-samples", "4", "--seqlen", "128"]


# ----- the measured child: sparsetune's CLI in-process, then its /proc/self/io --------------------------------------


def io_wrapper(argv: list[str], io_file: str) -> None:
    """Run `sparsetune ARGV` in this process and write this process's read/write byte counts at exit."""

    def dump() -> None:
        fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
        Path(io_file).write_text(json.dumps({k: int(v) for k, v in fields.items()}))

    atexit.register(dump)
    sys.argv = ["sparsetune", *argv]
    from sparsetune.cli.app import main

    main()


def measure(argv: list[str], env: dict[str, str] | None = None, python: str | None = None) -> dict[str, object]:
    """One whole process: `sparsetune ARGV` under /usr/bin/time -v; its exit code, wall, peak RSS and I/O."""
    with tempfile.TemporaryDirectory() as tmp:
        io_file = os.path.join(tmp, "io.json")
        cmd = ["/usr/bin/time", "-v", python or sys.executable, __file__, "--io-wrapper", io_file, "--", *argv]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        io = json.loads(Path(io_file).read_text()) if os.path.exists(io_file) else {}
    rss_kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    row: dict[str, object] = {
        "exit": proc.returncode,
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(int(rss_kb.group(1)) * 1024 / GIB, 3) if rss_kb else None,
        "read_gb": round(io.get("rchar", 0) / 1e9, 3),
        "written_gb": round(io.get("wchar", 0) / 1e9, 3),
    }
    if proc.returncode != 0:
        row["error"] = [line for line in proc.stderr.splitlines() if line.startswith("error:")][-1:] or proc.stderr[
            -600:
        ]
    return row


def emit(row: dict[str, object]) -> None:
    row = {"date": time.strftime("%Y-%m-%d %H:%M"), "bench": "memory", **row}
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")


def dir_gb(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e9, 3)


def random_checkpoint(work: Path, config: str) -> Path:
    from bench_common import make_random_checkpoint

    from sparsetune import loading

    hidden, inter, layers = CONFIGS[config]
    t0 = time.perf_counter()
    path = make_random_checkpoint(
        work / f"random-{config}", hidden, inter, layers, 49152, tokenizer_from=loading.bundled_model_dir()
    )
    emit(
        {
            "suite": "checkpoint",
            "config": config,
            "disk_gb": dir_gb(path),
            "generate_s": round(time.perf_counter() - t0),
        }
    )
    return path


# ----- suites -------------------------------------------------------------------------------------------------------


def suite_random(args: argparse.Namespace, work: Path) -> None:
    model = random_checkpoint(work, args.config)
    size = dir_gb(model)
    rows = {}
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            out = work / f"out-{mode}"
            extra = [] if mode == "streamed" else ["--no-stream"]
            row = measure(["prune", str(model), *PRUNE_ARGS, "-o", str(out), "--overwrite", *extra])
            row.update(suite="random", config=args.config, mode=mode, repeat=rep, checkpoint_gb=size)
            emit(row)
            rows.setdefault(mode, []).append(row)
    if set(rows) != {"streamed", "whole"}:
        return
    same = _same_tensors(work / "out-streamed", work / "out-whole")
    s, w = rows["streamed"], rows["whole"]
    emit(
        {
            "suite": "random",
            "config": args.config,
            "summary": True,
            "checkpoint_gb": size,
            "rss_streamed_gb": min(r["peak_rss_gb"] for r in s),
            "rss_whole_gb": min(r["peak_rss_gb"] for r in w),
            "time_ratio_streamed_vs_whole": round(
                sorted(r["wall_s"] for r in s)[len(s) // 2] / sorted(r["wall_s"] for r in w)[len(w) // 2], 3
            ),
            "outputs_identical": same,
        }
    )


def suite_large(args: argparse.Namespace, work: Path) -> None:
    model = random_checkpoint(work, args.config)
    size = dir_gb(model)
    pruned, exported = work / "pruned", work / "exported"
    row = measure(["prune", str(model), *PRUNE_ARGS, "-o", str(pruned)])
    emit({**row, "suite": "large", "config": args.config, "command": "prune", "checkpoint_gb": size})
    if row["exit"] != 0:
        return
    shutil.rmtree(model)  # the disk holds the pruned copy and the export, not three models
    row = measure(["export", str(pruned), "--format", "sparse-bitmask", "-o", str(exported)])
    row.update(suite="large", config=args.config, command="export sparse-bitmask", checkpoint_gb=dir_gb(pruned))
    if exported.exists():
        row["output_gb"] = dir_gb(exported)
        shutil.rmtree(exported)
    emit(row)
    text = work / "eval.txt"
    text.write_text(Path(ROOT / "sparsetune" / "samples" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:200_000])
    row = measure(
        ["eval", str(pruned), "--ppl", str(text), "--seqlen", "128", "--limit-windows", "4", "-o", str(work / "ev")]
    )
    row.update(suite="large", config=args.config, command="eval --ppl (4 x 128)", checkpoint_gb=dir_gb(pruned))
    if (work / "ev" / "eval.json").exists():
        row["eval"] = json.loads((work / "ev" / "eval.json").read_text()).get("results")
    emit(row)
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--plain-load", str(pruned), "--offload", str(work / "offload")],
        capture_output=True,
        text=True,
    )
    load = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-600:]}
    emit(
        {
            "suite": "large",
            "config": args.config,
            "command": "plain transformers load + forward",
            **load,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
    )


def suite_seft_nf4(args: argparse.Namespace, work: Path) -> None:
    model = random_checkpoint(work, args.config)
    pruned = work / "pruned"
    row = measure(
        ["prune", str(model), "--method", "magnitude", "--sparsity", "0.5", "--dtype", "bfloat16", "-o", str(pruned)]
    )
    emit({**row, "suite": "seft-nf4", "config": args.config, "command": "prune magnitude 50%"})
    if row["exit"] != 0:
        return
    shutil.rmtree(model)
    text = work / "train.txt"
    text.write_text(Path(ROOT / "sparsetune" / "samples" / "wikitext-2-raw" / "wiki.test.raw").read_text()[:200_000])
    seft = ["seft", str(pruned), "--data", str(text), "--base-dtype", "nf4", "--steps", "1", "--batch-size", "1"]
    seft += ["--seqlen", "128", "--dtype", "bfloat16", "--overwrite"]
    rows: dict[str, list[dict[str, object]]] = {}
    for rep in range(args.repeats):
        for mode in args.modes.split(","):
            extra = [] if mode == "streamed" else ["--no-stream"]
            row = measure([*seft, "-o", str(work / f"seft-{mode}"), *extra])
            row.update(suite="seft-nf4", config=args.config, mode=mode, repeat=rep)
            emit(row)
            rows.setdefault(mode, []).append(row)
    nf4_gb, block_gb = nf4_sizes(pruned)
    summary: dict[str, object] = {
        "suite": "seft-nf4",
        "config": args.config,
        "summary": True,
        "units": "GiB (the peaks' unit: /usr/bin/time's kB / 1024**2)",
        "nf4_base_gb": nf4_gb,
        "block_gb": block_gb,
        "base_two_blocks_gb": round(nf4_gb + 2 * block_gb, 3),  # the target, less the activations
    }
    for mode, measured in rows.items():
        summary[f"rss_{mode}_gb"] = min(r["peak_rss_gb"] for r in measured)
        summary[f"wall_{mode}_s"] = sorted(r["wall_s"] for r in measured)[len(measured) // 2]
    if "streamed" in rows:
        # what the streamed peak holds beyond the NF4 base and two blocks: the trainable entries with their
        # gradients and AdamW state (from the run's own report), then activations, the interpreter and the heap
        memory = json.loads((work / "seft-streamed" / "sparsity_report.json").read_text())["finetune_history"][-1][
            "memory"
        ]
        trainable = sum(memory[k] for k in ("delta_bytes", "index_bytes", "grad_bytes", "optimizer_state_bytes"))
        summary["trainable_state_gb"] = round(trainable / GIB, 3)
        summary["rss_streamed_over_target_gb"] = round(summary["rss_streamed_gb"] - nf4_gb - 2 * block_gb, 3)
        over = summary["rss_streamed_over_target_gb"] - summary["trainable_state_gb"]
        summary["rss_streamed_over_target_and_trainable_gb"] = round(over, 3)
    if set(rows) == {"streamed", "whole"}:
        summary["outputs_identical"] = _same_tensors(work / "seft-streamed", work / "seft-whole")
    emit(summary)


def nf4_sizes(pruned: Path) -> tuple[float, float]:
    """(GiB of the NF4 base: the decoder blocks' 2-D weights at 4 bits plus one fp32 scale per 64 and the bitmap of
    their non-zeros (one bit each), everything else as stored; GiB of one decoder block as stored), from the
    checkpoint's headers."""
    from sparsetune.streaming import CheckpointFiles

    entries = CheckpointFiles(pruned).entries
    base = block = 0
    for name, e in entries.items():
        in_block = ".layers." in name
        numel = e.nbytes // e.dtype.itemsize
        base += numel // 2 + numel // 64 * 4 + numel // 8 if in_block and len(e.shape) == 2 else e.nbytes
        block += e.nbytes if ".layers.0." in name else 0
    return round(base / GIB, 3), round(block / GIB, 3)


def plain_load(path: str, offload: str) -> None:
    """The pruned dir in plain transformers (accelerate's offload: it is larger than RAM), one forward pass."""
    import psutil
    import torch
    from transformers import AutoModelForCausalLM

    budget = int(psutil.virtual_memory().available * 0.5)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, device_map="auto", max_memory={"cpu": budget}, offload_folder=offload
    )
    ids = torch.arange(4, 36).view(1, -1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    print(json.dumps({"finite_logits": bool(torch.isfinite(logits).all()), "logits_shape": list(logits.shape)}))


def suite_bundled(args: argparse.Namespace, work: Path) -> None:
    from sparsetune import loading

    model = str(loading.bundled_model_dir())
    c4 = ROOT.parent / "shared" / "data" / "c4" / "c4_sample.jsonl"
    calib = ["--calib", str(c4) if c4.exists() else "c4", "--calib-samples", "32", "--seqlen", "512"]
    calib += ["--calib-sampling", "consecutive", "--dtype", "float32"]
    rows: dict[str, list[dict[str, object]]] = {}
    for rep in range(args.repeats):
        for mode in ("streamed", "whole"):
            extra = [] if mode == "streamed" else ["--no-stream"]
            out = work / f"bundled-{mode}"
            row = measure(
                [
                    "prune",
                    model,
                    "--method",
                    "wanda",
                    "--sparsity",
                    "0.5",
                    *calib,
                    "-o",
                    str(out),
                    "--overwrite",
                    *extra,
                ]
            )
            report = json.loads((out / "sparsity_report.json").read_text()) if out.exists() else {}
            row.update(
                suite="bundled", run="wanda-50", mode=mode, repeat=rep, prune_s=report.get("timings", {}).get("prune_s")
            )
            emit(row)
            rows.setdefault(mode, []).append(row)
    llmc = ROOT / ".venv-bench" / "bin" / "python"
    theirs = {}
    if llmc.exists():
        theirs = llmc_rows(llmc, work)
    s, w = rows["streamed"], rows["whole"]
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    summary = {
        "suite": "bundled",
        "summary": True,
        "rss_streamed_gb": min(r["peak_rss_gb"] for r in s),
        "rss_whole_gb": min(r["peak_rss_gb"] for r in w),
        "prune_s_ratio_streamed_vs_whole": round(med([r["prune_s"] for r in s]) / med([r["prune_s"] for r in w]), 3),
        "wall_ratio_streamed_vs_whole": round(med([r["wall_s"] for r in s]) / med([r["wall_s"] for r in w]), 3),
        "outputs_identical": _same_tensors(work / "bundled-streamed", work / "bundled-whole"),
    }
    for name, row in theirs.items():
        summary[f"llmc_{name}_rss_gb"] = row.get("peak_rss_gb")
    if "wanda-50" in theirs:
        summary["rss_ratio_streamed_vs_llmc_wanda50"] = round(
            summary["rss_streamed_gb"] / theirs["wanda-50"]["peak_rss_gb"], 3
        )
    emit(summary)
    identity_rows(model, calib, work)


def llmc_rows(python: Path, work: Path) -> dict[str, dict[str, object]]:
    """llm-compressor's Wanda 50% and SparseGPT 70% on the bench_prune testbed tokens, whole processes."""
    import torch
    from bench_common import testbed_ids
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from sparsetune import loading

    model = str(loading.bundled_model_dir())
    shared = ROOT.parent / "shared" / "data"
    tok = AutoTokenizer.from_pretrained(model)
    calib, ev = testbed_ids(
        tok, str(shared / "c4" / "c4_sample.jsonl"), str(shared / "wikitext-2-raw" / "wiki.test.raw"), 32, 1
    )
    ids = work / "ids.safetensors"
    save_file({"calib": calib.contiguous(), "eval": ev.to(torch.int64).contiguous()}, str(ids))
    out = {}
    for name, method, sparsity in (("wanda-50", "wanda", "0.5"), ("sparsegpt-70", "sparsegpt", "0.7")):
        cmd = [
            "/usr/bin/time",
            "-v",
            str(python),
            str(ROOT / "scripts" / "bench_prune_llmc_worker.py"),
            "--model",
            model,
            "--ids",
            str(ids),
            "--method",
            method,
            "--sparsity",
            sparsity,
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        row = {
            "suite": "bundled",
            "tool": "llm-compressor",
            "run": name,
            "exit": proc.returncode,
            "wall_s": round(time.perf_counter() - t0, 2),
            "peak_rss_gb": round(int(rss.group(1)) * 1024 / GIB, 3) if rss else None,
        }
        if proc.returncode == 0:
            inner = json.loads(proc.stdout.strip().splitlines()[-1])
            row["prune_phase_rss_gb"] = round(inner["peak_rss_gb"], 3)
            row["prune_s"] = round(inner["prune_s"], 2)
        emit(row)
        out[name] = row
    return out


def identity_rows(model: str, calib: list[str], work: Path) -> None:
    """Every setting of tests/data/llama_prune_reference.json and ALPS 70% on the bundled model: the streamed
    output's tensors against --no-stream's (4 x 256 calibration tokens: identity does not depend on the count)."""
    settings = json.loads((ROOT / "tests" / "data" / "llama_prune_reference.json").read_text())
    cases = {k: v["settings"] for k, v in settings.items()} | {"alps-70": {"method": "alps", "sparsity": 0.7}}
    small = [*calib]
    small[small.index("--calib-samples") + 1] = "4"
    small[small.index("--seqlen") + 1] = "256"
    for name, cfg in cases.items():
        flags = []
        for key, value in cfg.items():
            flag = "--" + key.replace("_", "-")
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + key.replace("_", "-"))
            elif key == "down_stats":
                flags += ["--down-stats", str(value)]
            else:
                flags += [flag, str(value)]
        outs = []
        for mode in ("streamed", "whole"):
            out = work / f"id-{name}-{mode}"
            extra = [] if mode == "streamed" else ["--no-stream"]
            row = measure(["prune", model, *flags, *small, "-o", str(out), "--overwrite", *extra])
            outs.append(out)
            if row["exit"] != 0:
                emit({"suite": "bundled-identity", "setting": name, "mode": mode, **row})
        emit({"suite": "bundled-identity", "setting": name, "identical": _same_tensors(*outs)})
        for out in outs:
            shutil.rmtree(out, ignore_errors=True)


def _same_tensors(a: Path, b: Path) -> bool | None:
    from bench_common import tensor_hashes

    if not (a.exists() and b.exists()):
        return None
    return tensor_hashes(a) == tensor_hashes(b)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--io-wrapper":
        return io_wrapper(sys.argv[4:], sys.argv[2])
    if len(sys.argv) > 2 and sys.argv[1] == "--plain-load":
        return plain_load(sys.argv[2], sys.argv[4])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=["random", "large", "bundled", "seft-nf4"], required=True)
    p.add_argument("--config", choices=list(CONFIGS), default="3b")
    p.add_argument("--repeats", type=int, default=2, help="alternated streamed / whole pairs")
    p.add_argument("--modes", default="streamed,whole", help="random, seft-nf4: streamed, whole or both")
    p.add_argument("--work", default=None, help="scratch dir on a disk with room for the checkpoints")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-", dir=args.work or ROOT.parent))
    try:
        suites = {"random": suite_random, "large": suite_large, "bundled": suite_bundled, "seft-nf4": suite_seft_nf4}
        suites[args.suite](args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
