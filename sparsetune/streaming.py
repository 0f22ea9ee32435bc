"""Weights streamed between disk and the compute device, one decoder block at a time.

A command that walks the model block by block (prune, perplexity, export, a frozen training base) never holds the
whole model: `StreamedModel` builds the causal LM's skeleton on the meta device (accelerate's `init_empty_weights`,
buffers such as rotary tables stay real), materialises one block's tensors from the checkpoint's safetensors
shards when its turn comes, and releases them afterwards. The embeddings, the final norm and the head are read once
each. `ShardWriter` writes an ordinary sharded HF dir, one shard per block plus one for everything else, each shard
written to a temp name and renamed, so a killed run leaves only whole shards behind.

Checkpoint keys reach the model through transformers' own conversion mapping (`convert_and_load_state_dict_in_model`
with the mapping `from_pretrained` uses: renamings, fused MoE experts), and written blocks go back through its
reverse (`revert_weight_conversion`, what `save_pretrained` does), so a streamed run reads and writes exactly the
tensors the in-memory path did.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import loading, structure
from sparsetune.errors import SparsetuneError
from sparsetune.gguf_convert import shard_name

log = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# safetensors header dtype names (the format's spec).
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _header(path: Path) -> tuple[dict[str, Any], int]:
    """(header as {name: {dtype, shape, data_offsets}} plus "__metadata__", offset of the data) of a safetensors
    file. huggingface_hub parses and validates the header; the data starts after it (8 bytes of length + header),
    an offset the hub's parser does not return."""
    from huggingface_hub import parse_local_safetensors_file_metadata

    parsed = parse_local_safetensors_file_metadata(path)
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
    header: dict[str, Any] = {
        name: {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
        for name, info in parsed.tensors.items()
    }
    header["__metadata__"] = parsed.metadata
    return header, 8 + size


class CheckpointFiles:
    """The tensors of a model dir's safetensors shards, read with plain `readinto` at the header's offsets.

    Not through `safetensors.safe_open`: it memory-maps the files, so a shard truncated while the run reads it
    kills the process with SIGBUS instead of raising, and every page read stays in the process's RSS while the
    file is open. Reading into a fresh tensor keeps a short read an error and the page cache out of RSS.
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        index = self.folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise SparsetuneError(f"{index} is unreadable ({err}); re-save the model (save_pretrained)") from err
            files = sorted({self.folder / name for name in weight_map.values()})
        elif (self.folder / SAFE_SINGLE).is_file():
            files = [self.folder / SAFE_SINGLE]
        else:
            raise SparsetuneError(
                f"{self.folder} holds no safetensors weights ({SAFE_SINGLE} or {SAFE_INDEX}); re-save the model "
                "with save_pretrained(safe_serialization=True)"
            )
        self.entries: dict[str, TensorEntry] = {}
        self.stats: dict[Path, tuple[int, int]] = {}
        self.metadata: dict[Path, dict[str, str]] = {}
        for path in files:
            try:
                st = path.stat()
                header, data_start = _header(path)
            except Exception as err:  # noqa: BLE001 - OSError, or the hub parser's SafetensorsParsingError
                raise SparsetuneError(
                    f"could not load model {self.folder}: shard {path.name} is unreadable ({loading.first_line(err)}); "
                    "check the files are complete (re-download or re-save the model)"
                ) from err
            self.stats[path] = (st.st_size, st.st_mtime_ns)
            self.metadata[path] = header.pop("__metadata__", None) or {}
            for key, info in header.items():
                start, end = (data_start + int(o) for o in info["data_offsets"])
                if end > st.st_size:
                    raise SparsetuneError(
                        f"shard {path} is truncated: tensor {key} ends at byte {end} of {st.st_size}; the checkpoint "
                        "is incomplete: re-download or re-save it"
                    )
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise SparsetuneError(
                        f"{path}: tensor {key} has dtype {info['dtype']}, which sparsetune cannot read"
                    )
                self.entries[key] = TensorEntry(path, dtype, tuple(int(s) for s in info["shape"]), start, end)

    def names(self) -> list[str]:
        return list(self.entries)

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        return sum(self.entries[k].nbytes for k in (self.entries if keys is None else keys))

    def _check_unchanged(self, path: Path) -> None:
        try:
            st = path.stat()
        except OSError as err:
            raise SparsetuneError(
                f"shard {path} disappeared while this run read it ({err}); restore it and rerun"
            ) from err
        if (st.st_size, st.st_mtime_ns) != self.stats[path]:
            raise SparsetuneError(
                f"shard {path} was changed while this run read it (size {self.stats[path][0]} -> {st.st_size} "
                "bytes); nothing was written: let whatever writes it finish, then rerun"
            )

    def read(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """The tensors `keys` as they are stored (dtype and shape of the file), each in its own CPU memory."""
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.entries[key].file, []).append(key)
        for path, names in by_file.items():
            self._check_unchanged(path)
            with open(path, "rb", buffering=0) as f:
                for key in sorted(names, key=lambda k: self.entries[k].start):
                    entry = self.entries[key]
                    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
                    f.seek(entry.start)
                    got = f.readinto(memoryview(buf.numpy())) if entry.nbytes else 0
                    while got < entry.nbytes:  # readinto may return short counts on large reads
                        more = f.readinto(memoryview(buf.numpy())[got:])
                        if not more:
                            raise SparsetuneError(
                                f"shard {path} was truncated while this run read it (tensor {key}: {got} of "
                                f"{entry.nbytes} bytes); nothing was written: restore the file and rerun"
                            )
                        got += more
                    out[key] = (
                        buf.view(entry.dtype).reshape(entry.shape)
                        if entry.nbytes
                        else torch.empty(entry.shape, dtype=entry.dtype)
                    )
            self._check_unchanged(path)
        return out

    def fingerprint(self) -> str:
        """A cheap identity of the checkpoint: every tensor's name, dtype and shape, each shard's size and its first
        and last 64 KiB (for resume checks; not a content hash of every byte)."""
        h = hashlib.sha256()
        for key in sorted(self.entries):
            e = self.entries[key]
            h.update(f"{key}:{e.dtype}:{e.shape}".encode())
        for path in sorted(self.stats):
            size = self.stats[path][0]
            h.update(str(size).encode())
            with open(path, "rb") as f:
                h.update(f.read(1 << 16))
                f.seek(max(0, size - (1 << 16)))
                h.update(f.read(1 << 16))
        return h.hexdigest()[:16]


def build_skeleton(config: Any, dtype: torch.dtype | None, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of `config` with every parameter on the meta device (buffers real), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    if dtype is None:  # as from_pretrained(dtype="auto"): the checkpoint's dtype
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_config on meta leaves a tied head untied; from_pretrained ties it
    return model.eval()


@contextlib.contextmanager
def _synchronous_loading() -> Iterator[None]:
    """transformers' loader copies tensors in a thread pool unless HF_DEACTIVATE_ASYNC_LOAD is set. Ours are already
    read, so the threads gain nothing, and the freed blocks they leave in their malloc arenas made a streamed run's
    RSS grow by about 60% of a block per block (40 blocks of a 1024-hidden Llama: 0.77 -> 1.37 GB; without the
    threads it stays at 0.71 GB)."""
    before = os.environ.get("HF_DEACTIVATE_ASYNC_LOAD")
    os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["HF_DEACTIVATE_ASYNC_LOAD"]
        else:
            os.environ["HF_DEACTIVATE_ASYNC_LOAD"] = before


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim). A block's tensors are freed at once
    when it is released, but glibc keeps freed heap memory for reuse, fragmented across arenas; over many blocks
    that showed as RSS creeping up by a fraction of a block per block. A no-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


class StreamedModel:
    """A causal LM whose weights stay in the checkpoint until a block needs them.

    `model` is the skeleton: run any code that needs only shapes on it. `load_block(i, device)` materialises block
    i, `release_block(i)` returns it to meta; `load_rest(device)` materialises everything outside the blocks but the
    output head (embeddings, final norm, ...) and `load_head(device)` the head. Before any work the checkpoint is
    checked against the skeleton: every tensor present with its shape, nothing unknown.
    """

    def __init__(
        self,
        location: str | os.PathLike[str],
        dtype: torch.dtype | None,
        trust_remote_code: bool = False,
        files: Any = None,
    ) -> None:
        """`location` holds config.json; the tensors come from `files` (default: `CheckpointFiles(location)`), any
        object with its interface: an exported dir's (`sparsetune.export.stream_input.ExportedFiles`, whose
        `decompressed` drops the config's quantization_config, as `load_exported` does) or a seft adapter's."""
        from transformers import AutoConfig
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.location = Path(location)
        self.files = CheckpointFiles(self.location) if files is None else files
        try:
            config = AutoConfig.from_pretrained(str(self.location), trust_remote_code=trust_remote_code)
        except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
            hint = "check config.json"
            if not trust_remote_code and loading.needs_remote_code(err):
                hint = loading.REMOTE_CODE_HINT
            raise SparsetuneError(f"could not load model {self.location}: {loading.first_line(err)}; {hint}") from err
        if getattr(self.files, "decompressed", False) and hasattr(config, "quantization_config"):
            del config.quantization_config  # the files decompress on read: transformers must not look for a quantizer
        self.model = build_skeleton(config, dtype, trust_remote_code)
        self.dtype = self.model.dtype
        self.decoder_path, self.layers = structure.find_decoder(self.model)
        self.mapping = get_model_conversion_mapping(self.model)
        meta_state = self.model.state_dict()
        renamings = [m for m in self.mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        prefix = self.model.base_model_prefix
        # checkpoint key -> the model's state-dict key it lands in (a fused expert: the fused parameter)
        self.lands_in = {
            key: rename_source_key(key, renamings, converters, prefix, meta_state)[0] for key in self.files.names()
        }
        self.block_keys: list[list[str]] = [[] for _ in self.layers]
        self.rest_keys: list[str] = []
        self.head_keys: list[str] = []
        head = self.model.get_output_embeddings()
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        head_params = {n for n, p in self.model.named_parameters(remove_duplicate=False) if id(p) in head_ids}
        block_prefix = self.decoder_path + "."
        for key, target in self.lands_in.items():
            if target.startswith(block_prefix):
                index = int(target[len(block_prefix) :].split(".", 1)[0])
                self.block_keys[index].append(key)
            elif target in head_params and not structure.embeddings_tied(self.model):
                self.head_keys.append(key)
            else:
                self.rest_keys.append(key)
        self._validate()

    # ----- checks before any work

    def _load_state(self, state: dict[str, torch.Tensor], device: torch.device | str) -> Any:
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        config = LoadStateDictConfig(device_map={"": str(device)}, dtype=self.dtype, weight_mapping=self.mapping)
        with _synchronous_loading():
            info, _ = convert_and_load_state_dict_in_model(self.model, state, config)
        return info

    def _validate(self) -> None:
        """Load the whole checkpoint as meta tensors of its header shapes: transformers' own loader then reports
        every missing, unexpected and mis-shaped tensor, at no cost, before a byte of weights is read."""
        tied = structure.embeddings_tied(self.model)
        state = {k: torch.empty(e.shape, dtype=e.dtype, device="meta") for k, e in self.files.entries.items()}
        info = self._load_state(state, "meta")
        if tied:
            self.model.tie_weights()
        missing = sorted(k for k in info.missing_keys if not (tied and self._is_head_key(k)))
        problems = []
        if info.mismatched_keys:
            name, got, want = sorted(info.mismatched_keys, key=str)[0]
            problems.append(f"{name} has shape {list(got)} in the checkpoint, the config needs {list(want)}")
        if missing:
            problems.append(f"{len(missing)} tensor(s) the config needs are missing ({', '.join(missing[:3])})")
        if getattr(info, "conversion_errors", None):
            problems.append(f"transformers could not convert {', '.join(sorted(info.conversion_errors)[:3])}")
        if problems:
            raise SparsetuneError(
                f"checkpoint {self.location} does not match its config.json: {'; '.join(problems)}; nothing was "
                "done: re-download or re-save the model"
            )
        if info.unexpected_keys:
            log.warning(
                "%s: %d checkpoint tensor(s) the model does not use are not carried into outputs (%s)",
                self.location,
                len(info.unexpected_keys),
                ", ".join(sorted(info.unexpected_keys)[:3]),
            )
            unused = set(info.unexpected_keys)
            self.rest_keys = [k for k in self.rest_keys if self.lands_in[k] not in unused and k not in unused]

    def _is_head_key(self, key: str) -> bool:
        head = self.model.get_output_embeddings()
        return head is not None and key.startswith(self._module_name(head) + ".")

    def _module_name(self, module: nn.Module) -> str:
        return next(n for n, m in self.model.named_modules() if m is module)

    # ----- materialise and release

    def _load_keys(self, keys: list[str], device: torch.device | str) -> None:
        if not keys:
            return
        info = self._load_state(self.files.read(keys), device)
        if info.mismatched_keys:  # the validation saw the same headers, so only a changed file gets here
            raise SparsetuneError(f"checkpoint {self.location} changed while this run read it; rerun")

    def load_block(self, index: int, device: torch.device | str = "cpu") -> nn.Module:
        self._load_keys(self.block_keys[index], device)
        return self.layers[index]

    def release_block(self, index: int) -> None:
        release(self.layers[index])
        trim_heap()

    def load_rest(self, device: torch.device | str = "cpu") -> None:
        """Everything outside the decoder blocks except a separate output head: embeddings, final norm, ..."""
        self._load_keys(self.rest_keys, device)
        if structure.embeddings_tied(self.model) or not self.head_keys:
            self.model.tie_weights()

    def load_head(self, device: torch.device | str = "cpu") -> None:
        """The output head, once: a head already in memory (pruned, or tied to the embeddings) is kept."""
        head = self.model.get_output_embeddings()
        if head is not None and all(p.device.type != "meta" for p in head.parameters()):
            return
        self._load_keys(self.head_keys, device)

    def release_rest(self) -> None:
        layers = set(map(id, self.layers.modules()))
        for module in self.model.modules():
            if id(module) not in layers:
                release(module, recurse=False)

    # ----- writing in the checkpoint's layout

    def checkpoint_state(self, module: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
        """`module`'s tensors as the checkpoint stores them (keys and layout of save_pretrained)."""
        from transformers.core_model_loading import revert_weight_conversion

        state = {f"{prefix}.{k}" if prefix else k: v for k, v in module.state_dict().items()}
        return dict(revert_weight_conversion(self.model, state))

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        return self.checkpoint_state(self.layers[index], f"{self.decoder_path}.{index}")

    def rest_state(self, part: str = "all") -> dict[str, torch.Tensor]:
        """Everything outside the blocks, tied duplicates dropped as save_pretrained drops them. `part`: "all",
        "body" (all but a separate output head) or "head" (the separate head alone; nothing when tied)."""
        from transformers.core_model_loading import revert_weight_conversion

        block_prefix = self.decoder_path + "."
        head = self._module_name(self.model.get_output_embeddings()) + "."
        tied = structure.embeddings_tied(self.model)
        state = {}
        for key, value in self.model.state_dict().items():
            in_head = key.startswith(head)
            if key.startswith(block_prefix) or (in_head and tied):
                continue
            if part == "all" or (part == "head") == in_head:
                state[key] = value
        return dict(revert_weight_conversion(self.model, state)) if state else {}

    def release_input_embeddings(self) -> None:
        """Free the embedding table (once the calibration inputs are captured and it is written); a head tied to
        it is freed with it."""
        head = self.model.get_output_embeddings()
        if head is not None and structure.embeddings_tied(self.model):
            release(head)  # the same tensor: keep nothing alive through the head
        release(self.model.get_input_embeddings())
        trim_heap()

    def output_nbytes(self) -> int:
        """Bytes of the model's tensors in its compute dtype (what an output dir of it takes)."""
        total = 0
        for e in self.files.entries.values():
            size = torch.finfo(self.dtype).bits // 8 if e.dtype.is_floating_point else e.dtype.itemsize
            total += size * max(1, int(torch.tensor(e.shape).prod()) if e.shape else 1)
        return total


def release(module: nn.Module, recurse: bool = True) -> None:
    """Return a module's parameters and persistent buffers to the meta device (shapes and dtypes kept)."""
    for m in module.modules() if recurse else [module]:
        for name, p in list(m._parameters.items()):
            if p is not None and p.device.type != "meta":
                m._parameters[name] = nn.Parameter(_meta(p), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None and name not in m._non_persistent_buffers_set and b.device.type != "meta":
                m._buffers[name] = _meta(b)


# ----- writing: one shard per block, plus one for everything else --------------------------------------------------

# A shard is written from the tensors' own memory: safetensors' save_file first copies every tensor into Python
# bytes (and the serializer builds the file in memory), which doubled and tripled a block's bytes at its write.
# The header and the tensors' order are exactly save_file's (tests/export/test_streaming.py compares the files).
_DTYPE_NAMES = {  # torch dtype -> safetensors header name
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A CPU tensor's bytes (no copy when it is contiguous)."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def storage_order(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[str]:
    """The order safetensors stores `entries` in (larger dtypes first, then by name), asked of safetensors itself
    with empty tensors of the same names and dtypes, so the files equal `save_file`'s."""
    from safetensors.torch import save

    raw = save({k: torch.empty(0, dtype=dtype) for k, (dtype, _) in entries.items()})
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    header.pop("__metadata__", None)
    return list(header)


def safetensors_header(entries: dict[str, tuple[torch.dtype, tuple[int, ...]]], order: list[str]) -> bytes:
    """The header bytes `save_file(..., metadata={"format": "pt"})` writes for tensors stored in `order`."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in order:
        dtype, shape = entries[key]
        nbytes = dtype.itemsize * _numel(shape)
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _no_space(err: BaseException) -> bool:
    text = str(err)
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "code: 28" in text


def human_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def disk_full_error(path: Path, err: BaseException, need: int | None = None) -> SparsetuneError:
    import shutil

    free = shutil.disk_usage(path.parent if path.parent.exists() else path).free
    needs = f", the output needs about {human_bytes(need)}" if need else ""
    return SparsetuneError(
        f"disk full writing {path} ({human_bytes(free)} free{needs}); nothing was kept: free space or choose an "
        "-o on a larger disk"
    )


class ShardWriter:
    """Writes an HF sharded safetensors dir shard by shard, then its index (built from the shards' headers, so a
    resumed run that finds earlier shards on disk indexes them too)."""

    def __init__(self, folder: str | os.PathLike[str], n_shards: int) -> None:
        self.folder, self.n_shards = Path(folder), n_shards
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, k: int) -> Path:
        return self.folder / shard_name(k, self.n_shards)

    def done(self, k: int) -> bool:
        return self.path(k).is_file()

    def write(self, k: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Write shard k (1-based) atomically: a temp name, then a rename."""
        path = self.path(k)
        tmp = path.with_name(f".{path.name}.tmp")
        data = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
        entries = {name: (t.dtype, tuple(t.shape)) for name, t in data.items()}
        order = storage_order(entries)
        try:
            with open(tmp, "wb") as f:
                f.write(safetensors_header(entries, order))
                for name in order:
                    f.write(raw_bytes(data[name]))
            os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - safetensors wraps I/O errors in its own type
            tmp.unlink(missing_ok=True)
            if _no_space(err):
                raise disk_full_error(path, err) from err
            raise
        return path

    def write_index(self) -> Path:
        weight_map: dict[str, str] = {}
        total = 0
        for k in range(1, self.n_shards + 1):
            path = self.path(k)
            header, _ = _header(path)
            header.pop("__metadata__", None)
            for key, info in header.items():
                weight_map[key] = path.name
                start, end = info["data_offsets"]
                total += int(end) - int(start)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        out = self.folder / SAFE_INDEX
        out.write_text(json.dumps(index, indent=2) + "\n")
        return out


def generation_config_of(model: nn.Module, location: Path) -> Any:
    """The generation config from_pretrained gives a model of `location`: its generation_config.json, else one
    built from its config.json (not the skeleton's own, which also copies the config's output_* flags)."""
    if not model.can_generate():
        return None
    from transformers import GenerationConfig

    if (location / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(location))
    return GenerationConfig.from_pretrained(str(location), config_file_name="config.json", _from_model_config=True)


def save_config_files(model: nn.Module, tokenizer: Any, location: Path, out_dir: Path) -> None:
    """What save_pretrained writes besides the weights (config.json, generation_config.json), the tokenizer, and
    no `auto_map` entry whose code is not in the output."""
    model.config.save_pretrained(str(out_dir))
    generation = generation_config_of(model, location)
    if generation is not None:
        generation.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    loading.drop_dangling_auto_map(out_dir)
