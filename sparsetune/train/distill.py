"""Distillation from a dense teacher, for every `seft` method (seft, masked-ft, lora-reprune, granet).

The loss a step minimises becomes CE + w * D (the logged loss and the divergence guard stay on CE), where D is

- `kl`: sum over the label tokens of T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton's scaling);
- `squarehead` (Kurtic et al. 2023): that KL plus, for every decoder layer, the normalised feature error
  mean((h_student - h_teacher)^2) / mean(h_teacher^2) over the micro-batch's label positions (times their count,
  so it sums over tokens like the CE).

The teacher runs once per micro-batch without gradients, its weights in bf16 or NF4 (bitsandbytes through
transformers' `BitsAndBytesConfig`). Both models' output heads run on chunks of label tokens under activation
checkpointing, like the CE (`loss.token_nll_sum`): neither model's whole logits exist at once.

Glue to the loop: `Trainer.distiller` (set by the `seft` task's `load`) and `Trainer.objective`, which calls
`Distiller.objective` per micro-batch.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from sparsetune import loading, reports, structure
from sparsetune.errors import SparsetuneError
from sparsetune.train.examples import IGNORE
from sparsetune.train.loss import LOSS_CHUNK_TOKENS, final_hidden, logit_transform

FEATURE_EPS = 1e-6  # keeps the normalised feature error finite for an all-zero teacher layer


# ---- the losses: pure functions -----------------------------------------------------------------------------


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over rows of T^2 * KL(softmax(teacher / T) || softmax(student / T)), in float32."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction="sum", log_target=True) * temperature**2


def normalised_mse(student: torch.Tensor, teacher: torch.Tensor, eps: float = FEATURE_EPS) -> torch.Tensor:
    """MSE(student, teacher) / MSE(teacher, 0): SquareHead's per-layer feature loss, in float32."""
    student, teacher = student.float(), teacher.float()
    return (student - teacher).pow(2).mean() / (teacher.pow(2).mean() + eps)


def squarehead_feature_loss(
    student_layers: list[torch.Tensor], teacher_layers: list[torch.Tensor], eps: float = FEATURE_EPS
) -> torch.Tensor:
    """The sum over layers of `normalised_mse`."""
    if len(student_layers) != len(teacher_layers):
        raise ValueError(f"{len(student_layers)} student layers against {len(teacher_layers)} teacher layers")
    return sum(
        (normalised_mse(s, t, eps) for s, t in zip(student_layers, teacher_layers, strict=True)),
        torch.zeros((), device=student_layers[0].device) if student_layers else torch.zeros(()),
    )


# ---- capturing what the models compute -----------------------------------------------------------------------


@contextlib.contextmanager
def captured_layers(model: nn.Module, enabled: bool = True) -> Iterator[list[torch.Tensor]]:
    """The decoder blocks' outputs of the forward pass run inside the block (in order). Blocks that activation
    checkpointing runs again during backward are not captured twice: the capture ends with the block."""
    outputs: list[torch.Tensor] = []
    if not enabled:
        yield outputs
        return
    recording = [True]

    def hook(_module: nn.Module, _args: Any, output: Any) -> None:
        if recording[0]:
            outputs.append(output[0] if isinstance(output, tuple) else output)

    handles = [layer.register_forward_hook(hook) for layer in structure.decoder_layers(model)]
    try:
        yield outputs
    finally:
        recording[0] = False
        for h in handles:
            h.remove()


# ---- the teacher ----------------------------------------------------------------------------------------------


@dataclass
class TeacherOutput:
    hidden: torch.Tensor  # (batch, seq, hidden): what the teacher's head reads
    layers: list[torch.Tensor]  # the decoder blocks' outputs (empty unless squarehead)


class Teacher:
    """A frozen model run without gradients, one forward pass per micro-batch; times its passes."""

    def __init__(self, model: nn.Module, source: str, dtype: str, capture_layers: bool) -> None:
        self.model, self.source, self.dtype, self.capture_layers = model, source, dtype, capture_layers
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        self.head = model.get_output_embeddings()
        self.transform = logit_transform(model.config)
        self.seconds = 0.0
        self.passes = 0

    @property
    def weight_bytes(self) -> int:
        """Bytes of the teacher's weights and buffers as held (4-bit packed for NF4, with its quantization state)."""
        return int(self.model.get_memory_footprint())

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherOutput:
        t0 = time.perf_counter()
        with captured_layers(self.model, self.capture_layers) as layers:
            hidden = final_hidden(self.model, batch)
        if hidden.is_cuda:  # the time share needs the pass done, not just queued
            torch.cuda.synchronize(hidden.device)
        self.seconds += time.perf_counter() - t0
        self.passes += 1
        return TeacherOutput(hidden, list(layers))


