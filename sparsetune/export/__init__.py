"""`sparsetune export`: compressed sparse checkpoints and loading them back.

This module stays light (json + pathlib only at import time): `sparsetune.models` asks `loader_for(path)`
on every dir it loads. The codecs, writer and loader live in submodules imported on use.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError

FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4", "dense")
COMPRESSED_FORMATS = FORMATS[:3]


def read_export_format(path: str | Path) -> str | None:
    """The compressed format of an export dir (sparsetune or compressed-tensors sparse), else None."""
    path = Path(path)
    meta = path / "sparsetune_config.json"
    if meta.is_file():
        data = _read_json(meta)
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt in COMPRESSED_FORMATS:
            return str(fmt)
    config = path / "config.json"
    if not config.is_file():
        return None
    qc = _read_json(config).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors" or qc.get("config_groups"):
        return None  # not compressed-tensors, or quantized (not a sparse-only checkpoint we decompress)
    sparsity = qc.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    return str(fmt) if fmt in ("sparse-bitmask", "sparse-24-bitmask") else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SparsetuneError(f"{path} is not valid JSON ({err}); re-export the model") from err
    return data if isinstance(data, dict) else {}


def loader_for(path: str | Path) -> Callable[..., Any] | None:
    """The loader for a dir `sparsetune export` wrote in a compressed format (or compressed-tensors did), else None.

    The loader is called as `loader(path, dtype=torch_dtype, **kwargs)` and returns a decompressed model.
    """
    if read_export_format(path) is None:
        return None
    from sparsetune.export.loader import load_exported

    return load_exported


def export(cfg: Any, overwrite: bool = False) -> dict[str, Any]:
    """Run one export (`cfg` is an ExportConfig); see `sparsetune.export.writer.run_export`."""
    from sparsetune.export.writer import run_export

    return run_export(cfg, overwrite=overwrite)


# ----- bytes on disk -------------------------------------------------------------------------------------------


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor in a dir's safetensors files, read from the headers only."""
    sizes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, info in header.items():
            if key != "__metadata__":
                start, end = info["data_offsets"]
                sizes[key] = end - start
    return sizes


def module_bytes(sizes: dict[str, int], modules: list[str]) -> int:
    """Bytes stored for the given modules' weights, dense (`<m>.weight`, or `<m>` itself for a fused expert
    parameter) or compressed (`<m>.<part>`)."""
    wanted = set(modules)
    return sum(n for key, n in sizes.items() if key.rpartition(".")[0] in wanted or key in wanted)


def disk_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def size_comparison(dense_dir: str | Path, sparse_dir: str | Path) -> dict[str, Any]:
    """Bytes on disk of a dense dir and its export: whole checkpoint and the compressed Linears alone."""
    meta = _read_json(Path(sparse_dir) / "sparsetune_config.json")
    modules = list(meta.get("modules", {}))
    dense_sizes, sparse_sizes = tensor_bytes(dense_dir), tensor_bytes(sparse_dir)
    dense_total, sparse_total = disk_bytes(dense_dir), disk_bytes(sparse_dir)
    dense_mod, sparse_mod = module_bytes(dense_sizes, modules), module_bytes(sparse_sizes, modules)
    return {
        "format": meta.get("format"),
        "dense_bytes": dense_total,
        "sparse_bytes": sparse_total,
        "ratio": sparse_total / max(1, dense_total),
        "compressed_modules": len(modules),
        "dense_module_bytes": dense_mod,
        "sparse_module_bytes": sparse_mod,
        "module_ratio": sparse_mod / max(1, dense_mod),
    }


def print_size_comparison(dense_dir: str | Path, sparse_dir: str | Path) -> dict[str, Any]:
    """Print (and return) dense vs sparse bytes on disk, for demos and quick checks."""
    s = size_comparison(dense_dir, sparse_dir)
    mb = 1e6
    print(
        f"[export] on disk: dense {s['dense_bytes'] / mb:.1f} MB -> {s['format']} {s['sparse_bytes'] / mb:.1f} MB "
        f"({s['ratio']:.2f}x); the {s['compressed_modules']} compressed Linears: "
        f"{s['dense_module_bytes'] / mb:.1f} MB -> {s['sparse_module_bytes'] / mb:.1f} MB ({s['module_ratio']:.2f}x)",
        flush=True,
    )
    return s


def demo_export(pruned_dir: str | Path, out_dir: str | Path, fmt: str = "sparse-bitmask") -> dict[str, Any]:
    """Export a pruned dir, load it back, check the weights match, and print the sizes on disk."""
    import torch

    from sparsetune.export.config import ExportConfig
    from sparsetune.models import load_model

    export(ExportConfig(model=str(pruned_dir), output=str(out_dir), format=fmt), overwrite=True)
    sparse, _ = load_model(str(out_dir), dtype="float32", device="cpu", need_tokenizer=False)
    dense, _ = load_model(str(pruned_dir), dtype="float32", device="cpu", need_tokenizer=False)
    ref = dense.state_dict()
    same = all(torch.equal(t, ref[k]) for k, t in sparse.state_dict().items())
    print(f"[export] {fmt} loaded back from {out_dir}: weights {'identical' if same else 'DIFFER'}", flush=True)
    return {**print_size_comparison(pruned_dir, out_dir), "identical": same}
