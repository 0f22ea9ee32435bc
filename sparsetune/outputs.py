"""Writing results safely: temp dir + rename, refusal to clobber, and run metadata (versions, memory)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError


def check_output_dir(output: str | os.PathLike[str], overwrite: bool, inputs: tuple[str, ...] = ()) -> Path:
    """Validate an output dir before any work starts, so bad input fails fast and writes nothing."""
    out = Path(output).expanduser().resolve()
    for src in inputs:
        src_path = Path(src).expanduser()
        if src_path.exists():
            src_path = src_path.resolve()
            if out == src_path or src_path in out.parents or out in src_path.parents:
                raise SparsetuneError(
                    f"output dir {out} overlaps the input {src_path}; choose another --output "
                    "(sparsetune never overwrites its input)"
                )
    if out.exists() and not overwrite:
        raise SparsetuneError(f"output dir {out} already exists; pass --overwrite or choose another --output")
    if out.exists() and not out.is_dir():
        raise SparsetuneError(f"output path {out} is a file, not a directory; choose another --output")
    return out


@contextlib.contextmanager
def atomic_output_dir(output: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir next to `output`; on success rename it into place, on failure remove it.

    A crash never leaves a half-written result at `output`, and an existing `output` is only replaced
    (after the new one is complete) when `overwrite` is set.
    """
    out = Path(output).expanduser().resolve()
    if out.exists() and not overwrite:
        raise SparsetuneError(f"output dir {out} already exists; pass --overwrite or choose another --output")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """write_json through a temp file and a rename: readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, obj)
    os.replace(tmp, path)


def package_versions() -> dict[str, str]:
    names = [
        "sparsetune",
        "torch",
        "transformers",
        "accelerate",
        "datasets",
        "safetensors",
        "peft",
        "lm_eval",
    ]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def peak_memory() -> dict[str, int]:
    """Peak host RSS and, on CUDA, peak allocated device memory."""
    import torch

    mem = {"peak_rss_bytes": peak_rss_bytes()}
    if torch.cuda.is_available():
        mem["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    return mem
