"""Loading exported checkpoints back as ordinary (decompressed) transformers models.

Reads sparsetune exports and checkpoints written by compressed-tensors 0.14 (sparse-bitmask, sparse-24-bitmask).
Every file is checked before any weight is used: its sha256 when sparsetune wrote it, the safetensors header,
and each compressed tensor's shape, dtype and internal consistency. Any failure is a SparsetuneError.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as safetensors_load_file
from torch import nn

from sparsetune.devices import DTYPES
from sparsetune.errors import SparsetuneError
from sparsetune.export.codecs import CODECS, TWO_FOUR, CorruptTensorError, nm_group_violations
from sparsetune.export.formats import SAFE_INDEX, SAFE_WEIGHTS, SPARSETUNE_CONFIG, file_sha256, read_export_format
from sparsetune.export.formats import read_json as _read_json

log = logging.getLogger(__name__)


def shard_files(path: Path) -> list[str]:
    """The safetensors files of a checkpoint dir: the index's files, or the single model.safetensors."""
    index = path / SAFE_INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise SparsetuneError(f"{index} is not a valid safetensors index; re-export the model") from err
        return sorted(set(weight_map.values()))
    if (path / SAFE_WEIGHTS).exists():
        return [SAFE_WEIGHTS]
    raise SparsetuneError(f"{path} has no {SAFE_WEIGHTS} or {SAFE_INDEX}; re-export the model")


def integrity_record(path: Path) -> dict[str, Any] | None:
    """The per-file size and sha256 that `sparsetune export` records in sparsetune_config.json, or None (with one
    warning) when the dir has none: then only the layout checks run, and a bitmask edited so that its counts still
    line up (a popcount-preserving change) would load as different weights without any error."""
    meta_file = path / SPARSETUNE_CONFIG
    meta = _read_json(meta_file) if meta_file.is_file() else {}
    files = meta.get("files")
    if files is None:
        log.warning(
            "%s has no sha256 record (the `files` entry of %s), so its weight files cannot be checked for "
            "corruption or tampering; re-export it with `sparsetune export` to get one",
            path,
            SPARSETUNE_CONFIG,
        )
        return None
    valid = isinstance(files, dict) and all(
        isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
        for v in files.values()
    )
    if not valid:
        raise SparsetuneError(
            f"{meta_file}: `files` must map each weight file to its bytes and sha256; re-export the model"
        )
    return files


def verify_files(path: Path, digests: dict[str, Any] | None, sha256: Callable[[Path], str] = file_sha256) -> list[str]:
    """The weight files of a checkpoint dir (`shard_files`), each present and, when `digests` are given, of its
    recorded size and sha256 (`sha256` hashes one file)."""
    files = shard_files(path)
    if digests is not None and sorted(digests) != files:
        raise SparsetuneError(
            f"{path} holds weight files {files} but {SPARSETUNE_CONFIG} lists {sorted(digests)}; re-export the model"
        )
    for name in files:
        file = path / name
        if not file.exists():
            raise SparsetuneError(f"weight file {file} is missing; re-export the model")
        if digests is not None:
            expected = digests[name]
            size = file.stat().st_size
            if size != expected["bytes"]:
                raise SparsetuneError(
                    f"{file} is truncated or corrupted ({size} bytes, expected {expected['bytes']}); "
                    "re-export or re-copy it"
                )
            if sha256(file) != expected["sha256"]:
                raise SparsetuneError(f"{file} is corrupted (sha256 mismatch); re-export or re-copy it")
    return files