def check_same_vocabulary(
    student_vocab: int, teacher_vocab: int, student_tokens: dict[str, int] | None, teacher_tokens: dict[str, int] | None
) -> None:
    """Refuse a teacher whose vocabulary (the logits' size) or tokenizer differs from the student's."""
    if student_vocab != teacher_vocab:
        raise SparsetuneError(
            f"the teacher's vocabulary holds {teacher_vocab} tokens and the student's {student_vocab}: distillation "
            "compares their logits token by token; pass --distill-from the dense model the student was pruned from"
        )
    if student_tokens is not None and teacher_tokens is not None and student_tokens != teacher_tokens:
        differ = len(set(student_tokens.items()) ^ set(teacher_tokens.items()))
        raise SparsetuneError(
            f"the teacher's tokenizer differs from the student's ({differ} token ids differ): distillation compares "
            "their logits token by token; pass --distill-from the dense model the student was pruned from"
        )


def source_model(report: dict[str, Any] | None) -> str | None:
    """The dense source an input's sparsity report records: its `source_model`, else the model its prune ran
    on (`settings.model`)."""
    if not report:
        return None
    return report.get("source_model") or (report.get("settings") or {}).get("model")


def load_teacher(
    spec: str,
    dtype: str,
    device: torch.device,
    student: nn.Module,
    student_tokenizer: Any,
    capture_layers: bool,
    trust_remote_code: bool = False,
) -> Teacher:
    """Load the teacher in `dtype` (bf16 or nf4), refusing one whose vocabulary or tokenizer differs from the
    student's (read from its config and tokenizer before its weights when it is a local dir)."""
    kind, location = loading.resolve_model_path(spec)
    student_vocab = int(student.config.get_text_config().vocab_size)
    student_tokens = student_tokenizer.get_vocab() if student_tokenizer is not None else None
    if kind == "dir" and (Path(location) / "config.json").is_file():
        config = loading.read_config(location)
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if vocab is not None:
            check_same_vocabulary(student_vocab, int(vocab), None, None)
    kwargs: dict[str, Any] = {}
    if dtype == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        kwargs["device_map"] = {"": str(device)}
    model, tokenizer = loading.load_model(
        spec, dtype="bfloat16", device=str(device), trust_remote_code=trust_remote_code, **kwargs
    )
    teacher_tokens = tokenizer.get_vocab() if tokenizer is not None else None
    check_same_vocabulary(student_vocab, int(model.config.get_text_config().vocab_size), student_tokens, teacher_tokens)
    if capture_layers:
        shapes = [
            (len(structure.decoder_layers(m)), int(m.config.get_text_config().hidden_size)) for m in (student, model)
        ]
        if shapes[0] != shapes[1]:
            raise SparsetuneError(
                f"squarehead compares every decoder layer's features, and the teacher has {shapes[1][0]} layers of "
                f"width {shapes[1][1]} where the student has {shapes[0][0]} of width {shapes[0][1]}; use "
                "--distill-loss kl, or the dense model the student was pruned from"
            )
    return Teacher(model, spec, dtype, capture_layers)


# ---- the objective ----------------------------------------------------------------------------------------------


