"""`seft --method lora-reprune`, the LoRA* baseline: dense LoRA (peft) on the decoder blocks' Linear and Conv1D
weights (q/k/v/o/gate/up/down in Llama), merge, re-prune with Wanda.

The re-prune restores the starting model's sparsity (or N:M pattern) on exactly the Linear / Conv1D matrices that
were sparse, with calibration windows taken from the training data, through the prune library (`prune_and_report`).
peft's LoRA wraps modules, not the fused 3-D expert parameters of MoE models: those stay frozen, exactly as pruned,
are not re-pruned, and the report counts them (`frozen_sparse_matrices`).
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from sparsetune import distributed, structure
from sparsetune.data import CalibrationSet, token_hash
from sparsetune.distributed import DistContext
from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern
from sparsetune.prune.api import prune_and_report
from sparsetune.prune.config import PruneConfig
from sparsetune.train.adamw import dense_adamw
from sparsetune.train.examples import DataOrder, Examples
from sparsetune.train.loop import Finished, MethodReport, TrainingContext, TrainingMethod
from sparsetune.train.sparse_start import SparseStart

log = logging.getLogger(__name__)


class LoraReprune(TrainingMethod):
    """LoRA adapters on `context.model` (the `seft` run's), merged and re-pruned at the end."""

    def __init__(self, context: TrainingContext) -> None:
        assert context.start is not None
        self.context = context
        cfg, start = context.cfg, context.start
        self.start: SparseStart = start
        self.lora_modules = lora_target_names(context.model)
        # The sparse matrices LoRA trains and the re-prune restores; fused expert slices stay as they are.
        self.repruned = [n for n in start.masks if start.kind(n) != "expert"]
        self.frozen = [n for n in start.masks if start.kind(n) == "expert"]
        if self.frozen:
            log.warning(
                "lora-reprune: peft LoRA cannot wrap fused 3-D expert parameters; %d sparse expert slices stay "
                "frozen as pruned (use --method masked-ft to train them)",
                len(self.frozen),
            )
        if not self.lora_modules:
            raise SparsetuneError(
                f"lora-reprune: model type {structure.model_type(context.model)!r} has no Linear or Conv1D weight in "
                "its decoder blocks for LoRA to wrap; use --method masked-ft"
            )
        context.model = attach_lora(context.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, self.lora_modules)
        context.model.train()
        self.trainable = dict(lora_parameters(context.model))
        self.optimizer = dense_adamw(list(self.trainable.values()), cfg)
        self.peak_grad_bytes = 0

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainable

    def reduce_grads(self) -> None:
        grads = [p.grad for p in self.trainable.values() if p.grad is not None]
        distributed.mean_in_place(grads)
        # measured while the gradients exist (the optimizer step is next, then zero_grad frees them)
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in grads))

    def sparsity(self) -> float:
        return self.start.sparsity_of(self.start.nonzeros())

    def report(self) -> MethodReport:
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        memory = {
            "trainable_params": sum(p.numel() for p in self.trainable.values()),
            "grad_bytes": self.peak_grad_bytes,
            "optimizer_state_bytes": state_bytes,
        }
        return MethodReport(
            memory, {"lora_modules": len(self.lora_modules), "frozen_sparse_matrices": len(self.frozen)}
        )

    def finish(self) -> Finished:
        """Merge the adapters, then re-prune the merged Linears / Conv1Ds to the start's sparsity or pattern.

        Wanda's re-prune picks int(in_features * s) per row, so a matrix may end up to one weight per row off a
        start that was pruned per matrix (the end-of-run check's tolerance)."""
        report = self.merge_and_reprune()
        tolerance = {}
        if self.start.pattern is None:
            tolerance = {name: module.weight.shape[0] for name, module in self.start.modules.items()}
        return Finished(reprune=report, zero_tolerance=tolerance)

    def merge_and_reprune(self) -> dict[str, Any] | None:
        context, cfg, start = self.context, self.context.cfg, self.start
        context.model = merge_lora(context.model)
        context.model.eval()
        if not self.repruned:  # only expert slices were sparse: LoRA trained dense weights, nothing to re-prune
            start.rebind(context.model)
            return None
        data = context.data
        n = min(cfg.reprune_samples, len(data))
        order = DataOrder(len(data), n, cfg.seed + 1)
        windows = calibration_windows(data, order.batch(0), cfg.seqlen, context.pad_id)
        calib = calibration_from_windows(windows, cfg.data, cfg.seed)
        layerwise = (start.report or {}).get("layerwise")
        block_sparsity = None
        if layerwise and start.report:
            block_sparsity = [b["sparsity"] for b in start.report["blocks"]]
            if self.frozen:  # the blocks' sparsity over the re-pruned matrices alone
                block_sparsity = subset_block_sparsity(context.model, start, self.repruned, block_sparsity)
        prune_cfg = reprune_config(
            cfg.model,
            self.repruned,
            start.pattern,
            start.global_sparsity(self.repruned),
            block_sparsity,
            windows.shape[0],
            windows.shape[1],
        )
        report = reprune(context.model, context.tokenizer, prune_cfg, calib, context.dist)
        start.rebind(context.model)  # the merged model's weights
        return report