def read_tensors(path: Path, digests: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint dir, each file verified against its recorded size and sha256 when given.

    The files are memory-mapped (as transformers' own loading does): the digest is computed straight from the
    mapping and the tensors are views into it, so nothing is copied before decompression.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name in verify_files(path, digests):
        file = path / name
        try:
            part = safetensors_load_file(str(file))
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise SparsetuneError(f"{file} is truncated or corrupted ({err}); re-export or re-copy it") from err
        overlap = part.keys() & tensors.keys()
        if overlap:
            raise SparsetuneError(f"{file} repeats tensor {sorted(overlap)[0]}; re-export the model")
        tensors.update(part)
    return tensors


def compressed_modules(
    names: Iterable[str], fmt: str, keys: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """(the tensor names that pass through, {compressed module: its dense key}) of a checkpoint in `fmt`: a module's
    parts are `<module>.<part>` for the format's parts; its dense key is `<module>.weight` unless `keys` (from
    sparsetune_config.json) names another. A module missing a part, or stored both dense and compressed, is an
    error."""
    keys = keys or {}
    params = CODECS[fmt][0]
    by_module: dict[str, set[str]] = {}
    plain: list[str] = []
    for key in names:
        module, _, part = key.rpartition(".")
        if part in params and module:
            by_module.setdefault(module, set()).add(part)
        else:
            plain.append(key)
    taken = set(plain)
    modules: dict[str, str] = {}
    for module, parts in by_module.items():
        missing = [p for p in params if p not in parts]
        if missing:
            raise SparsetuneError(f"{module} lacks {module}.{missing[0]} in its {fmt} tensors; re-export the model")
        dense_key = keys.get(module, f"{module}.weight")
        if dense_key in taken:
            raise SparsetuneError(f"{module} is stored both dense and compressed; re-export the model")
        taken.add(dense_key)
        modules[module] = dense_key
    return plain, modules


def module_keys(path: Path) -> dict[str, str]:
    """The dense key of every compressed module that sparsetune_config.json names one for (fused 3-D experts)."""
    meta_file = path / SPARSETUNE_CONFIG
    meta = _read_json(meta_file) if meta_file.is_file() else {}
    modules = meta.get("modules") if isinstance(meta.get("modules"), dict) else {}
    return {n: str(m["key"]) for n, m in modules.items() if isinstance(m, dict) and isinstance(m.get("key"), str)}


def decompress_state(
    tensors: dict[str, torch.Tensor], fmt: str, keys: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Replace every compressed module's parts by its dense `<m>.weight` (or the dense key `keys` names, for a
    fused 3-D expert parameter); other tensors pass through.

    A fused 3-D expert parameter [E, R, C] (its dense key, from sparsetune_config.json, is not `<m>.weight`) is
    stored as one [E * R, C] matrix whose `shape` holds the three dims: it is decompressed as that matrix and
    given its expert axis back.
    """
    params, _, decompress = CODECS[fmt]
    plain, modules = compressed_modules(tensors, fmt, keys)
    state: dict[str, torch.Tensor] = {key: tensors[key] for key in plain}
    for module, dense_key in modules.items():
        parts = {p: tensors[f"{module}.{p}"] for p in params}
        shape = parts["shape"]
        if dense_key != f"{module}.weight":  # a fused expert parameter (named so by sparsetune_config.json)
            if shape.dtype != torch.int64 or shape.numel() != 3:
                raise CorruptTensorError(f"{module}.shape should hold 3 int64 values (experts, rows, columns)")
            experts, rows, cols = (int(v) for v in shape.reshape(-1))
            flat = torch.tensor([experts * rows, cols], dtype=torch.int64).reshape(-1, *shape.shape[1:])
            state[dense_key] = decompress({**parts, "shape": flat}, module).reshape(experts, rows, cols)
        else:
            state[dense_key] = decompress(parts, module)
    return state


def _stored_dtype(config: dict[str, Any], state: dict[str, torch.Tensor]) -> torch.dtype:
    name = str(config.get("dtype") or config.get("torch_dtype") or "").removeprefix("torch.")
    if name in DTYPES:
        return DTYPES[name]
    floats = [t.dtype for t in state.values() if t.dtype.is_floating_point]
    return floats[0] if floats else torch.float32


def load_exported(
    path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False, **kwargs: Any
) -> nn.Module:
    """Load an exported dir (any compressed format) as a decompressed transformers causal LM in eval mode.

    Args:
        path: the export dir.
        dtype: dtype to cast to; None keeps the stored dtype.
        trust_remote_code: passed to transformers for the config.
        **kwargs: passed to the model class's `from_pretrained` (e.g. attn_implementation).
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    path = Path(path)
    fmt = read_export_format(path)
    if fmt is None:
        raise SparsetuneError(f"{path} is not a compressed sparsetune export; load it as a plain HF dir")
    state = decompress_state(read_tensors(path, integrity_record(path)), fmt, module_keys(path))

    raw_config = json.loads((path / "config.json").read_text())
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # decompressed here, so transformers must not look for a quantizer
    model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_cls is None:
        raise SparsetuneError(f"{path}: model type {config.model_type!r} is not a causal LM transformers knows")
    try:
        model, info = model_cls.from_pretrained(
            None,
            config=config,
            state_dict=state,
            dtype=dtype or _stored_dtype(raw_config, state),
            output_loading_info=True,
            **kwargs,
        )
    except SparsetuneError:
        raise
    except Exception as err:  # noqa: BLE001 - a shape mismatch etc. means the files do not fit the config
        raise SparsetuneError(f"{path}: weights do not fit config.json ({err}); re-export the model") from err
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        bad = list(info.get(kind) or [])
        if bad:
            what = kind.replace("_keys", "")
            raise SparsetuneError(f"{path}: {len(bad)} {what} weights (first: {bad[0]}); re-export the model")
    model.eval()
    return model


def to_semi_structured(model: nn.Module) -> int:
    """Put every exact-2:4 fp16/bf16 Linear weight in a SparseSemiStructuredTensor (sparse tensor cores).

    Needs CUDA with compute capability >= 8.0; elsewhere the model keeps its dense weights and one info line
    says so. Weights must be multiples of 32 x 64 (the CUTLASS minimum tile) and not tied to the embeddings.
    Returns the number of Linears converted.
    """
    device = next(model.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        log.info(
            "semi_structured=True needs CUDA with compute capability >= 8.0; the model is on %s, "
            "so its 2:4 weights stay decompressed (dense)",
            device,
        )
        return 0
    from torch.sparse import to_sparse_semi_structured

    embedding = model.get_input_embeddings()
    shared = embedding.weight if embedding is not None else None
    converted = skipped_fp32 = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear) or module.weight is shared:
            continue
        weight = module.weight.detach()
        rows, cols = weight.shape
        if rows % 32 or cols % 64 or nm_group_violations(weight):
            continue
        if weight.dtype not in (torch.float16, torch.bfloat16):
            skipped_fp32 += 1
            continue
        module.weight = nn.Parameter(to_sparse_semi_structured(weight.contiguous()), requires_grad=False)
        converted += 1
    log.info("semi_structured: %d Linears (%s) now run on 2:4 sparse tensor cores", converted, TWO_FOUR)
    if skipped_fp32:
        log.info("%d 2:4 Linears are fp32; load with dtype='bfloat16' to run them sparse", skipped_fp32)
    return converted
