"""Bytes on disk and export/load time of every `sparsetune export` format, on the bundled SmolLM2-135M.

The model is pruned by Wanda at 50% and at 2:4 (through the `sparsetune prune` CLI, unless --pruned-50 /
--pruned-24 name existing pruned dirs) and stored in bf16. For each format it reports, relative to dense bf16:
  - bytes over the pruned decoder-block tensors (targets: sparse-bitmask at 50%, sparse-24-bitmask and
    semi-structured-2:4 at 2:4 all <= 0.57x), and beside it the whole checkpoint (embeddings stay dense);
  - export time vs a plain `save_pretrained`, and load time vs a plain `from_pretrained` (target: within 2x).
One JSON line per measurement. `--quick` prunes by magnitude (no calibration) and times each step once.
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

ROOT = Path(__file__).resolve().parents[1]
SIZE_TARGET = 0.57
TIME_TARGET = 2.0
FORMATS = {
    "50": ["sparse-bitmask", "dense"],
    "2:4": ["sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4", "dense"],
}
TARGETED = {("50", "sparse-bitmask"), ("2:4", "sparse-24-bitmask"), ("2:4", "semi-structured-2:4")}


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def prune_with_cli(out: Path, sparsity_args: list[str], method: str, quick: bool) -> Path:
    cmd = [str(Path(sys.executable).parent / "sparsetune"), "prune", "smollm2", "--method", method, *sparsity_args]
    if method != "magnitude":
        cmd += ["--calib-samples", "8", "--seqlen", "256", "--calib-sampling", "consecutive", "--calib", "c4"]
    cmd += ["-o", str(out), "--json"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, timeout=3600)
    emit({"step": "prune", "args": " ".join(cmd[1:]), "seconds": round(time.perf_counter() - t0, 2), "quick": quick})
    return out


def to_bf16_dir(src: Path, out: Path) -> Path:
    """The pruned model stored in bf16 (bf16 keeps fp32's exponent range, so zeros and 2:4 groups survive)."""
    from sparsetune.models import load_model, save_model

    model, tok = load_model(str(src), dtype="bfloat16", device="cpu")
    save_model(model, tok, out)
    for name in ("sparsity_report.json",):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out


def pruned_modules(pruned: Path) -> list[str]:
    """Decoder-block Linears the prune run touched (from its report; else every Linear with zeros in a block)."""
    report = pruned / "sparsity_report.json"
    if report.exists():
        modules = json.loads(report.read_text()).get("modules", {})
        return [m for m, info in modules.items() if info.get("sparsity", 0) > 0 and ".layers." in m]
    from safetensors import safe_open

    with safe_open(str(pruned / "model.safetensors"), "pt") as f:
        return [
            k.removesuffix(".weight")
            for k in f.keys()  # noqa: SIM118 - safe_open has keys(), not iteration
            if ".layers." in k and k.endswith("proj.weight") and bool((f.get_tensor(k) == 0).any())
        ]


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bench_one(label: str, pruned: Path, work: Path, repeats: int) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM

    from sparsetune.export import disk_bytes, module_bytes, tensor_bytes
    from sparsetune.export.config import ExportConfig
    from sparsetune.export.writer import export_model
    from sparsetune.models import load_model

    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.bfloat16)
    modules = pruned_modules(pruned)
    base_dir = work / f"{label}-save_pretrained"

    def plain_save():
        shutil.rmtree(base_dir, ignore_errors=True)
        model.save_pretrained(base_dir)

    save_s = best_time(plain_save, repeats)
    load_s = best_time(lambda: AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16), repeats)
    dense_sizes = tensor_bytes(base_dir)
    dense_total, dense_pruned = disk_bytes(base_dir), module_bytes(dense_sizes, modules)
    emit(
        {
            "model": label,
            "format": "save_pretrained (baseline)",
            "bytes_total": dense_total,
            "bytes_pruned_tensors": dense_pruned,
            "pruned_modules": len(modules),
            "save_s": round(save_s, 3),
            "load_s": round(load_s, 3),
        }
    )
    results = []
    for fmt in FORMATS[label]:
        out = work / f"{label}-{fmt}"
        cfg = ExportConfig(model=str(pruned), output=str(out), format=fmt)

        def export(out=out, cfg=cfg):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            export_model(model, None, out, cfg)

        export_s = best_time(export, repeats)

        def load(out=out):
            return load_model(str(out), dtype="bfloat16", device="cpu", need_tokenizer=False)

        load_back_s = best_time(load, repeats)
        got = load()[0].state_dict()
        want = model.state_dict()
        identical = all(torch.equal(got[k].view(torch.uint8), want[k].contiguous().view(torch.uint8)) for k in want)
        sizes = tensor_bytes(out)
        record = {
            "model": label,
            "format": fmt,
            "bytes_total": disk_bytes(out),
            "ratio_total": round(disk_bytes(out) / dense_total, 4),
            "ratio_pruned_tensors": round(module_bytes(sizes, modules) / dense_pruned, 4),
            "export_s": round(export_s, 3),
            "export_vs_save_pretrained": round(export_s / save_s, 3),
            "load_s": round(load_back_s, 3),
            "load_vs_from_pretrained": round(load_back_s / load_s, 3),
            "bit_identical": identical,
        }
        if (label, fmt) in TARGETED:
            record["size_target"] = SIZE_TARGET
            record["size_ok"] = record["ratio_pruned_tensors"] <= SIZE_TARGET
        record["time_ok"] = record["export_vs_save_pretrained"] <= TIME_TARGET and (
            record["load_vs_from_pretrained"] <= TIME_TARGET
        )
        emit(record)
        results.append(record)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned-50", type=Path, help="existing dir of the model pruned to 50%% (skips pruning)")
    parser.add_argument("--pruned-24", type=Path, help="existing dir of the model pruned to 2:4 (skips pruning)")
    parser.add_argument("--method", default="wanda", help="prune method when pruning here (default: wanda)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is reported)")
    parser.add_argument("--work-dir", type=Path, help="keep outputs here (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true", help="magnitude pruning and one timing repeat")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.method, args.repeats = "magnitude", 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sparsetune-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        sources = {"50": (args.pruned_50, ["--sparsity", "0.5"]), "2:4": (args.pruned_24, ["--pattern", "2:4"])}
        results = []
        for label, (given, sparsity_args) in sources.items():
            name = label.replace(":", "")
            pruned = given or prune_with_cli(work / f"pruned-{name}", sparsity_args, args.method, args.quick)
            bf16 = to_bf16_dir(pruned, work / f"pruned-{name}-bf16")
            results += bench_one(label, bf16, work, args.repeats)
        ok = all(r.get("size_ok", True) and r["time_ok"] and r["bit_identical"] for r in results)
        emit({"summary": "bench_export", "all_targets_met": ok, "method": args.method, "repeats": args.repeats})
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
