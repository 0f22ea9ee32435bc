"""`sparsetune export`: compressed sparse checkpoints and loading them back.

Importing this package registers exported compressed dirs as an input format (`sparsetune.input_formats`): any
command loads one decompressed, or streams it. It stays light (json + pathlib only at import time): the
`sparsetune` package imports it, and the loader asks it about every dir it loads. The codecs, writer and loader
live in submodules, imported on use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsetune.export.formats import COMPRESSED_FORMATS, FORMATS, read_export_format
from sparsetune.export.formats import read_json as _read_json
from sparsetune.input_formats import register_format

__all__ = [
    "COMPRESSED_FORMATS",
    "FORMATS",
    "disk_bytes",
    "is_exported_dir",
    "module_bytes",
    "print_size_comparison",
    "read_export_format",
    "size_comparison",
    "tensor_bytes",
]


def is_exported_dir(path: str | Path) -> bool:
    """A dir `sparsetune export` wrote in a compressed format (or compressed-tensors did)."""
    return read_export_format(path) is not None


def _load(path: Path, dtype: Any = None, **kwargs: Any) -> Any:
    from sparsetune.export.loader import load_exported  # torch: the CLI's --help imports this package

    return load_exported(path, dtype=dtype, **kwargs)


def _stream_files(path: Path, base_files: Any, verify: bool) -> Any:
    from sparsetune.export.stream_input import ExportedFiles  # as above

    return ExportedFiles(path, verify=verify)


register_format("exported", "exported compressed dir", is_exported_dir, _stream_files, load=_load)


# ----- bytes on disk -------------------------------------------------------------------------------------------


def tensor_bytes(path: str | Path) -> dict[str, int]:
    """Bytes of every tensor in a dir's safetensors files, read from the headers only."""
    from huggingface_hub import parse_local_safetensors_file_metadata

    sizes = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        for key, info in parse_local_safetensors_file_metadata(file).tensors.items():
            start, end = info.data_offsets
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
