"""Which local inputs stream block by block, and the files each one's tensors are read through.

- a plain HF dir with safetensors: its shards (`streaming.CheckpointFiles`);
- an exported compressed dir: its dense tensors, decompressed on read (`export.stream_input.ExportedFiles`);
- a `seft --no-merge` adapter dir whose base streams: the base's tensors, the trained Linears merged on read
  (`train.sparse_delta.stream_input.AdapterFiles`); but not one trained on an NF4 base, which bitsandbytes
  quantizes on the compute device of the whole-model load.

Each reads exactly the tensors the whole-model load (`models.load_model`) builds, so streamed runs equal it bit for
bit. `stream_input(path)` says whether and how a dir streams; `open_streamed` builds its `StreamedModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetune import models
from sparsetune.streaming import CheckpointFiles, StreamedModel


@dataclass(frozen=True)
class StreamInput:
    location: Path  # the dir as given
    model_dir: Path  # where config.json, the tokenizer and generation_config.json are (an adapter: its base's)
    kind: str  # "checkpoint", "exported" or "adapter"
    base: StreamInput | None = None  # an adapter's base


def local_dir(spec: str) -> tuple[Path | None, str]:
    """(the local dir a model spec streams from, "") or (None, why it does not): a dir, the bundled alias's dir or
    a hub id's complete local snapshot."""
    kind, location = models.resolve_model_path(spec)
    if kind == "bundled":
        return models.bundled_model_dir(), ""
    if kind == "hub":
        snapshot = models.hub_snapshot(location)
        return (snapshot, "") if snapshot is not None else (None, "the hub id has no complete local snapshot")
    if kind == "gguf":
        return None, "a .gguf file is dequantized by transformers as a whole"
    return Path(location), ""


def stream_input(path: Path) -> tuple[StreamInput | None, str]:
    """(how the local dir `path` streams, "") or (None, why it loads whole)."""
    base_spec = models.seft_adapter_base(path)
    if base_spec is not None:
        from sparsetune.train.sparse_delta.adapter import read_adapter

        if read_adapter(path)[1].get("base_dtype") == "nf4":
            return None, "a seft adapter trained on an NF4 base is merged in memory, where bitsandbytes quantizes it"
        base_dir, why = local_dir(base_spec)
        base = None
        if base_dir is not None:
            base, why = stream_input(base_dir)
        if base is None:
            return None, f"the base {base_spec} of the seft adapter dir does not stream ({why})"
        return StreamInput(path, base.model_dir, "adapter", base), ""
    if models.is_exported_dir(path):
        return StreamInput(path, path, "exported"), ""
    if not models.has_safetensors(path):
        return None, f"{path} holds no safetensors weights (only .bin files are read whole)"
    return StreamInput(path, path, "checkpoint"), ""


def open_files(source: StreamInput, verify: bool = True) -> Any:
    """The files object of `source` (see the module doc); `verify=False` skips an export's sha256 check."""
    if source.kind == "exported":
        from sparsetune.export.stream_input import ExportedFiles

        return ExportedFiles(source.location, verify=verify)
    if source.kind == "adapter":
        from sparsetune.train.sparse_delta.stream_input import AdapterFiles

        assert source.base is not None
        return AdapterFiles(source.location, open_files(source.base, verify))
    return CheckpointFiles(source.location)


def _stored_dtype(files: Any) -> torch.dtype | None:
    """The dtype the whole-model load of an export picks when none is asked for (None: the config's, as usual)."""
    inner = files
    while hasattr(inner, "base"):
        inner = inner.base
    return inner.stored_dtype() if hasattr(inner, "stored_dtype") else None


def open_streamed(source: StreamInput, dtype: torch.dtype | None, trust_remote_code: bool = False) -> StreamedModel:
    """The `StreamedModel` of `source`: its skeleton from `model_dir`, its tensors from `open_files`."""
    files = open_files(source)
    if dtype is None:
        dtype = _stored_dtype(files)
    streamed = StreamedModel(source.model_dir, dtype, trust_remote_code, files=files)
    if hasattr(files, "bind"):
        files.bind(streamed)
    return streamed
