"""`seft --base-dtype nf4` over a streamed input: the model is read one decoder block at a time, and each block's
targeted Linears become their DeltaLinears (NF4 base, entries, identity) right after the block is read, so the
full-precision weights of at most one block exist at a time and the whole model is never in memory in full
precision.

What seft derives from an input weight is taken by `wrap.swap_in_delta` and `wrap.module_plan`, which the
whole-model path runs too, in the same module order and with one generator: both paths give the same layers. The
start's masks are the layers' non-zero bitmaps (`SparseStart.packed`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import devices, loading, stream_inputs, structure
from sparsetune.streaming import trim_heap
from sparsetune.train.heap import release_cached_blocks
from sparsetune.train.sparse_delta.budget import budget_total, check_capacity, module_budgets
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear, require_bitsandbytes
from sparsetune.train.sparse_delta.method import delta_settings, select_targets
from sparsetune.train.sparse_delta.wrap import ModulePlan, module_plan, swap_in_delta
from sparsetune.train.sparse_start import mask_drifted, start_pattern, start_target

log = logging.getLogger(__name__)


class StartDrifted(Exception):  # noqa: N818 - a signal to load the whole model, not an error
    """A start matrix's mask is off its target: restoring it takes a whole-model backward in full precision."""


@dataclass
class LoadedDeltas:
    """The targeted Linears wrapped as they loaded, and what `SparseDelta` would have read off their weights."""

    plans: dict[str, ModulePlan]
    budgets: dict[str, int]
    layers: dict[str, DeltaLinear]
    target_order: list[str]  # the decoder matrices' names as `structure.named_targets` listed them before wrapping
    streamed: Any = None  # the `StreamedModel` it came from: the run's end merges and writes it block by block

    def packed(self) -> dict[str, tuple[torch.Tensor, tuple[int, int]]]:
        """name -> (the input's non-zero bitmap, shape) of each wrapped Linear: its start mask."""
        return {name: (layer.input_support, layer.shape) for name, layer in self.layers.items()}


def streamable(cfg: Any) -> tuple[stream_inputs.StreamInput | None, str]:
    """(how the run's model streams, "") or (None, why this run loads the whole model)."""
    if cfg.method != "seft" or cfg.base_dtype != "nf4":
        return None, "only an NF4 base is built block by block"
    if not cfg.stream:
        return None, "--no-stream"
    kind, location = loading.resolve_model_path(cfg.model)
    if kind == "bundled":
        location = str(loading.bundled_model_dir())
    elif kind == "gguf":  # converted once, tensor by tensor, into a cached HF dir
        location = str(loading.gguf_dir(Path(location)))
    elif kind == "hub":
        snapshot = loading.hub_snapshot(location)
        if snapshot is None:
            return None, "the hub id has no complete local snapshot of safetensors files"
        location = str(snapshot)
    return stream_inputs.stream_input(Path(location))


def load_streamed(
    cfg: Any, device: torch.device, source: stream_inputs.StreamInput, report: dict[str, Any] | None
) -> tuple[nn.Module, Any, LoadedDeltas]:
    """The model (in eval mode on `device`) with its targeted Linears wrapped over NF4 bases, its tokenizer, and
    the wrapped layers. Raises `StartDrifted` as soon as a start mask is off its target."""
    require_bitsandbytes(device)
    tokenizer = loading.load_tokenizer(str(source.model_dir), cfg.trust_remote_code)
    streamed = stream_inputs.open_streamed(source, devices.resolve_dtype(cfg.dtype, device), cfg.trust_remote_code)
    model = streamed.model
    settings = delta_settings(cfg)
    target_order = list(structure.named_targets(model))
    # on the skeleton, names and shapes only: holding the modules would keep their weights alive once loaded
    shapes = {
        name: (linear.out_features, linear.in_features)
        for name, linear in select_targets(model, settings.targets, settings.ignore).items()
    }
    budgets = module_budgets(shapes, delta_rank=settings.delta_rank, delta_density=settings.delta_density)
    flag = budget_total(shapes, settings.delta_rank, settings.delta_density)[1]
    pattern = start_pattern(report)
    starts = set(report["modules"]) if report and report.get("modules") else set()
    generator = torch.Generator().manual_seed(cfg.seed)
    plans: dict[str, ModulePlan] = {}
    layers: dict[str, DeltaLinear] = {}

    def wrap(names: list[str]) -> None:
        for name in names:
            linear = model.get_submodule(name)
            plan = module_plan(name, linear.weight)
            if name in starts:
                mask = linear.weight.detach() != 0
                target = start_target(name, mask.numel(), plan.target, report, pattern)
                if mask_drifted(mask, plan.target, target, pattern):
                    raise StartDrifted(name)
            check_capacity(flag, name, budgets[name], plan.shape, plan.target)
            plans[name] = plan
            layers[name] = swap_in_delta(model, name, linear, budgets[name], "nf4", generator)

    prefixes = [f"{streamed.decoder_path}.{i}." for i in range(len(streamed.layers))]
    in_block = [[name for name in shapes if name.startswith(prefix)] for prefix in prefixes]
    outside = [name for name in shapes if not any(name.startswith(prefix) for prefix in prefixes)]
    # wrapped in `select_targets` order (blocks in order, then a head), as the whole-model path wraps: same draws
    assert [name for names in in_block for name in names] + outside == list(shapes)
    streamed.load_rest(device)
    for index, names in enumerate(in_block):
        streamed.load_block(index, device)
        wrap(names)
        # the block's full-precision Linears are gone: hand their pages back before the next block (the block
        # cache's too: quantizing leaves temporaries of many sizes that the next block would only partly reuse)
        trim_heap()
        release_cached_blocks()
    streamed.load_head(device)
    wrap(outside)
    trim_heap()
    release_cached_blocks()
    model.to(device)  # the skeleton's buffers (rotary tables) were built on the CPU
    model.eval()
    return model, tokenizer, LoadedDeltas(plans, budgets, layers, target_order, streamed)
