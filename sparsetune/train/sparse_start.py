"""What `sparsetune seft` starts from and must preserve: the pruned model's sparse Linears, their masks and target
counts, and the N:M pattern, read from its zeros and its sparsity report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import masks, models
from sparsetune.errors import SparsetuneError

REPORT_FILE = "sparsity_report.json"


@dataclass
class SparseStart:
    """What the run must preserve: which Linears are sparse, their masks and active counts, the N:M pattern."""

    modules: dict[str, nn.Linear]
    masks: dict[str, torch.Tensor]  # name -> bool (True = active), the mask the run starts from
    targets: dict[str, int]  # name -> the active count to keep (from the report; else the non-zeros)
    pattern: masks.NMPattern | None
    report: dict[str, Any] | None  # the input dir's sparsity_report.json

    def __post_init__(self) -> None:
        self.active_counts = {name: int(m.sum()) for name, m in self.masks.items()}
        self.numel = {name: m.numel() for name, m in self.masks.items()}

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask
        self.active_counts[name] = int(mask.sum())

    def release_masks(self) -> None:
        """Drop the masks (one byte per weight) once nothing needs them: counts and sizes stay."""
        self.masks = {}

    def global_sparsity(self) -> float:
        total = sum(self.numel.values())
        return 1.0 - sum(self.active_counts.values()) / max(1, total)

    def nonzeros(self) -> dict[str, int]:
        """Each sparse module's non-zero weights now."""
        return {name: int((m.weight.detach() != 0).sum()) for name, m in self.modules.items()}

    def sparsity_of(self, nonzeros: dict[str, int]) -> float:
        numel = sum(m.weight.numel() for m in self.modules.values())
        return (numel - sum(nonzeros.values())) / max(1, numel)

    def drifted(self) -> list[str]:
        """Modules whose mask is off target: a wrong count, or a broken N:M pattern."""
        bad = []
        for name, m in self.masks.items():
            broken_nm = self.pattern is not None and masks.nm_violations(m.float(), self.pattern) > 0
            if self.active_counts[name] != self.targets[name] or broken_nm:
                bad.append(name)
        return bad


def read_input_report(model_spec: str) -> dict[str, Any] | None:
    path = Path(model_spec).expanduser() / REPORT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SparsetuneError(
            f"{path} is not valid JSON ({err}); fix or delete it to take the mask from zeros"
        ) from err


def find_sparse_start(model: nn.Module, report: dict[str, Any] | None) -> SparseStart:
    """The sparse Linears (those the report lists, else decoder Linears holding zeros) and their masks."""
    named = dict(model.named_modules())
    if report and report.get("modules"):
        names = list(report["modules"])
        missing = [n for n in names if not isinstance(named.get(n), nn.Linear)]
        if missing:
            raise SparsetuneError(
                f"{REPORT_FILE} names {missing[0]}, which is not a Linear of this model; "
                "pass the model dir the report was written with"
            )
    else:
        layers = models.decoder_layers(model)
        names = [
            f"model.layers.{i}.{local}"
            for i, layer in enumerate(layers)
            for local, mod in layer.named_modules()
            if isinstance(mod, nn.Linear) and bool((mod.weight == 0).any())
        ]
    modules = {n: named[n] for n in names}
    start_masks = {n: (m.weight.detach() != 0) for n, m in modules.items()}
    if report is None and all(bool(m.all()) for m in start_masks.values()):
        raise SparsetuneError(
            "the model has no zero weights in its decoder Linears: seft repairs a pruned model; "
            "run `sparsetune prune MODEL -o PRUNED` first and fine-tune PRUNED"
        )
    pattern = None
    if report and report.get("pattern") not in (None, "unstructured"):
        pattern = masks.parse_pattern(report["pattern"])
    targets = {}
    for n, m in start_masks.items():
        if pattern is not None:
            targets[n] = m.numel() // pattern.m * pattern.n
        elif report and report.get("modules"):
            targets[n] = m.numel() - int(report["modules"][n]["zeros"])
        else:
            targets[n] = int(m.sum())
    return SparseStart(modules, start_masks, targets, pattern, report)


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
