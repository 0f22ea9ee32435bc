"""`sparsetune seft`: fine-tune a pruned model and keep its sparsity exact, on the one training loop (`loop.py`).

Methods (the strategy objects in METHODS; adding one is a class and a table entry):
- `seft` (the default): sparse-delta fine-tuning, a budget of trainable entries over the frozen pruned base
  (`sparse_delta.method.SparseDelta`);
- `masked-ft`: the active weights under a fixed mask (`masked_ft.py`);
- `lora-reprune` (LoRA*): dense LoRA, merge, Wanda re-prune to the starting sparsity/pattern (`lora_reprune.py`);
- `granet`: GraNet's gradual pruning with neuroregeneration to a target sparsity or N:M (`granet/`); its input may
  be dense.

Any method may distil from a dense teacher (`--distill-loss`, `distill.py`).

A start whose mask drifted from its target counts (a dense edit after pruning) is first restored by a
sensitivity re-prune. Multi-process runs (torchrun / accelerate launch) join the process group through accelerate.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparsetune import data, loading, masks
from sparsetune.distributed import sum_in_place
from sparsetune.outputs import atomic_output_dir, package_versions, peak_memory
from sparsetune.streaming import trim_heap
from sparsetune.train.checkpoint import NOT_IDENTITY
from sparsetune.train.distill import build_distiller
from sparsetune.train.examples import DataOrder, Examples, instruction_examples, packed_windows
from sparsetune.train.granet.method import GranetTraining
from sparsetune.train.loop import Finished, Trainer, TrainingContext, TrainingMethod, mean_step_s
from sparsetune.train.loop import print_summary as print_table
from sparsetune.train.lora_reprune import LoraReprune
from sparsetune.train.masked_ft import MaskedFineTuning
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.sparse_delta import streamed_base
from sparsetune.train.sparse_delta.method import SparseDelta
from sparsetune.train.sparse_start import SparseStart, find_sparse_start, read_input_report, sensitivity_mask

log = logging.getLogger(__name__)

# --method -> the method that trains it, built as METHOD(context) once the model and data are loaded.
METHODS: dict[str, Callable[[TrainingContext], TrainingMethod]] = {
    "seft": SparseDelta,
    "masked-ft": MaskedFineTuning,
    "lora-reprune": LoraReprune,
    "granet": GranetTraining,
}


def load_examples(tokenizer: Any, source: str, cfg: SeftConfig, skip_tokens: int = 0) -> Examples:
    """Packed LM windows for text, Alpaca examples with the loss on the response only."""
    records = data.load_records(source, "train", cfg.data_dir)
    if all(data.is_instruction_record(r) for r in records):
        return instruction_examples(tokenizer, records, cfg.seqlen)
    return packed_windows(tokenizer, records, cfg.seqlen, skip_tokens, source)


class FinetuneRun(Trainer):
    """The `seft` task: a pruned model, its start masks (`start`), text or instruction data, and the method."""

    RESUME_HINT = "resume with the same model and settings"

    def setup(self, inputs: tuple[str, ...] = ()) -> None:
        super().setup(inputs=(self.cfg.model,))

    def load(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        report = read_input_report(cfg.model)
        loaded = self.load_streamed(report)
        if loaded is None:
            model, tokenizer = loading.load_model(
                cfg.model, dtype=cfg.dtype, device=str(self.ctx.device), trust_remote_code=cfg.trust_remote_code
            )
            self.start = find_sparse_start(model, report, allow_dense=cfg.method == "granet")
        else:
            model, tokenizer, self.start = loaded
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.distiller = build_distiller(cfg, model, tokenizer, self.start.report, self.ctx.device)
        self.train_data = load_examples(tokenizer, cfg.data, cfg, cfg.skip_tokens)
        self.val_data = load_examples(tokenizer, cfg.val_data, cfg) if cfg.val_data else None
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()

    def load_streamed(self, report: dict[str, Any] | None) -> tuple[torch.nn.Module, Any, SparseStart] | None:
        """`--base-dtype nf4`: the model read block by block, its targeted Linears wrapped over NF4 bases as each
        block is read (`streamed_base`); None where the run loads the whole model (an input that does not stream,
        --no-stream, or a start whose masks drifted from their targets: their re-prune runs the model in full
        precision)."""
        source, why = streamed_base.streamable(self.cfg)
        if source is None:
            log.debug("seft loads the whole model: %s", why)
            return None
        try:
            model, tokenizer, deltas = streamed_base.load_streamed(self.cfg, self.ctx.device, source, report)
            start = find_sparse_start(model, report, deltas.packed(), deltas.target_order)
            if start.drifted():
                raise streamed_base.StartDrifted(start.drifted()[0])
        except streamed_base.StartDrifted as drifted:
            log.info("%s is off its target count or pattern: seft loads the whole model to restore it", drifted)
        else:
            start.deltas = deltas
            return model, tokenizer, start
        trim_heap()  # the streamed model is gone with the exception
        return None

    def build_method(self, context: TrainingContext) -> TrainingMethod:
        if self.start.drifted():
            self.restore_target_counts()
        self._identity = run_identity(self.cfg, self.start)  # the start masks are final here; a resume must match
        return METHODS[self.cfg.method](context)

    def identity(self) -> dict[str, Any]:
        return self._identity

    def restore_target_counts(self) -> None:
        """Sensitivity re-prune of the modules whose mask drifted from the target count or pattern."""
        names = self.start.drifted()
        new_masks: dict[str, torch.Tensor] = {}

        def choose(name: str, grad: torch.Tensor) -> None:
            w = self.start.modules[name].weight.detach()
            new_masks[name] = sensitivity_mask(w, grad, self.start.targets[name], self.start.pattern)

        self.growth_gradients(0, {n: self.start.modules[n].weight for n in names}, choose)
        event: dict[str, Any] = {"step": 0, "modules": len(names), "before": 0, "after": 0}
        with torch.no_grad():
            for name in names:
                mask = new_masks[name]
                event["before"] += int(self.start.masks[name].sum())
                event["after"] += int(mask.sum())
                self.start.modules[name].weight.masked_fill_(~mask, 0.0)
                self.start.set_mask(name, mask)
                self.start.modules[name].weight.requires_grad_(False)
        log.info("sensitivity re-prune restored the target count of %d modules", len(names))
        self.state.reprunes.append(event)

    def growth_gradients(
        self,
        step: int,
        weights: dict[str, torch.Tensor],
        consume: Callable[[str, torch.Tensor], None],
    ) -> None:
        """Hand `consume(name, dense gradient)` each weight's dense gradient on the training batch of `step`
        (all-reduced over ranks), module by module during the backward pass.

        Each gradient is consumed and freed as soon as backward has finished it, so at most one module's dense
        gradient exists at a time."""
        batches = grow_batches(self.order, step, 1)
        total = sum(self.example_labels[i] for idx in batches for i in idx)
        hooks = []

        def consume_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:
                assert param.grad is not None
                grad = sum_in_place(param.grad.detach())
                param.grad = None
                consume(name, grad)

            return hook

        for w in weights.values():
            w.requires_grad_(True)
        try:
            for j, idx in enumerate(batches):
                if j == len(batches) - 1:
                    hooks += [w.register_post_accumulate_grad_hook(consume_hook(n)) for n, w in weights.items()]
                (self.nll(self.batch(self.train_data, idx)) / total).backward()
        finally:
            for h in hooks:
                h.remove()
            for w in weights.values():
                w.grad = None

    # -- output -----------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """The method's end (LoRA*: merge and re-prune), the end-of-run sparsity check, then rank 0 writes the HF
        dir, the updated report and the log."""
        t0 = time.perf_counter()
        finished = self.finish_method()
        finish_s = time.perf_counter() - t0
        start = self.start
        if finished.blocks is not None:
            return self.finish_by_blocks(finished, finish_s)
        weights = {n: finished.weights[n] if n in finished.weights else start.modules[n].weight for n in start.numel}
        start_zeros = {n: w.numel() - start.active_counts[n] for n, w in weights.items()}
        self.check_final_sparsity(weights, start_zeros, finished)
        stats = masks.sparsity_stats(weights)
        report = build_report(self, stats, self.memory_report(), finished.reprune, finish_s)
        self.write_output(report, "seft", finished)
        return report

    def finish_by_blocks(self, finished: Finished, finish_s: float) -> dict[str, Any]:
        """`finish` for a model the method merges block by block (`Finished.blocks`): each block is merged, checked,
        measured and (rank 0, when the model is written) written as one shard, then freed; nothing is written
        unless the whole check passes (the output dir is renamed into place at the end)."""
        assert finished.blocks is not None
        start = self.start

        def start_zeros(name: str, weight: torch.Tensor) -> int:
            return weight.numel() - start.active_counts[name]

        def conclude(tmp: Path | None) -> dict[str, Any]:
            write = tmp if finished.write_model else None
            assert finished.blocks is not None
            modules, counts = self.merge_blocks(finished.blocks, write, start_zeros)
            self.check_sparsity_kept({n: counts[n] for n in start.numel}, finished.zero_tolerance)
            stats = combined_stats({n: modules[n] for n in start.numel})
            report = build_report(self, stats, self.memory_report(), finished.reprune, finish_s)
            if tmp is not None:
                self.write_run_files(tmp, report, "seft", finished)
            return report

        if self.ctx.is_main:
            with atomic_output_dir(self.out, overwrite=self.overwrite) as tmp:
                report = conclude(tmp)
        else:
            report = conclude(None)
        self.ctx.barrier()
        report["rank"] = self.ctx.rank
        return report


def grow_batches(order: DataOrder, step: int, count: int) -> list[list[int]]:
    """The batches that score growth at topology step `step`: the last `count` training batches (the first ones
    before training), so the growth pass holds activations of exactly the shapes a training step holds."""
    first = max(0, step - count)
    return [order.batch(first + j) for j in range(count)]


def run_identity(cfg: SeftConfig, start: SparseStart) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the settings that change the result and the starting masks."""
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_IDENTITY}
    digest = hashlib.blake2b(digest_size=8)
    for name in start.numel:  # one module at a time, packed to bits on the CPU: no model-sized copy
        digest.update(name.encode())
        digest.update(np.packbits(start.mask(name).detach().reshape(-1).cpu().numpy()).tobytes())
    return {**settings, "start_mask": digest.hexdigest()}


