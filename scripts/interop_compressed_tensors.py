"""Interop with compressed-tensors 0.14.0.1 (the last release with the sparse compressors), both ways.

`make interop` runs this from the main venv. It builds tiny pruned models, exports them with sparsetune, and
runs itself with `--worker` inside `.venv-interop` (compressed-tensors 0.14.0.1 + transformers 4.57), which:
  1. decompresses our sparse-bitmask / sparse-24-bitmask exports with compressed-tensors' own compressors, and
     also loads them through transformers 4.57's compressed-tensors integration;
  2. writes the same dense models with compressed-tensors' ModelCompressor.
Back in the main venv it checks, bit for bit:
  - compressed-tensors' decompression of our files == our dense weights;
  - sparsetune's loader on compressed-tensors' files == the dense weights;
and compares the two writers' tensors (keys, dtypes, shapes, bytes) and config.json `quantization_config`.
Prints one JSON line per check and exits 1 when any required check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PYTHON = ROOT / ".venv-interop" / "bin" / "python"

# (case name, format, sparsity or "2:4", dtype, max shard size)
CASES = [
    ("bitmask-fp32", "sparse-bitmask", 0.5, "float32", "5GB"),
    ("bitmask-bf16-sharded", "sparse-bitmask", 0.6, "bfloat16", "60KB"),
    ("24-bf16", "sparse-24-bitmask", "2:4", "bfloat16", "5GB"),
    ("24-fp16-sharded", "sparse-24-bitmask", "2:4", "float16", "60KB"),
]


# ----- worker: runs in .venv-interop (compressed-tensors 0.14.0.1, transformers 4.57) ----------------------------


def worker(spec_file: str) -> None:
    import compressed_tensors
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.config import BitmaskConfig, Sparse24BitMaskConfig
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    specs = json.loads(Path(spec_file).read_text())
    results = {"compressed_tensors": compressed_tensors.__version__}
    for case in specs:
        work = Path(case["work"])
        res: dict = {}
        # 1. compressed-tensors decompresses our export (its own sparse compressor, file by file).
        compressor = ModelCompressor.from_pretrained(case["ours"])
        res["ct_detects"] = type(compressor.sparsity_compressor).__name__
        tensors = {k: v.contiguous() for k, v in compressor.sparsity_compressor.decompress(case["ours"])}
        save_file(tensors, str(work / "ct_decompressed.safetensors"))
        # 2. compressed-tensors writes the same dense model.
        dense = AutoModelForCausalLM.from_pretrained(case["dense"], torch_dtype=getattr(torch, case["dtype"]))
        config_cls = BitmaskConfig if case["format"] == "sparse-bitmask" else Sparse24BitMaskConfig
        sconfig = config_cls(targets=["Linear"], ignore=case["ignore"], global_sparsity=case["global_sparsity"])
        if case["format"] == "sparse-bitmask":
            sconfig.sparsity_structure = "unstructured"
        writer = ModelCompressor(sparsity_config=sconfig)
        compressed = writer.compress(dense)
        dense.save_pretrained(case["ct"], state_dict=compressed, safe_serialization=True, max_shard_size=case["shard"])
        writer.update_config(case["ct"])
        for f in Path(case["dense"]).glob("tokenizer*"):
            shutil.copy2(f, Path(case["ct"]) / f.name)
        # 3. the transformers 4.57 integration (what a user of that stack calls), on our files and on theirs.
        res["hf_load"] = _hf_load(case["ours"], case["dtype"], work / "hf_loaded.safetensors")
        res["hf_load_ct_own"] = _hf_load(case["ct"], case["dtype"], None)
        results[case["name"]] = res
    print(json.dumps(results))


def _hf_load(path: str, dtype: str, save_to: Path | None) -> str:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=getattr(torch, dtype))
    except Exception as err:  # noqa: BLE001 - reported, not fatal
        return f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if save_to is not None:
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(save_to))
    return "ok"


# ----- driver: runs in the main venv (sparsetune) -----------------------------------------------------------------


def _make_pruned(case: tuple, work: Path) -> Path:
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import make_tiny_model, make_tokenizer

    from sparsetune.masks import NMPattern, nm_mask, row_mask

    _, _, sparsity, dtype, _ = case
    # intermediate 100: down_proj has 100 input columns (not a multiple of 8: a partial bitmask byte).
    model = make_tiny_model("llama", seed=1, tie=True, intermediate_size=100)
    gen = torch.Generator().manual_seed(0)
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight.data
                scores = torch.rand(w.shape, generator=gen)
                keep = nm_mask(scores, NMPattern(2, 4)) if sparsity == "2:4" else row_mask(scores, sparsity)
                w.masked_fill_(~keep, 0)
    model.to(getattr(torch, dtype))
    dense = work / "dense"
    model.save_pretrained(dense)
    make_tokenizer().save_pretrained(dense)
    return dense


def _bits(t):
    import torch

    return t.contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


def _same(a, b) -> bool:
    import torch

    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))


def _compare_states(got: dict, want: dict) -> dict:
    keys_equal = sorted(got) == sorted(want)
    differ = [k for k in want if k in got and not _same(got[k], want[k])]
    return {"keys_equal": keys_equal, "tensors": len(want), "differ": len(differ), "first_diff": differ[:1]}


def _load_dir(path: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def driver(python: str, keep: bool) -> int:
    import torch
    from safetensors.torch import load_file

    from sparsetune.export.config import ExportConfig
    from sparsetune.export.writer import run_export
    from sparsetune.loading import load_model

    root = Path(tempfile.mkdtemp(prefix="sparsetune-interop-"))
    specs, dense_states = [], {}
    for case in CASES:
        name, fmt, _, dtype, shard = case
        work = root / name
        work.mkdir()
        dense = _make_pruned(case, work)
        ours = work / "ours"
        run_export(ExportConfig(model=str(dense), output=str(ours), format=fmt, max_shard_size=shard))
        meta = json.loads((ours / "sparsetune_config.json").read_text())
        dense_states[name] = _load_dir(dense)
        specs.append(
            {
                "name": name,
                "format": fmt,
                "dtype": dtype,
                "shard": shard,
                "work": str(work),
                "dense": str(dense),
                "ours": str(ours),
                "ct": str(work / "ct"),
                "ignore": sorted(meta["ignore"]),
                "global_sparsity": meta["global_sparsity"],
            }
        )
    spec_file = root / "cases.json"
    spec_file.write_text(json.dumps(specs))
    proc = subprocess.run(
        [python, __file__, "--worker", str(spec_file)], capture_output=True, text=True, timeout=900, check=False
    )
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        _emit({"check": "worker", "ok": False, "returncode": proc.returncode})
        return 1
    worker_out = json.loads(proc.stdout.strip().splitlines()[-1])
    ok = True
    for spec in specs:
        name, work = spec["name"], Path(spec["work"])
        want = dense_states[name]
        # compressed-tensors' decompression of our files == our dense weights
        got = load_file(str(work / "ct_decompressed.safetensors"))
        cmp = _compare_states(got, want)
        passed = cmp["keys_equal"] and cmp["differ"] == 0
        ok &= passed
        _emit({"case": name, "check": "compressed-tensors decompresses ours", "ok": passed, **cmp})
        # transformers 4.57 + compressed-tensors from_pretrained of our files (informational)
        hf = worker_out[name]["hf_load"]
        record = {
            "case": name,
            "check": "transformers 4.57 from_pretrained(ours)",
            "status": hf,
            "same_call_on_compressed_tensors_own_files": worker_out[name]["hf_load_ct_own"],
        }
        if hf == "ok":
            record.update(_compare_states(load_file(str(work / "hf_loaded.safetensors")), want))
            record["ok"] = record["keys_equal"] and record["differ"] == 0
        _emit(record)
        # sparsetune's loader on compressed-tensors' files == the dense weights
        model, _ = load_model(spec["ct"], dtype=spec["dtype"], device="cpu", need_tokenizer=False)
        state = {k: v for k, v in model.state_dict().items() if not (k == "lm_head.weight" and k not in want)}
        cmp = _compare_states(state, want)
        passed = cmp["keys_equal"] and cmp["differ"] == 0
        ok &= passed
        _emit({"case": name, "check": "sparsetune loads compressed-tensors' files", "ok": passed, **cmp})
        # layout parity: the two writers' tensors and configs
        ours_t, ct_t = _load_dir(Path(spec["ours"])), _load_dir(Path(spec["ct"]))
        layout_same = sorted(ours_t) == sorted(ct_t) and all(
            ours_t[k].dtype == ct_t[k].dtype and ours_t[k].shape == ct_t[k].shape for k in ours_t
        )
        byte_diff = [k for k in ours_t if k in ct_t and not _same(ours_t[k], ct_t[k])]
        ours_qc = json.loads((Path(spec["ours"]) / "config.json").read_text())["quantization_config"]
        ct_qc = json.loads((Path(spec["ct"]) / "config.json").read_text())["quantization_config"]
        ok &= layout_same
        _emit(
            {
                "case": name,
                "check": "same keys, dtypes and shapes as compressed-tensors' writer",
                "ok": layout_same,
                "tensors": len(ours_t),
                "byte_identical": len(ours_t) - len(byte_diff),
                "byte_differ": byte_diff[:3],
                "config_keys_equal": sorted(ours_qc) == sorted(ct_qc)
                and sorted(ours_qc["sparsity_config"]) == sorted(ct_qc["sparsity_config"]),
                "ct_config": ct_qc,
            }
        )
    _emit(
        {
            "check": "interop",
            "ok": ok,
            "compressed_tensors": worker_out["compressed_tensors"],
            "torch": torch.__version__,
        }
    )
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"kept {root}", file=sys.stderr)
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="CASES_JSON", help=argparse.SUPPRESS)
    parser.add_argument("--python", default=str(DEFAULT_PYTHON), help="python of the compressed-tensors venv")
    parser.add_argument("--keep", action="store_true", help="keep the work dir for inspection")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    if not Path(args.python).exists():
        print(f"error: {args.python} not found; run `make interop` (it creates .venv-interop)", file=sys.stderr)
        return 2
    return driver(args.python, args.keep)


if __name__ == "__main__":
    sys.exit(main())
