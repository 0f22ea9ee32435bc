"""`sparsetune export` from a checkpoint on disk to an export dir on disk, one decoder block at a time.

The model is never materialised: `StreamedModel` gives the skeleton (module types and shapes, on the meta device),
from which the checkpoint-layout keys, their order and dtypes and the compressible weights are known before a byte
is read. The checkpoint's tensors are then read group by group (each decoder block's, then what lies outside the
blocks, in the order `save_pretrained` writes them), cast to the export dtype, checked, encoded and appended to the
output shard being built. A shard is written when the next module no longer fits under `--max-shard-size`, exactly
as the in-memory writer splits them, so the files are byte-identical to its own.

A shard's header comes first in its file and names every tensor's size, which for `sparse-bitmask` depends on the
values. `ShardBuilder` therefore keeps a shard's encoded tensors in memory up to `SPILL_BYTES` and moves them to a
spill file next to the output beyond that; `write` then writes the header and copies the data in safetensors'
order, hashing it on the way (the sha256 of `sparsetune_config.json` costs no second read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsetune.errors import SparsetuneError
from sparsetune.export.formats import SAFE_INDEX, SAFE_WEIGHTS
from sparsetune.outputs import write_json
from sparsetune.streaming import (
    CheckpointFiles,
    StreamedModel,
    disk_full_error,
    raw_bytes,
    safetensors_header,
    storage_order,
    trim_heap,
)

log = logging.getLogger(__name__)

# Encoded tensors of the shard being built stay in memory up to this many bytes, then go to a spill file.
SPILL_BYTES = 256 << 20
COPY_CHUNK = 16 << 20


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    tensor: torch.Tensor | None = None
    spill_offset: int = -1


@dataclass
class ShardBuilder:
    """One output shard's tensors, in memory or in a spill file, until `write` puts them in a safetensors file."""

    folder: Path
    index: int
    entries: dict[str, _Entry] = field(default_factory=dict)
    in_memory: int = 0
    spilled: int = 0

    @property
    def spill_path(self) -> Path:
        return self.folder / f".shard-{self.index:05d}.spill"

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            t = tensor.detach().contiguous()
            self.entries[key] = _Entry(t.dtype, tuple(t.shape), t.numel() * t.element_size(), tensor=t)
            self.in_memory += self.entries[key].nbytes
        if self.in_memory > SPILL_BYTES:
            self._spill()

    def _spill(self) -> None:
        with open(self.spill_path, "ab") as f:
            for entry in self.entries.values():
                if entry.tensor is None:
                    continue
                entry.spill_offset = self.spilled
                f.write(raw_bytes(entry.tensor))
                self.spilled += entry.nbytes
                entry.tensor = None
        self.in_memory = 0

    def write(self, path: Path) -> tuple[int, str]:
        """Write the shard to `path`; return (bytes, sha256) of the file."""
        shapes = {k: (e.dtype, e.shape) for k, e in self.entries.items()}
        order = storage_order(shapes)
        header = safetensors_header(shapes, order)
        digest = hashlib.sha256(header)
        size = len(header)
        spill = open(self.spill_path, "rb") if self.spilled else None  # noqa: SIM115 - closed below
        try:
            with open(path, "wb") as f:
                f.write(header)
                buf = bytearray(COPY_CHUNK)
                for key in order:
                    entry = self.entries[key]
                    if entry.tensor is not None:
                        data = raw_bytes(entry.tensor)
                        f.write(data)
                        digest.update(data)
                    else:
                        assert spill is not None
                        spill.seek(entry.spill_offset)
                        left = entry.nbytes
                        while left:
                            view = memoryview(buf)[: min(left, COPY_CHUNK)]
                            got = spill.readinto(view)
                            if not got:
                                raise OSError(errno.EIO, f"spill file {self.spill_path} ended early")
                            f.write(view[:got])
                            digest.update(view[:got])
                            left -= got
                    size += entry.nbytes
        finally:
            if spill is not None:
                spill.close()
            self.spill_path.unlink(missing_ok=True)
        self.entries = {}
        return size, digest.hexdigest()


