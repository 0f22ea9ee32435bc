"""Bytes on disk and export/load time of every `sparsetune export` format, on the bundled SmolLM2-135M.

The model is pruned by Wanda at 50% and at 2:4 (through the `sparsetune prune` CLI, unless --pruned-50 /
--pruned-24 name existing pruned dirs) and stored in bf16. For each format it reports, relative to dense bf16:
  - bytes over the pruned decoder-block tensors (targets: sparse-bitmask at 50%, sparse-24-bitmask and
    semi-structured-2:4 at 2:4 all <= 0.57x), and beside it the whole checkpoint (embeddings stay dense);
  - export time vs a plain `save_pretrained`, and load time vs a plain `from_pretrained` (target: within 2x).
    from_pretrained memory-maps the safetensors file and returns without reading the weights; our loader checks
    each file's sha256 and decompresses, so it reads everything. For a fair comparison `load_s` on both sides
    includes `materialize`: reading one byte of every 4 KiB page of every weight, which pages in the mapped
    weights (no arithmetic over the values, so it adds the same few ms of work to each side). The lazy times
    without it are reported too (`load_lazy_s`). Both sides write to a fresh dir; each time is the best of
    --repeats;
  - whether the weights load back unchanged, against the model that was exported: `bit_identical` compares
    every tensor bit for bit (keys, dtypes and shapes first) and names the tensors that differ. The sparse
    formats store a value when it is != 0 (as compressed-tensors does), so a -0.0 in a pruned slot loads back
    as +0.0; sparsetune's pruners write -0.0 where a negative weight is multiplied by a zero mask, so
    `signed_zeros` counts those elements and `identical_up_to_zero_sign` says whether they are the only
    difference. `logits_identical` runs both models on the same tokens. The weights target is
    identical_up_to_zero_sign and identical logits.
  - the whole-process comparison the export target is stated in (`process` rows): `sparsetune export` as its own
    process against a process that runs `from_pretrained` + `save_pretrained` on the same dir, wall time and
    peak RSS of each (target: export <= 2x).
One JSON line per measurement. `--quick` prunes by magnitude (no calibration) and times each step once.

`--random-config` (tiny, 1b, 3b, 13b or HIDDEN,INTERMEDIATE,LAYERS,VOCAB) instead writes a random-initialised
Llama checkpoint of that config in bf16 safetensors shards (bench_common.make_random_checkpoint, block by block;
its decoder Linears --random-sparsity zeroed), exports it with `sparsetune export --format FMT` as its own process
and reports wall time, peak RSS and the disk read/write volumes next to the checkpoint's size (13b target: peak
RSS <= 4 GB); with --baseline also from_pretrained + save_pretrained as one process. The checkpoint is deleted
afterwards unless --work-dir keeps it.

    .venv/bin/python scripts/bench_export.py --random-config 13b --work-dir /data/bench   # ~26 GB on disk
    .venv/bin/python scripts/bench_export.py --random-config tiny --baseline              # checks the mode runs
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
sys.path.insert(0, str(ROOT / "scripts"))
RANDOM_CONFIGS = {  # hidden, intermediate, layers, vocab
    "tiny": (256, 688, 3, 49152),
    "1b": (2048, 5632, 22, 32000),
    "3b": (3072, 8192, 26, 32000),
    "13b": (5120, 13824, 40, 32000),
}
RSS_TARGET_GB = {"13b": 4.0}
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
    from sparsetune.loading import load_model, save_model

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


PAGE = 4096


def materialize(model) -> int:
    """Read one byte of every 4 KiB page of every weight (each storage once), so mmapped weights are paged in."""
    import torch

    seen, total = set(), 0
    with torch.no_grad():
        for tensor in model.state_dict().values():
            storage = tensor.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            total += int(raw[::PAGE].sum()) + int(raw[-1])
    return total


def compare_weights(got_model, want_model, tokens) -> dict:
    """Bit-for-bit comparison of two models' state dicts, naming what differs, plus their logits on `tokens`."""
    import torch

    got, want = got_model.state_dict(), want_model.state_dict()
    out = {"missing": sorted(want.keys() - got.keys())[:5], "unexpected": sorted(got.keys() - want.keys())[:5]}
    differing, signed_zeros, other = [], 0, 0
    for key in sorted(want.keys() & got.keys()):
        a, b = got[key], want[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            differing.append(f"{key} ({a.dtype} {list(a.shape)} vs {b.dtype} {list(b.shape)})")
            other += b.numel()
            continue
        if a.numel() == 0:
            continue
        as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        diff = a.contiguous().view(as_int) != b.contiguous().view(as_int)
        n = int(diff.sum())
        if n:
            zero_sign = diff & (a == 0) & (b == 0) if a.dtype.is_floating_point else torch.zeros_like(diff)
            zeros = int(zero_sign.sum())
            signed_zeros += zeros
            other += n - zeros
            kind = "only the sign of zeros" if zeros == n else f"{n - zeros} beyond the sign of zeros"
            differing.append(f"{key} ({n} elements: {kind})")
    with torch.no_grad():
        logits_same = torch.equal(got_model(tokens).logits, want_model(tokens).logits)
    keys_ok = not out["missing"] and not out["unexpected"]
    out.update(
        {
            "bit_identical": keys_ok and not differing,
            "identical_up_to_zero_sign": keys_ok and other == 0,
            "signed_zeros": signed_zeros,
            "differing_tensors": len(differing),
            "differing_first": differing[:3],
            "logits_identical": logits_same,
        }
    )
    if not out["missing"] and not out["unexpected"]:
        del out["missing"], out["unexpected"]
    return out


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
    from sparsetune.loading import load_model

    model = AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.bfloat16)
    materialize(model)
    modules = pruned_modules(pruned)
    base_dir = work / f"{label}-save_pretrained"
    tokens = torch.randint(0, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))

    def plain_save():
        shutil.rmtree(base_dir, ignore_errors=True)
        model.save_pretrained(base_dir)

    def plain_load():
        return AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.bfloat16)

    save_s = best_time(plain_save, repeats)
    load_lazy_s = best_time(plain_load, repeats)
    load_s = best_time(lambda: materialize(plain_load()), repeats)
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
            "load_lazy_s": round(load_lazy_s, 3),
            "load_s_includes": "materialize (one byte read per 4 KiB page of every weight)",
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
            return load_model(str(out), dtype="bfloat16", device="cpu", need_tokenizer=False)[0]

        load_back_lazy_s = best_time(load, repeats)
        load_back_s = best_time(lambda load=load: materialize(load()), repeats)
        weights = compare_weights(load(), model, tokens)
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
            "load_lazy_s": round(load_back_lazy_s, 3),
            "load_lazy_vs_from_pretrained_lazy": round(load_back_lazy_s / load_lazy_s, 3),
            **weights,
            "weights_ok": weights["identical_up_to_zero_sign"] and weights["logits_identical"],
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


