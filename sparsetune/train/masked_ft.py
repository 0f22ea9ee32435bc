"""`seft --method masked-ft`: train the active weights of the pruned model's sparse Linears under a fixed mask.

Each sparse weight stays a dense parameter with zeros at inactive positions, plus a compact index set; its gradient
and AdamW state exist only for the active entries (`sparse_optim.SparseAdamW`), which also averages the compact
gradients over processes at every step.
"""

from __future__ import annotations

from typing import Any

import torch

from sparsetune.train.common import untrained_zeros
from sparsetune.train.loop import TrainingMethod
from sparsetune.train.sparse_optim import SparseAdamW, SparseWeight


class MaskedFineTuning(TrainingMethod):
    """The start masks stay fixed; `run` is the `seft` task (finetune.FinetuneRun) after loading."""

    def __init__(self, run: Any) -> None:
        self.run = run
        cfg, start = run.cfg, run.start
        weights = []
        for name, module in start.modules.items():
            module.weight.requires_grad_(True)
            weights.append(SparseWeight.from_mask(name, module.weight, start.masks[name]))
        self.optimizer = SparseAdamW(
            weights,
            dense_params=[],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            eight_bit=cfg.optim == "adamw8bit",
        )
        self.sparse = {w.name: w for w in weights}
        self.trainable = {name: m.weight for name, m in start.modules.items()}
        self.peak_grad_bytes = 0

    def reduce_grads(self) -> None:
        """SparseAdamW averages the compact gradients itself; measure them here, while they exist."""
        grads = [s.grad for s in self.optimizer.sparse_state.values() if s.grad is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in grads))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainable

    def sparsity(self) -> float:
        """The sparsity of the sparse modules now; also verify that every sparse weight keeps exactly its starting
        number of active slots and has no non-zero outside them."""
        start = self.run.start
        nonzeros = start.nonzeros()
        for name, weight in self.sparse.items():
            expected, slots = start.active_counts[name], weight.active.numel()
            if slots != expected or nonzeros[name] > expected:
                raise RuntimeError(
                    f"internal error: {name} has {slots} active slots and {nonzeros[name]} non-zeros, "
                    f"expected {expected}; please report this bug"
                )
        return start.sparsity_of(nonzeros)

    def memory_report(self) -> dict[str, Any]:
        report = dict(self.optimizer.memory_report())
        report.pop("gradient_bytes", None)  # the optimizer's count; grad_bytes is the measured one
        return {
            "trainable_params": sum(w.nnz for w in self.sparse.values()),
            "grad_bytes": self.peak_grad_bytes,
            **report,
        }

    def untrained_zeros(self, name: str) -> int:
        return untrained_zeros(self.optimizer, self.sparse[name])
