"""Writing exported checkpoints: choose the Linears worth compressing, encode them, write safetensors shards.

The compressed-tensors formats put their settings in config.json `quantization_config` (what vLLM and
transformers read); every compressed format also gets a `sparsetune_config.json` with the layout, the stored
dtype and a sha256 per shard, so the loader can refuse a truncated or corrupted file.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from sparsetune import __version__, devices, loading, masks, reports, stream_inputs, structure
from sparsetune.errors import SparsetuneError
from sparsetune.export import stream
from sparsetune.export.codecs import CODECS, force_24, mask_stats
from sparsetune.export.config import ExportConfig, shard_size_bytes
from sparsetune.export.formats import SAFE_INDEX, SAFE_WEIGHTS, SPARSETUNE_CONFIG, file_sha256
from sparsetune.export.stream import (
    ShardSequence,
    StreamedCheckpoint,
    check_free_space,
    module_groups,
    raise_disk_full,
)
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, write_json
from sparsetune.stream_inputs import StreamInput
from sparsetune.streaming import generation_config_of

log = logging.getLogger(__name__)

COMPRESSED_TENSORS_FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
TWO_FOUR_FORMATS = ("sparse-24-bitmask", "semi-structured-2:4")
# The compressed-tensors release whose sparse layouts (keys, dtypes, config fields) these files follow.
COMPRESSED_TENSORS_VERSION = "0.14.0.1"
# Files of the source dir carried into the export (the tokenizer is re-saved through transformers).
CARRIED_FILES = (reports.REPORT_FILE,)


@dataclass
class ModulePlan:
    """Which weights get compressed (name -> sparsity) and why the others stay dense (name -> reason).

    A name is the prefix of the stored parts (`<name>.shape`, ...): a Linear's or Conv1D's module name (its dense
    key `<name>.weight`), or a fused 3-D expert parameter's own name (its dense key is the name itself)."""

    compress: dict[str, float] = field(default_factory=dict)
    dense: dict[str, str] = field(default_factory=dict)
    forced: dict[str, int] = field(default_factory=dict)  # name -> 2:4 violations re-pruned by --force-24
    keys: dict[str, str] = field(default_factory=dict)  # compressed name -> its dense state-dict key


def _candidates(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, str, str, bool]]:
    """(name, dense key, kind, rows are [out, in]) of every weight of the checkpoint layout `state` that the sparse
    formats can store: Linears, transformers' Conv1D (stored [in, out]), each expert's 2-D weight where the
    checkpoint layout splits fused experts (Mixtral's `experts.0.w1`, Qwen3-MoE's `experts.0.gate_proj`: Linear
    weights [out, in]), and fused 3-D expert parameters the layout keeps whole ([E, out, in] unless transposed)."""
    modules = dict(model.named_modules())
    in_memory = model.state_dict()
    fused = {}
    for name, module in modules.items():
        for param in structure.expert_params(module):
            fused[f"{name}.{param}" if name else param] = not getattr(module, "is_transposed", False)
    out = []
    for key, tensor in state.items():
        name = key.removesuffix(".weight")
        module = modules.get(name) if key.endswith(".weight") else None
        if isinstance(module, nn.Linear):
            out.append((name, key, "linear", True))
        elif module is not None and structure.is_conv1d(module):
            out.append((name, key, "conv1d", False))
        elif key in fused and tensor.dim() == 3:
            out.append((key, key, "experts", fused[key]))
        elif key.endswith(".weight") and ".experts." in key and tensor.dim() == 2 and key not in in_memory:
            out.append((name, key, "expert", True))  # a fused expert parameter's slice, as the checkpoint stores it
    return out


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """A stored weight as the 2-D matrix the codecs see: 3-D expert parameters [E, R, C] as [E * R, C] (the
    expert slices stacked, row-major)."""
    return weight.reshape(-1, weight.shape[-1]) if weight.dim() == 3 else weight


