"""What an export dir is: its file names, its format (read from its JSON), and file digests.

Light on purpose (json, hashlib, mmap): the loader asks `read_export_format` about every dir it loads (through
the input format `sparsetune.export` registers), and both the writer and the loader use these names, so neither
has to import the other.
"""

from __future__ import annotations

import hashlib
import json
import mmap
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError

SPARSETUNE_CONFIG = "sparsetune_config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4", "dense")
COMPRESSED_FORMATS = FORMATS[:3]


def read_export_format(path: str | Path) -> str | None:
    """The compressed format of an export dir (sparsetune or compressed-tensors sparse), else None."""
    path = Path(path)
    meta = path / SPARSETUNE_CONFIG
    if meta.is_file():
        data = read_json(meta)
        fmt = data.get("format") if isinstance(data, dict) else None
        if fmt in COMPRESSED_FORMATS:
            return str(fmt)
    config = path / "config.json"
    if not config.is_file():
        return None
    qc = read_json(config).get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors" or qc.get("config_groups"):
        return None  # not compressed-tensors, or quantized (not a sparse-only checkpoint we decompress)
    sparsity = qc.get("sparsity_config") or {}
    fmt = sparsity.get("format") if isinstance(sparsity, dict) else None
    return str(fmt) if fmt in ("sparse-bitmask", "sparse-24-bitmask") else None


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise SparsetuneError(f"{path} is not valid JSON ({err}); re-export the model") from err
    return data if isinstance(data, dict) else {}


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, hashed straight from a read-only memory map (no copy into Python bytes)."""
    with open(path, "rb") as f:
        if f.seek(0, 2) == 0:
            return hashlib.sha256(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return hashlib.sha256(data).hexdigest()
