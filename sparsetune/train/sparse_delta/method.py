"""Sparse-delta fine-tuning as one object a training loop drives.

method = SparseDelta(model, settings, total_steps, lr=...)   # wraps the targeted Linears, builds the optimizer
for step in range(1, total_steps + 1):
    method.before_step(step)            # opens the selection window when this step is in one
    loss = ...; loss.backward()         # micro-batches: several backwards
    method.optimizer.step()             # set method.optimizer.param_groups[0]["lr"] for a schedule
    log = method.after_step(step)       # a reselection + re-prune when one is due, else None
    method.optimizer.zero_grad()
method.merge() / method.save_adapter(path)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsetune import structure
from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta import reprune as rp
from sparsetune.train.sparse_delta import selection
from sparsetune.train.sparse_delta.budget import module_budgets
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.optimizer import DeltaAdamW
from sparsetune.train.sparse_delta.wrap import ModulePlan, merge_model, plan_modules, wrap_model

log = logging.getLogger(__name__)
Reduce = Callable[[torch.Tensor], None]  # in-place all-reduce (mean) over processes


def select_targets(model: nn.Module, targets: list[str], ignore: list[str]) -> dict[str, nn.Linear]:
    """The Linears to train, by full name, resolved like prune's --targets/--ignore.

    Sparse deltas wrap nn.Linear only: a targeted Conv1D weight (GPT-2) or expert slice of a fused MoE parameter stays
    frozen exactly as pruned (one warning says how many); a model with no targeted Linear at all is refused.
    """
    blocks, head = structure.select_targets(model, targets, ignore)
    chosen = [target for block in blocks for target in block] + ([head] if head else [])
    linears = {target.name: target.module for target in chosen if target.kind == "linear"}
    others = sorted({target.kind for target in chosen if target.kind != "linear"})
    if not linears:
        raise SparsetuneError(
            f"seft's sparse deltas train nn.Linear weights, and this model's targets are {' and '.join(others)} "
            "matrices only; use --method masked-ft (or lora-reprune) for this model"
        )
    if others:
        frozen = len(chosen) - len(linears)
        log.warning(
            "seft: %d targeted %s matrices stay frozen as pruned (sparse deltas cover Linears only; "
            "--method masked-ft trains them)", frozen, "/".join(others),
        )  # fmt: skip
    return linears


class SparseDelta:
    """The trainable state (entries), its optimizer, the selection windows and the re-prune of one model.

    Args:
        model: a pruned HF causal LM; its targeted Linears are replaced in place by DeltaLinear.
        settings: the method's settings.
        total_steps: optimizer steps of the run (the replace fraction decays to 0 at the end).
        lr, betas, eps, weight_decay, eight_bit: AdamW over the deltas.
        seed: the random start positions.
        reduce: multi-process only, an in-place mean all-reduce; applied to every window gradient (each module's
            dense gradient inside its backward) so the window statistics, and every choice made from them, are the
            same on every rank. The loop all-reduces delta.grad itself.
    """

    def __init__(
        self,
        model: nn.Module,
        settings: DeltaSettings,
        total_steps: int,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        eight_bit: bool = False,
        seed: int = 0,
        reduce: Reduce | None = None,
    ) -> None:
        self.settings, self.total_steps, self.reduce = settings, total_steps, reduce
        modules = select_targets(model, settings.targets, settings.ignore)
        self.plans: dict[str, ModulePlan] = plan_modules(modules)
        self.budgets = module_budgets(
            {name: plan.shape for name, plan in self.plans.items()},
            delta_rank=settings.delta_rank,
            delta_density=settings.delta_density,
            capacity={name: plan.target for name, plan in self.plans.items()},
        )
        self.model = model
        self.layers: dict[str, DeltaLinear] = wrap_model(model, modules, self.budgets, settings.base_dtype, seed)
        self.optimizer = DeltaAdamW(self.layers, lr, betas, eps, weight_decay, eight_bit)
        self.windows: dict[str, selection.WindowStats] = {}
        self.window_steps = 0
        self.totals = {"grown": 0, "dropped": 0, "reactivated": 0, "repruned": 0, "restored": 0}

    # -- what the loop calls ----------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [layer.delta for layer in self.layers.values()]

    def before_step(self, step: int) -> None:
        """Open the selection window at its first step (1-based step about to run)."""
        s = self.settings
        if not self.windows and selection.in_window(step, s.reselect_every, s.select_window, self.total_steps):
            for name, layer in self.layers.items():
                stats = self.new_window(name, layer)
                self.windows[name] = stats
                layer.observer = stats
            self.window_steps = 0

    def new_window(self, name: str, layer: DeltaLinear) -> selection.WindowStats:
        """Empty statistics for one module: without reactivation its candidates come from the input's non-zeros."""
        eligible = None if self.settings.reactivate else layer.input_nonzero
        stats = selection.WindowStats(layer.k, layer.shape, layer.device, self.plans[name].pattern, eligible)
        stats.reduce = self.reduce
        return stats

    def after_step(self, step: int) -> dict[str, Any] | None:
        """After optimizer step `step`: count the window step; reselect and re-prune when due."""
        self.count_window_step()
        return self.reselect(step) if self.reselection_due(step) else None

    def count_window_step(self) -> None:
        """After an optimizer step: one more step behind the open window's statistics."""
        if self.windows:
            self.window_steps += 1

    def reselection_due(self, step: int) -> bool:
        """Whether a reselection follows optimizer step `step` (1-based, steps done)."""
        return bool(self.windows) and selection.reselection_due(step, self.settings.reselect_every, self.total_steps)

    def reselect(self, step: int) -> dict[str, Any]:
        """The reselection and re-prune after step `step`, closing the window; returns its counts."""
        s = self.settings
        fraction = selection.replace_fraction_at(
            step, s.reselect_every, self.total_steps, s.replace_fraction, s.replace_schedule
        )
        row: dict[str, Any] = {"step": step, "replace_fraction": fraction, "modules": {}}
        for name, layer in self.layers.items():
            row["modules"][name] = self.reselect_module(name, layer, self.windows[name], fraction)
            layer.observer = None
        self.windows = {}
        for key in self.totals:
            row[key] = sum(m[key] for m in row["modules"].values())
            self.totals[key] += row[key]
        return row

    # -- one module -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def reselect_module(
        self, name: str, layer: DeltaLinear, stats: selection.WindowStats, fraction: float
    ) -> dict[str, int]:
        pattern = self.plans[name].pattern
        input_nonzero = layer.input_nonzero()
        capacity = fill = None
        if pattern is not None:
            capacity = input_nonzero.reshape(-1, pattern.m).sum(1)
            fill = layer.base_weight(torch.float32).abs()
        n_replace = round(layer.k * fraction)
        change = selection.reselect(
            layer.indices, layer.delta, stats, n_replace, self.window_steps, pattern, capacity, layer.shape, fill
        )
        reactivated = int(layer.zero_in_base(change.positions).sum())
        layer.delta[change.slots] = 0  # the drop: the weight at the old position is its base value again
        layer.indices[change.slots] = change.positions.to(layer.indices.dtype)
        layer.delta.grad = None
        self.optimizer.reseed(name, change.slots, change.sum_g, change.sum_g2, change.observed)

        counts = {"grown": int(change.positions.numel()), "dropped": change.dropped, "reactivated": reactivated}
        if not self.settings.reactivate:  # every entry sits on an input non-zero: nothing to re-prune or restore
            return {**counts, "repruned": 0, "restored": 0}
        theta = layer.base_weight(torch.float32, repruned=False)  # input values, also at re-pruned positions
        scores = rp.sensitivity(theta, stats.mean_g2_estimate(layer.shape))
        result = rp.reprune(input_nonzero, layer.repruned, layer.indices, scores, pattern)
        layer.repruned = rp.apply_reprune(layer.repruned, result)
        return {**counts, "repruned": int(result.repruned.numel()), "restored": int(result.restored.numel())}

    # -- state ------------------------------------------------------------------------------------------------

    def nonzero_counts(self) -> dict[str, int]:
        """Per module: base non-zeros (not re-pruned) plus positions carrying an entry."""
        return {
            name: layer.merged_counts["nonzero"]
            if layer.merged_counts is not None
            else int(rp.support_counts(layer.input_nonzero(), layer.repruned, layer.indices, None).sum())
            for name, layer in self.layers.items()
        }

    def targets(self) -> dict[str, int]:
        return {name: plan.target for name, plan in self.plans.items()}

    def reactivated_count(self) -> int:
        """Entries now on positions the input had as zero or the re-prune removed (non-zeros gained)."""
        return sum(
            layer.merged_counts["reactivated"]
            if layer.merged_counts is not None
            else int(layer.zero_in_base(layer.indices).sum())
            for layer in self.layers.values()
        )

    def repruned_count(self) -> int:
        return sum(layer.repruned.numel() for layer in self.layers.values())

    def memory_report(self) -> dict[str, int]:
        """Bytes of the tensors that exist now for the trainable state (call after backward for grad_bytes)."""
        layers = self.layers.values()
        return {
            "trainable_params": sum(layer.k for layer in layers),
            "grad_bytes": self.optimizer.grad_bytes(),
            "optimizer_state_bytes": self.optimizer.state_bytes(),
            "delta_bytes": sum(layer.delta.numel() * layer.delta.element_size() for layer in layers),
            "index_bytes": sum(layer.indices.numel() * layer.indices.element_size() for layer in layers),
            "repruned_bytes": sum(layer.repruned.numel() * layer.repruned.element_size() for layer in layers),
            "window_bytes": sum(stats.nbytes() for stats in self.windows.values()),
        }

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Per module indices, deltas, re-pruned positions: with the optimizer state, all that resume needs."""
        state = {}
        for name, layer in self.layers.items():
            state[f"{name}.indices"] = layer.indices
            state[f"{name}.deltas"] = layer.delta.detach()
            state[f"{name}.repruned"] = layer.repruned
        return state

    @torch.no_grad()
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, layer in self.layers.items():
            layer.indices.copy_(state[f"{name}.indices"])
            layer.delta.copy_(state[f"{name}.deltas"])
            layer.repruned = state[f"{name}.repruned"].to(device=layer.device, dtype=torch.int64)

    def window_state(self) -> dict[str, Any]:
        """A copy of the open window's statistics (empty when none is open) and its step count."""
        windows = {
            name: {key: value.clone() if torch.is_tensor(value) else value for key, value in stats.state_dict().items()}
            for name, stats in self.windows.items()
        }
        return {"windows": windows, "window_steps": self.window_steps}

    def state_dict(self, window: dict[str, Any] | None = None) -> dict[str, Any]:
        """Everything resume needs besides the frozen base: entries, optimizer, an open window, the totals.
        `window` (a `window_state()` taken earlier) replaces the live window, e.g. one copied at a step boundary."""
        return {
            "trainable": {key: t.clone() for key, t in self.trainable_state().items()},
            "optimizer": self.optimizer.state_dict(),
            **(window if window is not None else self.window_state()),
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_trainable_state(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.windows = {}
        for layer in self.layers.values():
            layer.observer = None
        for name, saved in state["windows"].items():
            layer = self.layers[name]
            stats = self.new_window(name, layer)
            stats.load_state_dict(saved)
            self.windows[name] = stats
            layer.observer = stats
        self.window_steps = int(state["window_steps"])
        self.totals = dict(state["totals"])

    def adapter_config(self) -> dict[str, Any]:
        return {
            "budget": {"total": sum(self.budgets.values()), "per_module": dict(self.budgets)},
            "settings": self.settings.model_dump(),
            "base_dtype": self.settings.base_dtype,
            "modules": {
                name: {
                    "k": layer.k,
                    "input_dtype": str(layer.input_dtype).removeprefix("torch."),
                    "pattern": str(self.plans[name].pattern) if self.plans[name].pattern else None,
                    "target": self.plans[name].target,
                    **layer.identity,
                }
                for name, layer in self.layers.items()
            },
        }

    def save_adapter(self, path: str, extra: dict[str, Any] | None = None) -> None:
        """Write `seft_adapter.safetensors` at `path`; `extra` joins its config (e.g. `base_model`, the base dir)."""
        from sparsetune.train.sparse_delta.adapter import save_adapter

        save_adapter(path, self.trainable_state(), {**self.adapter_config(), **(extra or {})})

    def merge(self) -> nn.Module:
        """Replace the DeltaLinears by merged plain Linears in the input's dtype, releasing their bases; returns the
        model. The entries, re-pruned positions and optimizer state stay (the adapter and the report read them)."""
        return merge_model(self.model, self.layers)
