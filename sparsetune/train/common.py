"""Training plumbing shared by `seft` and `smet-pretrain`: token examples and batches, the data order, schedules,
the token loss, the divergence guard's bounds, the resumable state and checkpoint directories."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsetune import data
from sparsetune.errors import SparsetuneError
from sparsetune.train import memory_config
from sparsetune.train.distill_config import DistillSettings
from sparsetune.train.granet.config import GranetSettings

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


# Hand-written rather than transformers' get_cosine_with_min_lr_schedule_with_warmup, which gives the same values
# (tests/test_train_schedule.py compares them; its warm-up reads one step later, see lr_at): importing it pulls in
# transformers.trainer_utils, peft and bitsandbytes, about 1 s more per run and a bitsandbytes warning on every
# seft and smet-pretrain run that does not already load them.


def lr_at(step: int, cfg: Schedule) -> float:
    """Linear warmup to --lr, then cosine decay to lr * min_lr_ratio (step is 0-based; the first step already trains
    at lr / warmup, where transformers' warm-up starts at 0)."""
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
# The training loss.


LOSS_CHUNK_TOKENS = memory_config.LOSS_CHUNK_TOKENS  # label tokens whose vocabulary logits exist at once


class _CaptureHead(nn.Module):
    """Stands in for the output head during the model's forward pass: keeps the head's input (the final hidden
    states) and returns it unchanged, so what the model does after its head (a soft-cap, a scale) runs on a
    hidden-sized tensor that is then dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        self.hidden = hidden
        return hidden


def token_nll_sum(
    model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Sum of next-token NLL over the label tokens of a batch (float32).

    The full (batch, seq, vocab) fp32 logits, their log-softmax and their gradient would be the largest tensors of a
    training step (3 x 200 MB for 4 x 256 tokens of a 49k vocabulary, GBs for Llama-3's 128k). So the model runs
    with its output head bypassed, and the head plus cross-entropy run on chunks of `chunk_tokens` label tokens
    under activation checkpointing: one chunk's logits exist at a time, recomputed in backward (`chunk_tokens` 0:
    all label tokens in one piece, not recomputed). Ignored (prompt and padding) positions never reach the head.
    What the model does to its logits after the head (Gemma-2's soft-cap, Granite's and Cohere's scales) is
    applied to each chunk's logits (`logit_transform`)."""
    head = model.get_output_embeddings()
    capture = _CaptureHead()
    model.set_output_embeddings(capture)
    kwargs = {"use_cache": False} if getattr(model.config, "use_cache", None) is not None else {}
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    finally:
        model.set_output_embeddings(head)
    hidden = capture.hidden
    assert hidden is not None, "the model's forward pass did not run its output head"
    transform = logit_transform(model.config)
    labels = batch["labels"][:, 1:].reshape(-1)
    keep = labels != IGNORE
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
    labels = labels[keep]
    step = chunk_tokens if chunk_tokens > 0 else max(1, labels.numel())
    total = hidden[:0].sum().float()  # 0, attached to the graph even when no position carries a label
    for start in range(0, labels.numel(), step):
        chunk = slice(start, start + step)
        if torch.is_grad_enabled() and chunk_tokens > 0:
            nll = checkpoint(_head_nll_sum, head, transform, hidden[chunk], labels[chunk], use_reentrant=False)
        else:
            nll = _head_nll_sum(head, transform, hidden[chunk], labels[chunk])
        total = total + nll
    return total


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What a family's causal-LM head does to the logits after the matmul, from its config (None: nothing)."""
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:  # Gemma-2 and its kin: cap * tanh(logits / cap)
        return lambda logits: torch.tanh(logits / cap) * cap
    scaling = getattr(config, "logits_scaling", None)
    if scaling is not None and scaling != 1:  # Granite: logits / logits_scaling
        return lambda logits: logits / scaling
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:  # Cohere: logits * scale
        return lambda logits: logits * scale
    return None


def _head_nll_sum(
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    hidden: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    logits = head(hidden)
    if transform is not None:
        logits = transform(logits)
    return nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


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


def untrained_zeros(optimizer: Any, weight: Any) -> int:
    """Active entries of a SparseWeight that hold exactly 0 and never had a non-zero gradient (Adam's v is 0): grown
    at 0 where no gradient reaches (in tiny models, a unit whose output nothing reads). Unlike weights that
    overflowed or cancelled to 0, they are no sign of divergence."""
    _, v = optimizer.sparse_state[weight.name].moments.load()  # per slot, in the order of weight.active
    values = weight.param.detach().view(-1)[weight.active]
    return int(((values == 0) & (v == 0)).sum())


def dense_adamw(params: Any, cfg: Any) -> Any:
    """torch's AdamW over `params` (tensors or groups), or bitsandbytes' AdamW8bit with --optim adamw8bit."""
    kwargs = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optim == "adamw8bit":
        import bitsandbytes as bnb  # slow to import: only for the 8-bit state

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


# Settings that change where a run writes or how often it reports, not its result: a resume may differ in them.
# Activation checkpointing recomputes the same values: the losses and weights are those of a run without it.
NOT_IDENTITY = {
    "output",
    "device",
    "checkpoint_dir",
    "checkpoint_every",
    "resume",
    "log_every",
    "data_dir",
    "activation_checkpointing",
}
# Settings that joined the identity after checkpoints were written, with the value those checkpoints ran with: a
# checkpoint whose identity lacks one resumes a run that sets it to that value.
IDENTITY_ADDED: dict[str, Any] = {"loss_chunk_tokens": LOSS_CHUNK_TOKENS}
# GraNet's and distillation's settings joined with their defaults (a checkpoint written before ran without both).
IDENTITY_ADDED.update(
    {name: field.default for name, field in {**GranetSettings.model_fields, **DistillSettings.model_fields}.items()}
)
