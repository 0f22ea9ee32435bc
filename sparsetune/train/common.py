"""Training plumbing shared by `seft` and `smet-pretrain`: token examples and batches, the data order, schedules,
the loss over a rank's share of a batch, checkpoint directories and the progress bar."""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsetune import data
from sparsetune.distributed import DistContext
from sparsetune.errors import SparsetuneError

log = logging.getLogger(__name__)

IGNORE = -100
LOG_FILE = "train_log.jsonl"


class Schedule(Protocol):
    """The settings the schedules read (SeftConfig and SmetConfig both have them)."""

    lr: float
    min_lr_ratio: float
    steps: int
    drop_fraction: float
    drop_fraction_end: float

    @property
    def warmup(self) -> int: ...


@dataclass
class Examples:
    """Training examples as token lists; `labels` is None for packed text (labels = inputs)."""

    kind: str  # "text" or "instruction"
    inputs: list[torch.Tensor]
    labels: list[torch.Tensor] | None

    def __len__(self) -> int:
        return len(self.inputs)


def packed_windows(
    tokenizer: Any, records: list[dict[str, Any]], seqlen: int, skip_tokens: int, source: str
) -> Examples:
    """Join the texts with blank lines, tokenize once, drop `skip_tokens`, cut into windows of `seqlen`."""
    ids = tokenizer("\n\n".join(data.record_text(r) for r in records), verbose=False)["input_ids"][skip_tokens:]
    n = len(ids) // seqlen
    if n < 1:
        raise SparsetuneError(
            f"{source} holds {len(ids)} tokens after skipping {skip_tokens}, fewer than one window of {seqlen}; "
            f"lower --seqlen{' or --skip-tokens' if skip_tokens else ''}, or use more data"
        )
    windows = torch.tensor(ids[: n * seqlen], dtype=torch.int64).view(n, seqlen)
    return Examples("text", list(windows), None)


