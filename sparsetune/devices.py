"""The device and dtype a run computes in, from the `--device` / `--dtype` flags.

Below loading, training and the multi-process helpers (`sparsetune.distributed`), which all resolve them.
"""

from __future__ import annotations

import torch

from sparsetune.errors import SparsetuneError

# The dtypes a model loads in and an export stores, by flag name.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparsetuneError(f"--device {device} asked for CUDA, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise SparsetuneError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from err


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """`auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU (half matmuls are slow there)."""
    if dtype == "auto":
        return None if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SparsetuneError(f"unknown --dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]
