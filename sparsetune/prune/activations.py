"""Where calibration activations live between blocks: in memory (CPU or GPU), or in files on disk.

The engine only ever reads and writes whole samples (slices along dim 0), so the disk store reads and writes
those slices with plain file I/O: resident memory stays at one mini-batch, whatever the calibration set size.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class DiskTensor:
    """A (N, ...) tensor kept in an unlinked temp file; `t[slice]` reads samples, `t[slice] = x` writes them."""

    def __init__(
        self, shape: tuple[int, ...], dtype: torch.dtype, folder: str | os.PathLike[str] | None = None
    ) -> None:
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.device = torch.device("cpu")
        self._row_numel = int(torch.Size(shape[1:]).numel())
        self._row_bytes = self._row_numel * self.element_size()
        fd, path = tempfile.mkstemp(prefix="sparsetune-act-", suffix=".bin", dir=folder)
        self._file = os.fdopen(fd, "r+b", buffering=0)
        os.unlink(path)  # the data disappears with the process, crash or not
        self._file.truncate(self._row_bytes * shape[0])

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _rows(self, key: slice) -> range:
        if not isinstance(key, slice):
            raise TypeError("DiskTensor supports slices along dim 0 only")
        return range(*key.indices(self.shape[0]))

    def __getitem__(self, key: slice) -> torch.Tensor:
        rows = self._rows(key)
        buf = bytearray(self._row_bytes * len(rows))
        self._file.seek(rows.start * self._row_bytes)
        self._file.readinto(buf)
        return torch.frombuffer(buf, dtype=self.dtype).view(len(rows), *self.shape[1:])

    def __setitem__(self, key: slice, value: torch.Tensor) -> None:
        rows = self._rows(key)
        data = value.detach().to("cpu", self.dtype).contiguous()
        self._file.seek(rows.start * self._row_bytes)
        self._file.write(data.view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self._file.close()


class ActivationStore:
    """Allocates the engine's activation buffers in memory on `device`, or on disk under `folder`."""

    def __init__(self, mode: str, device: torch.device, folder: str | os.PathLike[str] | None = None) -> None:
        self.mode, self.device, self.folder = mode, device, folder
        if folder is not None:
            Path(folder).mkdir(parents=True, exist_ok=True)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | DiskTensor:
        if self.mode == "disk":
            return DiskTensor(tuple(shape), dtype, self.folder)
        return torch.empty(shape, dtype=dtype, device=self.device)

    def copy(self, source: torch.Tensor | DiskTensor, batch: int = 8) -> torch.Tensor | DiskTensor:
        out = self.empty(tuple(source.shape), source.dtype)
        for start in range(0, source.shape[0], batch):
            sl = slice(start, min(start + batch, source.shape[0]))
            out[sl] = source[sl]
        return out


def write_rows(tensor: torch.Tensor | DiskTensor, path: Path, batch: int = 8) -> None:
    """Dump the raw bytes of every sample (dim 0) to `path` (bf16-safe, no numpy dtype needed)."""
    with open(path, "wb") as f:
        for start in range(0, tensor.shape[0], batch):
            rows = tensor[slice(start, min(start + batch, tensor.shape[0]))]
            f.write(rows.contiguous().cpu().view(torch.uint8).numpy().tobytes())


def read_rows(path: Path, out: torch.Tensor | DiskTensor, batch: int = 8) -> None:
    """Fill `out` from a file written by `write_rows`; the size must match exactly."""
    row_bytes = int(torch.Size(out.shape[1:]).numel()) * out.element_size()
    if path.stat().st_size != row_bytes * out.shape[0]:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, expected {row_bytes * out.shape[0]}")
    with open(path, "rb") as f:
        for start in range(0, out.shape[0], batch):
            n = min(batch, out.shape[0] - start)
            buf = bytearray(f.read(row_bytes * n))
            out[slice(start, start + n)] = torch.frombuffer(buf, dtype=out.dtype).view(n, *out.shape[1:])