def instruction_examples(tokenizer: Any, records: list[dict[str, Any]], seqlen: int) -> Examples:
    """Alpaca template; labels are -100 on the prompt so only response tokens (and EOS) carry loss."""
    inputs, labels = [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for record in records:
        prompt, response = data.alpaca_prompt(record)
        p = tokenizer(prompt, verbose=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + eos
        ids = (p + r)[:seqlen]
        lab = ([IGNORE] * len(p) + r)[:seqlen]
        if sum(t != IGNORE for t in lab[1:]) == 0:  # prompt fills the window: nothing to learn from
            continue
        inputs.append(torch.tensor(ids, dtype=torch.int64))
        labels.append(torch.tensor(lab, dtype=torch.int64))
    if not inputs:
        raise SparsetuneError(f"no instruction example has a response within --seqlen {seqlen}; raise --seqlen")
    return Examples("instruction", inputs, labels)


def collate(examples: Examples, idx: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (-100 on padding and prompts)."""
    rows = [examples.inputs[i] for i in idx]
    labs = [examples.labels[i] for i in idx] if examples.labels is not None else rows
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.int64)
    attention = torch.zeros((len(rows), width), dtype=torch.int64)
    for j, (r, lab) in enumerate(zip(rows, labs, strict=True)):
        input_ids[j, : len(r)] = r
        labels[j, : len(r)] = lab
        attention[j, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def label_count(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class DataOrder:
    """Which examples make up each global batch: a pure function of (seed, step), so resume needs only the step.

    The sample stream runs through seeded permutations of the examples, one per epoch.
    """

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._perm: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def batch(self, step: int) -> list[int]:
        """Example indices of global batch `step` (0-based)."""
        out = []
        for p in range(step * self.batch_size, (step + 1) * self.batch_size):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out


def random_batch(n: int, batch_size: int, seed: int, step: int, j: int) -> list[int]:
    """Growth-scoring batch j at topology step `step`: seeded, so every rank and every resume draws the same."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step * 1_009 + j + 17) % (2**63))
    return torch.randint(0, n, (batch_size,), generator=g).tolist()


# ----------------------------------------------------------------------------------------------------------------
# Schedules: pure functions of the step.


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio (step is 0-based)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def drop_fraction_at(step: int, cfg: Schedule) -> float:
    """Cosine decay of the drop fraction from --drop-fraction to --drop-fraction-end over the run."""
    return cfg.drop_fraction_end + 0.5 * (cfg.drop_fraction - cfg.drop_fraction_end) * (
        1 + math.cos(math.pi * step / cfg.steps)
    )


# ----------------------------------------------------------------------------------------------------------------
# The divergence guard. Fixed, not settings: a healthy run never comes near these bounds, and a diverged one
# crosses them by far (lr 1e9 puts weights near 1e9 after one AdamW step; lr 0.1 took SmolLM2's fine-tuning loss
# from 6.3 to 22 in one step, and it stayed above ln(vocab) = 10.8 for the rest of the run).

DIVERGENCE_STEPS = 10  # N: consecutive steps the loss must stay too high; also the window of the loss reference
DIVERGENCE_FACTOR = 2.0  # too high: above max(FACTOR x reference, reference + MARGIN nats), where the reference is
DIVERGENCE_MARGIN = 1.0  # the lowest mean of N consecutive step losses so far (robust to single easy batches);
# or, once some step's loss was MARGIN below ln(vocab), at or above ln(vocab): no better than uniform guessing. That
# catches a model destroyed within its first N steps, before a clean reference exists.
WEIGHT_LIMIT_FACTOR = 1000.0  # a trained tensor may not exceed 1000 x max(1, its largest |w| at the start)


def new_guard() -> dict[str, Any]:
    """The loss history the guard keeps (in TrainingState, so a resumed run judges exactly as an uninterrupted one)."""
    return {"recent": [], "reference": None, "lowest": math.inf, "strikes": 0}


def loss_bound(reference: float | None, lowest: float = math.inf, uniform: float | None = None) -> float:
    """The loss above which a step counts as diverging: DIVERGENCE_FACTOR / MARGIN over the reference (once N steps
    gave one), capped at `uniform` = ln(vocab) once the `lowest` step loss so far was MARGIN below it."""
    bound = math.inf if reference is None else max(DIVERGENCE_FACTOR * reference, reference + DIVERGENCE_MARGIN)
    if uniform is not None and lowest < uniform - DIVERGENCE_MARGIN:
        bound = min(bound, uniform)
    return bound


@dataclass
class TrainingState:
    """Everything besides weights and optimizer state that resume needs (torch.save-able plain data)."""

    step: int = 0
    tokens: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    topology: list[dict[str, Any]] = field(default_factory=list)
    reprunes: list[dict[str, Any]] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    guard: dict[str, Any] = field(default_factory=new_guard)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("step", "tokens", "log", "topology", "reprunes", "rng", "guard")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


# ----------------------------------------------------------------------------------------------------------------
# Loss over a rank's share of a global batch.


def rank_share(idx: list[int], ctx: DistContext) -> list[int]:
    """This rank's contiguous share of a global batch's example indices."""
    if ctx.world == 1:
        return idx
    bounds = [len(idx) * r // ctx.world for r in range(ctx.world + 1)]
    return idx[bounds[ctx.rank] : bounds[ctx.rank + 1]]


LOSS_CHUNK_TOKENS = 256  # tokens whose vocabulary logits exist at once in the training loss


def token_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of next-token NLL over the label tokens of a batch (float32).

    The full (batch, seq, vocab) fp32 logits, their log-softmax and their gradient would be the largest tensors of a
    training step (3 x 200 MB for 4 x 256 tokens of a 49k vocabulary, GBs for Llama-3's 128k). So the model runs
    with its output head bypassed, and the head plus cross-entropy run on chunks of the label tokens under
    activation checkpointing: one chunk's logits exist at a time, recomputed in backward. Ignored (prompt and
    padding) positions never reach the head."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    finally:
        model.set_output_embeddings(head)
    labels = batch["labels"][:, 1:].reshape(-1)
    keep = labels != IGNORE
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    labels = labels[keep]
    total = hidden[:0].sum().float()  # 0, attached to the graph even when no position carries a label
    for start in range(0, labels.numel(), LOSS_CHUNK_TOKENS):
        chunk = slice(start, start + LOSS_CHUNK_TOKENS)
        if torch.is_grad_enabled():
            nll = checkpoint(_head_nll_sum, head, hidden[chunk], labels[chunk], use_reentrant=False)
        else:
            nll = _head_nll_sum(head, hidden[chunk], labels[chunk])
        total = total + nll
    return total


def _head_nll_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


CKPT_NAME = "checkpoint"


def check_checkpoint_dir(ckpt_dir: Path, resume: bool) -> None:
    current, previous = ckpt_dir / CKPT_NAME, ckpt_dir / f".{CKPT_NAME}.old"
    if not current.exists() and (previous / "state.pt").exists():  # killed between the two renames
        previous.rename(current)
    has = (current / "state.pt").exists()
    if resume and not has:
        raise SparsetuneError(f"--resume: no checkpoint in {ckpt_dir}; run once without --resume")
    if not resume and has:
        raise SparsetuneError(
            f"{ckpt_dir} already holds a checkpoint; pass --resume to continue it or use an empty dir"
        )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        (ckpt_dir / LOG_FILE).unlink(missing_ok=True)


def replace_dir(new: Path, target: Path) -> None:
    """Put `new` at `target`; the previous `target` is removed only after the new one is in place."""
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    new.rename(target)
    shutil.rmtree(old, ignore_errors=True)


class progress_bar:  # noqa: N801 - a context manager used like a function
    """Progress over steps showing loss, lr, sparsity and tokens/s (plain log lines off a terminal); yields the
    per-step callback."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        from sparsetune.progress import Progress

        self.bar = Progress(total, "step", completed=done, enabled=enabled)

    def __enter__(self) -> Any:
        bar = self.bar.__enter__()

        def advance(step: int, row: dict[str, Any]) -> None:
            info = (
                f"loss {row['loss']:.4f} lr {row['lr']:.2e} sparsity {row['sparsity']:.4f} "
                f"{row['tokens_per_s']:.0f} tok/s"
            )
            bar.update(completed=step, info=info)

        return advance

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


class CheckpointedTraining:
    """What SEFT and SMET training share: the loss, validation, the JSONL log, resumable checkpoints, and the stops
    on a non-finite or diverging loss and on non-finite or absurd weights.

    A subclass sets cfg, ctx, model, optimizer, state, ckpt_dir, val_data and pad_id in its setup, and says what a
    checkpoint holds (`checkpoint_tensors`) and which settings it must match to be resumed (`identity`). Its
    train loop calls `check_loss` before each optimizer step, `check_weights` after it, and `request_checkpoint`
    where a checkpoint is due; its setup calls `init_guard` before any resume.

    A checkpoint is only written once its weights have proven sane: the one due after step s is written during
    step s + 1, when those weights have given a finite loss that is not diverging (and before they change). So
    the checkpoint a stop calls intact always predates the divergence.
    """

    RESUME_HINT = "resume with the same settings"
    cfg: Any
    ctx: DistContext
    model: nn.Module
    optimizer: Any
    state: TrainingState
    ckpt_dir: Path | None
    val_data: Examples | None
    pad_id: int
    _last_ckpt_step = 0
    _pending_rng: torch.Tensor | None = None  # a checkpoint is due: the RNG state at the end of its step
    _weight_limits: dict[str, float] | None = None
    _uniform_loss: float | None = None  # ln(vocab): the loss of uniform guessing

    def identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token NLL of one micro-batch (a method so tests can inject a failure)."""
        return token_nll_sum(self.model, batch)

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
                self._pending_rng = None
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

    @torch.no_grad()
    def validation_loss(self) -> float:
        assert self.val_data is not None
        n = min(len(self.val_data), self.cfg.val_batches * self.cfg.batch_size)
        micro = self.cfg.batch_size // self.cfg.grad_accum
        self.model.eval()
        nll = torch.zeros(2, dtype=torch.float64)
        for start in range(0, n, micro):
            local = rank_share(list(range(start, min(n, start + micro))), self.ctx)
            batch = {k: v.to(self.ctx.device) for k, v in collate(self.val_data, local, self.pad_id).items()}
            nll[0] += float(token_nll_sum(self.model, batch))
            nll[1] += label_count(batch)
        self.model.train()
        all_reduce_sum(nll, self.ctx)
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
        self.state.rng = {"torch": rng}
        self._pending_rng = None
        if self.ctx.is_main:
            from safetensors.torch import save_file

            tmp = self.ckpt_dir / f".{CKPT_NAME}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            weights = {n: t.detach().contiguous().cpu() for n, t in self.checkpoint_tensors().items()}
            save_file(weights, str(tmp / "weights.safetensors"))
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")
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
        if saved["identity"] != identity:
            diff = sorted(k for k in identity if saved["identity"].get(k) != identity[k])
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

    def cleanup(self) -> None:
        if self.ctx.world > 1 and torch.distributed.is_initialized():
            self.ctx.barrier()


def untrained_zeros(optimizer: Any, weight: Any) -> int:
    """Active entries of a SparseWeight that hold exactly 0 and never had a non-zero gradient (Adam's v is 0): grown
    at 0 where no gradient reaches (in tiny models, a unit whose output nothing reads). Unlike weights that
    overflowed or cancelled to 0, they are no sign of divergence."""
    _, v = optimizer.sparse_state[weight.name].moments.load()  # per slot, in the order of weight.active
    values = weight.param.detach().view(-1)[weight.active]
    return int(((values == 0) & (v == 0)).sum())


def _abs_max(tensors: list[torch.Tensor]) -> list[float]:
    """Largest |value| of each tensor (nan when it holds one), with one device sync for all of them."""
    if not tensors:
        return []
    with torch.no_grad():
        peaks = torch.stack([torch.linalg.vector_norm(t.detach(), math.inf).float() for t in tensors])
    return [float(p) for p in peaks.cpu()]
