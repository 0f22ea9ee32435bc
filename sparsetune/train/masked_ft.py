"""`seft --method masked-ft`: train the active weights of the pruned model's sparse matrices under a fixed mask.

Each sparse weight stays a dense parameter with zeros at inactive positions, plus a compact index set; its gradient
and AdamW state exist only for the active entries (`compact_adamw.SparseAdamW`), which also averages the compact
gradients over processes at every step. The sparse matrices are Linears, Conv1D weights (masked in their stored
[in, out] layout) and expert slices: a fused 3-D expert parameter is one sparse weight whose mask is the stack of
its slices' masks, so every slice keeps its own zeros and active count (a slice left dense by `--ignore` trains
densely with its parameter).
"""

from __future__ import annotations

from typing import Any

import torch

from sparsetune.train.compact_adamw import SparseAdamW, SparseWeight, untrained_zeros
from sparsetune.train.loop import Finished, MethodReport, TrainingContext, TrainingMethod
from sparsetune.train.sparse_start import ParameterGroup, SparseStart


def active_weights_adamw(
    start: SparseStart, groups: list[ParameterGroup], cfg: Any
) -> tuple[dict[str, SparseWeight], SparseAdamW]:
    """The groups' parameters made trainable as sparse weights under their start masks, by name, and the AdamW over
    their active entries (the run's betas, eps, weight decay and --optim)."""
    weights = []
    for group in groups:
        group.param.requires_grad_(True)
        weights.append(SparseWeight.from_mask(group.name, group.param, start.parameter_mask(group)))
    adamw = SparseAdamW(
        weights,
        dense_params=[],
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        eight_bit=cfg.optim == "adamw8bit",
    )
    return {w.name: w for w in weights}, adamw


class MaskedFineTuning(TrainingMethod):
    """The start masks (`context.start`, the `seft` run's) stay fixed."""

    def __init__(self, context: TrainingContext) -> None:
        assert context.start is not None
        cfg, self.start = context.cfg, context.start
        start: SparseStart = self.start
        # One sparse weight per stored parameter: a Linear or Conv1D weight, or a whole fused expert parameter.
        self.groups = {g.name: g for g in start.parameter_groups()}
        self.sparse, self.optimizer = active_weights_adamw(start, list(self.groups.values()), cfg)
        self.trainable = {name: g.param for name, g in self.groups.items()}
        self.group_of = {member: name for name, g in self.groups.items() for member in g.members}
        self.peak_grad_bytes = 0

    def reduce_grads(self) -> None:
        """SparseAdamW averages the compact gradients itself; measure them here, while they exist."""
        grads = [s.grad for s in self.optimizer.sparse_state.values() if s.grad is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in grads))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainable

    def sparsity(self) -> float:
        """The sparsity of the sparse matrices now; also verify that every matrix keeps exactly its starting number
        of active slots and has no more non-zeros than that."""
        start = self.start
        nonzeros = start.nonzeros()
        for name in self.sparse:
            for member, slots in self.member_slots(name).items():
                expected = start.active_counts[member]
                if slots != expected or nonzeros[member] > expected:
                    raise RuntimeError(
                        f"internal error: {member} has {slots} active slots and {nonzeros[member]} non-zeros, "
                        f"expected {expected}; please report this bug"
                    )
        return start.sparsity_of(nonzeros)

    def slot_owner(self, name: str) -> torch.Tensor | None:
        """For a fused expert parameter, the expert (slice) each active slot of sparse weight `name` lies in: slice
        e is the contiguous flat range [e * numel / E, (e + 1) * numel / E) of the stored tensor, transposed
        layout or not. None for a Linear or Conv1D weight."""
        group, weight = self.groups[name], self.sparse[name]
        if group.param.dim() != 3:
            return None
        return weight.active // group.param[0].numel()

    def member_slots(self, name: str) -> dict[str, int]:
        """Active slots of each matrix of sparse weight `name` (one matrix, or the sparse slices of a fused one)."""
        group, weight = self.groups[name], self.sparse[name]
        owner = self.slot_owner(name)
        if owner is None:
            return {group.members[0]: weight.active.numel()}
        per_expert = torch.bincount(owner, minlength=group.param.shape[0]).tolist()
        return {m: per_expert[self.start.matrices[m].expert] for m in group.members}

    def report(self) -> MethodReport:
        report = dict(self.optimizer.memory_report())
        report.pop("gradient_bytes", None)  # the optimizer's count; grad_bytes is the measured one
        memory = {
            "trainable_params": sum(w.nnz for w in self.sparse.values()),
            "grad_bytes": self.peak_grad_bytes,
            **report,
        }
        return MethodReport(memory, {"sparse_matrices": self.start.kind_counts()})

    def finish(self) -> Finished:
        return Finished(untrained_zeros={name: self.untrained_zeros(name) for name in self.group_of})

    def untrained_zeros(self, name: str) -> int:
        """Zeros among matrix `name`'s active entries that never had a gradient."""
        group_name = self.group_of[name]
        weight = self.sparse[group_name]
        owner = self.slot_owner(group_name)
        if owner is None:
            return untrained_zeros(self.optimizer, weight)
        _, v = self.optimizer.sparse_state[group_name].moments.load()
        values = weight.param.detach().view(-1)[weight.active]
        inside = owner == self.start.matrices[name].expert
        return int(((values == 0) & (v == 0) & inside).sum())
