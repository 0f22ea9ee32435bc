"""The settings of one export: the schema behind `sparsetune export` flags and recipe `export` stages."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from sparsetune.patterns import check_regexes
from sparsetune.settings import RemoteCodeSettings

ExportFormat = Literal["sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4", "dense"]


class ExportConfig(RemoteCodeSettings):
    model: str = Field(description="Model to export: a pruned HF dir (or any model spec sparsetune loads)")
    output: str | None = Field(None, description="Output dir for the exported model")
    format: ExportFormat = Field(
        "sparse-bitmask",
        description="sparse-bitmask (any sparsity), sparse-24-bitmask (exact 2:4), "
        "semi-structured-2:4 (PyTorch CUTLASS packed values + metadata) or dense (plain HF save)",
    )
    ignore: list[str] = Field(default_factory=list, description="Regexes of Linear names to keep dense")
    max_density: float = Field(
        0.9, gt=0, le=1, description="Linears denser than this stay dense (they would not get smaller)"
    )
    force_24: bool = Field(
        False, description="For 2:4 formats: re-prune non-2:4 Linears by magnitude in each group of 4 (lossy)"
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard, e.g. 500MB or 2GB")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Stored dtype; auto keeps the checkpoint's dtype"
    )

    @field_validator("ignore")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        return check_regexes(value, "ignore pattern")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, value: str) -> str:
        shard_size_bytes(value)
        return value


def shard_size_bytes(text: str | int) -> int:
    """ "500MB" / "2GB" / "1GiB" / an int -> bytes (decimal units like transformers; KiB/MiB/GiB binary)."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(text), flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size {text!r} is not a size; write it like 500MB or 2GB")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    scale.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
    size = int(number * scale[unit])
    if size <= 0:
        raise ValueError(f"max_shard_size {text!r} must be positive")
    return size
