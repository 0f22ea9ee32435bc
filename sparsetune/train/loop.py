"""The one training loop of `seft` and `smet-pretrain`, with the method-specific parts as strategy objects.

`Trainer.run()`: setup -> for each step: the rank's share of the batch, forward/backward through the shared token
NLL (plus a teacher's distillation loss when the task set `distiller`, `distill.py`), the loss guard, gradient
averaging over processes, the optimizer step, the weight guard, the scheduled topology (or reselection) update,
logging, checkpoint -> finish (write the output and the report).

A task (`seft.FinetuneRun` for `seft`, `smet.PretrainRun` for `smet-pretrain`) subclasses `Trainer` for what
differs between them: what it loads (`load`), which method it trains with (`build_method`), which settings a
checkpoint must match (`identity`) and what it writes (`finish`). A training method subclasses `TrainingMethod`,
is built from a `TrainingContext` and is one entry in its task's method table (`seft.METHODS`, `smet.METHODS`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import loading, masks
from sparsetune.distributed import DistContext, dist_context, reduce_sum
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir, peak_memory
from sparsetune.progress import Progress
from sparsetune.recipes import dump_yaml
from sparsetune.reports import write_report
from sparsetune.streaming import ShardWriter, save_config_files
from sparsetune.train.activations import Checkpointing
from sparsetune.train.checkpoint import (
    CKPT_NAME,
    IDENTITY_ADDED,
    LOG_FILE,
    TrainingState,
    check_checkpoint_dir,
    replace_dir,
)
from sparsetune.train.distill import Distiller
from sparsetune.train.examples import IGNORE, DataOrder, Examples, collate, label_count
from sparsetune.train.guard import (
    DIVERGENCE_FACTOR,
    DIVERGENCE_MARGIN,
    DIVERGENCE_STEPS,
    WEIGHT_LIMIT_FACTOR,
    loss_bound,
)
from sparsetune.train.heap import block_cache_stats, install_block_cache, release_cached_blocks, stop_block_cache
from sparsetune.train.loss import token_nll_sum
from sparsetune.train.schedule import lr_at
from sparsetune.train.sparse_start import SparseStart

log = logging.getLogger(__name__)


@dataclass
class TrainingContext:
    """What a training method is built from, and may read while it trains: the run's settings, model and data."""

    cfg: Any  # the command's settings (SeftConfig or SmetConfig): optimizer, steps, seed and the method's options
    model: nn.Module  # the model to train; a method that wraps it (LoRA) puts the wrapped model here
    tokenizer: Any
    pad_id: int
    data: Examples  # the training examples
    dist: DistContext  # the process group: rank, world size, device
    state: TrainingState  # the run's progress (step, logged rows, topology history); read only
    nll: Callable[[list[int]], torch.Tensor]  # summed token NLL of training examples `idx` (this rank's share)
    order: DataOrder  # which training examples each step's global batch holds
    example_labels: list[int]  # label tokens of each training example (a batch's sum normalises its loss)
    start: SparseStart | None = None  # `seft`: the pruned input's sparse matrices, masks and counts to keep


@dataclass
class MethodReport:
    """What a method adds to the run's report (and `smet-pretrain`'s logged rows), measured from the live state."""

    memory: dict[str, Any] = field(default_factory=dict)  # trainable_params, grad_bytes, optimizer_state_bytes, ...
    fields: dict[str, Any] = field(default_factory=dict)  # extra fields of the summary (and of the history entry)


@dataclass
class Finished:
    """What a method's end did (`TrainingMethod.finish`), and what the run's end-of-run check and output need."""

    reprune: dict[str, Any] | None = None  # the report of an end-of-run re-prune (LoRA*)
    write_model: bool = True  # False: the output holds no model (seft --no-merge writes the adapter only)
    write_files: Callable[[Path], None] | None = None  # writes the method's own files into the output dir
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # trained weights the model does not hold
    untrained_zeros: dict[str, int] = field(default_factory=dict)  # zeros the sparsity check does not count
    zero_tolerance: dict[str, int] = field(default_factory=dict)  # how far a module's zero count may move
    # The model merged, checked and (when write_model) written one decoder block at a time, instead of whole
    blocks: MergedBlocks | None = None


