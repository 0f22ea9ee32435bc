"""Resolving the --device and --dtype flags."""

from __future__ import annotations

import pytest

from sparsetune import devices
from sparsetune.errors import SparsetuneError


def test_dtype_and_device_flags():
    import torch

    assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert devices.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(SparsetuneError, match="--dtype"):
        devices.resolve_dtype("fp8", torch.device("cpu"))
    with pytest.raises(SparsetuneError, match="--device"):
        devices.resolve_device("tpu")
