"""`sparsetune seft` as a recipe: fine-tune a pruned model and keep its sparsity exact.

Methods:
- `seft` (sparsity evolution): train only the active weights; every `update_interval` steps drop the active weights
  with the smallest `drop_criterion` score (default |w| * ||x||; REFERENCE.md's accumulated update is one option),
  and grow as many inactive positions with the largest dense gradient (summed over the last `grow_batches` training
  batches at that step only). Grown weights start at 0 with fresh optimizer state. N:M patterns drop and grow
  inside each group.
- `masked-ft`: the same loop with a fixed mask.
- `lora-reprune` (LoRA*): dense LoRA on the projections, merge, Wanda re-prune to the starting sparsity/pattern.

Multi-process runs (torchrun / accelerate launch) join the process group through accelerate. Sparse weights are not
wrapped in DDP: their compact gradients are all-reduced by the optimizer, growth scores are all-reduced here, and
every rank then makes the same topology choice, which is verified by a hash after every update.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, masks, models
from sparsetune.distributed import dist_context
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory, write_json
from sparsetune.recipes import dump_yaml
from sparsetune.train.common import (
    IGNORE,
    LOG_FILE,
    CheckpointedTraining,
    DataOrder,
    Examples,
    TrainingState,
    all_reduce_sum,
    check_checkpoint_dir,
    collate,
    drop_fraction_at,
    instruction_examples,
    lr_at,
    packed_windows,
    progress_bar,
    rank_share,
    untrained_zeros,
)
from sparsetune.train.seft_config import SeftConfig

log = logging.getLogger(__name__)

REPORT_FILE = "sparsity_report.json"


# ----------------------------------------------------------------------------------------------------------------
# The starting mask: the pruned model's zeros, on the modules its sparsity report names.


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

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        self.masks[name] = mask
        self.active_counts[name] = int(mask.sum())

    def global_sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(self.active_counts.values()) / max(1, total)

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
            "the model has no zero weights in its decoder Linears, so there is no sparsity to keep; "
            "prune it first (sparsetune prune MODEL -o PRUNED) and pass PRUNED"
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


# ----------------------------------------------------------------------------------------------------------------
# Data: packed LM windows for text, Alpaca examples with the loss on the response only.


def load_examples(tokenizer: Any, source: str, cfg: SeftConfig, skip_tokens: int = 0) -> Examples:
    records = data.load_records(source, "train", cfg.data_dir)
    if all(data.is_instruction_record(r) for r in records):
        return instruction_examples(tokenizer, records, cfg.seqlen)
    return packed_windows(tokenizer, records, cfg.seqlen, skip_tokens, source)


def default_update_interval(kind: str) -> int:
    return 60 if kind == "text" else 10


# ----------------------------------------------------------------------------------------------------------------
# The recipe.


class SeftRecipe(CheckpointedTraining):
    """setup -> train -> save_output, with save_checkpoint every `checkpoint_every` steps and cleanup at the end."""

    def __init__(self, cfg: SeftConfig, overwrite: bool = False, show_progress: bool = True) -> None:
        self.cfg, self.overwrite, self.show_progress = cfg, overwrite, show_progress
        self.state = TrainingState()

    # -- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.output is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        self.out = check_output_dir(cfg.output, self.overwrite, inputs=(cfg.model,))
        ckpt = cfg.checkpoint_path()
        self.ckpt_dir = Path(ckpt).expanduser().resolve() if ckpt else None
        if self.ckpt_dir is not None:
            check_checkpoint_dir(self.ckpt_dir, cfg.resume)
        self.ctx = dist_context(cfg.device)
        torch.manual_seed(cfg.seed)
        model, tokenizer = models.load_model(
            cfg.model, dtype=cfg.dtype, device=str(self.ctx.device), trust_remote_code=cfg.trust_remote_code
        )
        self.model, self.tokenizer = model, tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.start = find_sparse_start(model, read_input_report(cfg.model))
        self.train_data = load_examples(tokenizer, cfg.data, cfg, cfg.skip_tokens)
        self.val_data = load_examples(tokenizer, cfg.val_data, cfg) if cfg.val_data else None
        micro = cfg.batch_size // cfg.grad_accum
        if micro < self.ctx.world:
            raise SparsetuneError(
                f"each micro-batch holds {micro} sequences but {self.ctx.world} processes share it; "
                "raise --batch-size or lower --grad-accum"
            )
        self.interval = cfg.update_interval or default_update_interval(self.train_data.kind)
        self.order = DataOrder(len(self.train_data), cfg.batch_size, cfg.seed)
        self.example_labels = [
            int((lab[1:] != IGNORE).sum()) if self.train_data.labels is not None else len(lab) - 1
            for lab in (self.train_data.labels or self.train_data.inputs)
        ]
        for p in model.parameters():
            p.requires_grad_(False)
        model.train()
        if self.start.drifted():
            self.restore_target_counts()
        if cfg.method == "lora-reprune":
            self._setup_lora()
        else:
            self._setup_sparse()
        self._identity = run_identity(cfg, self.start)  # the start masks are final here; a resume must match them
        self.init_guard()
        if cfg.resume:
            self.load_checkpoint()

    def _setup_sparse(self) -> None:
        from sparsetune.train.sparse_optim import SparseAdamW, SparseWeight

        weights = []
        for name, module in self.start.modules.items():
            module.weight.requires_grad_(True)
            weights.append(SparseWeight.from_mask(name, module.weight, self.start.masks[name]))
        cfg = self.cfg
        self.optimizer = SparseAdamW(
            weights,
            dense_params=[],
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            regrow_warmup=cfg.regrow_warmup,
            regrow_lr_scale=cfg.regrow_lr_scale,
            eight_bit=cfg.optim == "adamw8bit",
            track_updates=cfg.method == "seft" and cfg.drop_criterion == "update",
        )
        self.sparse = {w.name: w for w in weights}
        self.trainable = {name: m.weight for name, m in self.start.modules.items()}

    def _setup_lora(self) -> None:
        from sparsetune.train.lora_reprune import attach_lora, lora_parameters

        cfg = self.cfg
        self.model = attach_lora(self.model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        self.model.train()
        self.trainable = dict(lora_parameters(self.model))
        params = list(self.trainable.values())
        kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
        if cfg.optim == "adamw8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(params, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(params, **kwargs)
        self.sparse = {}

    def restore_target_counts(self) -> None:
        """Sensitivity re-prune of the modules whose mask drifted from the target count or pattern."""
        names = self.start.drifted()
        new_masks: dict[str, torch.Tensor] = {}

        def choose(name: str, grad: torch.Tensor, _norms: torch.Tensor | None) -> None:
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
        consume: Callable[[str, torch.Tensor, torch.Tensor | None], None],
        input_norms: bool = False,
    ) -> None:
        """Hand `consume(name, dense gradient, input norms)` each weight's dense gradient summed over the last
        --grow-batches training batches (all-reduced over ranks), module by module during the last backward pass.

        Each gradient is consumed and freed as soon as backward has finished it, so at most one module's dense
        gradient exists at a time (plus, with more than one grow batch, the running sum of the earlier batches).
        With `input_norms`, the sum of squared inputs per input column (the Wanda statistic) comes along."""
        cfg, ctx = self.cfg, self.ctx
        batches = grow_batches(self.order, step, cfg.grow_batches)
        total = sum(self.example_labels[i] for idx in batches for i in idx)
        norms: dict[str, torch.Tensor] = {}
        hooks = []
        if input_norms:
            from sparsetune.prune import wanda

            for name in weights:
                norms[name] = wanda.init_stats(self.start.modules[name].in_features, ctx.device)

                def record(_mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                    wanda.accumulate(norms[name], args[0].detach())

                hooks.append(self.start.modules[name].register_forward_pre_hook(record))

        def consume_hook(name: str) -> Callable[[torch.Tensor], None]:
            def hook(param: torch.Tensor) -> None:
                assert param.grad is not None
                grad = all_reduce_sum(param.grad.detach(), ctx)
                param.grad = None
                consume(name, grad, all_reduce_sum(norms[name], ctx) if input_norms else None)

            return hook

        for w in weights.values():
            w.requires_grad_(True)
        try:
            for j, idx in enumerate(batches):
                if j == len(batches) - 1:
                    hooks += [w.register_post_accumulate_grad_hook(consume_hook(n)) for n, w in weights.items()]
                batch = {
                    k: v.to(ctx.device) for k, v in collate(self.train_data, rank_share(idx, ctx), self.pad_id).items()
                }
                (self.nll(batch) / total).backward()
        finally:
            for h in hooks:
                h.remove()
            for w in weights.values():
                w.grad = None

    # -- train ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        with progress_bar(cfg.steps, self.state.step, self.show_progress and self.ctx.is_main) as advance:
            while self.state.step < cfg.steps:
                step = self.state.step
                t0 = time.perf_counter()
                loss, tokens = self.train_step(step)
                row: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": lr_at(step, cfg)}
                self.state.step = step + 1
                self.state.tokens += tokens
                if cfg.method == "seft" and self.state.step % self.interval == 0 and self.state.step < cfg.steps:
                    row["topology"] = self.topology_update(self.state.step)
                sparsity = self.check_sparsity()
                row.update(
                    sparsity=sparsity,
                    tokens=self.state.tokens,
                    step_s=time.perf_counter() - t0,
                )
                row["tokens_per_s"] = tokens / max(row["step_s"], 1e-9)
                if cfg.eval_every and self.state.step % cfg.eval_every == 0:
                    row["val_loss"] = self.validation_loss()
                if self.state.step % cfg.log_every == 0 or "topology" in row or self.state.step == cfg.steps:
                    self.log_row(row)
                advance(self.state.step, row)
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.request_checkpoint()

    def train_step(self, step: int) -> tuple[float, int]:
        """Forward/backward over the micro-batches of global batch `step`, then one optimizer step."""
        cfg, ctx = self.cfg, self.ctx
        idx = self.order.batch(step)
        total = sum(self.example_labels[i] for i in idx)
        micro = cfg.batch_size // cfg.grad_accum
        nll = torch.zeros((), dtype=torch.float64)
        for start in range(0, cfg.batch_size, micro):
            local = rank_share(idx[start : start + micro], ctx)
            batch = {k: v.to(ctx.device) for k, v in collate(self.train_data, local, self.pad_id).items()}
            loss_sum = self.nll(batch)
            (loss_sum * self.grad_scale() / total).backward()
            nll += loss_sum.detach().double().cpu()
        loss = float(all_reduce_sum(nll, ctx)) / total
        self.check_loss(step, loss)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if cfg.method == "lora-reprune":
            self.reduce_dense_grads(list(self.trainable.values()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_weights(step)
        return loss, sum(len(self.train_data.inputs[i]) for i in idx)

    def grad_scale(self) -> float:
        """The optimizer averages compact gradients over ranks; scale the loss so the average is the global mean."""
        return float(self.ctx.world)

    def reduce_dense_grads(self, params: list[torch.Tensor]) -> None:
        """Average dense gradients over ranks (LoRA params, growth scores)."""
        if self.ctx.world == 1:
            return
        for p in params:
            if p.grad is not None:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
                p.grad.div_(self.ctx.world)

    # -- topology ---------------------------------------------------------------------------------------------

    def topology_update(self, step: int) -> dict[str, Any]:
        """Drop the active weights with the smallest `--drop-criterion` score, grow where the dense gradient
        (accumulated over the grow batches) is largest. Choices are made per module as backward delivers its
        gradient, and applied once the backward pass is over."""
        from sparsetune.train import topology

        cfg = self.cfg
        fraction = drop_fraction_at(step, cfg)
        swaps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def choose(name: str, grad: torch.Tensor, norms: torch.Tensor | None) -> None:
            weight = self.sparse[name]
            active = weight.active
            k = min(int(fraction * active.numel()), active.numel(), weight.param.numel() - active.numel())
            if k == 0:
                return
            grad = grad.view(-1)
            score = drop_score(cfg.drop_criterion, weight, grad, self.optimizer, norms)
            if self.start.pattern is not None:
                swaps[name] = topology.nm_drop_grow(
                    active, score, grad.abs(), k, self.start.pattern, weight.param.shape
                )
            else:
                swaps[name] = (topology.drop(score, k), topology.grow(grad.abs(), k, exclude=active))

        with self.optimizer.dense_grads():
            weights = {name: w.param for name, w in self.sparse.items()}
            self.growth_gradients(step, weights, choose, input_norms=cfg.drop_criterion == "wanda")
        stats = {"step": step, "drop_fraction": fraction, "dropped": 0, "grown": 0, "regrown_previously_pruned": 0}
        for name in self.sparse:  # a fixed order, the same on every rank
            if name not in swaps:
                continue
            drop_slots, grow_pos = swaps[name]
            self.optimizer.swap_entries(name, drop_slots, grow_pos)
            stats["dropped"] += int(drop_slots.numel())
            stats["grown"] += int(grow_pos.numel())
            stats["regrown_previously_pruned"] += int((~self.start.masks[name].view(-1)[grow_pos]).sum())
        self.optimizer.reset_tracking()
        topology.verify_same_across_ranks({n: w.index for n, w in self.sparse.items()})
        self.state.topology.append(stats)
        return stats

    # -- invariants, validation, logging ----------------------------------------------------------------------

    def check_sparsity(self) -> float:
        """The sparsity of the sparse modules now; for SEFT and masked-ft, also verify that every sparse weight
        keeps exactly its starting number of active slots and has no non-zero outside them."""
        zeros = numel = 0
        for name, module in self.start.modules.items():
            nonzero = int((module.weight.detach() != 0).sum())
            zeros += module.weight.numel() - nonzero
            numel += module.weight.numel()
            if name in self.sparse:
                expected, slots = self.start.active_counts[name], self.sparse[name].active.numel()
                if slots != expected or nonzero > expected:
                    raise RuntimeError(
                        f"internal error: {name} has {slots} active slots and {nonzero} non-zeros, "
                        f"expected {expected}; please report this bug"
                    )
        return zeros / max(1, numel)

    def check_final_sparsity(self) -> None:
        """Every sparse module ends with the zeros it started with (start: its active count after any restore).
        LoRA*'s Wanda re-prune picks int(in_features * s) per row, so it may differ by up to one weight per row
        from a start that was pruned per matrix."""
        counts, tolerance = {}, {}
        for name, module in self.start.modules.items():
            w = module.weight.detach()
            zeros = w.numel() - int(w.count_nonzero())
            if name in self.sparse:
                zeros -= untrained_zeros(self.optimizer, self.sparse[name])
            counts[name] = (w.numel(), w.numel() - self.start.active_counts[name], zeros)
            if self.cfg.method == "lora-reprune" and self.start.pattern is None:
                tolerance[name] = w.shape[0]
        self.check_sparsity_kept(counts, tolerance)

    # -- checkpoints (the mechanics live in CheckpointedTraining) ---------------------------------------------

    RESUME_HINT = "resume with the same model and settings"

    def identity(self) -> dict[str, Any]:
        return self._identity

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.trainable

    # -- output -----------------------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        """LoRA*: merge and re-prune. Then rank 0 writes the HF dir, the updated report and the log."""
        cfg = self.cfg
        t0 = time.perf_counter()
        reprune_report = self._merge_and_reprune() if cfg.method == "lora-reprune" else None
        finish_s = time.perf_counter() - t0
        self.check_final_sparsity()
        memory = self.memory_report()
        report = build_report(self, memory, reprune_report, finish_s)
        if self.ctx.is_main:
            with atomic_output_dir(self.out, overwrite=self.overwrite) as tmp:
                models.save_model(self.model, self.tokenizer, tmp)
                (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.state.log))
                write_json(tmp / REPORT_FILE, report)
                dump_yaml(cfg, tmp / "recipe.yaml", header="sparsetune seft --recipe recipe.yaml reproduces this run")
        self.ctx.barrier()
        report["rank"] = self.ctx.rank
        return report

    def _merge_and_reprune(self) -> dict[str, Any]:
        from sparsetune.train import lora_reprune

        self.model = lora_reprune.merge_lora(self.model)
        self.model.eval()
        start = self.start
        n = min(self.cfg.reprune_samples, len(self.train_data))
        order = DataOrder(len(self.train_data), n, self.cfg.seed + 1)
        windows = calibration_windows(self.train_data, order.batch(0), self.cfg.seqlen, self.pad_id)
        calib = lora_reprune.calibration_from_windows(windows, self.cfg.data, self.cfg.seed)
        layerwise = (start.report or {}).get("layerwise")
        block_sparsity = [b["sparsity"] for b in start.report["blocks"]] if layerwise and start.report else None
        prune_cfg = lora_reprune.reprune_config(
            self.cfg.model,
            list(start.modules),
            start.pattern,
            start.global_sparsity(),
            block_sparsity,
            windows.shape[0],
            windows.shape[1],
        )
        report = lora_reprune.reprune(self.model, self.tokenizer, prune_cfg, calib, self.ctx)
        named = dict(self.model.named_modules())
        self.start.modules = {name: named[name] for name in start.modules}  # the merged model's Linears
        return report

    def memory_report(self) -> dict[str, Any]:
        if self.sparse:
            mem = dict(self.optimizer.memory_report())
        else:
            state_bytes = sum(
                t.numel() * t.element_size()
                for s in self.optimizer.state.values()
                for t in s.values()
                if torch.is_tensor(t)
            )
            grad_bytes = sum(p.numel() * p.element_size() for p in self.trainable.values())
            mem = {"optimizer_state_bytes": state_bytes, "gradient_bytes": grad_bytes}
        mem.update(peak_memory())
        return mem


def drop_score(
    criterion: str, weight: Any, grad: torch.Tensor, optimizer: Any, input_norms: torch.Tensor | None = None
) -> torch.Tensor:
    """Per active slot: how much the model would lose if the weight went to zero (drop the smallest).

    sensitivity |w * dL/dw| is the first-order loss change of zeroing w (the score SEFT re-prunes with);
    wanda |w| * ||x_j|| is the output error of zeroing w (the score that pruned the model; `input_norms` holds the
    summed x_j**2 of the grow batches); update, the accumulated update since the last topology change, is the
    criterion as REFERENCE.md states it; on a pretrained model it ignores |w| and zeroes large weights that merely
    moved little (see the README).
    """
    if criterion == "update":
        return optimizer.tracked_update(weight.name).abs()
    active = weight.active
    values = weight.param.detach().view(-1)[active].float()
    if criterion == "magnitude":
        return values.abs()
    if criterion == "wanda":
        assert input_norms is not None
        return values.abs() * input_norms.sqrt()[active % weight.param.shape[1]]
    return (values * grad[active].float()).abs()


def grow_batches(order: DataOrder, step: int, count: int) -> list[list[int]]:
    """The batches that score growth at topology step `step`: the last `count` training batches (the first ones
    before training), so the growth pass holds activations of exactly the shapes a training step holds."""
    first = max(0, step - count)
    return [order.batch(first + j) for j in range(count)]


def run_identity(cfg: SeftConfig, start: SparseStart) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the settings that change the result and the starting masks."""
    skip = {"output", "device", "checkpoint_dir", "checkpoint_every", "resume", "log_every", "data_dir"}
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    mask_hash = data.token_hash(torch.cat([m.view(-1) for m in start.masks.values()]).to(torch.int64))
    return {**settings, "start_mask": mask_hash}


