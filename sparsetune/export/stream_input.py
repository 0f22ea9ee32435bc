"""An exported compressed dir read as the dense checkpoint it stands for, a few tensors at a time.

`ExportedFiles` has the interface of `sparsetune.streaming.CheckpointFiles` (`entries`, `names`, `read`,
`nbytes`, `fingerprint`), so `StreamedModel(..., files=ExportedFiles(dir))` streams an export as it streams any
checkpoint: its entries are the *dense* tensors (a compressed module's dense key, dtype and shape), and `read`
reads a module's compressed parts with the plain reads of `CheckpointFiles` and decompresses them with the
loader's own `decompress_state`, so every tensor equals what `load_exported` builds, bit for bit. Every weight file
is checked against the sha256 that `sparsetune export` recorded before anything else, hashed in fixed-size chunks
(the files are never held in memory, nor mapped).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.export.codecs import CODECS, CorruptTensorError
from sparsetune.export.formats import read_export_format
from sparsetune.export.loader import (
    _stored_dtype,
    compressed_modules,
    decompress_state,
    integrity_record,
    module_keys,
    verify_files,
)
from sparsetune.streaming import CheckpointFiles, TensorEntry

HASH_CHUNK = 16 << 20
# The part holding a compressed module's kept values, whose dtype is the dense weight's.
VALUE_PART = {"sparse-bitmask": "compressed", "sparse-24-bitmask": "compressed", "semi-structured-2:4": "packed"}


def chunked_sha256(path: Path) -> str:
    """sha256 of a file read through one fixed buffer."""
    h = hashlib.sha256()
    buf = bytearray(min(HASH_CHUNK, max(1, path.stat().st_size)))
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            h.update(view[:n])
    return h.hexdigest()


@dataclass(frozen=True)
class DenseEntry(TensorEntry):
    """A compressed module's dense tensor: `file`, `start` and `end` locate its value part, `parts` names every
    stored part; `nbytes` is the dense size."""

    parts: tuple[str, ...] = ()

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * self.dtype.itemsize


class ExportedFiles:
    """The dense tensors of an export dir (sparse-bitmask, sparse-24-bitmask, semi-structured-2:4), decompressed on
    read. `verify=False` skips the sha256 check (for size estimates from the headers alone)."""

    decompressed = True  # the config's quantization_config describes the files, not the model (StreamedModel)

    def __init__(self, folder: str | Path, verify: bool = True) -> None:
        self.folder = Path(folder)
        fmt = read_export_format(self.folder)
        if fmt is None:
            raise SparsetuneError(f"{self.folder} is not a compressed sparsetune export; load it as a plain HF dir")
        self.format = fmt
        if verify:
            verify_files(self.folder, integrity_record(self.folder), sha256=chunked_sha256)
        self.raw = CheckpointFiles(self.folder)
        self.stats, self.metadata = self.raw.stats, self.raw.metadata
        self.keys = module_keys(self.folder)
        plain, modules = compressed_modules(self.raw.names(), fmt, self.keys)
        params = CODECS[fmt][0]
        shapes = self.raw.read([f"{module}.shape" for module in modules])  # a few bytes each
        self.entries: dict[str, TensorEntry] = {key: self.raw.entries[key] for key in plain}
        self.module_of: dict[str, str] = {}  # dense key -> its compressed module
        for module, dense_key in modules.items():
            shape = shapes[f"{module}.shape"]
            dims = 3 if dense_key != f"{module}.weight" else 2
            if shape.dtype != torch.int64 or shape.numel() != dims:
                raise CorruptTensorError(f"{module}.shape should hold {dims} int64 values; re-export the model")
            values = self.raw.entries[f"{module}.{VALUE_PART[fmt]}"]
            self.entries[dense_key] = DenseEntry(
                values.file,
                values.dtype,
                tuple(int(v) for v in shape.reshape(-1)),
                values.start,
                values.end,
                tuple(f"{module}.{p}" for p in params),
            )
            self.module_of[dense_key] = module

    def names(self) -> list[str]:
        return list(self.entries)

    def _stored_keys(self, keys: Any) -> list[str]:
        stored: list[str] = []
        for key in keys:
            entry = self.entries[key]
            stored.extend(entry.parts if isinstance(entry, DenseEntry) else (key,))
        return stored

    def nbytes(self, keys: Any = None) -> int:
        """Bytes read from the files for `keys` (all when None): the compressed parts of a compressed tensor."""
        return self.raw.nbytes(self._stored_keys(self.entries if keys is None else keys))

    def read(self, keys: Any) -> dict[str, torch.Tensor]:
        """The dense tensors `keys`: stored ones as stored, compressed ones decompressed (their stored dtype)."""
        keys = list(keys)
        state = decompress_state(self.raw.read(self._stored_keys(keys)), self.format, self.keys)
        out = {}
        for key in keys:
            entry, tensor = self.entries[key], state[key]
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise CorruptTensorError(f"{key} decompressed to {list(tensor.shape)}, not {list(entry.shape)}")
            out[key] = tensor
        return out

    def fingerprint(self) -> str:
        return hashlib.sha256(f"{self.format}:{self.raw.fingerprint()}".encode()).hexdigest()[:16]

    def stored_dtype(self) -> torch.dtype:
        """The dtype `load_exported` gives the model when none is asked for (config.json's, else the first
        floating tensor's)."""
        config = json.loads((self.folder / "config.json").read_text())
        state = {k: torch.empty(0, dtype=e.dtype, device="meta") for k, e in self.entries.items()}
        return _stored_dtype(config, state)
