"""The GPU check (issue 32): one prepared script, at most about 8 minutes, for a session lent a CUDA machine.

    python scripts/gpu_check.py [--config 3b] [--work DIR]      # prints one JSON line per check, then a summary

1. A streamed prune of a random-initialised 3B Llama checkpoint (bf16, generated here, deleted afterwards) with
   Wanda 50% on 4 x 128 calibration tokens, on CUDA and on the CPU: the masks compared tensor by tensor (the
   fraction of equal mask entries: bf16 matmuls accumulate differently on the two devices, so ties may fall
   differently), the GPU's peak allocated memory and both wall times.
2. `sparsetune.load(..., semi_structured=True)` of a 2:4 export of a small random model (exported with
   `--format semi-structured-2:4`), with its logits against the dense masked model's.
3. The 2:4 matmul (torch's semi-structured sparse tensors) against dense at Llama-8B's Linear shapes, for 1, 16 and
   2048 tokens, in bf16, timed with CUDA events (median of 50 after 10 warm-up calls).

CI never runs it (it needs CUDA). Exit status 0 when every check ran, whatever it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
ROOT = Path(__file__).resolve().parents[1]
SHAPES_8B = {
    "q_proj/o_proj": (4096, 4096),
    "k_proj/v_proj": (1024, 4096),
    "gate/up": (14336, 4096),
    "down": (4096, 14336),
}


def emit(row: dict) -> None:
    print(json.dumps({"check": "gpu", **row}), flush=True)


def prune_run(model: Path, out: Path, device: str) -> dict:
    args = ["prune", str(model), "--method", "wanda", "--sparsity", "0.5", "--dtype", "bfloat16", "--calib", "c4"]
    args += ["--calib-samples", "4", "--seqlen", "128", "--device", device, "-o", str(out)]
    code = (
        "import json, sys, torch; from sparsetune.cli.app import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0\n"
        "print(json.dumps({'exit': code, 'cuda_peak_gb': peak / 1024**3}))\n"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    row = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {"exit": proc.returncode}
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    if row.get("exit"):
        row["stderr"] = proc.stderr[-800:]
    return row


def mask_agreement(a: Path, b: Path) -> dict:
    import torch
    from safetensors import safe_open

    equal = total = 0
    tensors = identical = 0
    for shard in sorted(a.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as fa, safe_open(str(b / shard.name), "pt") as fb:
            for key in fa.keys():  # noqa: SIM118 - safe_open is not a mapping
                if ".layers." not in key or not key.endswith("proj.weight"):
                    continue
                ma, mb = fa.get_tensor(key) != 0, fb.get_tensor(key) != 0
                equal += int((ma == mb).sum())
                total += ma.numel()
                tensors += 1
                identical += int(torch.equal(ma, mb))
    return {"mask_entries_equal": equal / max(1, total), "matrices_identical": identical, "matrices": tensors}


def check_prune(work: Path, config: str) -> None:
    from bench_common import make_random_checkpoint
    from bench_memory import CONFIGS

    from sparsetune import loading

    hidden, inter, layers = CONFIGS[config]
    t0 = time.perf_counter()
    model = make_random_checkpoint(
        work / "model", hidden, inter, layers, 49152, tokenizer_from=loading.bundled_model_dir()
    )
    emit({"what": f"random {config} checkpoint", "generate_s": round(time.perf_counter() - t0, 1)})
    gpu = prune_run(model, work / "gpu", "cuda")
    cpu = prune_run(model, work / "cpu", "cpu")
    row = {"what": f"streamed prune, random {config}, wanda 50%", "cuda": gpu, "cpu": cpu}
    if gpu.get("exit") == 0 and cpu.get("exit") == 0:
        row.update(mask_agreement(work / "gpu", work / "cpu"))
        row["gpu_vs_cpu_time"] = round(gpu["wall_s"] / cpu["wall_s"], 3)
    emit(row)
    for name in ("model", "gpu", "cpu"):
        shutil.rmtree(work / name, ignore_errors=True)


def check_semi_structured(work: Path) -> None:
    import torch
    from bench_common import make_random_checkpoint

    from sparsetune import load, loading

    model = make_random_checkpoint(work / "small", 1024, 2816, 4, 49152, tokenizer_from=loading.bundled_model_dir())
    pruned, exported = work / "small-24", work / "small-24-export"
    for args in (
        ["prune", str(model), "--method", "magnitude", "--pattern", "2:4", "--dtype", "bfloat16", "-o", str(pruned)],
        ["export", str(pruned), "--format", "semi-structured-2:4", "-o", str(exported)],
    ):
        subprocess.run([sys.executable, "-m", "sparsetune", *args], check=True, capture_output=True, cwd=ROOT)
    ids = torch.randint(4, 40000, (4, 128), device="cuda")
    dense = load(str(pruned), dtype="bfloat16", device="cuda")
    with torch.no_grad():
        want = dense(input_ids=ids).logits.float()
    del dense
    sparse = load(str(exported), semi_structured=True, dtype="bfloat16", device="cuda")
    converted = sum(
        type(m.weight).__name__.startswith("SparseSemiStructured")
        for m in sparse.modules()
        if isinstance(m, torch.nn.Linear)
    )
    with torch.no_grad():
        got = sparse(input_ids=ids).logits.float()
    rel = float((got - want).norm() / want.norm())
    emit(
        {
            "what": "sparsetune.load(semi_structured=True) of a 2:4 export",
            "linears_on_2of4_cores": converted,
            "logits_rel_diff_vs_dense": rel,
            "close": rel < 2e-2,
            "finite": bool(torch.isfinite(got).all()),
        }
    )
    for name in ("small", "small-24", "small-24-export"):
        shutil.rmtree(work / name, ignore_errors=True)


def check_matmul() -> None:
    import torch
    from torch.sparse import to_sparse_semi_structured

    def timed(fn) -> float:
        for _ in range(10):
            fn()
        times = []
        for _ in range(50):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    for name, (out_f, in_f) in SHAPES_8B.items():
        w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16)
        mask = torch.tensor([1, 1, 0, 0], device="cuda", dtype=torch.bool).repeat(out_f, in_f // 4)
        w = w * mask
        ws = to_sparse_semi_structured(w)
        for tokens in (1, 16, 2048):
            x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)
            row = {"what": "2:4 matmul vs dense (bf16)", "shape": name, "out": out_f, "in": in_f, "tokens": tokens}
            try:
                d = timed(lambda x=x, w=w: torch.nn.functional.linear(x, w))
                s = timed(lambda x=x, ws=ws: torch.nn.functional.linear(x, ws))
                row.update(dense_ms=round(d, 4), sparse_ms=round(s, 4), speedup=round(d / s, 3))
            except RuntimeError as err:  # e.g. a token count the sparse kernel does not take
                row["error"] = str(err).splitlines()[0]
            emit(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="3b")
    p.add_argument("--work", default=None)
    p.add_argument("--skip", default="", help="comma list of prune,semi,matmul to skip")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check needs CUDA")
    emit(
        {
            "what": "device",
            "name": torch.cuda.get_device_name(),
            "capability": list(torch.cuda.get_device_capability()),
            "torch": torch.__version__,
        }
    )
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work))
    skip = set(args.skip.split(","))
    try:
        for name, fn in (
            ("matmul", check_matmul),
            ("semi", lambda: check_semi_structured(work)),
            ("prune", lambda: check_prune(work, args.config)),
        ):
            if name in skip:
                continue
            t0 = time.perf_counter()
            try:
                fn()
            except Exception as err:  # noqa: BLE001 - report and go on to the next check
                emit({"what": name, "error": f"{type(err).__name__}: {err}"[:600]})
            emit({"what": f"{name} done", "seconds": round(time.perf_counter() - t0, 1)})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
