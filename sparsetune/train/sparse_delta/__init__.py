"""Sparse-delta fine-tuning (SEFT on SpIEL's machinery): a frozen pruned base plus a budget of trainable
(index, delta) entries per targeted Linear, moved by periodic drop/grow, with a sensitivity re-prune that keeps
the model's sparsity (and N:M pattern) exact.

Files: config (settings), budget (entries per module), delta_linear (the layer and its autograd function),
wrap (module surgery, merge), selection (schedule, window statistics, drop/grow), reprune, optimizer (AdamW over
entries), adapter (seft_adapter.safetensors), adapter_dir (telling an adapter dir, torch-free), stream_input (an
adapter dir streamed), streamed_base (the frozen base read block by block), method (the training method).

Importing this package registers `seft --no-merge` output dirs as an input format (`sparsetune.input_formats`):
any command loads one as its base with the adapter merged, or streams it. It stays light (no torch): the
`sparsetune` package imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsetune.input_formats import register_format
from sparsetune.train.sparse_delta.adapter_dir import is_adapter_dir


def _base_model(path: Path) -> str:
    from sparsetune.train.sparse_delta.adapter import base_model_of  # torch, as below

    return base_model_of(path)


def _apply(model: Any, path: Path) -> None:
    """Merge the adapter into its loaded base (whose identity it checks)."""
    from sparsetune.train.sparse_delta.adapter import apply_adapter

    apply_adapter(model, path)


def _stream_refusal(path: Path) -> str:
    from sparsetune.train.sparse_delta.adapter import read_adapter

    if read_adapter(path)[1].get("base_dtype") == "nf4":
        return "a seft adapter trained on an NF4 base is merged in memory, where bitsandbytes quantizes it"
    return ""


def _stream_files(path: Path, base_files: Any, verify: bool) -> Any:
    from sparsetune.train.sparse_delta.stream_input import AdapterFiles

    return AdapterFiles(path, base_files)


register_format(
    "adapter",
    "seft adapter dir",
    is_adapter_dir,
    _stream_files,
    base_model=_base_model,
    apply=_apply,
    stream_refusal=_stream_refusal,
)
