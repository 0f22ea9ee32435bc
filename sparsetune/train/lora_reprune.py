"""`seft --method lora-reprune`, the LoRA* baseline: dense LoRA (peft) on the attention and MLP projections,
merge, re-prune with Wanda.

The re-prune restores the starting model's sparsity (or N:M pattern) on exactly the modules that were sparse,
with calibration windows taken from the training data, through the prune library (`prune_model`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from sparsetune import distributed
from sparsetune.data import CalibrationSet, token_hash
from sparsetune.distributed import DistContext
from sparsetune.masks import NMPattern
from sparsetune.prune.api import prune_model
from sparsetune.prune.config import PruneConfig
from sparsetune.train.common import DataOrder, Examples, dense_adamw
from sparsetune.train.loop import TrainingMethod
from sparsetune.train.seft_config import LORA_TARGETS


class LoraReprune(TrainingMethod):
    """LoRA adapters on `run.model` (the `seft` task, finetune.FinetuneRun), merged and re-pruned at the end."""

    def __init__(self, run: Any) -> None:
        self.run = run
        cfg = run.cfg
        run.model = attach_lora(run.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        run.model.train()
        self.trainable = dict(lora_parameters(run.model))
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
        start = self.run.start
        return start.sparsity_of(start.nonzeros())

    def memory_report(self) -> dict[str, Any]:
        state_bytes = sum(
            t.numel() * t.element_size()
            for s in self.optimizer.state.values()
            for t in s.values()
            if torch.is_tensor(t)
        )
        return {
            "trainable_params": sum(p.numel() for p in self.trainable.values()),
            "grad_bytes": self.peak_grad_bytes,
            "optimizer_state_bytes": state_bytes,
        }

    def zero_tolerance(self, name: str, weight: torch.Tensor) -> int:
        """Wanda's re-prune picks int(in_features * s) per row, so it may differ by up to one weight per row from a
        start that was pruned per matrix."""
        return weight.shape[0] if self.run.start.pattern is None else 0

    def finish(self) -> dict[str, Any]:
        """Merge the adapters, then re-prune the merged Linears to the start's sparsity or pattern."""
        run, cfg, start = self.run, self.run.cfg, self.run.start
        run.model = merge_lora(run.model)
        run.model.eval()
        n = min(cfg.reprune_samples, len(run.train_data))
        order = DataOrder(len(run.train_data), n, cfg.seed + 1)
        windows = calibration_windows(run.train_data, order.batch(0), cfg.seqlen, run.pad_id)
        calib = calibration_from_windows(windows, cfg.data, cfg.seed)
        layerwise = (start.report or {}).get("layerwise")
        block_sparsity = [b["sparsity"] for b in start.report["blocks"]] if layerwise and start.report else None
        prune_cfg = reprune_config(
            cfg.model,
            list(start.modules),
            start.pattern,
            start.global_sparsity(),
            block_sparsity,
            windows.shape[0],
            windows.shape[1],
        )
        report = reprune(run.model, run.tokenizer, prune_cfg, calib, run.ctx)
        named = dict(run.model.named_modules())
        start.modules = {name: named[name] for name in start.modules}  # the merged model's Linears
        return report


def calibration_windows(examples: Examples, idx: list[int], seqlen: int, pad_id: int) -> torch.Tensor:
    """Equal-length (N, T) windows for Wanda calibration: text windows as they are; instruction examples padded."""
    rows = [examples.inputs[i][:seqlen] for i in idx]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out


def attach_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> nn.Module:
    """Wrap `model` with peft LoRA adapters on q/k/v/o/gate/up/down; only adapter weights stay trainable."""
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in LORA_TARGETS if t in present]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, config)


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
        seqlen=seqlen,
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
    return prune_model(model, tokenizer, cfg, calib=calib, show_progress=False, ctx=ctx)