SAVE_PRETRAINED_SCRIPT = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[3]))
model.save_pretrained(sys.argv[2])
"""


def run_process(cmd: list[str]) -> dict:
    """Run `cmd` as its own process: wall time, its peak RSS and its block I/O (os.wait4's rusage of that child,
    so earlier children do not count)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read() if proc.stderr else b""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return {
        "wall_s": round(wall, 2),
        "peak_rss_gb": round(usage.ru_maxrss / 1024**2, 3),
        "disk_read_gb": round(usage.ru_inblock * 512 / 1e9, 3),
        "disk_written_gb": round(usage.ru_oublock * 512 / 1e9, 3),
    }


def export_cmd(src: Path, out: Path, fmt: str) -> list[str]:
    return [str(Path(sys.executable).parent / "sparsetune"), "export", str(src), "--format", fmt, "-o", str(out)]


def save_pretrained_cmd(src: Path, out: Path, dtype: str) -> list[str]:
    return [sys.executable, "-c", SAVE_PRETRAINED_SCRIPT, str(src), str(out), dtype]


def process_rows(label: str, pruned: Path, work: Path, formats: list[str], repeats: int) -> list[dict]:
    """Whole processes, best wall time of `repeats`: save_pretrained once, then `sparsetune export` per format."""

    def best(cmd: list[str], out: Path) -> dict:
        runs = []
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            runs.append(run_process(cmd))
        return min(runs, key=lambda r: r["wall_s"])

    base = best(save_pretrained_cmd(pruned, work / f"{label}-process-save", "bfloat16"), work / f"{label}-process-save")
    emit({"model": label, "process": "from_pretrained + save_pretrained (baseline)", **base})
    rows = []
    for fmt in formats:
        out = work / f"{label}-process-{fmt}"
        got = best(export_cmd(pruned, out, fmt), out)
        record = {"model": label, "process": f"sparsetune export --format {fmt}", **got}
        record["export_vs_save_pretrained"] = round(got["wall_s"] / base["wall_s"], 3)
        record["time_ok"] = record["export_vs_save_pretrained"] <= TIME_TARGET
        emit(record)
        rows.append(record)
    return rows


def parse_random_config(text: str) -> tuple[str, tuple[int, int, int, int]]:
    if text in RANDOM_CONFIGS:
        return text, RANDOM_CONFIGS[text]
    try:
        hidden, intermediate, layers, vocab = (int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"--random-config {text!r}: one of {', '.join(RANDOM_CONFIGS)} or H,I,L,V") from None
    return text, (hidden, intermediate, layers, vocab)


