"""`seft --method seft` (the default): sparse-delta fine-tuning, a training method of the one loop (`loop.py`).

The pruned model's targeted Linears become a frozen base plus a budget of trainable (index, delta) entries
(`SparseDelta`: budget, selection windows, reselection, re-prune, AdamW over the entries, merge, adapter). The loop
drives it through the `TrainingMethod` hooks and steps and checkpoints it as its optimizer: AdamW over the entries
plus the window's step count, with a state dict that holds everything a resume needs besides the checkpoint tensors
(re-pruned positions, the open window, the totals).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import distributed, structure
from sparsetune.errors import SparsetuneError
from sparsetune.streaming import trim_heap
from sparsetune.train.loop import Finished, MergedBlocks, MergedPart, MethodReport, TrainingContext, TrainingMethod
from sparsetune.train.sparse_delta import reprune as rp
from sparsetune.train.sparse_delta import selection
from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE, save_adapter
from sparsetune.train.sparse_delta.budget import module_budgets
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.optimizer import DeltaAdamW
from sparsetune.train.sparse_delta.wrap import (
    ModulePlan,
    check_sparse,
    merge_model,
    merged_counts,
    merged_weight,
    plan_modules,
    wrap_model,
)

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


def delta_settings(cfg: Any) -> DeltaSettings:
    """The method's settings out of a SeftConfig (which extends DeltaSettings): the fields that were set, so that
    a density budget does not also pass the default rank."""
    names = set(DeltaSettings.model_fields)
    values = {name: getattr(cfg, name) for name in names & cfg.model_fields_set}
    return DeltaSettings(**values)


def mean_over_processes(t: torch.Tensor) -> None:
    distributed.mean_in_place([t])


class SparseDelta(TrainingMethod):
    """Sparse-delta fine-tuning of `context.model`: the trainable entries, their AdamW, the selection windows and
    the re-prune.

    Built from the run's context: its model (a pruned HF causal LM, whose targeted Linears are replaced in place by
    DeltaLinear), the settings (`DeltaSettings` fields, steps, AdamW's betas/eps/weight decay, --optim, the seed of
    the random start positions), the process group and the start (`sparse_start.SparseStart`).

    Multi-process: every window gradient (each module's dense gradient inside its backward) is mean all-reduced, so
    the window statistics, and every choice made from them, are the same on every rank; `reduce_grads` averages
    delta.grad.
    """

    def __init__(self, context: TrainingContext) -> None:
        cfg, model = context.cfg, context.model
        self.context = context
        self.settings = settings = delta_settings(cfg)
        self.total_steps = cfg.steps
        self.reduce: Reduce | None = mean_over_processes if context.dist.world > 1 else None
        self.model = model
        loaded = context.start.deltas if context.start is not None else None
        if loaded is not None:  # wrapped as the blocks loaded (a streamed NF4 base), from the same facts
            self.plans: dict[str, ModulePlan] = check_sparse(loaded.plans)
            self.budgets = loaded.budgets
            self.layers: dict[str, DeltaLinear] = loaded.layers
            self.streamed = loaded.streamed
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in self.layers.values():  # the run's load froze every parameter, the entries' too
                layer.delta.requires_grad_(True)
        else:
            self.streamed = None
            modules = select_targets(model, settings.targets, settings.ignore)
            self.plans = plan_modules(modules)
            self.budgets = module_budgets(
                {name: plan.shape for name, plan in self.plans.items()},
                delta_rank=settings.delta_rank,
                delta_density=settings.delta_density,
                capacity={name: plan.target for name, plan in self.plans.items()},
            )
            self.layers = wrap_model(model, modules, self.budgets, settings.base_dtype, cfg.seed)
        betas = (cfg.beta1, cfg.beta2)
        self.adamw = DeltaAdamW(self.layers, betas, cfg.eps, cfg.weight_decay, cfg.optim == "adamw8bit")
        self.windows: dict[str, selection.WindowStats] = {}
        self.window_steps = 0
        self.totals = {"grown": 0, "dropped": 0, "reactivated": 0, "repruned": 0, "restored": 0}
        self.peak: dict[str, int] = {"grad_bytes": 0, "window_bytes": 0}
        self._sparsity: float | None = None
        self.merged = False
        self.nf4_zeroed: int | None = None
        start = context.start
        if start is not None:
            # The trained modules' weights are the layers' from here (base plus deltas): the start must not keep
            # the input Linears alive (an NF4 or bf16 base replaced them), and its masks (a byte per weight) are not
            # needed past this point (the resume identity was taken).
            for name in self.layers:
                start.modules.pop(name, None)
                start.matrices.pop(name, None)
            start.release_masks()
            start.deltas = None
            # What seft keeps is each module's non-zero count as loaded (a 2:4 start whose dense model held zeros
            # has fewer than N per group in places; nothing can fill those), so the end-of-run check compares with it.
            for name, target in self.targets().items():
                if name in start.active_counts:
                    start.active_counts[name] = target

    # -- the loop's optimizer: AdamW over the entries, and the window's step count ------------------------------

    @property
    def optimizer(self) -> SparseDelta:
        return self

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.adamw.param_groups

    def step(self) -> None:
        self.adamw.step()
        if self.windows:  # one more step behind the open window's statistics
            self.window_steps += 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adamw.zero_grad(set_to_none)

    # -- the loop's hooks -------------------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.delta"] = layer.delta
            tensors[f"{name}.indices"] = layer.indices
        return tensors

    def before_step(self, step: int) -> None:
        """Open the selection window at its first step (`step` 0-based: optimizer step step + 1 is about to run)."""
        s = self.settings
        if not self.windows and selection.in_window(step + 1, s.reselect_every, s.select_window, self.total_steps):
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

    def reduce_grads(self) -> None:
        layers = list(self.layers.values())
        if self.context.dist.world > 1:  # every rank must reduce the same tensors
            for layer in layers:
                if layer.delta.grad is None:
                    layer.delta.grad = torch.zeros_like(layer.delta)
        distributed.mean_in_place([layer.delta.grad for layer in layers if layer.delta.grad is not None])
        # measured while the gradients exist (after backward, before the optimizer step frees them)
        self.peak["grad_bytes"] = max(self.peak["grad_bytes"], self.adamw.grad_bytes())
        window = sum(stats.nbytes() for stats in self.windows.values())
        self.peak["window_bytes"] = max(self.peak["window_bytes"], window)

    def update_topology(self, step: int) -> dict[str, Any] | None:
        """The reselection and re-prune after optimizer step `step` when one is due; its counts less the per-module
        ones (they would make every log row hundreds of lines long)."""
        if not self.reselection_due(step):
            return None
        row = self.reselect(step)
        row.pop("modules")
        self._sparsity = None
        return row

    def sparsity(self) -> float:
        """The sparsity of the targeted modules (the input's, exactly); verifies after every reselection that every
        module's non-zero count (base non-zeros plus reactivated entries) equals its count in the input."""
        if self._sparsity is None:
            counts, targets = self.nonzero_counts(), self.targets()
            for name, count in counts.items():
                if count != targets[name]:
                    raise RuntimeError(
                        f"internal error: {name} has {count} non-zeros after a reselection, expected {targets[name]}; "
                        "please report this bug"
                    )
            numel = sum(layer.numel for layer in self.layers.values())
            self._sparsity = (numel - sum(counts.values())) / max(1, numel)
        return self._sparsity

    def report(self) -> MethodReport:
        memory = self.memory_report()
        memory["grad_bytes"] = self.peak["grad_bytes"]  # the gradients are freed by now: their measured peak
        memory["window_bytes"] = self.peak["window_bytes"]
        fields = {
            "trainable_params": memory["trainable_params"],
            "grad_bytes": memory["grad_bytes"],
            "optimizer_state_bytes": memory["optimizer_state_bytes"],
            "reactivated": self.reactivated_count(),
            "repruned": self.repruned_count(),
            "reselections": len(self.context.state.topology),
            "reselection_totals": dict(self.totals),
            "budget": sum(self.budgets.values()),
            "base_dtype": self.settings.base_dtype,
            "merged": self.merged,
            **({"nf4_zeroed": self.nf4_zeroed} if self.nf4_zeroed is not None else {}),
        }
        return MethodReport(memory, fields)

    def finish(self) -> Finished:
        """Merge the deltas into the model (unless --no-merge: then the merged weights are computed for the
        end-of-run check and the report only); the adapter is written either way. A model loaded block by block is
        merged so too, as the run's end walks it (`merged_parts`)."""
        if self.settings.base_dtype == "nf4":
            self.nf4_zeroed = self.count_nf4_zeroed()
        base_model = str(Path(self.context.cfg.model).expanduser().resolve())

        def write_adapter(out_dir: Path) -> None:
            self.save_adapter(str(out_dir / ADAPTER_FILE), extra={"base_model": base_model})

        if self.streamed is not None:  # loaded block by block: merged, checked and written so too
            self.sparsity()  # checked and cached while the bases exist: the merge releases them
            self.merged = self.settings.merge
            blocks = MergedBlocks(self.merged_parts, len(self.streamed.layers) + 1, self.streamed.location)
            return Finished(write_model=self.merged, write_files=write_adapter, blocks=blocks)
        weights: dict[str, torch.Tensor] = {}
        if self.settings.merge:
            self.sparsity()  # checked and cached while the bases exist: the merge releases them
            self.merge()
            self.merged = True
            if self.context.start is not None:  # the merged weights: Linears, and any frozen Conv1D / expert slices
                self.context.start.rebind(self.context.model)
            untrained = {name: layer.merged_counts["untrained_zeros"] for name, layer in self.layers.items()}
        else:
            weights = {name: merged_weight(layer) for name, layer in self.layers.items()}
            untrained = {
                name: merged_counts(layer, weights[name])["untrained_zeros"] for name, layer in self.layers.items()
            }
        return Finished(write_model=self.merged, write_files=write_adapter, weights=weights, untrained_zeros=untrained)

    def merged_parts(self, write: bool) -> Iterator[MergedPart]:
        """The streamed model's parts (each decoder block, then everything outside them), one at a time: each
        part's layers merged as `merge_model` merges them (into the model with --merge, its Linears then in the
        part's checkpoint-layout tensors when `write`; else into weights for the check and the report only), and
        a merged block freed as soon as the caller has it."""
        streamed, start = self.streamed, self.context.start
        # the start's matrices seft does not wrap (fused experts, Conv1D) stay frozen: measured with their block
        frozen = [name for name in start.numel if name not in self.layers] if start is not None else []
        prefixes = [f"{streamed.decoder_path}.{i}." for i in range(len(streamed.layers))]

        def part_of(name: str) -> int:
            return next((i for i, prefix in enumerate(prefixes) if name.startswith(prefix)), len(prefixes))

        for index in range(len(prefixes) + 1):
            layers = {name: layer for name, layer in self.layers.items() if part_of(name) == index}
            names = list(layers)
            if self.settings.merge:
                merge_model(self.model, layers)
                weights = {name: self.model.get_submodule(name).weight for name in names}
                untrained = {name: layer.merged_counts["untrained_zeros"] for name, layer in layers.items()}
            else:
                weights = {name: merged_weight(layer) for name, layer in layers.items()}
                untrained = {
                    name: merged_counts(layer, weights[name])["untrained_zeros"] for name, layer in layers.items()
                }
            weights.update({name: start.modules[name].weight for name in frozen if part_of(name) == index})
            state: dict[str, torch.Tensor] = {}
            if write:
                state = streamed.block_state(index) if index < len(prefixes) else streamed.rest_state()
            yield MergedPart(weights, untrained, state)
            del weights, state
            if self.settings.merge and index < len(prefixes):
                streamed.release_block(index)  # the run is over: the merged block is written and measured
            trim_heap()

    def count_nf4_zeroed(self) -> int:
        """Input non-zeros the NF4 base read as 0 during training and the merge gives back (those not re-pruned);
        the re-prune removes such weights first (their sensitivity is 0), so usually few are left."""
        total = 0
        for layer in self.layers.values():
            if layer.nf4_zeroed is not None:
                positions = layer.nf4_zeroed[0]
                total += int((~torch.isin(positions, layer.repruned)).sum())
        return total

    # -- the schedule -----------------------------------------------------------------------------------------

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
        self.adamw.reseed(name, change.slots, change.sum_g, change.sum_g2, change.observed)

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
            "grad_bytes": self.adamw.grad_bytes(),
            "optimizer_state_bytes": self.adamw.state_bytes(),
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

    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs besides the frozen base: entries, optimizer, an open window, the totals (copies
        where a later step changes them in place)."""
        return {
            "trainable": {key: t.clone() for key, t in self.trainable_state().items()},
            "optimizer": self.adamw.state_dict(),
            **self.window_state(),
            "totals": dict(self.totals),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_trainable_state(state["trainable"])
        self.adamw.load_state_dict(state["optimizer"])
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
        save_adapter(path, self.trainable_state(), {**self.adapter_config(), **(extra or {})})

    def merge(self) -> nn.Module:
        """Replace the DeltaLinears by merged plain Linears in the input's dtype, releasing their bases; returns the
        model. The entries, re-pruned positions and optimizer state stay (the adapter and the report read them)."""
        return merge_model(self.model, self.layers)