def subset_block_sparsity(model: nn.Module, start: Any, names: list[str], fallback: list[float]) -> list[float]:
    """Per decoder block, the start sparsity of the matrices `names` inside it (a block without any keeps its
    `fallback` entry)."""
    path = structure.find_decoder(model)[0]
    out = []
    for i, default in enumerate(fallback):
        inside = [n for n in names if n.startswith(f"{path}.{i}.")]
        out.append(start.global_sparsity(inside) if inside else default)
    return out


def calibration_windows(examples: Examples, idx: list[int], seqlen: int, pad_id: int) -> torch.Tensor:
    """Equal-length (N, T) windows for Wanda calibration: text windows as they are; instruction examples padded."""
    rows = [examples.inputs[i][:seqlen] for i in idx]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out


def lora_target_names(model: nn.Module) -> list[str]:
    """The modules LoRA wraps: every Linear and Conv1D of the decoder blocks (peft cannot wrap fused experts)."""
    return [name for name, t in structure.named_targets(model).items() if t.kind in ("linear", "conv1d")]


def attach_lora(model: nn.Module, r: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on exactly the modules named `targets` (full names); only adapter weights
    stay trainable."""
    from peft import LoraConfig, get_peft_model

    named = dict(model.named_modules())
    conv1d = all(structure.is_conv1d(named[n]) for n in targets)  # GPT-2: Conv1D stores [in, out]
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none", fan_in_fan_out=conv1d
    )
    with _no_v4_moe_conversion(), warnings.catch_warnings():
        # peft reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning that is not the user's)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        peft_model = get_peft_model(model, config)
    # peft makes the embeddings' output require grad when the blocks are checkpointed (reentrant checkpointing needs
    # an input that does); sparsetune's is non-reentrant, and that gradient would be backward work for nothing
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()
    wrapped = set(getattr(peft_model.base_model, "targeted_module_names", targets))
    if wrapped != set(targets) or getattr(peft_model.peft_config["default"], "target_parameters", None):
        raise RuntimeError(
            f"internal error: peft wrapped {sorted(wrapped ^ set(targets))[:3]} besides or instead of the asked "
            "modules; please report this bug"
        )
    return peft_model


@contextlib.contextmanager
def _no_v4_moe_conversion() -> Iterator[None]:
    """Switch off peft's conversion of transformers-4 MoE targets while attaching adapters. With transformers 5, peft
    reads LoRA targets of some MoE families (Mixtral, Qwen2/3-MoE, DeepSeek) as transformers-4 names and rewrites
    any module named `...gate_proj` / `up_proj` / `down_proj` into the fused expert parameters, so DeepSeek's dense
    and shared-expert MLP Linears would become `experts.gate_up_proj` targets. Ours are exact transformers-5 module
    names of the loaded model, which need no conversion."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:  # a peft without the conversion
        yield
        return
    original = getattr(conversion, "convert_peft_config_for_transformers", None)
    if original is None:
        yield
        return
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def merge_lora(peft_model: nn.Module) -> nn.Module:
    """Fold the adapters into the base weights (now dense) and return the plain transformers model."""
    return peft_model.merge_and_unload()


def calibration_from_windows(windows: torch.Tensor, source: str, seed: int) -> CalibrationSet:
    """A prune-library calibration set made of training windows (N, T)."""
    return CalibrationSet(windows.to(torch.int64), source, "training-data", seed, token_hash(windows))


def reprune_config(
    model_dir: str,
    module_names: list[str],
    pattern: NMPattern | None,
    sparsity: float,
    block_sparsity: list[float] | None,
    calib_samples: int,
    seqlen: int,
) -> Any:
    """The Wanda PruneConfig that re-prunes exactly `module_names` to the starting sparsity or pattern."""
    target: dict[str, Any] = {"pattern": str(pattern)} if pattern is not None else {"sparsity": sparsity}
    if pattern is None and block_sparsity is not None:
        target["block_sparsity"] = block_sparsity
    return PruneConfig(
        model=model_dir,
        method="wanda",
        targets=[f"^{re.escape(name)}$" for name in module_names],
        calib="training-data",
        calib_samples=calib_samples,
        calib_seqlen=seqlen,
        device="cpu",
        **target,
    )


def reprune(
    model: nn.Module,
    tokenizer: Any,
    cfg: Any,
    calib: CalibrationSet,
    ctx: DistContext,
) -> dict[str, Any]:
    """Wanda re-prune in place (each rank calibrates on its share; statistics are all-reduced)."""
    cfg = cfg.model_copy(update={"device": str(ctx.device)})
    return prune_and_report(model, tokenizer, cfg, calib=calib, show_progress=False, ctx=ctx)