@dataclass
class MergedPart:
    """One part of a model merged block by block: its trained modules' merged weights, their untrained zeros, and
    the part's tensors in the checkpoint's layout (empty when the model is not written)."""

    weights: dict[str, torch.Tensor]
    untrained_zeros: dict[str, int]
    state: dict[str, torch.Tensor]


@dataclass
class MergedBlocks:
    """A model the method's end merges one part at a time: each decoder block, then everything outside them.
    `parts(write)` yields them in that order, merging a part just before it is yielded and freeing it after, so
    at most one part's merged weights exist at a time; `shards` parts in all; `location` holds the input's config
    files."""

    parts: Callable[[bool], Iterator[MergedPart]]
    shards: int
    location: Path


class TrainingMethod:
    """The method-specific parts of a run. A method builds its trainable state and `optimizer` in
    `__init__(context)` and overrides what it needs of the hooks below (only `checkpoint_tensors` is required).

    The optimizer needs `param_groups` (a list of dicts whose "lr" the loop sets before every step: the learning
    rate has no other source), `step()`, `zero_grad(set_to_none=True)`, `state_dict()` and `load_state_dict()`;
    its state dict is saved with every checkpoint as of the step the checkpoint belongs to.
    """

    optimizer: Any

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds besides the optimizer state, restored in place on resume. Their floating
        ones are the trained weights the divergence guard watches."""
        raise NotImplementedError

    def before_step(self, step: int) -> None:
        """Before the forward/backward passes of `step` (0-based): e.g. arm statistics for a reselection window."""

    def reduce_grads(self) -> None:
        """After backward, before the optimizer step: average gradients over processes (the loss was scaled by the
        number of processes), unless the optimizer does so itself (SparseAdamW), and measure them while they
        exist."""

    def update_topology(self, step: int) -> dict[str, Any] | None:
        """After optimizer step `step` (1-based: steps done): change the trainable topology (or reselect) when one
        is due, and return its statistics (logged in the row and kept in `state.topology`, so plain data); None
        when none is due."""
        return None

    def sparsity(self) -> float:
        """The sparsity of the trained modules after a step (and the place to verify per-step invariants)."""
        return 0.0

    def log_fields(self, step: int) -> dict[str, Any]:
        """Extra fields of the log row of step `step`."""
        return {}

    def report(self) -> MethodReport:
        """The method's memory (bytes of gradient and optimizer state held for the trainable state, measured from
        the live tensors) and its extra report fields."""
        return MethodReport()

    def finish(self) -> Finished:
        """After the last step, before the end-of-run checks and the output: e.g. merge adapters into the model
        (putting the merged model in `context.model`)."""
        return Finished()


class Trainer:
    """The loop, the divergence guard, validation, the JSONL log and resumable checkpoints.

    A checkpoint is only written once its weights have proven sane: the one due after step s is written during
    step s + 1, when those weights have given a finite loss that is not diverging (and before they change). So
    the checkpoint a stop calls intact always predates the divergence.
    """

    RESUME_HINT = "resume with the same settings"
    ctx: DistContext
    model: nn.Module
    tokenizer: Any
    method: TrainingMethod
    context: TrainingContext
    start: SparseStart | None = None  # `seft`: what the run starts from and must preserve
    ckpt_dir: Path | None
    train_data: Examples
    val_data: Examples | None
    pad_id: int
    _last_ckpt_step = 0
    _pending_rng: torch.Tensor | None = None  # a checkpoint is due: the RNG state at the end of its step
    _pending_optimizer: dict[str, Any] | None = None  # ... and the optimizer state at the end of its step
    _weight_limits: dict[str, float] | None = None
    _uniform_loss: float | None = None  # ln(vocab): the loss of uniform guessing
    activation_checkpointing: Checkpointing | None = None  # the decoder blocks' activation checkpointing while training
    block_cache = False  # whether this run installed the CPU block cache (train/heap.py)
    block_cache_counts: dict[str, int] | None = None  # its counters when the run stopped it
    distiller: Distiller | None = None  # the teacher's objective when the run distils (set by the task's `load`)

    def __init__(self, cfg: Any, overwrite: bool = False, show_progress: bool = True) -> None:
        self.cfg, self.overwrite, self.show_progress = cfg, overwrite, show_progress
        self.state = TrainingState()

    # -- what a task provides ---------------------------------------------------------------------------------

    def load(self) -> None:
        """Set model, tokenizer, pad_id, train_data and val_data (the process group is joined: `self.ctx`)."""
        raise NotImplementedError

    def build_method(self, context: TrainingContext) -> TrainingMethod:
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to be resumed."""
        raise NotImplementedError

    def finish(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- the run ----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """setup -> train (checkpointing) -> finish (save), then cleanup."""
        try:
            self.setup()
            self.train()
            self.end_checkpointing()
            return self.finish()
        finally:
            self.end_block_cache()
            if hasattr(self, "ctx"):
                self.cleanup()

    def setup(self, inputs: tuple[str, ...] = ()) -> None:
        cfg = self.cfg
        if cfg.output is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        self.out = check_output_dir(cfg.output, self.overwrite, inputs=inputs)
        ckpt = cfg.checkpoint_path()
        self.ckpt_dir = Path(ckpt).expanduser().resolve() if ckpt else None
        if self.ckpt_dir is not None:
            check_checkpoint_dir(self.ckpt_dir, cfg.resume)
        self.block_cache = install_block_cache(cfg.cpu_block_cache_mb)  # before anything is loaded (train/heap.py)
        self.ctx = dist_context(cfg.device)
        micro = cfg.batch_size // cfg.grad_accum
        if micro < self.ctx.world:
            raise SparsetuneError(
                f"each micro-batch holds {micro} sequences but {self.ctx.world} processes share it; "
                "raise --batch-size or lower --grad-accum"
            )
        self.load()
        if cfg.activation_checkpointing:  # before a method wraps Linears or the model: the blocks stay the same
            self.activation_checkpointing = Checkpointing(self.model)
        self.order = DataOrder(len(self.train_data), cfg.batch_size, cfg.seed)
        self.example_labels = [
            int((lab[1:] != IGNORE).sum()) if self.train_data.labels is not None else len(lab) - 1
            for lab in (self.train_data.labels or self.train_data.inputs)
        ]
        # the settings as the task's load left them (smet-pretrain resolves --density auto)
        loaded = (self.cfg, self.model, self.tokenizer, self.pad_id, self.train_data)
        progress = (self.ctx, self.state, self.train_nll, self.order, self.example_labels)  # dist ... example_labels
        self.context = TrainingContext(*loaded, *progress, start=self.start)
        self.method = self.build_method(self.context)
        self.model = self.context.model  # as the method left it (LoRA wraps it)
        self.init_guard()
        if cfg.resume:
            self.load_checkpoint()
        if self.block_cache:
            release_cached_blocks()  # what loading freed: training allocates other sizes

    @property
    def optimizer(self) -> Any:
        return self.method.optimizer

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return self.method.checkpoint_tensors()

    def memory_report(self) -> dict[str, Any]:
        return {**self.method.report().memory, **self.activation_memory(), **peak_memory()}

    def activation_memory(self) -> dict[str, Any]:
        """How the run bounds its activations: the checkpointing mechanism ("transformers", "torch" or "off") and
        the loss chunk (0: the whole logits at once)."""
        mechanism = self.activation_checkpointing.mechanism if self.activation_checkpointing is not None else "off"
        return {
            "activation_checkpointing": mechanism,
            "loss_chunk_tokens": self.cfg.loss_chunk_tokens,
            "cpu_block_cache_mb": self.cfg.cpu_block_cache_mb,
            "cpu_block_cache": self.block_cache_counts or block_cache_stats() if self.block_cache else None,
        }

    def end_checkpointing(self) -> None:
        """After the last step: the model as loaded again (the blocks' checkpointing off) and the CPU block cache
        ended, for the method's end and the output."""
        if self.activation_checkpointing is not None:
            self.activation_checkpointing.disable()
        self.end_block_cache()

    def end_block_cache(self) -> None:
        """Stop the CPU block cache this run installed (its cached blocks handed back), keeping its counters."""
        if self.block_cache and self.block_cache_counts is None:
            self.block_cache_counts = stop_block_cache()

    def finish_method(self) -> Finished:
        """The method's end; the run goes on with the model as the method left it (LoRA* merged)."""
        finished = self.method.finish()
        self.model = self.context.model
        return finished

    def sparsity(self) -> float:
        return self.method.sparsity()

    def topology_update(self, step: int) -> dict[str, Any] | None:
        """The method's topology update after step `step` when one is due (kept in `state.topology`), else None."""
        stats = self.method.update_topology(step)
        if stats is not None:
            self.state.topology.append(stats)
        return stats

    def batch(self, examples: Examples, idx: list[int]) -> dict[str, torch.Tensor]:
        """This rank's share of the examples `idx` as a batch on the device."""
        return {k: v.to(self.ctx.device) for k, v in collate(examples, self.ctx.share(idx), self.pad_id).items()}

    def nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token NLL of one micro-batch: what every training step minimises."""
        return token_nll_sum(self.model, batch, self.cfg.loss_chunk_tokens)

    def train_nll(self, idx: list[int]) -> torch.Tensor:
        """Summed token NLL of this rank's share of the training examples `idx` (a method's growth scoring)."""
        return self.nll(self.batch(self.train_data, idx))

    def objective(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token NLL, the summed loss to minimise) of one micro-batch: the NLL both, unless distilling (the
        logged loss and the divergence guard stay on the NLL)."""
        if self.distiller is None:
            nll = self.nll(batch)
            return nll, nll
        return self.distiller.objective(self.model, batch, self.cfg.loss_chunk_tokens)

    def train(self) -> None:
        cfg, method = self.cfg, self.method
        with Progress(
            cfg.steps, "step", completed=self.state.step, enabled=self.show_progress and self.ctx.is_main
        ) as bar:
            while self.state.step < cfg.steps:
                step = self.state.step
                t0 = time.perf_counter()
                loss, tokens = self.train_step(step)
                self.state.step = done = step + 1
                self.state.tokens += tokens
                row: dict[str, Any] = {"step": done, "loss": loss, "lr": lr_at(step, cfg)}
                topology = self.topology_update(done)
                if topology is not None:
                    row["topology"] = topology
                sparsity = self.sparsity()
                step_s = time.perf_counter() - t0  # a topology update counts towards the step it follows
                row.update(sparsity=sparsity, tokens=self.state.tokens, step_s=step_s)
                row["tokens_per_s"] = tokens / max(step_s, 1e-9)
                row.update(method.log_fields(done))
                if cfg.eval_every and done % cfg.eval_every == 0 and self.val_data is not None:
                    row["val_loss"] = self.validation_loss()
                if self.probe_due(done):
                    row["probe_loss"] = self.validation_loss(examples=cfg.batch_size)
                logged = "topology" in row or "probe_loss" in row or self.log_due(done)
                if done % cfg.log_every == 0 or done == cfg.steps or logged:
                    row.update(self.logged_fields())
                    self.log_row(row)
                info = f"loss {loss:.4f} lr {row['lr']:.2e} sparsity {sparsity:.4f} {row['tokens_per_s']:.0f} tok/s"
                bar.update(completed=done, info=info)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    self.request_checkpoint()

    def train_step(self, step: int) -> tuple[float, int]:
        """Forward/backward over the micro-batches of global batch `step`, then one optimizer step."""
        cfg = self.cfg
        self.method.before_step(step)
        idx = self.order.batch(step)
        total = sum(self.example_labels[i] for i in idx)
        micro = cfg.batch_size // cfg.grad_accum
        nll = torch.zeros((), dtype=torch.float64)
        for start in range(0, cfg.batch_size, micro):
            loss_sum, objective = self.objective(self.batch(self.train_data, idx[start : start + micro]))
            # Gradients are averaged over processes: scale the loss so the average is the global mean.
            (objective * self.ctx.world / total).backward()
            nll += loss_sum.detach().double().cpu()
        loss = float(reduce_sum(nll)) / total
        self.check_loss(step, loss)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.method.reduce_grads()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_weights(step)
        return loss, sum(len(self.train_data.inputs[i]) for i in idx)

    # -- checks, checkpoints, validation, logging -------------------------------------------------------------

    def intact_checkpoint(self) -> str:
        if self.ckpt_dir is not None and (self.ckpt_dir / CKPT_NAME / "state.pt").exists():
            return f"the last checkpoint in {self.ckpt_dir} (step {self._last_ckpt_step}) is intact"
        return "no checkpoint was written"

    def raise_nonfinite(self, step: int, loss: float) -> None:
        raise SparsetuneError(
            f"the training loss became {loss} at step {step + 1}, so training stopped before the optimizer step; "
            f"{self.intact_checkpoint()}; lower --lr or check the data"
        )

    # -- the divergence guard ---------------------------------------------------------------------------------

    def guarded_tensors(self) -> dict[str, torch.Tensor]:
        """The trained weights among the checkpoint's tensors (not bookkeeping such as SMET's uint8 ITOP bitmaps)."""
        return {n: t for n, t in self.checkpoint_tensors().items() if t.is_floating_point()}

    def init_guard(self) -> None:
        """Each trained tensor's weight limit, from its values at the start (call before loading a checkpoint)."""
        tensors = self.guarded_tensors()
        peaks = _abs_max(list(tensors.values()))
        self._weight_limits = {n: WEIGHT_LIMIT_FACTOR * max(1.0, p) for n, p in zip(tensors, peaks, strict=True)}
        vocab = getattr(self.model.config, "vocab_size", None)
        self._uniform_loss = math.log(vocab) if isinstance(vocab, int) and vocab > 1 else None

    def check_loss(self, step: int, loss: float) -> None:
        """Before the optimizer step of `step` (0-based): stop on a non-finite loss, or when the loss has stayed
        too high for DIVERGENCE_STEPS steps; otherwise write the checkpoint that waited for this loss."""
        if not math.isfinite(loss):
            self.raise_nonfinite(step, loss)
        guard = self.state.guard
        bound = loss_bound(guard["reference"], guard["lowest"], self._uniform_loss)
        high = loss >= bound
        if self._pending_rng is not None:
            if high:
                log.log(
                    logging.INFO if guard["strikes"] else logging.WARNING,  # warn once per run of high losses
                    "the checkpoint of step %d was not written: the next loss, %.4g, is above %.4g",
                    step,
                    loss,
                    bound,
                )
                self._pending_rng = self._pending_optimizer = None
            else:
                self.save_checkpoint()  # the state as of the end of `step` (its RNG included), before this loss
        guard["strikes"] = guard["strikes"] + 1 if high else 0
        guard["lowest"] = min(guard["lowest"], loss)
        guard["recent"] = [*guard["recent"], loss][-DIVERGENCE_STEPS:]
        if len(guard["recent"]) == DIVERGENCE_STEPS:
            mean = sum(guard["recent"]) / DIVERGENCE_STEPS
            guard["reference"] = mean if guard["reference"] is None else min(guard["reference"], mean)
        if guard["strikes"] >= DIVERGENCE_STEPS:
            if bound == self._uniform_loss:
                why = f"ln(vocab), no better than uniform guessing, where it had reached {guard['lowest']:.4g}"
            else:
                why = f"{DIVERGENCE_FACTOR:g}x its best {DIVERGENCE_STEPS}-step mean, "
                why += f"at least {DIVERGENCE_MARGIN:g} above it"
            raise SparsetuneError(
                f"training diverged: the loss stayed at or above {bound:.4g} ({why}) for {DIVERGENCE_STEPS} steps, "
                f"up to step {step + 1} (loss {loss:.4g}), so training stopped before the optimizer step; "
                f"{self.intact_checkpoint()}; lower --lr or check the data"
            )

    def check_weights(self, step: int) -> None:
        """After the optimizer step of `step`: stop when a trained tensor holds a non-finite or absurd value."""
        if self._weight_limits is None:
            return
        tensors = self.guarded_tensors()
        for (name, _), peak in zip(tensors.items(), _abs_max(list(tensors.values())), strict=True):
            limit = self._weight_limits[name]
            if not peak <= limit:  # also true for nan
                raise SparsetuneError(
                    f"training diverged: after step {step + 1}, {name} holds a weight of magnitude {peak:.3g}, over "
                    f"its limit {limit:.3g} ({WEIGHT_LIMIT_FACTOR:g} x the larger of 1 and its largest at the start), "
                    f"so training stopped; {self.intact_checkpoint()}; lower --lr"
                )

    def request_checkpoint(self) -> None:
        """A checkpoint is due now. The last step's is written at once (there is no next loss to wait for; its
        weights passed `check_weights`); any other waits for the next step's loss (see `check_loss`)."""
        if self.state.step >= self.cfg.steps:
            self._pending_rng = None
            self.save_checkpoint()
        else:
            self._pending_rng = torch.get_rng_state()
            # as of this step: the next step's backward changes state that its optimizer step has not consumed yet
            # (seft's open selection window)
            self._pending_optimizer = self.optimizer.state_dict()

    def probe_due(self, step: int) -> bool:
        """Whether the row of `step` carries `probe_loss`: the loss of one fixed held-out batch (a task's choice)."""
        return False

    def log_due(self, step: int) -> bool:
        """Whether step `step` is logged whatever --log-every says (a task's choice)."""
        return False

    def logged_fields(self) -> dict[str, Any]:
        """Extra fields of the rows that are written to the log, computed only for those (a task's choice)."""
        return {}

    @torch.no_grad()
    def validation_loss(self, examples: int | None = None) -> float:
        """Mean token loss of the first `examples` held-out sequences (default: --val-batches batches)."""
        assert self.val_data is not None
        n = min(len(self.val_data), examples or self.cfg.val_batches * self.cfg.batch_size)
        micro = self.cfg.batch_size // self.cfg.grad_accum
        self.model.eval()
        nll = torch.zeros(2, dtype=torch.float64)
        for start in range(0, n, micro):
            batch = self.batch(self.val_data, list(range(start, min(n, start + micro))))
            nll[0] += float(token_nll_sum(self.model, batch, self.cfg.loss_chunk_tokens))
            nll[1] += label_count(batch)
        self.model.train()
        nll = reduce_sum(nll)
        return float(nll[0] / nll[1])

    def log_row(self, row: dict[str, Any]) -> None:
        self.state.log.append(row)
        if self.ckpt_dir is not None and self.ctx.is_main:
            with open(self.ckpt_dir / LOG_FILE, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save_checkpoint(self) -> None:
        """Trained tensors, optimizer state (masks included), TrainingState and RNG (of the end of the step a
        checkpoint waited since, else the current one): temp dir, then renamed."""
        assert self.ckpt_dir is not None
        rng = self._pending_rng if self._pending_rng is not None else torch.get_rng_state()
        optimizer = self._pending_optimizer if self._pending_optimizer is not None else self.optimizer.state_dict()
        self.state.rng = {"torch": rng}
        self._pending_rng = self._pending_optimizer = None
        if self.ctx.is_main:
            from safetensors.torch import save_file

            tmp = self.ckpt_dir / f".{CKPT_NAME}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            weights = {n: t.detach().contiguous().cpu() for n, t in self.checkpoint_tensors().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(optimizer, tmp / "optimizer.pt")
            torch.save({"identity": self.identity(), "state": self.state.state_dict()}, tmp / "state.pt")
            replace_dir(tmp, self.ckpt_dir / CKPT_NAME)
        self._last_ckpt_step = self.state.step
        self.ctx.barrier()

    def load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        assert self.ckpt_dir is not None
        path = self.ckpt_dir / CKPT_NAME
        saved = torch.load(path / "state.pt", weights_only=True)
        identity = self.identity()
        # a checkpoint written before a setting joined the identity ran with the value IDENTITY_ADDED gives it, and
        # one written before a setting was renamed holds its old name (and, for a changed meaning, its old value)
        saved_identity = {**{k: v for k, v in IDENTITY_ADDED.items() if k in identity}, **saved["identity"]}
        for old, new in type(self.cfg).RENAMED.items():
            if old in saved_identity and new not in saved_identity:
                saved_identity[new] = type(self.cfg).renamed_value(old, saved_identity.pop(old), saved_identity)
        if saved_identity != identity:
            diff = sorted(k for k in identity if saved_identity.get(k) != identity[k])
            raise SparsetuneError(
                f"the checkpoint in {self.ckpt_dir} belongs to another run ({', '.join(diff)} differ); "
                f"{self.RESUME_HINT}, or use another --checkpoint-dir"
            )
        weights = load_file(str(path / "weights.safetensors"))
        with torch.no_grad():
            for name, tensor in self.checkpoint_tensors().items():
                tensor.copy_(weights[name].to(tensor.device))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        self.state.load_state_dict(saved["state"])
        torch.set_rng_state(self.state.rng["torch"])
        self._last_ckpt_step = self.state.step
        if self.ctx.is_main:  # the live log loses any lines written after the checkpoint
            (self.ckpt_dir / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.state.log))
        log.info("resumed from step %d in %s", self.state.step, path)

    def check_sparsity_kept(
        self, counts: dict[str, tuple[int, int, int]], tolerance: dict[str, int] | None = None
    ) -> None:
        """The end-of-run invariant: every sparse module holds as many zeros as it held at the start, counted the
        same way (weights == 0). `counts` maps a module to (numel, zeros at the start, zeros now, less any
        `untrained_zeros`); `tolerance` allows a module a difference (LoRA*'s re-prune rounds per row). Weights
        that overflowed or cancelled to exactly 0 in a diverging run break it, and nothing is written then."""
        tolerance = tolerance or {}
        off = {n: c for n, c in counts.items() if abs(c[2] - c[1]) > tolerance.get(n, 0)}
        if not off:
            return
        numel = sum(c[0] for c in counts.values())
        before = sum(c[1] for c in counts.values()) / numel
        after = sum(c[2] for c in counts.values()) / numel
        name, (_, start, now) = next(iter(off.items()))
        raise SparsetuneError(
            f"the sparsity changed from {before:.4f} to {after:.4f} during training ({len(off)} modules, e.g. {name} "
            f"with {now} zeros instead of {start}): weights overflowed or cancelled to exactly 0, so the run "
            f"diverged; nothing was written; lower --lr"
        )

    def check_final_sparsity(
        self, weights: dict[str, torch.Tensor], start_zeros: dict[str, int], finished: Finished
    ) -> None:
        """`check_sparsity_kept` over `weights` (name -> weight), less the untrained zeros the method's end counted,
        within its tolerance."""
        self.check_sparsity_kept(final_counts(weights, start_zeros, finished.untrained_zeros), finished.zero_tolerance)

    def cleanup(self) -> None:
        self.ctx.barrier()

    def write_output(self, report: dict[str, Any], command: str, finished: Finished) -> None:
        """Rank 0 writes the HF model dir (unless the method's end says not to: an adapter only), the log, the
        report, the recipe that reproduces the run and the method's own files."""
        if self.ctx.is_main:
            with atomic_output_dir(self.out, overwrite=self.overwrite) as tmp:
                if finished.write_model:
                    loading.save_model(self.model, self.tokenizer, tmp)
                self.write_run_files(tmp, report, command, finished)
        self.ctx.barrier()
        report["rank"] = self.ctx.rank

    def write_run_files(self, tmp: Path, report: dict[str, Any], command: str, finished: Finished) -> None:
        """The output's files besides the model: the log, the report, the recipe and the method's own files."""
        (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.state.log))
        write_report(tmp, report)
        header = f"sparsetune {command} --recipe recipe.yaml reproduces this run"
        dump_yaml(self.cfg, tmp / "recipe.yaml", header=header)
        if finished.write_files is not None:
            finished.write_files(tmp)

    def merge_blocks(
        self, blocks: MergedBlocks, tmp: Path | None, start_zeros: Callable[[str, torch.Tensor], int]
    ) -> tuple[dict[str, Any], dict[str, tuple[int, int, int]]]:
        """Walk a model merged block by block (`Finished.blocks`): each part's modules are counted for the
        end-of-run check and measured for the report (`masks.sparsity_stats`), and, when `tmp` is given, the part
        is written as one shard of `tmp` (then the index and the config files). Returns (the stats of every
        module, the check's counts); `start_zeros(name, weight)` is a module's zero count at the start."""
        writer = ShardWriter(tmp, blocks.shards) if tmp is not None else None
        modules: dict[str, Any] = {}
        counts: dict[str, tuple[int, int, int]] = {}
        k = 0  # not enumerate: its reused result tuple would keep the last part alive while the next one merges
        for part in blocks.parts(writer is not None):
            k += 1  # noqa: SIM113
            starts = {name: start_zeros(name, w) for name, w in part.weights.items()}
            counts.update(final_counts(part.weights, starts, part.untrained_zeros))
            modules.update(masks.sparsity_stats(part.weights)["modules"])
            if writer is not None:
                writer.write(k, part.state)
            del part
        if writer is not None and tmp is not None:
            writer.write_index()
            save_config_files(self.model, self.tokenizer, blocks.location, tmp)
        return modules, counts