def saved_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors as a checkpoint stores them: on CPU, each shared tensor once (tied lm_head dropped), in
    the layout `save_pretrained` writes (transformers' weight conversions reverted, so fused MoE experts are the
    per-expert Linear weights of the family's checkpoints, e.g. Mixtral's `block_sparse_moe.experts.0.w1`)."""
    from transformers.core_model_loading import revert_weight_conversion

    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.device.type != "meta" and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor.detach().cpu()
    reverted = revert_weight_conversion(model, dict(out))
    if reverted.keys() == out.keys():  # nothing converted: keep the model's own order
        return out
    return {k: v.contiguous() for k, v in reverted.items()}


class Planner:
    """Decides weight by weight which to compress (what `plan_modules` does for a whole state dict), so a
    streamed export can plan each tensor as it is read. `finish` raises the errors `plan_modules` raises."""

    def __init__(
        self,
        model: nn.Module,
        state: dict[str, torch.Tensor],
        fmt: str,
        ignore: list[str],
        max_density: float,
        force: bool,
    ) -> None:
        self.fmt, self.max_density, self.force = fmt, max_density, force
        self.exclude = [re.compile(p) for p in ignore]
        self.plan = ModulePlan()
        self.offenders: list[tuple[str, int, torch.Size]] = []
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and f"{name}.weight" not in state:
                self.plan.dense[name] = "shares its weight with the embeddings"
        # dense key -> (name, kind, rows are [out, in]); needs only the shapes of `state` (meta tensors do)
        self.candidates = {key: (name, kind, out_in) for name, key, kind, out_in in _candidates(model, state)}

    def visit(self, key: str, weight: torch.Tensor) -> None:
        """Plan the candidate weight `key` (its values: the mask decides)."""
        name, kind, out_in = self.candidates[key]
        fmt, plan = self.fmt, self.plan
        if any(p.search(name) for p in self.exclude):
            plan.dense[name] = "matched --ignore"
            return
        nonzero, violations = mask_stats(as_rows(weight))
        density = nonzero / weight.numel()
        if density > self.max_density:
            plan.dense[name] = f"density {density:.3f} > --max-density {self.max_density}"
            return
        if fmt in TWO_FOUR_FORMATS and not out_in:
            plan.dense[name] = f"{kind} weight stored [in, out]: {fmt} groups run along stored rows"
            return
        if fmt == "semi-structured-2:4" and kind not in ("linear", "expert"):
            plan.dense[name] = f"{fmt} holds 2-D Linear weights only"
            return
        if fmt in TWO_FOUR_FORMATS and violations:
            self.offenders.append((name, violations, as_rows(weight).shape))
            if not self.force:
                return
            plan.forced[name] = violations
        plan.compress[name] = 1.0 - density
        plan.keys[name] = key

    @property
    def failing(self) -> bool:
        """An error is certain (non-2:4 weights without --force-24): nothing more needs encoding."""
        return bool(self.offenders) and not self.force

    def finish(self) -> ModulePlan:
        plan, fmt, max_density = self.plan, self.fmt, self.max_density
        if self.failing:
            name, violations, shape = self.offenders[0]
            groups = shape[0] * -(-shape[1] // 4)
            more = f" (and {len(self.offenders) - 1} more Linears)" if len(self.offenders) > 1 else ""
            why = (
                f"has {shape[1]} input columns, not a multiple of 4"
                if shape[1] % 4
                else f"has {violations} of {groups} groups of 4 with more than 2 non-zeros"
            )
            raise SparsetuneError(
                f"--format {fmt} needs exact 2:4 weights, but {name} {why}{more}; prune with --pattern 2:4, "
                "pass --force-24 to re-prune by magnitude (quality may drop), --ignore it, or use --format "
                "sparse-bitmask"
            )
        if not plan.compress:
            example = next(iter(plan.dense.items()), None)
            why = f" ({example[0]}: {example[1]})" if example else ""
            raise SparsetuneError(
                f"no Linear is sparse enough to compress (density <= --max-density {max_density}){why}; "
                "prune the model first, raise --max-density, or use --format dense"
            )
        if plan.forced:
            log.warning(
                "--force-24 re-pruned %d Linears to 2:4 by magnitude (%d groups of 4 had more than 2 non-zeros); "
                "quality may drop: evaluate the exported model",
                len(plan.forced),
                sum(plan.forced.values()),
            )
        return plan


def plan_modules(
    model: nn.Module, state: dict[str, torch.Tensor], fmt: str, ignore: list[str], max_density: float, force: bool
) -> ModulePlan:
    """Pick the weights to compress (Linears, Conv1Ds, fused expert parameters); for 2:4 formats refuse (or, with
    force, re-prune) any non-2:4 sparse one."""
    planner = Planner(model, state, fmt, ignore, max_density, force)
    for key in planner.candidates:
        planner.visit(key, state[key])
    return planner.finish()


def encode_tensors(state: dict[str, torch.Tensor], plan: ModulePlan, fmt: str) -> dict[str, torch.Tensor]:
    """Replace each planned `<m>.weight` by its format's `<m>.<part>` tensors, keeping checkpoint order."""
    _, compress, _ = CODECS[fmt]
    by_key = {key: name for name, key in plan.keys.items()}
    out = {}
    for key, tensor in state.items():
        module = by_key.get(key)
        if module is not None:
            weight = as_rows(tensor)
            if module in plan.forced:
                weight = force_24(weight)
                plan.compress[module] = masks.zero_count(weight) / weight.numel()
            for part, value in compress(weight).items():
                if part == "shape" and tensor.dim() == 3:  # the 3-D shape: the loader restores the expert axis
                    value = torch.tensor(list(tensor.shape), dtype=torch.int64).reshape(-1, *value.shape[1:])
                out[f"{module}.{part}"] = value
        else:
            out[key] = tensor.contiguous()
    return out