class ShardSequence:
    """Output shards filled in order up to `max_bytes` (a module's parts stay together), as `write_shards` does:
    named once their count is known (`model.safetensors` when there is one), with an index when there are more."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.current = ShardBuilder(folder, 1)
        self.size = 0
        self.done: list[tuple[Path, list[str], int, str]] = []  # (temp path, keys in order, bytes, sha256)
        self.total = 0

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.current.entries and self.size + nbytes > self.max_bytes:
            self._close()
        self.current.add(tensors)
        self.size += nbytes
        self.total += nbytes

    def _close(self) -> None:
        keys = list(self.current.entries)
        tmp = self.folder / f".shard-{self.current.index:05d}.safetensors.tmp"
        size, sha = self.current.write(tmp)
        self.done.append((tmp, keys, size, sha))
        self.current = ShardBuilder(self.folder, self.current.index + 1)
        self.size = 0

    def finish(self) -> dict[str, dict[str, Any]]:
        """Write the last shard, name them all, write the index; {file name: {"bytes", "sha256"}}."""
        self._close()
        n = len(self.done)
        names = [SAFE_WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        files = {}
        for name, (tmp, _, size, sha) in zip(names, self.done, strict=True):
            os.replace(tmp, self.folder / name)
            files[name] = {"bytes": size, "sha256": sha}
        if n > 1:
            weight_map = {k: name for name, (_, keys, _, _) in zip(names, self.done, strict=True) for k in keys}
            write_json(self.folder / SAFE_INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return files


def module_groups(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """`tensors` split by module (the key up to its last dot), in first-appearance order, as write_shards groups."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        groups.setdefault(key.rsplit(".", 1)[0], {})[key] = tensor
    return list(groups.values())


# ----- the checkpoint, walked in save_pretrained's order ---------------------------------------------------------


@dataclass
class Segment:
    """Consecutive output keys read together: one decoder block's (block >= 0) or a run of keys outside them."""

    block: int
    keys: list[str]


class StreamedCheckpoint:
    """The output keys of a checkpoint in the layout and order the in-memory writer's `saved_state_dict` gives,
    with their export dtypes, readable segment by segment."""

    def __init__(self, streamed: StreamedModel) -> None:
        from transformers.core_model_loading import revert_weight_conversion

        self.streamed = streamed
        self.files: CheckpointFiles = streamed.files
        model = streamed.model
        seen: set[int] = set()
        state: dict[str, torch.Tensor] = {}
        for key, tensor in model.state_dict(keep_vars=True).items():  # tied tensors once, as saved_state_dict
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            state[key] = tensor.detach()
        reverted = dict(revert_weight_conversion(model, dict(state)))
        self.state = state if reverted.keys() == state.keys() else reverted  # meta tensors: shapes and dtypes
        # Read straight from the files when the checkpoint stores exactly these keys and shapes (what
        # save_pretrained writes); else each block goes through transformers' conversion and back.
        self.direct = all(
            (k in self.files.entries and self.files.entries[k].shape == tuple(t.shape)) or t.device.type != "meta"
            for k, t in self.state.items()
        )
        prefix = streamed.decoder_path + "."
        self.segments: list[Segment] = []
        for key in self.state:
            target = streamed.lands_in.get(key, key)
            block = int(target[len(prefix) :].split(".", 1)[0]) if target.startswith(prefix) else -1
            if self.segments and self.segments[-1].block == block:
                self.segments[-1].keys.append(key)
            else:
                self.segments.append(Segment(block, [key]))
        if not self.direct:
            log.info("%s: keys differ from save_pretrained's layout; blocks are converted as read", streamed.location)

    def nbytes(self, keys: list[str]) -> int:
        return sum(self.state[k].numel() * self.state[k].element_size() for k in keys)

    def read(self, segment: Segment) -> dict[str, torch.Tensor]:
        """The segment's tensors in the export dtype (cast as from_pretrained casts), in output order."""
        trim_heap()  # the previous segment's tensors are freed by now: give their pages back (streaming.trim_heap)
        if not self.direct:
            return self._read_converted(segment)
        # from the files; a buffer the checkpoint does not store is the skeleton's own (built as from_pretrained does)
        got = self.files.read([k for k in segment.keys if k in self.files.entries])
        out = {}
        for key in segment.keys:
            meta = self.state[key]
            tensor = got.pop(key) if key in got else meta
            out[key] = tensor if tensor.dtype == meta.dtype else tensor.to(meta.dtype)
        return out

    def _read_converted(self, segment: Segment) -> dict[str, torch.Tensor]:
        streamed = self.streamed
        if segment.block >= 0:
            streamed.load_block(segment.block)
            state = streamed.block_state(segment.block)
            streamed.release_block(segment.block)
        else:
            streamed.load_rest()
            streamed.load_head()
            state = streamed.rest_state()
            streamed.release_rest()
        return {k: state[k].detach().cpu().contiguous() for k in segment.keys}


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def is_disk_full(err: BaseException) -> bool:
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(err)


