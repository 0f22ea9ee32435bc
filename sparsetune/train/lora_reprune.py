"""The LoRA* baseline: dense LoRA (peft) on the attention and MLP projections, merge, re-prune with Wanda.

The re-prune restores the starting model's sparsity (or N:M pattern) on exactly the modules that were sparse,
with calibration windows taken from the training data, through the prune library (`prune_model`).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from sparsetune.data import CalibrationSet, token_hash
from sparsetune.distributed import DistContext
from sparsetune.masks import NMPattern
from sparsetune.train.seft_config import LORA_TARGETS


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
    from sparsetune.prune.config import PruneConfig

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
    from sparsetune.prune.api import prune_model

    cfg = cfg.model_copy(update={"device": str(ctx.device)})
    return prune_model(model, tokenizer, cfg, calib=calib, show_progress=False, ctx=ctx)
