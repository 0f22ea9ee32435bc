"""A `seft --no-merge` adapter dir read as the merged model it stands for, a few tensors at a time.

`AdapterFiles` has the interface of `sparsetune.streaming.CheckpointFiles` over the base's files (a plain
checkpoint's, an export's, another adapter's): every tensor is the base's, except the weights (and biases) of the
Linears the adapter trains, which are merged on read by `apply_adapter_tensors`, one module at a time, on the
module as the whole-model load would hold it (cast to the run's dtype first). So a streamed adapter dir equals
`load_model(adapter_dir)` bit for bit. `bind(streamed)` ties the files to the `StreamedModel` built on them (its
dtype, and which checkpoint keys hold which module's tensors) and checks every trained module's shape before any
work; the zero-pattern and weight hashes of a module are checked when it is read.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE, apply_adapter_tensors, read_adapter


def _holder(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module tree holding one Linear at `name` (so the adapter's module names and errors stay its own)."""
    root = nn.Module()
    parent = root
    *path, last = name.split(".")
    for part in path:
        child = nn.Module()
        parent.add_module(part, child)
        parent = child
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    parent.add_module(last, linear)
    return root


class AdapterFiles:
    """The tensors of the merged model of a seft adapter dir over its base's `files`."""

    def __init__(self, adapter: str | Path, base: Any) -> None:
        self.path = Path(adapter)
        self.source = str(self.path)
        self.base = base
        self.tensors, self.config = read_adapter(self.path)
        self.entries = base.entries
        self.decompressed = getattr(base, "decompressed", False)
        self.dtype: torch.dtype | None = None
        self.module_keys: dict[str, tuple[str, str | None]] = {}  # module -> (weight key, bias key)
        self.key_module: dict[str, str] = {}  # weight or bias key -> its module

    def bind(self, streamed: Any) -> None:
        """Map the adapter's modules to the checkpoint keys of `streamed` (the StreamedModel over these files) and
        check each is a Linear of the shape trained on."""
        if hasattr(self.base, "bind"):
            self.base.bind(streamed)
        self.dtype = streamed.dtype
        by_target: dict[str, list[str]] = {}
        for key, target in streamed.lands_in.items():
            by_target.setdefault(target, []).append(key)
        named = dict(streamed.model.named_modules())
        for name, meta in self.config["modules"].items():
            module = named.get(name)
            if not isinstance(module, nn.Linear):
                raise SparsetuneError(
                    f"adapter {self.source} trains {name}, which is not a Linear of this model; "
                    "apply it to the pruned model it was trained on"
                )
            shape = "x".join(map(str, module.weight.shape))
            if shape != meta["shape"]:
                raise SparsetuneError(
                    f"adapter {self.source} was trained on a different base: {name} differs in its shape "
                    f"(this model {shape}, adapter {meta['shape']}); apply it to the pruned model it was trained on"
                )
            weight = by_target.get(f"{name}.weight", [])
            bias = by_target.get(f"{name}.bias", [])
            if len(weight) != 1 or len(bias) > 1:
                raise SparsetuneError(
                    f"adapter {self.source} trains {name}, whose weight the checkpoint does not store as one tensor; "
                    "load it whole with --no-stream"
                )
            self.module_keys[name] = (weight[0], bias[0] if bias else None)
            self.key_module[weight[0]] = name
            if bias:
                self.key_module[bias[0]] = name

    def names(self) -> list[str]:
        return self.base.names()

    def nbytes(self, keys: Any = None) -> int:
        return self.base.nbytes(keys)

    def read(self, keys: Any) -> dict[str, torch.Tensor]:
        """The base's tensors `keys`, a trained Linear's weight and bias merged with its entries (in the run's
        dtype, as `load_model` of the adapter dir gives them)."""
        if self.dtype is None:
            raise RuntimeError("AdapterFiles.read before bind(streamed)")
        keys = list(keys)
        modules = list(dict.fromkeys(self.key_module[k] for k in keys if k in self.key_module))
        partners = [k for m in modules for k in self.module_keys[m] if k is not None and k not in keys]
        out = self.base.read(keys + partners)
        for name in modules:
            weight_key, bias_key = self.module_keys[name]
            weight = out[weight_key].to(self.dtype)
            bias = out[bias_key].to(self.dtype) if bias_key is not None else None
            root = _holder(name, weight, bias)
            config = {**self.config, "modules": {name: self.config["modules"][name]}}
            apply_adapter_tensors(root, self.tensors, config, self.source)
            merged = root.get_submodule(name)
            out[weight_key] = merged.weight.detach()
            if bias_key is not None:
                out[bias_key] = merged.bias.detach()
        for key in partners:
            del out[key]
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.base.fingerprint().encode())
        with open(self.path / ADAPTER_FILE if self.path.is_dir() else self.path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()[:16]
