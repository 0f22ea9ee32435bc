"""Resumable runs: the state a checkpoint holds besides weights and optimizer state, the checkpoint directory and
its atomic replacement, and which settings a resumed run must match."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError
from sparsetune.train.distill_config import DistillSettings
from sparsetune.train.granet.config import GranetSettings
from sparsetune.train.guard import new_guard
from sparsetune.train.memory_config import LOSS_CHUNK_TOKENS

LOG_FILE = "train_log.jsonl"
CKPT_NAME = "checkpoint"


@dataclass
class TrainingState:
    """Everything besides weights and optimizer state that resume needs (torch.save-able plain data)."""

    step: int = 0
    tokens: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    topology: list[dict[str, Any]] = field(default_factory=list)
    reprunes: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=new_guard)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "tokens", "log", "topology", "reprunes", "rng", "guard")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def check_checkpoint_dir(ckpt_dir: Path, resume: bool) -> None:
    current, previous = ckpt_dir / CKPT_NAME, ckpt_dir / f".{CKPT_NAME}.old"
    if not current.exists() and (previous / "state.pt").exists():  # killed between the two renames
        previous.rename(current)
    has = (current / "state.pt").exists()
    if resume and not has:
        raise SparsetuneError(f"--resume: no checkpoint in {ckpt_dir}; run once without --resume")
    if not resume and has:
        raise SparsetuneError(
            f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it or use an empty dir"
        )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (ckpt_dir / LOG_FILE).unlink(missing_ok=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; the previous `target` is removed only after the new one is in place."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


# Settings that change where a run writes or how often it reports, not its result: a resume may differ in them.
# Activation checkpointing recomputes the same values: the losses and weights are those of a run without it; where
# the allocator puts tensors does not change them either.
NOT_IDENTITY = {
    "output",
    "device",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "log_every",
    "data_dir",
    "activation_checkpointing",
    "cpu_block_cache_mb",
    "stream",
}
# Settings that joined the identity after checkpoints were written, with the value those checkpoints ran with: a
# checkpoint whose identity lacks one resumes a run that sets it to that value.
IDENTITY_ADDED: dict[str, Any] = {"loss_chunk_tokens": LOSS_CHUNK_TOKENS}
# GraNet's and distillation's settings joined with their defaults (a checkpoint written before ran without both).
IDENTITY_ADDED.update(
    {name: setting.default for name, setting in {**GranetSettings.model_fields, **DistillSettings.model_fields}.items()}
)
