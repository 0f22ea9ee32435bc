"""The activation-memory settings every training command shares (`seft` with each --method, `smet-pretrain`).

Each command's schema declares these fields with their factories, beside its other settings, so their help text
lives here once (the CPU block cache with each command's own default: on for `seft`, off for `smet-pretrain`,
whose whole-model steps it was not measured on). Torch-free: the CLI builds its flags from the Field descriptions,
and `--help` must not import torch.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

LOSS_CHUNK_TOKENS = 256  # the default: label tokens whose vocabulary logits exist at once in the training loss


def activation_checkpointing_field() -> Any:
    return Field(
        True,
        description="Keep only each decoder block's input during the forward pass and recompute the block in "
        "backward (transformers' activation checkpointing, non-reentrant; torch's checkpoint around each block "
        "where transformers' does not apply): the activations of one block instead of all of them, for about one "
        "more forward pass per step; losses and weights are the same bit for bit",
    )


def cpu_block_cache_field(default: float) -> Any:
    return Field(
        default,
        ge=0,
        description="Keep freed CPU tensors of at least this many MB for reuse at the same size (a caching "
        "allocator for torch's CPU tensors, compiled once with the system's C++ compiler), instead of glibc's heap "
        "keeping the freed activations resident and fragmented; 0 = off",
    )


def loss_chunk_tokens_field() -> Any:
    return Field(
        LOSS_CHUNK_TOKENS,
        ge=0,
        description="Run the output head and cross-entropy on chunks of this many label tokens, each recomputed in "
        "backward, so one chunk's vocabulary logits exist at a time (0 = all label tokens at once: the full "
        "logits, as a plain forward pass holds them)",
    )
