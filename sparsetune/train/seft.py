"""`seft --method seft` (the default): sparse-delta fine-tuning on the one training loop.

The pruned model's targeted Linears become a frozen base plus a budget of trainable (index, delta) entries
(`sparse_delta.SparseDelta`, which holds the method: budget, windows, reselection, re-prune, optimizer, merge). This
strategy adapts it to `loop.Trainer`: the loop's 0-based steps, the gradient average over processes, checkpoints,
the per-step invariant checks, the measured memory and the output (merged model and/or adapter).

Checkpoints: the loop writes the checkpoint due after step s during step s + 1, after that step's backward. The
optimizer state is still that of step s then, but an open selection window has already seen step s + 1's
gradients, so the window statistics are copied at the step boundary when a checkpoint is pending and saved instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsetune import distributed
from sparsetune.train.loop import TrainingMethod
from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.method import SparseDelta
from sparsetune.train.sparse_delta.wrap import merged_counts, merged_weight


def delta_settings(cfg: Any) -> DeltaSettings:
    """The method's settings out of a SeftConfig (which extends DeltaSettings): the fields that were set, so that
    a density budget does not also pass the default rank."""
    names = set(DeltaSettings.model_fields)
    values = {name: getattr(cfg, name) for name in names & cfg.model_fields_set}
    return DeltaSettings(**values)


class DeltaOptimizer:
    """The loop's view of the method's optimizer: AdamW over the entries, and a state dict that holds everything a
    resume needs besides the checkpoint tensors (re-pruned positions, the open window, the totals)."""

    def __init__(self, method: SeftFineTuning) -> None:
        self.method = method
        self.param_groups = method.delta.optimizer.param_groups

    def step(self) -> None:
        self.method.delta.optimizer.step()
        self.method.delta.count_window_step()
        self.method.saved_window = None  # a pending checkpoint was written (or dropped) before this step

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.method.delta.optimizer.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.method.delta.state_dict(window=self.method.saved_window)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.method.delta.load_state_dict(state)


class MergedView:
    """Stands for a trained module where the run reads `.weight`: the merged weight, built on each read."""

    def __init__(self, layer: DeltaLinear) -> None:
        self.layer = layer

    @property
    def weight(self) -> torch.Tensor:
        return merged_weight(self.layer)


class SeftFineTuning(TrainingMethod):
    """Sparse-delta fine-tuning of `run.model` (the `seft` task, finetune.FinetuneRun, after loading)."""

    def __init__(self, run: Any) -> None:
        self.run = run
        cfg = run.cfg
        self.settings = delta_settings(cfg)
        reduce = None
        if run.ctx.world > 1:

            def reduce(t: torch.Tensor) -> None:
                distributed.mean_in_place([t])

        self.delta = SparseDelta(
            run.model,
            self.settings,
            cfg.steps,
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            eight_bit=cfg.optim == "adamw8bit",
            seed=cfg.seed,
            reduce=reduce,
        )
        self.optimizer = DeltaOptimizer(self)
        # The run's view of the trained modules is their merged weight, computed when read (the end-of-run checks
        # and the report); it must not keep the input Linears alive (an NF4 or bf16 base replaced them), and the
        # start masks (a byte per weight) are not needed past this point (the resume identity was taken).
        start = run.start
        start.modules = {
            name: MergedView(self.delta.layers[name]) if name in self.delta.layers else module
            for name, module in start.modules.items()
        }
        start.release_masks()
        # What seft keeps is each module's non-zero count as loaded (a 2:4 start whose dense model held zeros has
        # fewer than N per group in places; nothing can fill those), so the end-of-run check compares with it.
        for name, target in self.delta.targets().items():
            if name in start.active_counts:
                start.active_counts[name] = target
        self.saved_window: dict[str, Any] | None = None
        self.peak: dict[str, int] = {"grad_bytes": 0, "window_bytes": 0}
        self._sparsity: float | None = None
        self.merged = False
        self.nf4_zeroed: int | None = None

    # -- the loop's hooks -------------------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.delta.layers.items():
            tensors[f"{name}.delta"] = layer.delta
            tensors[f"{name}.indices"] = layer.indices
        return tensors

    def before_step(self, step: int) -> None:
        if self.run.checkpoint_pending:
            self.saved_window = self.delta.window_state()
        self.delta.before_step(step + 1)

    def reduce_grads(self) -> None:
        layers = list(self.delta.layers.values())
        if self.run.ctx.world > 1:  # every rank must reduce the same tensors
            for layer in layers:
                if layer.delta.grad is None:
                    layer.delta.grad = torch.zeros_like(layer.delta)
        distributed.mean_in_place([layer.delta.grad for layer in layers if layer.delta.grad is not None])
        # measured while the gradients exist (after backward, before the optimizer step frees them)
        self.peak["grad_bytes"] = max(self.peak["grad_bytes"], self.delta.optimizer.grad_bytes())
        window = sum(stats.nbytes() for stats in self.delta.windows.values())
        self.peak["window_bytes"] = max(self.peak["window_bytes"], window)

    def topology_due(self, step: int) -> bool:
        return self.delta.reselection_due(step)

    def topology_update(self, step: int) -> dict[str, Any]:
        row = self.delta.reselect(step)
        row.pop("modules")  # the per-module counts would make every log row hundreds of lines long
        self._sparsity = None
        return row

    def sparsity(self) -> float:
        """The sparsity of the targeted modules (the input's, exactly); verifies after every reselection that every
        module's non-zero count (base non-zeros plus reactivated entries) equals its count in the input."""
        if self._sparsity is None:
            counts, targets = self.delta.nonzero_counts(), self.delta.targets()
            for name, count in counts.items():
                if count != targets[name]:
                    raise RuntimeError(
                        f"internal error: {name} has {count} non-zeros after a reselection, expected {targets[name]}; "
                        "please report this bug"
                    )
            numel = sum(layer.numel for layer in self.delta.layers.values())
            self._sparsity = (numel - sum(counts.values())) / max(1, numel)
        return self._sparsity

    def memory_report(self) -> dict[str, Any]:
        report = self.delta.memory_report()
        report["grad_bytes"] = self.peak["grad_bytes"]  # the gradients are freed by now: their measured peak
        report["window_bytes"] = self.peak["window_bytes"]
        return report

    def report_fields(self) -> dict[str, Any]:
        memory = self.memory_report()
        return {
            "trainable_params": memory["trainable_params"],
            "grad_bytes": memory["grad_bytes"],
            "optimizer_state_bytes": memory["optimizer_state_bytes"],
            "reactivated": self.delta.reactivated_count(),
            "repruned": self.delta.repruned_count(),
            "reselections": len(self.run.state.topology),
            "reselection_totals": dict(self.delta.totals),
            "budget": sum(self.delta.budgets.values()),
            "base_dtype": self.settings.base_dtype,
            "merged": self.merged,
            **({"nf4_zeroed": self.nf4_zeroed} if self.nf4_zeroed is not None else {}),
        }

    def finish(self) -> dict[str, Any] | None:
        """Merge the deltas into the model (unless --no-merge); the run then checks and writes the merged Linears."""
        if self.settings.base_dtype == "nf4":
            self.nf4_zeroed = self.count_nf4_zeroed()
        if not self.settings.merge:
            return None
        self.sparsity()  # checked and cached while the bases exist: the merge releases them
        self.delta.merge()
        self.merged = True
        self.run.start.rebind(self.run.model)  # the merged weights: Linears, and any frozen Conv1D / expert slices
        return None

    def count_nf4_zeroed(self) -> int:
        """Input non-zeros the NF4 base read as 0 during training and the merge gives back (those not re-pruned);
        the re-prune removes such weights first (their sensitivity is 0), so usually few are left."""
        total = 0
        for layer in self.delta.layers.values():
            if layer.nf4_zeroed is not None:
                positions = layer.nf4_zeroed[0]
                total += int((~torch.isin(positions, layer.repruned)).sum())
        return total

    def untrained_zeros(self, name: str) -> int:
        """Entries that read exactly 0 in the merged weight although they count as non-zeros: a reactivated entry
        whose delta never moved, or a delta that cancels its base value. Neither is a sign of divergence."""
        layer = self.delta.layers.get(name)
        if layer is None:
            return 0
        if layer.merged_counts is None:
            with torch.no_grad():
                return merged_counts(layer, merged_weight(layer))["untrained_zeros"]
        return layer.merged_counts["untrained_zeros"]

    def write_files(self, out_dir: Path) -> None:
        config_extra = {"base_model": str(Path(self.run.cfg.model).expanduser().resolve())}
        self.delta.save_adapter(str(out_dir / ADAPTER_FILE), extra=config_extra)
