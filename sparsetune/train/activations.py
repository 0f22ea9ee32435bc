"""Activation checkpointing of the decoder blocks during training (`--activation-checkpointing`, on by default).

A checkpointed block keeps only its input from the forward pass and runs again during backward to rebuild what its
own backward needs, so a step holds the activations of one block at a time rather than of all of them, for about
one more forward pass per step.

Non-reentrant checkpointing throughout (`use_reentrant=False`): it needs no input that requires grad (the frozen
embeddings of `seft` give the first block none), composes with custom autograd functions (the sparse-delta
Linears), peft's LoRA layers and bitsandbytes' 4-bit Linears inside a block, and restores the RNG state for the
recomputation, so dropout draws the same masks and the result is that of a run without it, bit for bit.

Two mechanisms, chosen per model:
- `transformers`: the model's own (`activation_checkpointing_enable`, `gradient_checkpointing_enable` on older
  versions), when every decoder block is a transformers `GradientCheckpointingLayer`: the block's `forward` is
  checkpointed and its cache arguments are dropped.
- `torch`: otherwise (e.g. remote-code models), each decoder block's `forward` is wrapped in
  `torch.utils.checkpoint.checkpoint` here, active only in training mode with gradients enabled.

Enable on the model as loaded, before a method wraps its Linears (sparse-delta) or the model (peft): both leave
the decoder blocks in place, so the blocks stay checkpointed. `Checkpointing.disable` restores the model before it
is saved.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsetune import structure

_ORIGINAL_FORWARD = "_sparsetune_unchecked_forward"  # set on a block whose forward `torch` mode wrapped


def _hf_layer_class() -> type | None:
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - transformers before GradientCheckpointingLayer
        return None
    return GradientCheckpointingLayer


class Checkpointing:
    """The decoder blocks of one model, checkpointed in training until `disable()`; `mechanism` says how
    ("transformers" or "torch")."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers = list(structure.decoder_layers(model))
        self.mechanism = "torch"
        self.active = True
        layer_class = _hf_layer_class()
        if (
            getattr(model, "supports_gradient_checkpointing", False)
            and layer_class is not None
            and all(isinstance(layer, layer_class) for layer in self.layers)
        ):
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:  # pragma: no cover - transformers before the rename
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if all(getattr(layer, "gradient_checkpointing", False) for layer in self.layers):
                self.mechanism = "transformers"
                return
            _disable_transformers(model)  # a model that overrides the switch without setting the blocks' flags
        for layer in self.layers:
            _wrap(layer)

    def disable(self) -> None:
        """Undo the checkpointing: the model is then as loaded (e.g. for saving). `mechanism` still says how the
        training ran."""
        if not self.active:
            return
        self.active = False
        if self.mechanism == "transformers":
            _disable_transformers(self.model)
            return
        for layer in self.layers:
            original = layer.__dict__.pop(_ORIGINAL_FORWARD, None)
            if original is None:
                continue
            if getattr(original, "__func__", None) is type(layer).forward:  # the class's own method: drop the wrapper
                del layer.forward
            else:
                layer.forward = original


def _disable_transformers(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:  # pragma: no cover - transformers before the rename
        model.gradient_checkpointing_disable()


def _wrap(layer: nn.Module) -> None:
    if _ORIGINAL_FORWARD in layer.__dict__:
        return
    forward = layer.forward
    layer.__dict__[_ORIGINAL_FORWARD] = forward

    @functools.wraps(forward)
    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            return checkpoint(functools.partial(forward, **kwargs), *args, use_reentrant=False)
        return forward(*args, **kwargs)

    layer.forward = checkpointed