def final_counts(
    weights: dict[str, torch.Tensor], start_zeros: dict[str, int], untrained_zeros: dict[str, int]
) -> dict[str, tuple[int, int, int]]:
    """`check_sparsity_kept`'s counts of `weights`: (numel, zeros at the start, zeros now less the untrained ones)."""
    counts = {}
    for name, weight in weights.items():
        w = weight.detach()
        zeros = w.numel() - int(w.count_nonzero()) - untrained_zeros.get(name, 0)
        counts[name] = (w.numel(), start_zeros[name], zeros)
    return counts


def _abs_max(tensors: list[torch.Tensor]) -> list[float]:
    """Largest |value| of each tensor (nan when it holds one), with one device sync for all of them."""
    if not tensors:
        return []
    with torch.no_grad():
        peaks = torch.stack([torch.linalg.vector_norm(t.detach(), math.inf).float() for t in tensors])
    return [float(p) for p in peaks.cpu()]


def mean_step_s(state: TrainingState) -> float:
    return sum(r["step_s"] for r in state.log) / max(1, len(state.log))


def print_summary(
    title: str, s: dict[str, Any], rows: list[tuple[str, str]], lead: list[tuple[str, str]] | None = None
) -> None:
    """The run's summary table: the task's `lead` rows, steps, losses, the task's `rows`, the mean step time."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    head = [*(lead or []), ("steps / tokens", f"{s['steps']} / {s['tokens']:,}")]
    head.append(("loss first -> last", f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}"))
    if s["final_val_loss"] is not None:
        head.append(("validation loss", f"{s['final_val_loss']:.4f}"))
    for name, value in [*head, *rows, ("mean step", f"{s['mean_step_s']:.3f} s")]:
        table.add_row(name, value)
    Console().print(table)
    Console().print(f"wrote {s['output']}")