def calibration_windows(examples: Examples, idx: list[int], seqlen: int, pad_id: int) -> torch.Tensor:
    """Equal-length (N, T) windows for Wanda calibration: text windows as they are; instruction examples padded."""
    rows = [examples.inputs[i][:seqlen] for i in idx]
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    for j, r in enumerate(rows):
        out[j, : len(r)] = r
    return out


def build_report(
    recipe: SeftRecipe, memory: dict[str, Any], reprune: dict[str, Any] | None, finish_s: float
) -> dict[str, Any]:
    """The input's sparsity report, with this run's module stats and one more entry in `finetune_history`."""
    cfg, start, state = recipe.cfg, recipe.start, recipe.state
    stats = masks.sparsity_stats(start.modules)
    before = start.global_sparsity()
    losses = [r["loss"] for r in state.log]
    totals = {k: sum(t[k] for t in state.topology) for k in ("dropped", "grown", "regrown_previously_pruned")}
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
        "memory": memory,
        "mean_step_s": sum(r["step_s"] for r in state.log) / max(1, len(state.log)),
        "finish_s": round(finish_s, 3),
        "reprune": reprune["summary"] if reprune else None,
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
        "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
        "gradient_bytes": memory.get("gradient_bytes"),
        "peak_rss_bytes": memory.get("peak_rss_bytes"),
        "mean_step_s": entry["mean_step_s"],
        "output": str(recipe.out),
    }
    return {"summary": summary, **report}


