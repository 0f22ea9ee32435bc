"""`seft --method granet`: GraNet on the masked fine-tuning machinery.

Every trained matrix is a dense parameter with zeros at its inactive positions plus a compact index set; its
gradient and AdamW state exist for the active entries only (`compact_adamw.SparseAdamW`), as in `masked-ft`. At
each update step (`schedule.GranetSchedule`) the masks change:

1. one gradient pass on the first micro-batch of the step just trained gives each matrix's dense gradient (summed
   over processes; one matrix's at a time, consumed during backward) and, for the Wanda score, its inputs' squared
   norms (summed over processes and over every update so far: the running input norms);
2. pruning to the schedule's sparsity (per matrix, or one global threshold), or at the last pruning step with an
   N:M target, imposing the pattern;
3. regeneration: the cosine-decayed fraction of each matrix's remaining entries with the lowest score is dropped
   and as many inactive entries with the largest |gradient| grow, at 0 with fresh optimizer state (a dropped entry
   grown back in the same update keeps its value and state).

Every choice is a deterministic function of the weights, the summed gradients and norms, so every process holds
the same masks. Checkpoints hold the weights, the optimizer state (the masks are its index sets) and the running
norms; the schedule is a function of the step.

Glue to the loop (`loop.TrainingMethod`, built from the `TrainingContext`): `__init__` (build, and the update of
step 0 when the schedule starts there), `checkpoint_tensors`, `reduce_grads` (peak gradient bytes),
`update_topology` (the update, when one is due), `sparsity` (the per-step invariant), `report` (memory and the
schedule), `finish` (the output report's pattern and source, the untrained zeros). A resume restores the masks and
the running norms through the optimizer's `load_state_dict`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from sparsetune.distributed import sum_in_place
from sparsetune.errors import SparsetuneError
from sparsetune.patterns import NMPattern, parse_pattern
from sparsetune.prune import wanda
from sparsetune.train.compact_adamw import SparseAdamW, untrained_zeros
from sparsetune.train.granet import selection
from sparsetune.train.granet.schedule import GranetSchedule, keep_count
from sparsetune.train.loop import Finished, MethodReport, TrainingContext, TrainingMethod
from sparsetune.train.masked_ft import active_weights_adamw
from sparsetune.train.sparse_start import SparseStart

log = logging.getLogger(__name__)


@torch.no_grad()
def set_active(optimizer: SparseAdamW, name: str, new_active: torch.Tensor) -> None:
    """Make `new_active` (flat bool) the active set of sparse weight `name`: entries that stay keep their value,
    moments and step counts; removed entries become 0; added ones start at 0 with zero moments and a fresh step
    counter (a new cohort born now)."""
    weight, state = optimizer.weights[name], optimizer.sparse_state[name]
    device = weight.param.device
    new_active = new_active.to(device)
    old = weight.active
    keep = new_active[old]
    added = new_active.clone()
    added[old] = False
    grown = added.nonzero().squeeze(1)
    flat = weight.param.view(-1)
    flat.index_fill_(0, old[~keep], 0)
    flat.index_fill_(0, grown, 0)
    weight.index = torch.cat([weight.index[keep], grown.to(torch.int32)])
    m, v = state.moments.load()
    fresh = torch.zeros(grown.numel(), device=m.device, dtype=m.dtype)
    state.moments.store(torch.cat([m[keep], fresh]), torch.cat([v[keep], fresh]))
    if state.tracked is not None:
        state.tracked = torch.cat([state.tracked[keep], fresh])
    kept = [int(c.sum()) for c in keep.split(state.cohort_sizes)]
    cohorts = [(n, b) for n, b in zip(kept, state.cohort_births, strict=True) if n > 0]
    if grown.numel():
        cohorts.append((grown.numel(), optimizer.step_count))
    state.cohort_sizes = [n for n, _ in cohorts]
    state.cohort_births = [b for _, b in cohorts]
    state.grad = None


class GranetOptimizer:
    """The loop's view of the optimizer: SparseAdamW, with the running input norms in its state dict (so a resume
    restores the masks, the norms and the start's active counts here)."""

    def __init__(self, method: GranetTraining) -> None:
        self.method = method
        self.param_groups = method.adam.param_groups

    def step(self) -> None:
        self.method.adam.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.method.adam.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"adam": self.method.adam.state_dict(), "input_norms": self.method.input_norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        method = self.method
        method.adam.load_state_dict(state["adam"])
        norms = state["input_norms"]
        if norms is not None:
            method.input_norms = {n: t.to(method.context.dist.device) for n, t in norms.items()}
        for name, weight in method.sparse.items():
            method.start.active_counts[name] = weight.nnz


