"""What `sparsetune seft` starts from and must preserve: the pruned model's sparse matrices (Linears, Conv1D weights
and the expert slices of fused 3-D expert parameters, see `structure.named_targets`), their masks and target counts,
and the N:M pattern, read from its zeros and its sparsity report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sparsetune import masks, reports, structure
from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta.delta_linear import unpack_bits


class TargetView:
    """A sparse matrix that is not an nn.Linear (a Conv1D, or one expert's slice of a fused 3-D expert parameter),
    with what the seft code reads of a Linear: `.weight` is its [out, in] view of the stored weight. The view shares
    memory (writing into it changes the model) but is no autograd leaf: methods that train such a matrix do it
    through its stored parameter (`SparseStart.parameter_groups`)."""

    def __init__(self, target: structure.Target) -> None:
        self.target = target

    @property
    def weight(self) -> torch.Tensor:
        return self.target.weight()

    @property
    def in_features(self) -> int:
        return self.target.in_features

    def __repr__(self) -> str:
        return f"TargetView({self.target.name!r}, {self.target.kind})"


@dataclass
class ParameterGroup:
    """One stored parameter and the sparse matrices it holds: a Linear or Conv1D weight holds one, a fused 3-D
    expert parameter one per expert (those of its slices that are sparse)."""

    name: str  # the matrix name for a Linear or Conv1D, `...experts.gate_up_proj` for a fused parameter
    param: nn.Parameter
    members: list[str]  # the sparse matrices' names


@dataclass
class SparseStart:
    """What the run must preserve: which matrices are sparse, their masks and active counts, the N:M pattern.

    `modules[name]` is the nn.Linear itself for a Linear, else a `TargetView` (same `.weight` / `.in_features`).
    A matrix whose input weight was let go as it loaded (seft over a streamed NF4 base: its module is a DeltaLinear
    already) has its mask in `packed` instead of `masks`, as the packed bitmap its layer keeps; `mask(name)`
    reads either."""

    modules: dict[str, nn.Linear | TargetView]
    masks: dict[str, torch.Tensor]  # name -> bool [out, in] (True = active), the mask the run starts from
    targets: dict[str, int]  # name -> the active count to keep (from the report; else the non-zeros)
    pattern: masks.NMPattern | None
    report: dict[str, Any] | None  # the input dir's sparsity report (`sparsetune.reports`)
    matrices: dict[str, structure.Target] = field(default_factory=dict)  # name -> where the matrix is stored
    packed: dict[str, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)  # name -> (bitmap, shape)
    deltas: Any = None  # `sparse_delta.streamed_base.LoadedDeltas`: the Linears the load already wrapped

    def __post_init__(self) -> None:
        self.active_counts, self.numel = {}, {}
        for name in self.modules:  # one unpacked mask at a time
            mask = self.mask(name)
            self.active_counts[name] = int(mask.sum())
            self.numel[name] = mask.numel()

    def mask(self, name: str) -> torch.Tensor:
        """The bool [out, in] start mask of `name` (unpacked anew for a packed one)."""
        if name in self.masks:
            return self.masks[name]
        bitmap, shape = self.packed[name]
        return unpack_bits(bitmap, shape[0] * shape[1]).view(shape)

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask
        self.active_counts[name] = int(mask.sum())

    def release_masks(self) -> None:
        """Drop the masks (one byte per weight) once nothing needs them: counts and sizes stay."""
        self.masks = {}
        self.packed = {}

    def global_sparsity(self, names: list[str] | None = None) -> float:
        """The sparsity of the start (of the matrices `names`, else of all)."""
        names = list(self.numel) if names is None else names
        total = sum(self.numel[n] for n in names)
        return 1.0 - sum(self.active_counts[n] for n in names) / max(1, total)

    def nonzeros(self) -> dict[str, int]:
        """Each sparse module's non-zero weights now."""
        return {name: int((m.weight.detach() != 0).sum()) for name, m in self.modules.items()}

    def sparsity_of(self, nonzeros: dict[str, int]) -> float:
        numel = sum(m.weight.numel() for m in self.modules.values())
        return (numel - sum(nonzeros.values())) / max(1, numel)

    def kind(self, name: str) -> str:
        """linear, conv1d or expert."""
        return self.matrices[name].kind if name in self.matrices else "linear"

    def kind_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.numel:
            counts[self.kind(name)] = counts.get(self.kind(name), 0) + 1
        return counts

    def drifted(self) -> list[str]:
        """Modules whose mask is off target: a wrong count, or a broken N:M pattern. The sensitivity re-prune that
        restores them scores Linears only, so a drifted Conv1D or expert slice is refused here."""
        bad = [
            name
            for name in self.numel
            if mask_drifted(self.mask(name), self.active_counts[name], self.targets[name], self.pattern)
        ]
        other = [n for n in bad if self.kind(n) != "linear"]
        if other:
            name = other[0]
            raise SparsetuneError(
                f"{name} ({self.kind(name)}) holds {self.active_counts[name]} non-zeros, off its target "
                f"{self.targets[name]} or N:M pattern, and seft restores the target count of Linear weights only; "
                "re-prune the model (sparsetune prune) and pass that"
            )
        return bad

    def parameter_groups(self) -> list[ParameterGroup]:
        """The stored parameters holding the sparse matrices, in first-appearance order."""
        groups: dict[int, ParameterGroup] = {}
        for name in self.masks:
            target = self.matrices.get(name)
            param = target.param if target is not None else self.modules[name].weight
            group = groups.get(id(param))
            if group is None:
                group_name = name.rpartition("[")[0] if target is not None and target.kind == "expert" else name
                groups[id(param)] = group = ParameterGroup(group_name, param, [])
            group.members.append(name)
        return list(groups.values())

    def parameter_mask(self, group: ParameterGroup) -> torch.Tensor:
        """The group's start mask in the stored parameter's layout (a fused parameter's is the stack of its slices'
        masks). Slices that are not sparse (left dense by `--ignore`) are all active: a fused parameter is one
        trainable tensor, so they train with it."""
        if len(group.members) == 1 and self.kind(group.members[0]) == "linear":
            return self.masks[group.members[0]]
        mask = torch.ones(group.param.shape, dtype=torch.bool, device=group.param.device)
        for name in group.members:
            self.matrices[name].view_of(mask).copy_(self.masks[name])
        return mask

    def rebind(self, model: nn.Module) -> None:
        """Point `modules` and `matrices` at `model`'s weights again (after LoRA* or seft merged their adapters)."""
        found = _resolve(model, list(self.numel))  # every start matrix (seft releases the masks and its modules)
        self.matrices = found
        self.modules = {n: _entry(t) for n, t in found.items()}


def _entry(target: structure.Target) -> nn.Linear | TargetView:
    return target.module if target.kind == "linear" else TargetView(target)


def _resolve(model: nn.Module, names: list[str]) -> dict[str, structure.Target]:
    """The Target of each name: a decoder matrix (`structure.named_targets`), or a Linear / Conv1D elsewhere (a pruned
    lm_head). Names that are neither are left out."""
    found = structure.named_targets(model)
    missing = [n for n in names if n not in found]
    if missing:
        named = dict(model.named_modules())
        for n in missing:
            module = named.get(n)
            if isinstance(module, nn.Linear):
                found[n] = structure.Target(n, module, "linear")
            elif module is not None and structure.is_conv1d(module):
                found[n] = structure.Target(n, module, "conv1d")
    return {n: found[n] for n in names if n in found}


def read_input_report(model_spec: str) -> dict[str, Any] | None:
    return reports.read_raw(model_spec, fix="fix or delete it to take the mask from zeros")


def find_sparse_start(
    model: nn.Module,
    report: dict[str, Any] | None,
    packed: dict[str, tuple[torch.Tensor, tuple[int, int]]] | None = None,
    order: list[str] | None = None,
    allow_dense: bool = False,
) -> SparseStart:
    """The sparse matrices (those the report lists, else every decoder matrix holding zeros: Linears, Conv1D
    weights, expert slices) and their masks. With `allow_dense` (a method that prunes, GraNet), a model without a
    report listing its matrices starts from every decoder matrix, dense or not.

    `packed`: the non-zero bitmaps (and shapes) of matrices already wrapped as they loaded, whose input weights are
    gone; `order`: the decoder matrices' names as `structure.named_targets` lists them before that wrapping."""
    packed = packed or {}
    if report and report.get("modules"):
        names = list(report["modules"])
        matrices = _resolve(model, [n for n in names if n not in packed])
        missing = [n for n in names if n not in matrices and n not in packed]
        if missing:
            raise SparsetuneError(
                f"{reports.REPORT_FILE} names {missing[0]}, which is not a prunable weight (Linear, Conv1D or expert "
                "slice) of this model; pass the model dir the report was written with"
            )
    elif allow_dense:
        matrices = structure.named_targets(model)
        names = list(matrices)
    else:
        found = structure.named_targets(model)
        names = [
            n
            for n in (order or list(found))
            if (n in packed and not bool(unpack_bits(packed[n][0], packed[n][1][0] * packed[n][1][1]).all()))
            or (n in found and bool((found[n].weight() == 0).any()))
        ]
        matrices = {n: found[n] for n in names if n not in packed}
    modules = {n: _entry(matrices[n]) if n in matrices else model.get_submodule(n) for n in names}
    start_masks = {n: (t.weight() != 0).contiguous() for n, t in matrices.items()}
    pattern = start_pattern(report)
    start = SparseStart(
        modules, start_masks, {}, pattern, report, matrices, {n: packed[n] for n in names if n in packed}
    )
    if report is None and not allow_dense and all(start.active_counts[n] == start.numel[n] for n in names):
        raise SparsetuneError(
            "the model has no zero weights in its decoder matrices (Linears, Conv1D, experts): seft repairs a pruned "
            "model; run `sparsetune prune MODEL -o PRUNED` first and fine-tune PRUNED"
        )
    start.targets = {n: start_target(n, start.numel[n], start.active_counts[n], report, pattern) for n in names}
    return start


def start_pattern(report: dict[str, Any] | None) -> masks.NMPattern | None:
    """The N:M pattern the input's report names, or None."""
    if report and report.get("pattern") not in (None, "unstructured"):
        return masks.parse_pattern(report["pattern"])
    return None


def start_target(
    name: str, numel: int, active: int, report: dict[str, Any] | None, pattern: masks.NMPattern | None
) -> int:
    """The active count the run keeps for a matrix of `numel` weights, `active` of them non-zero: N per M-group,
    else the report's, else the non-zeros."""
    if pattern is not None:
        return numel // pattern.m * pattern.n
    if report and report.get("modules"):
        return numel - int(report["modules"][name]["zeros"])
    return active


def mask_drifted(mask: torch.Tensor, active: int, target: int, pattern: masks.NMPattern | None) -> bool:
    """Whether a start mask is off its target: a wrong count, or a broken N:M pattern."""
    return active != target or (pattern is not None and masks.nm_violations(mask.float(), pattern) > 0)


def sensitivity_mask(
    weight: torch.Tensor, grad: torch.Tensor, target: int, pattern: masks.NMPattern | None
) -> torch.Tensor:
    """Restore an exact active count (or exactly N per M-group) by sensitivity |w * dL/dw|.

    Current non-zeros rank above every zero, ordered by |w * grad| (the lowest are removed when there are too
    many); zeros fill any shortfall by |grad| (they come back at 0, like grown weights).
    """
    nonzero = weight != 0
    keep_score = (weight * grad).abs().float()
    fill_score = grad.abs().float()
    score = torch.where(
        nonzero,
        1.0 + keep_score / (keep_score.max() + 1e-30),  # in [1, 2]
        0.999 * fill_score / (fill_score.max() + 1e-30),  # in [0, 1)
    )
    if pattern is not None:
        return masks.nm_mask(score, pattern)
    mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    mask[torch.topk(score.view(-1), target).indices] = True
    return mask.view_as(weight)