def run_seft(cfg: SeftConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune seft` flow: setup, train (checkpointing), finish (save), cleanup."""
    recipe = SeftRecipe(cfg, overwrite, show_progress)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        if hasattr(recipe, "ctx"):
            recipe.cleanup()


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["summary"]
    table = Table(title=f"sparsetune seft: {s['method']}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("steps / tokens", f"{s['steps']} / {s['tokens']:,}")
    table.add_row("loss first -> last", f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}")
    if s["final_val_loss"] is not None:
        table.add_row("validation loss", f"{s['final_val_loss']:.4f}")
    table.add_row("sparsity before -> after", f"{s['sparsity_before']:.4f} -> {s['sparsity_after']:.4f}")
    t = s["topology_totals"]
    if t["dropped"]:
        table.add_row(
            "dropped / grown / regrown pruned",
            f"{t['dropped']:,} / {t['grown']:,} / {t['regrown_previously_pruned']:,}",
        )
    for key in ("optimizer_state_bytes", "gradient_bytes", "peak_rss_bytes"):
        if s.get(key) is not None:
            table.add_row(key.removesuffix("_bytes").replace("_", " "), f"{s[key] / 2**20:.1f} MiB")
    table.add_row("mean step", f"{s['mean_step_s']:.3f} s")
    Console().print(table)
    Console().print(f"wrote {s['output']}")