def elapsed(t0: float) -> float:
    return round(time.perf_counter() - t0, 3)


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse before any work when `folder`'s disk has less than `need` bytes free."""
    free = free_bytes(folder)
    if free < need:
        raise SparsetuneError(
            f"not enough disk space for {what}: about {need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free at "
            f"{folder}; nothing was written: free space or choose an -o on a larger disk"
        )


def raise_disk_full(path: Path, err: BaseException, need: int | None) -> None:
    if is_disk_full(err):
        raise disk_full_error(path, err, need) from err


# ----- --format dense: the files save_pretrained writes ---------------------------------------------------------


def save_pretrained_split(model: Any, max_shard_size: str | int) -> Any:
    """How `save_pretrained(max_shard_size=...)` splits `model` into shards (huggingface_hub's
    split_torch_state_dict_into_shards over the state dict it saves), computed on the skeleton; None where that
    cannot be told without the weights: tensors save_pretrained shares storage between (a weight conversion's
    views, e.g. fused experts split back per expert), keys it skips, or code shipped with the model."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    if model._keys_to_ignore_on_save or model.is_remote_code():
        return None
    state = remove_tied_weights_from_state_dict(model.state_dict(), model)
    reverted = dict(revert_weight_conversion(model, dict(state)))
    if set(reverted) != set(state):  # converted: its per-expert views share the fused storage when real
        return None
    return split_torch_state_dict_into_shards(
        reverted, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )


class PlannedShards:
    """Output shards whose contents are known up front (`split.filename_to_tensors`): each is written as soon as
    its last tensor arrives, then the index save_pretrained writes when there are several."""

    def __init__(self, folder: Path, split: Any, total_parameters: int) -> None:
        self.folder, self.split, self.total_parameters = folder, split, total_parameters
        self.missing = {name: set(keys) for name, keys in split.filename_to_tensors.items()}
        self.builders = {name: ShardBuilder(folder, i + 1) for i, name in enumerate(split.filename_to_tensors)}
        self.files: dict[str, dict[str, Any]] = {}

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        for key, tensor in tensors.items():
            name = self.split.tensor_to_filename[key]
            self.builders[name].add({key: tensor})
            self.missing[name].discard(key)
            if not self.missing[name]:
                self._write(name)

    def _write(self, name: str) -> None:
        builder = self.builders.pop(name)
        # save_pretrained writes a shard's tensors in the split's order; the file's layout depends only on the set
        builder.entries = {k: builder.entries[k] for k in self.split.filename_to_tensors[name]}
        size, sha = builder.write(self.folder / name)
        self.files[name] = {"bytes": size, "sha256": sha}

    def finish(self) -> dict[str, dict[str, Any]]:
        if self.builders:
            raise SparsetuneError(f"internal: shards {sorted(self.builders)} never received all their tensors")
        if self.split.is_sharded:
            index = {
                "metadata": {"total_parameters": self.total_parameters, **self.split.metadata},
                "weight_map": self.split.tensor_to_filename,
            }
            (self.folder / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return {name: self.files[name] for name in self.split.filename_to_tensors}