def _chunk_losses(
    head: nn.Module,
    transform: Callable[[torch.Tensor], torch.Tensor] | None,
    teacher_head: nn.Module,
    teacher_transform: Callable[[torch.Tensor], torch.Tensor] | None,
    temperature: float,
    hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE, summed T^2 KL) of one chunk of label positions."""
    logits = head(hidden)
    if transform is not None:
        logits = transform(logits)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
        if teacher_transform is not None:
            teacher_logits = teacher_transform(teacher_logits)
    nll = F.cross_entropy(logits.float(), labels, reduction="sum")
    return nll, kl_sum(logits, teacher_logits, temperature)


class Distiller:
    """The distillation objective of a run: its teacher, loss kind, weight and temperature."""

    def __init__(self, teacher: Teacher, loss: str, weight: float, temperature: float) -> None:
        self.teacher, self.loss, self.weight, self.temperature = teacher, loss, weight, temperature
        self.totals = {"kl": 0.0, "feature": 0.0, "tokens": 0}

    def objective(
        self, model: nn.Module, batch: dict[str, torch.Tensor], chunk_tokens: int = LOSS_CHUNK_TOKENS
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token CE, CE + weight x distillation) of one micro-batch, both sums over its label tokens."""
        squarehead = self.loss == "squarehead"
        target = self.teacher(batch)
        with captured_layers(model, squarehead) as student_layers:
            hidden = final_hidden(model, batch)
        labels = batch["labels"][:, 1:].reshape(-1)
        keep = labels != IGNORE
        labels = labels[keep]
        hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])[keep]
        teacher_hidden = target.hidden[:, :-1].reshape(-1, target.hidden.shape[-1])[keep]
        transform = logit_transform(model.config)
        step = chunk_tokens if chunk_tokens > 0 else max(1, labels.numel())
        nll = kl = hidden[:0].sum().float()  # 0, attached to the graph even when no position carries a label
        for start in range(0, labels.numel(), step):
            part = slice(start, start + step)
            args = (
                model.get_output_embeddings(),
                transform,
                self.teacher.head,
                self.teacher.transform,
                self.temperature,
                hidden[part],
                teacher_hidden[part],
                labels[part],
            )
            if torch.is_grad_enabled() and chunk_tokens > 0:
                chunk_nll, chunk_kl = checkpoint(_chunk_losses, *args, use_reentrant=False)
            else:
                chunk_nll, chunk_kl = _chunk_losses(*args)
            nll, kl = nll + chunk_nll, kl + chunk_kl
        distill = kl
        if squarehead and labels.numel():

            def at_labels(h: torch.Tensor) -> torch.Tensor:
                return h[:, :-1].reshape(-1, h.shape[-1])[keep]

            features = squarehead_feature_loss(
                [at_labels(h) for h in student_layers], [at_labels(h) for h in target.layers]
            )
            distill = distill + features * labels.numel()
            self.totals["feature"] += float(features.detach()) * labels.numel()
        self.totals["kl"] += float(kl.detach())
        self.totals["tokens"] += labels.numel()
        return nll, nll + self.weight * distill

    def report(self, mean_step_s: float, micro_batches: int) -> dict[str, Any]:
        """The teacher's weight bytes, its mean seconds per optimizer step (of `micro_batches` passes) and their
        share of the mean step time, and the mean distillation terms per label token (over this process's passes
        since the start or the resume)."""
        teacher = self.teacher
        per_step = teacher.seconds / max(1, teacher.passes) * micro_batches
        tokens = max(1, self.totals["tokens"])
        return {
            "teacher": teacher.source,
            "teacher_dtype": teacher.dtype,
            "teacher_weight_bytes": teacher.weight_bytes,
            "loss": self.loss,
            "weight": self.weight,
            "temperature": self.temperature,
            "teacher_s_per_step": round(per_step, 6),
            "teacher_step_share": round(per_step / mean_step_s, 4) if mean_step_s > 0 else None,
            "mean_kl_per_token": self.totals["kl"] / tokens,
            "mean_feature_loss": self.totals["feature"] / tokens if self.loss == "squarehead" else None,
        }


def build_distiller(
    cfg: Any, student: nn.Module, tokenizer: Any, report: dict[str, Any] | None, device: torch.device
) -> Distiller | None:
    """The run's Distiller (None with --distill-loss none): the teacher is --distill-from, else the source the
    input's report records."""
    if cfg.distill_loss == "none":
        return None
    spec = cfg.distill_from or source_model(report)
    if spec is None:
        raise SparsetuneError(
            f"--distill-loss {cfg.distill_loss} needs a teacher, and {cfg.model} has no {reports.REPORT_FILE} naming "
            "the model it was pruned from; pass --distill-from DENSE_MODEL"
        )
    teacher = load_teacher(
        spec, cfg.teacher_dtype, device, student, tokenizer, cfg.distill_loss == "squarehead", cfg.trust_remote_code
    )
    return Distiller(teacher, cfg.distill_loss, cfg.distill_weight, cfg.distill_temperature)