def write_shards(tensors: dict[str, torch.Tensor], out_dir: Path, max_bytes: int) -> dict[str, dict[str, Any]]:
    """Write safetensors shards (a module's parts stay together) and an index when there is more than one.

    Returns {file name: {"bytes", "sha256"}}.
    """
    # Not huggingface_hub.split_torch_state_dict_into_shards: it splits per tensor, so a compressed module's
    # shape/compressed/bitmask parts can land in different shards (3 modules at 40KB on the tiny test model), and it
    # moves an over-size tensor into a shard of its own out of order; both change the files and index we write now.
    groups: dict[str, list[str]] = {}
    for key in tensors:
        groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
    shards: list[list[str]] = [[]]
    size = 0
    for keys in groups.values():
        nbytes = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].extend(keys)
        size += nbytes
    names = (
        [SAFE_WEIGHTS]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    files = {}
    for name, keys in zip(names, shards, strict=True):
        save_file({k: tensors[k] for k in keys}, str(out_dir / name), metadata={"format": "pt"})
        files[name] = {"bytes": (out_dir / name).stat().st_size, "sha256": file_sha256(out_dir / name)}
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map = {k: name for name, keys in zip(names, shards, strict=True) for k in keys}
        write_json(out_dir / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def compressed_tensors_config(fmt: str, plan: ModulePlan) -> dict[str, Any]:
    """config.json `quantization_config` as compressed-tensors 0.14.0.1 writes it for a sparsity-only model."""
    structure = "2:4" if fmt == "sparse-24-bitmask" else "unstructured"
    return {
        "version": COMPRESSED_TENSORS_VERSION,
        "quant_method": "compressed-tensors",
        "sparsity_config": {
            "format": fmt,
            "targets": ["Linear"],
            "ignore": sorted(plan.dense),
            "global_sparsity": None,  # filled by the caller (needs element counts)
            "sparsity_structure": structure,
            "registry_requires_subclass": False,
        },
        "transform_config": {},
    }


def export_model(model: nn.Module, tokenizer: Any, out_dir: Path, cfg: ExportConfig) -> dict[str, Any]:
    """Write `model` into the existing (empty, temporary) `out_dir` in `cfg.format`; return a report."""
    t0 = time.perf_counter()
    if cfg.format == "dense":
        loading.save_model(model, tokenizer, out_dir, max_shard_size=cfg.max_shard_size)
        return {"format": "dense", "timings": {"write_s": round(time.perf_counter() - t0, 3)}}

    state = saved_state_dict(model)
    plan = plan_modules(model, state, cfg.format, cfg.ignore, cfg.max_density, cfg.force_24)
    tensors = encode_tensors(state, plan, cfg.format)
    t_encode = time.perf_counter()
    files = write_shards(tensors, out_dir, shard_size_bytes(cfg.max_shard_size))

    generation = getattr(model, "generation_config", None)
    report = write_export_files(model.config, generation, tokenizer, out_dir, cfg, plan, state, files)
    report["timings"] = {
        "encode_s": round(t_encode - t0, 3),
        "write_s": round(time.perf_counter() - t_encode, 3),
    }
    return report


def write_export_files(
    config: Any,
    generation_config: Any,
    tokenizer: Any,
    out_dir: Path,
    cfg: ExportConfig,
    plan: ModulePlan,
    state: dict[str, torch.Tensor],
    files: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Everything an export writes besides its weight shards (config.json with `quantization_config`, the
    generation config, the tokenizer, sparsetune_config.json); return the report. `state` is the dense layout
    that was exported: only its shapes and dtypes are used (meta tensors will do)."""
    config.save_pretrained(str(out_dir))
    numel = {name: state[plan.keys[name]].numel() for name in plan.compress}
    zeros = sum(round(plan.compress[n] * numel[n]) for n in plan.compress)
    global_sparsity = zeros / max(1, sum(numel.values()))
    if cfg.format in COMPRESSED_TENSORS_FORMATS:
        config_path = out_dir / "config.json"
        config_data = json.loads(config_path.read_text())
        config_data["quantization_config"] = compressed_tensors_config(cfg.format, plan)
        config_data["quantization_config"]["sparsity_config"]["global_sparsity"] = global_sparsity
        config_path.write_text(json.dumps(config_data, indent=2, sort_keys=True) + "\n")
    if generation_config is not None:
        generation_config.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    loading.drop_dangling_auto_map(out_dir)

    dtype = str(next(iter(state[plan.keys[n]] for n in plan.compress)).dtype).removeprefix("torch.")
    meta: dict[str, Any] = {
        "format": cfg.format,
        "dtype": dtype,
        "global_sparsity": global_sparsity,
        "modules": {
            n: {"shape": list(state[plan.keys[n]].shape), "sparsity": s, "key": plan.keys[n]}
            for n, s in plan.compress.items()
        },
        # Fused experts are stored as the checkpoint layout has them: per-expert 2-D Linear weights (Mixtral,
        # Qwen3-MoE, DeepSeek-V3), each compressed like any Linear; a 3-D parameter the layout keeps whole
        # [E, R, C] is one [E * R, C] matrix (expert slices stacked) whose `shape` holds the three dims.
        "expert_layout": "stacked" if any(state[k].dim() == 3 for k in plan.keys.values()) else None,
        "ignore": plan.dense,
        "forced_24": plan.forced,
        "files": files,
        "sparsetune_version": __version__,
        "versions": package_versions(),
    }
    if cfg.format == "semi-structured-2:4":
        meta["layout"] = {
            "kernel": "cutlass",
            "built_with": "torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass",
            "tensors": {"packed": "[R, C/2] kept values", "meta": "int16 [R, C/16]", "shape": "int64 [2] unpadded"},
            "padding": "weights zero-padded to R, C = multiples of 32 rows, 64 columns",
            "fp32_note": "fp32 values use the 16-bit 2:4 metadata layout; load in bf16/fp16 for sparse kernels",
        }
    write_json(out_dir / SPARSETUNE_CONFIG, meta)
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    return {
        "format": cfg.format,
        "modules_compressed": len(plan.compress),
        "modules_dense": len(plan.dense),
        "forced_24": len(plan.forced),
        "global_sparsity": round(global_sparsity, 6),
        "bytes_written": sum(f["bytes"] for f in files.values()),
        "bytes_dense": dense_bytes,
        "shards": len(files),
    }


def checkpoint_dtype(spec: str) -> str:
    """The dtype name a model dir stores (config.json dtype / torch_dtype), float32 when unknown."""
    path = Path(spec).expanduser()
    config = path / "config.json"
    if path.is_dir() and config.exists():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return "float32"
        name = str(data.get("dtype") or data.get("torch_dtype") or "float32").removeprefix("torch.")
        if name in devices.DTYPES:
            return name
    return "float32"


def run_export(cfg: ExportConfig, overwrite: bool = False) -> dict[str, Any]:
    """Export `cfg.model` to `cfg.output` (temp dir + rename) and return the report: streamed from its
    safetensors shards block by block where the input is a plain HF checkpoint, else loaded whole."""
    if cfg.output is None:
        raise SparsetuneError("missing --output; pass -o OUT_DIR")
    out = check_output_dir(cfg.output, overwrite, inputs=(cfg.model,))
    source, why = streamable_input(cfg)
    if source is not None:
        report = run_streamed_export(cfg, source, out, overwrite)
        if report is not None:
            return report
        why = "save_pretrained shares storage between the tensors it writes (weight conversions) or runs model code"
    log.info("export loads %s whole: %s", cfg.model, why)
    t0 = time.perf_counter()
    dtype = checkpoint_dtype(cfg.model) if cfg.dtype == "auto" else cfg.dtype
    is_gguf = loading.resolve_model_path(cfg.model)[0] == "gguf"
    model, tokenizer = loading.load_model(
        cfg.model, dtype=dtype, device="cpu", trust_remote_code=cfg.trust_remote_code, need_tokenizer=is_gguf
    )
    if not is_gguf:
        tokenizer = _tokenizer_or_none(cfg.model, cfg.trust_remote_code)
    t_load = time.perf_counter() - t0
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        report = export_model(model, tokenizer, Path(tmp), cfg)
        source = Path(cfg.model).expanduser()
        for name in CARRIED_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, Path(tmp) / name)
    report["timings"] = {"load_s": round(t_load, 3), **report["timings"]}
    report.update({"model": cfg.model, "output": str(out), "dtype": dtype, "disk_bytes": checkpoint_bytes(out)})
    report["streamed"] = False
    return report


def streamable_input(cfg: ExportConfig) -> tuple[StreamInput | None, str]:
    """(how `cfg.model` streams: a plain HF dir's shards, an exported dir's decompressed tensors or a seft adapter
    merged onto its streamed base; see `sparsetune.stream_inputs`, "") or (None, why it loads whole)."""
    path, why = stream_inputs.local_dir(cfg.model)
    if path is None:
        return None, why
    source, why = stream_inputs.stream_input(path)
    if source is not None and not (source.model_dir / "config.json").is_file():
        return None, f"{source.model_dir} has no config.json"
    return source, why


def estimate_output_bytes(checkpoint: StreamedCheckpoint, planner: Planner, fmt: str, location: Path) -> int:
    """About how many bytes the export writes: dense tensors as they are, compressible ones in `fmt` at the
    sparsity the input's prune report records for them (2:4 formats: half the values), plus their masks. Without a
    report every compressible weight counts at 50%; with one, a weight it does not list counts dense."""
    recorded = reports.recorded_sparsity(location)
    total = 0
    for key, meta in checkpoint.state.items():
        dense = meta.numel() * meta.element_size()
        name = planner.candidates[key][0] if key in planner.candidates else None
        sparsity = 0.5 if recorded is None else recorded.get(name or "", 0.0)
        if name is None or sparsity <= 0:
            total += dense
            continue
        rows, cols = as_rows(meta).shape[0], meta.shape[-1]
        kept = 0.5 if fmt in TWO_FOUR_FORMATS else 1.0 - sparsity
        mask = rows * -(-cols // 8) + (8 * rows if fmt == "sparse-bitmask" else 0)
        total += min(dense, int(dense * kept) + mask)
    return total


def write_dense_files(model: nn.Module, generation: Any, tokenizer: Any, out_dir: Path) -> None:
    """What save_pretrained (through loading.save_model) writes besides the weights."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(str(out_dir))
    if generation is not None:
        generation.save_pretrained(str(out_dir))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    loading.drop_dangling_auto_map(out_dir)


def run_streamed_export(cfg: ExportConfig, source: StreamInput, out: Path, overwrite: bool) -> dict[str, Any] | None:
    """The export of a safetensors HF dir, read and written one decoder block at a time (module docstring of
    `sparsetune.export.stream`); its files are the ones `export_model` writes for the loaded model. None (nothing
    done) for a --format dense whose save_pretrained split cannot be told from the skeleton."""
    t0 = time.perf_counter()
    location = source.location  # its dtype, tokenizer and carried files as the whole-model path reads them
    dtype = checkpoint_dtype(str(location)) if cfg.dtype == "auto" else cfg.dtype
    streamed = stream_inputs.open_streamed(source, devices.DTYPES[dtype], cfg.trust_remote_code)
    checkpoint = StreamedCheckpoint(streamed)
    split = None
    if cfg.format == "dense":
        split = stream.save_pretrained_split(streamed.model, cfg.max_shard_size)
        if split is None or set(split.tensor_to_filename) != set(checkpoint.state):
            return None
    planner = Planner(streamed.model, checkpoint.state, cfg.format, cfg.ignore, cfg.max_density, cfg.force_24)
    tokenizer = _tokenizer_or_none(str(location), cfg.trust_remote_code)
    if split is not None:
        need = sum(t.numel() * t.element_size() for t in checkpoint.state.values())
    else:
        need = estimate_output_bytes(checkpoint, planner, cfg.format, location)
    spill = min(need, shard_size_bytes(cfg.max_shard_size))
    if spill > stream.SPILL_BYTES:  # a shard written from its spill file takes its space twice meanwhile
        need += spill
    check_free_space(out.parent, need, f"the export of {cfg.model}")
    t_load = time.perf_counter() - t0
    timings = {"load_s": round(t_load, 3), "read_s": 0.0, "encode_s": 0.0, "write_s": 0.0}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        tmp = Path(tmp)
        try:
            if split is not None:
                shards = stream.PlannedShards(tmp, split, streamed.model.num_parameters())
            else:
                shards = ShardSequence(tmp, shard_size_bytes(cfg.max_shard_size))
            for segment in checkpoint.segments:
                t = time.perf_counter()
                state = checkpoint.read(segment)
                timings["read_s"] += time.perf_counter() - t
                t = time.perf_counter()
                for key, tensor in state.items():
                    if split is None and key in planner.candidates:
                        planner.visit(key, tensor)
                if planner.failing:  # the error is certain: plan the rest for its message, write nothing more
                    continue
                tensors = state if split is not None else encode_tensors(state, planner.plan, cfg.format)
                del state
                timings["encode_s"] += time.perf_counter() - t
                t = time.perf_counter()
                for group in module_groups(tensors):
                    shards.add_group(group)
                del tensors
                timings["write_s"] += time.perf_counter() - t
            t = time.perf_counter()
            generation = generation_config_of(streamed.model, source.model_dir)
            if split is not None:
                shards.finish()
                write_dense_files(streamed.model, generation, tokenizer, tmp)
                report = {"format": "dense"}
            else:
                plan = planner.finish()
                files = shards.finish()
                report = write_export_files(
                    streamed.model.config, generation, tokenizer, tmp, cfg, plan, checkpoint.state, files
                )
            for name in CARRIED_FILES:
                if (location / name).is_file():
                    shutil.copy2(location / name, tmp / name)
            timings["write_s"] += time.perf_counter() - t
        except OSError as err:
            raise_disk_full(tmp, err, need)
            raise
    report["timings"] = {k: round(v, 3) for k, v in timings.items()}
    report.update({"model": cfg.model, "output": str(out), "dtype": dtype, "disk_bytes": checkpoint_bytes(out)})
    report["streamed"] = True
    entries = checkpoint.files.entries  # the most checkpoint bytes one read asked for (one block, or the embeddings)
    report["read_bytes_max"] = max(
        checkpoint.files.nbytes([k for k in s.keys if k in entries]) for s in checkpoint.segments
    )
    return report


def _tokenizer_or_none(spec: str, trust_remote_code: bool) -> Any:
    kind, location = loading.resolve_model_path(spec)
    if kind == "bundled":
        location = str(loading.bundled_model_dir())
    try:
        return loading.load_tokenizer(location, trust_remote_code)
    except SparsetuneError:
        log.warning("no tokenizer found in %s; the export has none (eval will need one next to the weights)", spec)
        return None


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files (*.safetensors) in a model dir."""
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def print_summary(report: dict[str, Any]) -> None:
    """One line: the format, the bytes on disk and how much of dense they are, what was compressed."""
    mb = report["disk_bytes"] / 1e6
    line = f"exported {report['model']} as {report['format']} to {report['output']}: {mb:.1f} MB"
    if "bytes_dense" in report:
        line += (
            f" ({report['bytes_written'] / max(1, report['bytes_dense']):.2f}x of dense); "
            f"{report['modules_compressed']} Linears compressed, {report['modules_dense']} kept dense, "
            f"sparsity {report['global_sparsity']:.4f}"
        )
    print(line)
