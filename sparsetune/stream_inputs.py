"""Which local inputs stream block by block, and the files each one's tensors are read through.

- a plain HF dir with safetensors: its shards (`streaming.CheckpointFiles`);
- a dir of a registered input format (`sparsetune.input_formats`), through the files its format gives:
  - an exported compressed dir: its dense tensors, decompressed on read (`export.stream_input.ExportedFiles`);
  - a `seft --no-merge` adapter dir whose base streams: the base's tensors, the trained Linears merged on read
    (`train.sparse_delta.stream_input.AdapterFiles`); but not one trained on an NF4 base, which bitsandbytes
    quantizes on the compute device of the whole-model load.

Each reads exactly the tensors the whole-model load (`loading.load_model`) builds, so streamed runs equal it bit for
bit. `stream_input(path)` says whether and how a dir streams; `open_streamed` builds its `StreamedModel`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparsetune import loading
from sparsetune.input_formats import detect_format, format_named
from sparsetune.streaming import CheckpointFiles, StreamedModel


@dataclass(frozen=True)
class StreamInput:
    location: Path  # the dir as given
    model_dir: Path  # where config.json, the tokenizer and generation_config.json are (an adapter: its base's)
    kind: str  # "checkpoint", or the name of its input format ("exported", "adapter")
    base: StreamInput | None = None  # an adapter's base


def local_dir(spec: str) -> tuple[Path | None, str]:
    """(the local dir a model spec streams from, "") or (None, why it does not): a dir, the bundled alias's dir or
    a hub id's complete local snapshot."""
    kind, location = loading.resolve_model_path(spec)
    if kind == "bundled":
        return loading.bundled_model_dir(), ""
    if kind == "hub":
        snapshot = loading.hub_snapshot(location)
        return (snapshot, "") if snapshot is not None else (None, "the hub id has no complete local snapshot")
    if kind == "gguf":
        return None, "a .gguf file is dequantized by transformers as a whole"
    return Path(location), ""


def stream_input(path: Path) -> tuple[StreamInput | None, str]:
    """(how the local dir `path` streams, "") or (None, why it loads whole)."""
    fmt = detect_format(path)
    if fmt is not None and fmt.base_model is not None:  # it stands on a base model: it streams when the base does
        base_spec = fmt.base_model(path)
        refusal = fmt.stream_refusal(path) if fmt.stream_refusal is not None else ""
        if refusal:
            return None, refusal
        base_dir, why = local_dir(base_spec)
        base = None
        if base_dir is not None:
            base, why = stream_input(base_dir)
        if base is None:
            return None, f"the base {base_spec} of the {fmt.label} does not stream ({why})"
        return StreamInput(path, base.model_dir, fmt.name, base), ""
    if fmt is not None:
        return StreamInput(path, path, fmt.name), ""
    if not loading.has_safetensors(path):
        return None, f"{path} holds no safetensors weights (only .bin files are read whole)"
    return StreamInput(path, path, "checkpoint"), ""


def open_files(source: StreamInput, verify: bool = True) -> Any:
    """The files object of `source` (see the module doc); `verify=False` skips an export's sha256 check."""
    if source.kind == "checkpoint":
        return CheckpointFiles(source.location)
    fmt = format_named(source.kind)
    base_files = open_files(source.base, verify) if source.base is not None else None
    return fmt.stream_files(source.location, base_files, verify)


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