def bundled_tokenizer_dir() -> Path | None:
    try:
        from sparsetune.loading import bundled_model_dir

        return bundled_model_dir()
    except Exception:  # noqa: BLE001 - the bundled model is optional here: the checkpoint just has no tokenizer
        return None


def bench_random(args: argparse.Namespace, work: Path) -> bool:
    """The random-checkpoint mode: generate, export as a whole process, report; True when the targets hold."""
    from bench_common import make_random_checkpoint

    name, (hidden, intermediate, layers, vocab) = parse_random_config(args.random_config)
    src = work / f"random-llama-{name.replace(',', 'x')}"
    t0 = time.perf_counter()
    if not (src / "config.json").exists():
        make_random_checkpoint(
            src,
            hidden,
            intermediate,
            layers,
            vocab,
            sparsity=args.random_sparsity,
            tokenizer_from=bundled_tokenizer_dir(),
        )
    ckpt_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    label = f"random-llama-{name}"
    emit(
        {
            "model": label,
            "step": "generate",
            "config": {"hidden": hidden, "intermediate": intermediate, "layers": layers, "vocab": vocab},
            "dtype": "bfloat16",
            "sparsity": args.random_sparsity,
            "checkpoint_bytes": ckpt_bytes,
            "seconds": round(time.perf_counter() - t0, 2),
        }
    )
    ok = True
    out = work / f"{label}-{args.format}"
    shutil.rmtree(out, ignore_errors=True)
    got = run_process(export_cmd(src, out, args.format))
    record = {
        "model": label,
        "process": f"sparsetune export --format {args.format}",
        "checkpoint_gb": round(ckpt_bytes / 1e9, 3),
        **got,
        "output_gb": round(sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e9, 3),
    }
    if name in RSS_TARGET_GB:
        record["rss_target_gb"] = RSS_TARGET_GB[name]
        record["rss_ok"] = got["peak_rss_gb"] <= RSS_TARGET_GB[name]
        ok = record["rss_ok"]
    shutil.rmtree(out, ignore_errors=True)
    if args.baseline:
        base_out = work / f"{label}-save_pretrained"
        base = run_process(save_pretrained_cmd(src, base_out, "bfloat16"))
        shutil.rmtree(base_out, ignore_errors=True)
        emit({"model": label, "process": "from_pretrained + save_pretrained (baseline)", **base})
        record["export_vs_save_pretrained"] = round(got["wall_s"] / base["wall_s"], 3)
        record["rss_vs_save_pretrained"] = round(got["peak_rss_gb"] / max(base["peak_rss_gb"], 1e-9), 3)
    emit(record)
    if not args.keep_checkpoint:
        shutil.rmtree(src, ignore_errors=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned-50", type=Path, help="existing dir of the model pruned to 50%% (skips pruning)")
    parser.add_argument("--pruned-24", type=Path, help="existing dir of the model pruned to 2:4 (skips pruning)")
    parser.add_argument("--method", default="wanda", help="prune method when pruning here (default: wanda)")
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats (the best is reported)")
    parser.add_argument("--work-dir", type=Path, help="keep outputs here (default: a temp dir, removed)")
    parser.add_argument("--quick", action="store_true", help="magnitude pruning and one timing repeat")
    parser.add_argument("--random-config", help="benchmark a random Llama checkpoint: tiny, 1b, 3b, 13b or H,I,L,V")
    parser.add_argument("--random-sparsity", type=float, default=0.5, help="zeroed fraction of its block Linears")
    parser.add_argument("--format", default="sparse-bitmask", help="export format in --random-config mode")
    parser.add_argument("--baseline", action="store_true", help="--random-config: also from_pretrained+save_pretrained")
    parser.add_argument("--keep-checkpoint", action="store_true", help="--random-config: keep the generated dir")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.quick:
        args.method, args.repeats = "magnitude", 1
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sparsetune-bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.random_config:
            ok = bench_random(args, work)
            emit({"summary": "bench_export", "mode": "random-config", "all_targets_met": ok})
            return 0
        sources = {"50": (args.pruned_50, ["--sparsity", "0.5"]), "2:4": (args.pruned_24, ["--pattern", "2:4"])}
        results = []
        for label, (given, sparsity_args) in sources.items():
            name = label.replace(":", "")
            pruned = given or prune_with_cli(work / f"pruned-{name}", sparsity_args, args.method, args.quick)
            bf16 = to_bf16_dir(pruned, work / f"pruned-{name}-bf16")
            results += bench_one(label, bf16, work, args.repeats)
            compressed = [f for f in FORMATS[label] if f != "dense"]
            results += process_rows(label, bf16, work, compressed, args.repeats)
        ok = all(r.get("size_ok", True) and r["time_ok"] and r.get("weights_ok", True) for r in results)
        emit({"summary": "bench_export", "all_targets_met": ok, "method": args.method, "repeats": args.repeats})
        return 0
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
