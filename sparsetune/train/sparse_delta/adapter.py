"""`seft_adapter.safetensors`: the trained entries of every module, and applying them to a base model.

Tensors per module `<name>.indices` (int32/int64), `<name>.deltas` (float32), `<name>.repruned` (int64). The
safetensors metadata holds `format` and `config` (JSON): the budget, the method settings, the base precision and,
per module, its entry count, input dtype, pattern, target non-zeros and the base identity (shape, a hash of the
zero pattern and a hash of the weights rounded to bf16).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta.adapter_dir import ADAPTER_FILE
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.wrap import merge_model, weight_identity, wrap_model

FORMAT = "sparsetune-seft-adapter/1"


def save_adapter(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write the adapter at `path` (a temp file renamed into place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    plain = {key: t.detach().contiguous().cpu() for key, t in tensors.items()}
    save_file(plain, str(tmp), metadata={"format": FORMAT, "config": json.dumps(config)})
    tmp.replace(path)


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise SparsetuneError(f"no adapter at {path}; pass the {ADAPTER_FILE} a seft run wrote")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise SparsetuneError(f"{path} is not a seft adapter (format {meta.get('format')!r}, want {FORMAT})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    return tensors, json.loads(meta["config"])


def check_base(model: nn.Module, config: dict[str, Any], source: str) -> dict[str, nn.Linear]:
    """The adapter's modules in `model`; a one-line error when the model is not the base it was trained on."""
    named = dict(model.named_modules())
    modules = {}
    for name, meta in config["modules"].items():
        module = named.get(name)
        if not isinstance(module, nn.Linear):
            raise SparsetuneError(
                f"adapter {source} trains {name}, which is not a Linear of this model; "
                "apply it to the pruned model it was trained on"
            )
        identity = weight_identity(module.weight)
        for key, what in (("shape", "shape"), ("mask_blake2b", "zero pattern"), ("bf16_blake2b", "weights")):
            if identity[key] != meta[key]:
                ours, theirs = (identity[key], meta[key]) if key == "shape" else (identity[key][:12], meta[key][:12])
                raise SparsetuneError(
                    f"adapter {source} was trained on a different base: {name} differs in its {what} "
                    f"(this model {ours}, adapter {theirs}); apply it to the pruned model it was trained on"
                )
        modules[name] = module
    return modules


@torch.no_grad()
def apply_adapter(model: nn.Module, path: str | Path, merge: bool = True) -> dict[str, DeltaLinear]:
    """Apply a seft adapter to a loaded base model, in place.

    The base is first put in the precision it was trained in (the adapter's base_dtype), so the result equals the
    training-time model. With `merge` (default) every targeted Linear becomes a plain Linear holding base plus
    deltas in its input dtype; otherwise the model keeps DeltaLinear modules (e.g. to continue training).
    Returns the DeltaLinear modules (merged away when `merge`).
    """
    tensors, config = read_adapter(path)
    return apply_adapter_tensors(model, tensors, config, str(path), merge)


@torch.no_grad()
def apply_adapter_tensors(
    model: nn.Module, tensors: dict[str, torch.Tensor], config: dict[str, Any], source: str, merge: bool = True
) -> dict[str, DeltaLinear]:
    """`apply_adapter` with the adapter already read (`read_adapter`): its tensors and config, `source` naming it in
    errors. Only the modules `config["modules"]` lists are applied (a streamed input applies one at a time)."""
    modules = check_base(model, config, source)
    budgets = {name: int(meta["k"]) for name, meta in config["modules"].items()}
    layers = wrap_model(model, modules, budgets, config["base_dtype"])
    for name, layer in layers.items():
        layer.indices.copy_(tensors[f"{name}.indices"])
        layer.delta.copy_(tensors[f"{name}.deltas"])
        layer.repruned = tensors[f"{name}.repruned"].to(device=layer.device, dtype=torch.int64)
    if merge:
        merge_model(model, layers)
    return layers


def base_model_of(adapter: str | Path) -> str:
    """The base model dir an adapter was trained on (recorded by `sparsetune seft` as `base_model`)."""
    _, config = read_adapter(adapter)
    base = config.get("base_model")
    if not base:
        raise SparsetuneError(f"adapter {adapter} does not name its base model; pass the base dir explicitly")
    return str(base)


def load_with_adapter(base_dir: str | Path | None, adapter: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load the base model dir with transformers and apply (merge) a seft adapter to it: the fine-tuned model.

    `adapter` is a seft_adapter.safetensors file or the dir holding it; `base_dir` None means the base the adapter
    records. A base whose weights differ from the one trained on is refused with one error line.
    """
    from transformers import AutoModelForCausalLM

    base = str(base_dir) if base_dir is not None else base_model_of(adapter)
    if not (Path(base) / "config.json").is_file():
        raise SparsetuneError(f"the base model {base} of adapter {adapter} is not a HF model dir; pass base_dir")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype or "auto")
    apply_adapter(model, adapter)
    return model.eval()