def combined_stats(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`masks.sparsity_stats` of modules measured apart (its per-module entries, in order): the same totals."""
    zeros = sum(m["zeros"] for m in modules.values())
    total = sum(m["numel"] for m in modules.values())
    return {"global_sparsity": zeros / max(1, total), "zeros": zeros, "numel": total, "modules": modules}


def build_report(
    recipe: FinetuneRun,
    stats: dict[str, Any],
    memory: dict[str, Any],
    reprune: dict[str, Any] | None,
    finish_s: float,
) -> dict[str, Any]:
    """The input's sparsity report, with this run's module stats (`masks.sparsity_stats` of the trained weights)
    and one more entry in `finetune_history`."""
    cfg, start, state = recipe.cfg, recipe.start, recipe.state
    before = start.global_sparsity()
    losses = [r["loss"] for r in state.log]
    totals = topology_totals(state.topology)
    fields = recipe.method.report().fields
    distiller = recipe.distiller
    distillation = {"distillation": distiller.report(mean_step_s(state), cfg.grad_accum)} if distiller else {}
    entry = {
        "method": cfg.method,
        "data": cfg.data,
        "steps": state.step,
        "tokens": state.tokens,
        "processes": recipe.ctx.world,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "final_val_loss": next((r["val_loss"] for r in reversed(state.log) if "val_loss" in r), None),
        "sparsity_before": before,
        "sparsity_after": stats["global_sparsity"],
        "topology_updates": len(state.topology),
        "topology_totals": totals,
        **fields,
        "memory": memory,
        "mean_step_s": mean_step_s(state),
        "finish_s": round(finish_s, 3),
        "reprune": reprune["summary"] if reprune else None,
        **distillation,
        "settings": cfg.model_dump(mode="json"),
        "versions": package_versions(),
    }
    report = dict(start.report or {"method": "unknown", "pattern": str(start.pattern or "unstructured")})
    report.pop("summary", None)
    report.update(
        global_sparsity=stats["global_sparsity"],
        modules=stats["modules"],
        memory=peak_memory(),
        finetune_history=[*report.get("finetune_history", []), entry],
    )
    summary = {
        "method": cfg.method,
        "steps": state.step,
        "tokens": state.tokens,
        "first_loss": entry["first_loss"],
        "final_loss": entry["final_loss"],
        "final_val_loss": entry["final_val_loss"],
        "sparsity_before": before,
        "sparsity_after": stats["global_sparsity"],
        "topology_totals": totals,
        "trainable_params": memory.get("trainable_params"),
        "grad_bytes": memory.get("grad_bytes"),
        "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
        "peak_rss_bytes": memory.get("peak_rss_bytes"),
        "cuda_peak_bytes": memory.get("cuda_peak_bytes"),
        "activation_checkpointing": memory.get("activation_checkpointing"),
        "loss_chunk_tokens": memory.get("loss_chunk_tokens"),
        "cpu_block_cache_mb": memory.get("cpu_block_cache_mb"),
        "cpu_block_cache": memory.get("cpu_block_cache"),
        "sparsity": stats["global_sparsity"],
        **fields,
        **distillation,
        "mean_step_s": entry["mean_step_s"],
        "output": str(recipe.out),
    }
    return {"summary": summary, **report}


def topology_totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Sums of the integer counts of every topology update (seft: grown, dropped, reactivated, repruned, restored)."""
    totals: dict[str, int] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and isinstance(value, int) and not isinstance(value, bool):
                totals[key] = totals.get(key, 0) + value
    return totals


def run_seft(cfg: SeftConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune seft` flow: setup, train (checkpointing), finish (save), cleanup."""
    return FinetuneRun(cfg, overwrite, show_progress).run()


def activation_row(s: dict[str, Any]) -> str:
    chunk = s["loss_chunk_tokens"]
    return f"{s['activation_checkpointing']} / " + (f"{chunk} tokens" if chunk else "off (whole logits)")


def print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    rows = [("sparsity before -> after", f"{s['sparsity_before']:.4f} -> {s['sparsity_after']:.4f}")]
    t = s["topology_totals"]
    if t.get("grown"):
        counts = " / ".join(f"{t.get(k, 0):,}" for k in ("grown", "dropped", "reactivated", "repruned"))
        rows.append(("grown / dropped / reactivated / re-pruned", counts))
    if s.get("trainable_params") is not None:
        rows.append(("trainable params", f"{s['trainable_params']:,}"))
    for key in ("grad_bytes", "optimizer_state_bytes", "peak_rss_bytes"):
        if s.get(key) is not None:
            rows.append((key.removesuffix("_bytes").replace("_", " "), f"{s[key] / 2**20:.1f} MiB"))
    if s.get("activation_checkpointing") is not None:
        rows.append(("activation checkpointing / loss chunk", activation_row(s)))
    d = s.get("distillation")
    if d:
        share = f"{d['teacher_step_share']:.0%} of the step" if d["teacher_step_share"] is not None else ""
        teacher = f"{d['teacher']} ({d['teacher_dtype']}, {d['teacher_weight_bytes'] / 2**20:.1f} MiB) {share}"
        rows.append((f"distillation: {d['loss']}", teacher))
    print_table(f"sparsetune seft: {s['method']}", s, rows)