class GranetTraining(TrainingMethod):
    """GraNet on `context.model`, from the `seft` run's start (`context.start`, dense or pruned)."""

    def __init__(self, context: TrainingContext) -> None:
        assert context.start is not None
        self.context, self.cfg = context, context.cfg
        self.start: SparseStart = context.start
        cfg, start = self.cfg, self.start
        groups = start.parameter_groups()
        other = [g.name for g in groups if len(g.members) != 1 or start.kind(g.members[0]) != "linear"]
        if other:
            raise SparsetuneError(
                f"--method granet trains nn.Linear weights only; {other[0]} is a {start.kind(other[0])} matrix; "
                "use --method masked-ft for this model"
            )
        self.modules: dict[str, nn.Linear] = {g.name: start.modules[g.name] for g in groups}  # type: ignore[misc]
        self.pattern: NMPattern | None = parse_pattern(cfg.pattern) if cfg.pattern else None
        final = self.pattern.sparsity if self.pattern is not None else float(cfg.target_sparsity)
        self.input_sparsity = start.global_sparsity()
        if final < self.input_sparsity - 1e-9:
            raise SparsetuneError(
                f"the input is already {self.input_sparsity:.4f} sparse, above the final sparsity {final:g}; "
                "GraNet only prunes further: raise --target-sparsity"
            )
        if self.pattern is not None:
            odd = [n for n, m in self.modules.items() if m.in_features % self.pattern.m]
            if odd:
                raise SparsetuneError(
                    f"{odd[0]} has {self.modules[odd[0]].in_features} input columns, not a multiple of "
                    f"M={self.pattern.m}; pick another --pattern"
                )
        initial = cfg.initial_sparsity if cfg.initial_sparsity is not None else min(self.input_sparsity, final)
        regrowth = (cfg.granet_regrow_fraction, cfg.granet_regrow_fraction_end)
        timing = (cfg.granet_start, cfg.granet_end_step, cfg.granet_interval, cfg.steps)  # start, end, interval, steps
        self.schedule = GranetSchedule(initial, final, *timing, *regrowth)
        self.sparse, self.adam = active_weights_adamw(start, groups, cfg)
        self.optimizer = GranetOptimizer(self)
        self.trainable = {name: w.param for name, w in self.sparse.items()}
        self.numel = {name: w.param.numel() for name, w in self.sparse.items()}
        self.input_counts = {name: w.nnz for name, w in self.sparse.items()}
        self.input_norms: dict[str, torch.Tensor] | None = None
        if cfg.granet_score == "wanda":
            device = context.dist.device
            self.input_norms = {n: wanda.init_stats(m.in_features, device) for n, m in self.modules.items()}
        start.release_masks()  # the masks live in the optimizer's index sets from here on
        self.peak_grad_bytes = 0
        self.first_update: dict[str, Any] | None = None
        if self.schedule.update_due(0):
            self.first_update = self.update(0)

    # -- the update -------------------------------------------------------------------------------------------

    def score(self, name: str) -> torch.Tensor:
        """What pruning and dropping rank by (float32, the weight's shape): |W|, or |W| * sqrt(running sum of x^2)."""
        weight = self.sparse[name].param.detach()
        if self.input_norms is None:
            return weight.float().abs()
        return wanda.scores(weight, self.input_norms[name])

    def keep_counts(self, step: int) -> dict[str, int]:
        """Active entries each matrix keeps after pruning at `step` (never more than it holds)."""
        sparsity = self.schedule.sparsity_at(step)
        nnz = {name: w.nnz for name, w in self.sparse.items()}
        if self.cfg.granet_scope == "layer":
            return {name: min(nnz[name], keep_count(self.numel[name], sparsity)) for name in self.sparse}
        keep = keep_count(sum(self.numel.values()), sparsity)
        if keep >= sum(nnz.values()):
            return nnz

        def active_scores(name: str) -> torch.Tensor:
            return self.score(name).view(-1)[self.sparse[name].active]

        return selection.global_keep_counts(active_scores, list(self.sparse), keep)

    def update(self, step: int) -> dict[str, Any]:
        """The mask update after step `step` (0: before training): prune, then regenerate; returns its counts."""
        schedule = self.schedule
        prune = schedule.prunes_at(step)
        impose = prune and self.pattern is not None and schedule.is_final(step)
        imposed = self.pattern is not None and step > schedule.last_prune_step
        regrow = schedule.regrow_fraction_at(step) if step >= 1 else 0.0
        needs_pass = regrow > 0 or impose or (self.input_norms is not None and prune)
        keeps: dict[str, int] = {}
        totals = {"pruned": 0, "filled": 0, "dropped": 0, "grown": 0}

        def plan() -> None:  # after the norms of this update are in: the global threshold reads them
            if prune and not impose:
                keeps.update(self.keep_counts(step))

        def apply(name: str, grad: torch.Tensor | None) -> None:
            weight = self.sparse[name]
            shape = (weight.param.shape[0], weight.param.shape[1])
            change = selection.layer_update(
                self.score(name).view(-1),
                weight.mask().view(-1),
                grad.abs().view(-1) if grad is not None else None,
                keeps.get(name),
                regrow,
                shape,
                self.pattern,
                impose_pattern=impose,
                pattern_imposed=imposed,
            )
            counts = {
                "pruned": change.pruned,
                "filled": change.filled,
                "dropped": change.dropped,
                "grown": change.grown,
            }
            if any(counts.values()):
                set_active(self.adam, name, change.active)
            for key, count in counts.items():
                totals[key] += count

        if needs_pass:
            self.gradient_pass(step, plan, apply)
        else:
            plan()
            for name in self.sparse:
                apply(name, None)
        for name, weight in self.sparse.items():
            self.start.active_counts[name] = weight.nnz
        nnz = sum(w.nnz for w in self.sparse.values())
        return {
            "step": step,
            "sparsity": round(1 - nnz / max(1, sum(self.numel.values())), 6),
            "regrow_fraction": round(regrow, 6),
            **totals,
        }

    def gradient_pass(
        self, step: int, plan: Callable[[], None], consume: Callable[[str, torch.Tensor | None], None]
    ) -> None:
        """Forward/backward on the first micro-batch of the batch of `step` (0: the first batch): fold the inputs'
        squared norms into the running norms and call `plan()`, then hand each matrix's dense gradient (summed over
        processes) to `consume` as backward finishes it; a matrix no gradient reached gets zeros."""
        context, cfg = self.context, self.cfg
        idx = context.order.batch(max(step - 1, 0))[: cfg.batch_size // cfg.grad_accum]
        total = max(1, sum(context.example_labels[i] for i in idx))
        stats: dict[str, torch.Tensor] = {}
        recording = [self.input_norms is not None]  # off after the forward: checkpointed blocks run it again
        hooks: list[Any] = []
        if self.input_norms is not None:
            for name, module in self.modules.items():
                stats[name] = wanda.init_stats(module.in_features, context.dist.device)

                def record(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    if recording[0]:
                        wanda.accumulate(stats[name], args[0].detach())

                hooks.append(module.register_forward_pre_hook(record))
        seen: set[str] = set()

        def on_grad(name: str) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:
                assert param.grad is not None
                grad = sum_in_place(param.grad.detach())
                param.grad = None
                seen.add(name)
                consume(name, grad)
                self.peak_grad_bytes = max(self.peak_grad_bytes, grad.numel() * grad.element_size())

            return hook

        try:
            with self.adam.dense_grads():
                hooks += [w.param.register_post_accumulate_grad_hook(on_grad(n)) for n, w in self.sparse.items()]
                loss = context.nll(idx) / total
                recording[0] = False
                if self.input_norms is not None:
                    sum_in_place(list(stats.values()))
                    for name, s in stats.items():
                        self.input_norms[name].add_(s)
                plan()
                loss.backward()
        finally:
            for h in hooks:
                h.remove()
            for p in context.model.parameters():
                p.grad = None
        for name, weight in self.sparse.items():
            if name not in seen:
                consume(name, torch.zeros_like(weight.param))

    # -- the loop's hooks -------------------------------------------------------------------------------------

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainable

    def reduce_grads(self) -> None:
        """SparseAdamW averages the compact gradients itself; measure them here, while they exist."""
        grads = [s.grad for s in self.adam.sparse_state.values() if s.grad is not None]
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(g.numel() * g.element_size() for g in grads))

    def update_topology(self, step: int) -> dict[str, Any] | None:
        """The mask update after step `step` when the schedule has one due (none after the last step)."""
        if step >= self.cfg.steps or not self.schedule.update_due(step):
            return None
        return self.update(step)

    def sparsity(self) -> float:
        """The sparsity of the trained matrices' masks now (entries grown at 0 count as active); also verify that
        no matrix holds a non-zero outside its active entries."""
        start = self.start
        nonzeros = start.nonzeros()
        for name, weight in self.sparse.items():
            if nonzeros[name] > weight.nnz or start.active_counts[name] != weight.nnz:
                raise RuntimeError(
                    f"internal error: {name} has {weight.nnz} active entries and {nonzeros[name]} non-zeros; "
                    "please report this bug"
                )
        return start.sparsity_of({name: w.nnz for name, w in self.sparse.items()})

    def report(self) -> MethodReport:
        optimizer = dict(self.adam.memory_report())
        optimizer.pop("gradient_bytes", None)  # the optimizer's count; grad_bytes is the measured one
        norms = sum(t.numel() * 4 for t in self.input_norms.values()) if self.input_norms is not None else 0
        memory = {
            "trainable_params": sum(w.nnz for w in self.sparse.values()),
            "grad_bytes": self.peak_grad_bytes,
            "input_norm_bytes": norms,
            **optimizer,
        }
        schedule, cfg = self.schedule, self.cfg
        fields = {
            "sparsity_before": self.input_sparsity,
            "granet": {
                "input_sparsity": self.input_sparsity,
                "initial_sparsity": schedule.initial_sparsity,
                "final_sparsity": schedule.final_sparsity,
                "pattern": str(self.pattern) if self.pattern is not None else "unstructured",
                "score": cfg.granet_score,
                "scope": cfg.granet_scope,
                "start": schedule.start,
                "end": schedule.end,
                "last_prune_step": schedule.last_prune_step,
                "interval": schedule.interval,
                "step0_update": self.first_update,
            },
        }
        return MethodReport(memory, fields)

    def finish(self) -> Finished:
        """Check the final sparsity was reached, and record the target (and, for a dense input, the input as the
        source model) in the output's report; the end-of-run check leaves out the zeros grown where no gradient
        reaches."""
        start, cfg = self.start, self.cfg
        self.check_final()
        report = dict(start.report or {})
        source = report.get("source_model") or (report.get("settings") or {}).get("model") or cfg.model
        report.update(
            method="granet",
            pattern=str(self.pattern) if self.pattern is not None else "unstructured",
            target_sparsity=self.schedule.final_sparsity,
            source_model=source,
        )
        start.report = report
        start.pattern = self.pattern
        return Finished(untrained_zeros={name: self.untrained_zeros(name) for name in self.sparse})

    def check_final(self) -> None:
        """The masks hold exactly the final sparsity (per matrix with --granet-scope layer, in total with global;
        before any regeneration, GraNet never adds entries) or exactly N of every M."""
        final = self.schedule.final_sparsity
        counts = {n: w.nnz for n, w in self.sparse.items()}
        if self.pattern is not None:
            expected = {n: self.numel[n] // self.pattern.m * self.pattern.n for n in counts}
        elif self.cfg.granet_scope == "layer":  # a matrix the input held sparser than the target stays so
            expected = {n: min(self.input_counts[n], keep_count(self.numel[n], final)) for n in counts}
        else:
            expected = {"all": keep_count(sum(self.numel.values()), final)}
            counts = {"all": sum(counts.values())}
        off = [n for n in counts if counts[n] != expected[n]]
        if off:
            raise RuntimeError(
                f"internal error: {off[0]} holds {counts[off[0]]} active entries at the end, expected "
                f"{expected[off[0]]}; please report this bug"
            )

    def untrained_zeros(self, name: str) -> int:
        """Zeros among matrix `name`'s active entries that never had a gradient (grown where none reaches)."""
        return untrained_zeros(self.adam, self.sparse[name])
