"""The training loss: the summed next-token NLL of a batch, its output head run in chunks under activation
checkpointing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsetune.train import memory_config
from sparsetune.train.examples import IGNORE

LOSS_CHUNK_TOKENS = memory_config.LOSS_CHUNK_TOKENS  # label tokens whose vocabulary logits exist at once


class _CaptureHead(nn.Module):
    """Stands in for the output head during the model's forward pass: keeps the head's input (the final hidden
    states) and returns it unchanged, so what the model does after its head (a soft-cap, a scale) runs on a
    hidden-sized tensor that is then dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden


def final_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's forward pass with its output head bypassed: the hidden states the head would read."""
    head = model.get_output_embeddings()
    capture = _CaptureHead()
    model.set_output_embeddings(capture)
    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    finally:
        model.set_output_embeddings(head)
    assert capture.hidden is not None, "the model's forward pass did not run its output head"
    return capture.hidden


def token_nll_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of next-token NLL over the label tokens of a batch (float32).

    The full (batch, seq, vocab) fp32 logits, their log-softmax and their gradient would be the largest tensors of a
    training step (3 x 200 MB for 4 x 256 tokens of a 49k vocabulary, GBs for Llama-3's 128k). So the model runs
    with its output head bypassed, and the head plus cross-entropy run on chunks of `chunk_tokens` label tokens
    under activation checkpointing: one chunk's logits exist at a time, recomputed in backward (`chunk_tokens` 0:
    all label tokens in one piece, not recomputed). Ignored (prompt and padding) positions never reach the head.
    What the model does to its logits after the head (Gemma-2's soft-cap, Granite's and Cohere's scales) is
    applied to each chunk's logits (`logit_transform`)."""
    head = model.get_output_embeddings()
    hidden = final_hidden(model, batch)
    transform = logit_transform(model.config)
    labels = batch["labels"][:, 1:].reshape(-1)
    keep = labels != IGNORE
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    labels = labels[keep]
    step = chunk_tokens if chunk_tokens > 0 else max(1, labels.numel())
    total = hidden[:0].sum().float()  # 0, attached to the graph even when no position carries a label
    for start in range(0, labels.numel(), step):
        chunk = slice(start, start + step)
        if torch.is_grad_enabled() and chunk_tokens > 0:
            nll = checkpoint(_head_nll_sum, head, transform, hidden[chunk], labels[chunk], use_reentrant=False)
        else:
            nll = _head_nll_sum(head, transform, hidden[chunk], labels[chunk])
        total = total + nll
    return total


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a family's causal-LM head does to the logits after the matmul, from its config (None: nothing)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 and its kin: cap * tanh(logits / cap)
        return lambda logits: torch.tanh(logits / cap) * cap
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:  # Granite: logits / logits_scaling
        return lambda logits: logits / scaling
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:  # Cohere: logits * scale
        return lambda logits: logits * scale
    return None


def _head_nll_sum(
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    hidden: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    logits = head(hidden)
    if transform is not None:
        logits = transform(logits)
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
