"""Perplexity: one token stream, cut into windows, scored batch by batch.

The default protocol is the one the Wanda and SparseGPT papers report: WikiText-2 test rows joined with
"\\n\\n", tokenized once, cut into non-overlapping windows of `seqlen` tokens (the tail that does not fill a
window is dropped), ppl = exp(mean NLL of every predicted token). `stride` gives the sliding-window variant:
windows of up to `seqlen` tokens start every `stride` tokens and each token is scored once, with as much
left context as the window allows.

`streamed_perplexity_on_ids` computes the same figures without holding the model: the hidden states of every
window go through one decoder block at a time, materialised from the checkpoint and released after its turn
(`sparsetune.streaming.StreamedModel`); memory holds one block, the embeddings and head, and the windows' hidden
states (on disk when they exceed a budget). For the same batch size it runs the same operations on the same
shapes as the in-memory loop, so the figures are equal bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparsetune import data, structure
from sparsetune.errors import SparsetuneError
from sparsetune.progress import Progress

if TYPE_CHECKING:
    from sparsetune.prune.activations import DiskTensor
    from sparsetune.prune.engine import BlockCall
    from sparsetune.streaming import StreamedModel

log = logging.getLogger(__name__)

DEFAULT_SEQLEN = 2048
# lm_head rows computed at once: bounds the fp32 logits held in memory (512 x 49k vocab = 100 MB).
HEAD_CHUNK_TOKENS = 512


@dataclass(frozen=True)
class Protocol:
    """How a named dataset becomes one token stream (as the papers that report it do)."""

    split: str
    joiner: str
    max_docs: int | None = None
    max_windows: int | None = None


PROTOCOLS = {
    # Wanda / SparseGPT: "\n\n".join(test["text"]), every full window.
    "wikitext2": Protocol("test", "\n\n"),
    # SparseGPT: " ".join of the first 1100 validation documents, the first 256 windows.
    "c4": Protocol("validation", " ", max_docs=1100, max_windows=256),
}
FILE_PROTOCOL = Protocol("train", "\n\n")


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; tokens [first_target, end) are scored (each from the logits one step earlier)."""

    begin: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def protocol_for(source: str) -> Protocol:
    if source in PROTOCOLS:
        return PROTOCOLS[source]
    if source in data.NAMED_DATASETS:
        raise SparsetuneError(
            f"--ppl {source}: this dataset has no evaluation split; use {', '.join(PROTOCOLS)} or a local text file"
        )
    return FILE_PROTOCOL


def eval_text(source: str, data_dir: str | os.PathLike[str] | None = None) -> str:
    """The text of a perplexity source: a named set's evaluation split (hub or mirror) or a local file."""
    return labelled_eval_text(source, data_dir)[0]


def labelled_eval_text(source: str, data_dir: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """(text, label): the label is what the figures are called, `wikitext2 (embedded sample)` for the sample."""
    protocol = protocol_for(source)
    records = data.load_records(source, protocol.split, data_dir)
    label = data.source_label(records, source)
    if protocol.max_docs is not None:
        records = records[: protocol.max_docs]
    return protocol.joiner.join(data.record_text(r) for r in records), label


def eval_token_ids(tokenizer: Any, source: str, data_dir: str | os.PathLike[str] | None = None) -> torch.Tensor:
    """The whole source tokenized once, as a 1-D int64 tensor (special tokens as the tokenizer adds them)."""
    return eval_source(tokenizer, source, data_dir)[0]


def eval_source(
    tokenizer: Any, source: str, data_dir: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, str]:
    """(token ids as in `eval_token_ids`, the source's label as in `labelled_eval_text`)."""
    text, label = labelled_eval_text(source, data_dir)
    ids = tokenizer(text, verbose=False)["input_ids"]
    if len(ids) < 2:
        raise SparsetuneError(f"--ppl {source} holds fewer than 2 tokens; pass a source with text in it")
    return torch.tensor(ids, dtype=torch.int64), label


def resolve_seqlen(seqlen: int | None, model_limit: int) -> int:
    """`None` -> 2048 capped at the model's max positions; an explicit longer seqlen is an error."""
    if seqlen is None:
        return min(DEFAULT_SEQLEN, model_limit)
    if seqlen < 2:
        raise SparsetuneError(f"--seqlen {seqlen} is too short; a window needs at least 2 tokens")
    if seqlen > model_limit:
        raise SparsetuneError(
            f"--seqlen {seqlen} is longer than the model allows ({model_limit} positions); "
            f"pass --seqlen {model_limit} or less"
        )
    return seqlen


def make_windows(
    n_tokens: int, seqlen: int, stride: int | None = None, limit_windows: int | None = None
) -> list[Window]:
    """Non-overlapping full windows (stride None), or sliding windows that score every token once."""
    if stride is None:
        windows = [Window(i * seqlen, (i + 1) * seqlen, i * seqlen + 1) for i in range(n_tokens // seqlen)]
    else:
        if not 1 <= stride <= seqlen:
            raise SparsetuneError(f"--stride {stride} must be between 1 and --seqlen ({seqlen})")
        windows, scored_to = [], 0
        for begin in range(0, n_tokens, stride):
            end = min(begin + seqlen, n_tokens)
            if end - begin >= 2:
                windows.append(Window(begin, end, max(scored_to, begin + 1)))
            scored_to = end
            if end == n_tokens:
                break
    if not windows:
        raise SparsetuneError(
            f"the text holds {n_tokens} tokens, fewer than one window of {seqlen}; lower --seqlen or use more text"
        )
    return windows[:limit_windows] if limit_windows is not None else windows


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most `batch_size` per batch."""
    batches: list[list[Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].length == w.length:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def _has_plain_head(model: nn.Module) -> bool:
    """True when logits are exactly lm_head(last hidden state): no soft-capping or logit scaling to copy."""
    cfg = model.config
    return (
        getattr(cfg, "model_type", None) in structure.SUPPORTED_FAMILIES
        and isinstance(getattr(model, "model", None), nn.Module)
        and isinstance(model.get_output_embeddings(), nn.Linear)
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
    )


def _chunk_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row NLL of fp32 `logits` (N, V), computed in place: no second vocabulary-sized tensor is allocated,
    which on CPU saves as much time as the log-softmax itself (fresh large buffers are page-faulted in)."""
    picked = logits.gather(1, targets[:, None]).squeeze(1)
    peak = logits.amax(1, keepdim=True)
    logits.sub_(peak).exp_()
    return logits.sum(1).log_().add_(peak.squeeze(1)).sub_(picked)


def _head_scratch(model: nn.Module) -> torch.Tensor | None:
    """A reusable fp32 (chunk, vocab) buffer for the vocabulary projection of a plain fp32 head, else None."""
    if not _has_plain_head(model):
        return None
    head = model.get_output_embeddings()
    if head.weight.dtype != torch.float32:
        return None
    return torch.empty(HEAD_CHUNK_TOKENS, head.out_features, dtype=torch.float32, device=head.weight.device)


def _token_nll(
    model: nn.Module, input_ids: torch.Tensor, first: int, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """NLL of tokens input_ids[:, first:] given their prefixes; returns (B, T - first) fp32.

    The decoder runs once; the vocabulary projection and log-softmax run on chunks of positions, so the fp32
    logits of the whole batch never exist at once, and positions that are only context are never projected.
    `scratch` (from `_head_scratch`) receives each chunk's logits, so no vocabulary-sized tensor is allocated.
    """
    bsz, seqlen = input_ids.shape
    if _has_plain_head(model):
        hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, H)
        head = model.get_output_embeddings()
    else:
        hidden = model(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        head = None
    states = hidden[:, first - 1 : seqlen - 1].reshape(-1, hidden.shape[-1])  # (B * (T - first), H or V)
    targets = input_ids[:, first:].reshape(-1)  # (B * (T - first),)
    nll = torch.empty(targets.shape, dtype=torch.float32, device=input_ids.device)
    for lo in range(0, targets.numel(), HEAD_CHUNK_TOKENS):
        hi = min(lo + HEAD_CHUNK_TOKENS, targets.numel())
        if head is None:
            logits = states[lo:hi].float()  # (chunk, V)
        elif scratch is not None and states.dtype == torch.float32:
            logits = scratch[: hi - lo]
            torch.mm(states[lo:hi].to(scratch.device), head.weight.t(), out=logits)
            if head.bias is not None:
                logits.add_(head.bias)
        else:
            logits = head(states[lo:hi]).float()
        nll[lo:hi] = _chunk_nll(logits, targets[lo:hi].to(logits.device)).to(nll.device)
    return nll.view(bsz, seqlen - first)


def _input_device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _score_batch(
    model: nn.Module, ids: torch.Tensor, batch: list[Window], device: torch.device, scratch: torch.Tensor | None
) -> tuple[torch.Tensor, int]:
    """(sum of the scored tokens' NLL as a float64 CPU scalar, their count) for one batch of equal-length windows."""
    x = torch.stack([ids[w.begin : w.end] for w in batch]).to(device)  # (B, T)
    offsets = torch.tensor([w.first_target - w.begin for w in batch], device=device)  # (B,)
    first = int(offsets.min())
    nll = _token_nll(model, x, first, scratch)  # (B, T - first)
    positions = torch.arange(first, x.shape[1], device=device)  # (T - first,)
    keep = positions[None, :] >= offsets[:, None]  # (B, T - first)
    return nll[keep].sum(dtype=torch.float64).cpu(), int(keep.sum())


def _result(
    total_nll: torch.Tensor,
    scored: int,
    windows: list[Window],
    ids: torch.Tensor,
    seqlen: int,
    stride: int | None,
    seconds: float,
) -> dict[str, Any]:
    mean_nll = float(total_nll) / scored
    return {
        "ppl": math.exp(mean_nll),
        "nll": mean_nll,
        "protocol": "non-overlapping" if stride is None else "sliding",
        "seqlen": seqlen,
        "stride": stride,
        "windows": len(windows),
        "tokens_scored": scored,
        "tokens_in_source": int(ids.numel()),
        "seconds": round(seconds, 3),
        "tokens_per_s": round(sum(w.length for w in windows) / seconds, 1) if seconds > 0 else None,
    }


@torch.inference_mode()
def perplexity_on_ids(
    model: nn.Module,
    ids: torch.Tensor,
    seqlen: int,
    stride: int | None = None,
    limit_windows: int | None = None,
    batch_size: int = 1,
    show_progress: bool = False,
    label: str = "ppl",
) -> dict[str, Any]:
    """Perplexity of `model` on the 1-D token tensor `ids` (see the module docstring for the protocol)."""
    if batch_size < 1:
        raise SparsetuneError("--ppl-batch-size must be at least 1")
    windows = make_windows(int(ids.numel()), seqlen, stride, limit_windows)
    device = _input_device(model)
    total_nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    scratch = _head_scratch(model)
    t0 = time.perf_counter()
    total = sum(w.end - w.first_target for w in windows)
    with Progress(total, f"ppl {label}", unit="tokens", enabled=show_progress, rate=True) as bar:
        for batch in _batches(windows, batch_size):
            nll_sum, n = _score_batch(model, ids, batch, device, scratch)
            total_nll += nll_sum
            scored += n
            bar.update(advance=n)
    return _result(total_nll, scored, windows, ids, seqlen, stride, time.perf_counter() - t0)


# ----- streamed: one decoder block at a time over the hidden states of every window ----------------------------

# The windows' hidden states stay in memory while they take at most this share of the available RAM; above it
# they go to an unlinked temp file (the prune engine's disk ActivationStore), read and written batch by batch.
HIDDEN_MEMORY_FRACTION = 0.25


@dataclass
class _Run:
    """Consecutive windows of one length: their hidden states (N, T, H) and what the model passes each block."""

    windows: list[Window]
    hidden: torch.Tensor | DiskTensor
    calls: list[BlockCall]


def _runs(windows: list[Window]) -> list[list[Window]]:
    """Consecutive windows of equal length; cut by the batch size they give exactly `_batches`' batches."""
    runs: list[list[Window]] = []
    for w in windows:
        if runs and runs[-1][0].length == w.length:
            runs[-1].append(w)
        else:
            runs.append([w])
    return runs


def _hidden_size(model: nn.Module) -> int:
    cfg = getattr(model.config, "text_config", None) or model.config
    return int(
        getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None) or model.get_input_embeddings().embedding_dim
    )


def hidden_state_bytes(model: nn.Module, windows: list[Window]) -> int:
    """Bytes of the hidden states of every window in the model's dtype: what the streamed pass holds."""
    return sum(w.length for w in windows) * _hidden_size(model) * (torch.finfo(model.dtype).bits // 8)


def hidden_store(model: nn.Module, windows: list[Window], device: torch.device, budget: int | None = None) -> Any:
    """Where the windows' hidden states live: the GPU when they fit in half its free memory, else CPU memory up to
    `budget` bytes (default: HIDDEN_MEMORY_FRACTION of the available RAM), else a temp file."""
    import psutil

    from sparsetune.prune.activations import ActivationStore

    need = hidden_state_bytes(model, windows)
    if device.type == "cuda" and need < torch.cuda.mem_get_info(device)[0] // 2:
        return ActivationStore("memory", device)
    if budget is None:
        budget = int(psutil.virtual_memory().available * HIDDEN_MEMORY_FRACTION)
    if need > budget:
        log.info(
            "the hidden states of %d windows take %.2f GB, over the %.2f GB kept in memory: they go to a temp file",
            len(windows),
            need / 1e9,
            budget / 1e9,
        )
        return ActivationStore("disk", torch.device("cpu"))
    return ActivationStore("memory", torch.device("cpu"))


class _Replay(nn.Module):
    """Stands in for decoder block `index` during the last pass: block 0 returns the last block's stored output,
    the others pass it on, so the model's own code applies the final norm, head and logit transforms."""

    def __init__(self, index: int, box: list[torch.Tensor]) -> None:
        super().__init__()
        self.index, self.box = index, box

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.box[0] if self.index == 0 else (args[0] if args else kwargs["hidden_states"])


@contextlib.contextmanager
def _replaying(streamed: StreamedModel, box: list[torch.Tensor]) -> Iterator[None]:
    parent_path, _, attr = streamed.decoder_path.rpartition(".")
    parent = streamed.model.get_submodule(parent_path) if parent_path else streamed.model
    setattr(parent, attr, nn.ModuleList(_Replay(i, box) for i in range(len(streamed.layers))))
    try:
        yield
    finally:
        setattr(parent, attr, streamed.layers)


@dataclass(frozen=True)
class PplJob:
    """One perplexity measurement for `streamed_perplexities`: a token stream and how it is windowed."""

    ids: torch.Tensor
    seqlen: int
    stride: int | None = None
    limit_windows: int | None = None
    label: str = "ppl"


def streamed_perplexity_on_ids(
    streamed: StreamedModel,
    ids: torch.Tensor,
    seqlen: int,
    stride: int | None = None,
    limit_windows: int | None = None,
    batch_size: int = 1,
    show_progress: bool = False,
    label: str = "ppl",
    device: torch.device | str = "cpu",
    hidden_budget: int | None = None,
) -> dict[str, Any]:
    """`perplexity_on_ids` of a `StreamedModel`, one block in memory at a time (see `streamed_perplexities`)."""
    job = PplJob(ids, seqlen, stride, limit_windows, label)
    return streamed_perplexities(streamed, [job], batch_size, show_progress, device, hidden_budget)[0]


def streamed_perplexities(
    streamed: StreamedModel,
    jobs: list[PplJob],
    batch_size: int = 1,
    show_progress: bool = False,
    device: torch.device | str = "cpu",
    hidden_budget: int | None = None,
) -> list[dict[str, Any]]:
    """`perplexity_on_ids` of a `StreamedModel` for every job, in one pass over the weights.

    The embeddings (and the model's other non-block weights) are read first, give every window's input to block 0
    and are released; each block is then materialised, run on every batch of windows of every job and released;
    the embeddings are read again with the head, and the model's own forward (with the blocks standing aside)
    turns the stored states into NLL exactly as the in-memory loop does. `hidden_budget`: bytes of hidden states
    kept in memory (see `hidden_store`). With several jobs, `seconds` is the shared pass's and `tokens_per_s` its
    throughput over all of them (`shared_pass_sources` says how many).
    """
    from sparsetune.prune.engine import _layer_output, _on_device, batches, capture_block_inputs

    if batch_size < 1:
        raise SparsetuneError("--ppl-batch-size must be at least 1")
    job_windows = [make_windows(int(j.ids.numel()), j.seqlen, j.stride, j.limit_windows) for j in jobs]
    device = torch.device(device)
    model = streamed.model
    store = hidden_store(model, [w for ws in job_windows for w in ws], device, hidden_budget)
    t0 = time.perf_counter()
    runs: list[tuple[int, _Run]] = []  # (job index, run)
    n_layers = len(streamed.layers)
    totals = [torch.zeros((), dtype=torch.float64) for _ in jobs]
    scored = [0 for _ in jobs]
    label = ", ".join(j.label for j in jobs)
    with Progress(n_layers + 2, f"ppl {label} (streamed)", unit="steps", enabled=show_progress) as bar:
        try:
            streamed.load_rest(device)
            with torch.inference_mode():
                for k, (job, windows) in enumerate(zip(jobs, job_windows, strict=True)):
                    for run in _runs(windows):
                        x = torch.stack([job.ids[w.begin : w.end] for w in run])  # (N, T)
                        hidden, calls = capture_block_inputs(model, x, batch_size, device, store)
                        runs.append((k, _Run(run, hidden, calls)))
            streamed.release_rest()  # the embeddings wait on disk while the blocks run: memory holds one block
            bar.update(advance=1, info="embeddings")
            for i in range(n_layers):
                layer = streamed.load_block(i, device)
                with torch.inference_mode():
                    for _, r in runs:
                        call = _on_device(r.calls[i], device)
                        for sl in batches(len(r.windows), batch_size):
                            out = layer(r.hidden[sl].to(device), *call.args, **call.kwargs)
                            r.hidden[sl] = _layer_output(out).to(r.hidden.device)
                streamed.release_block(i)
                bar.update(advance=1, info=f"block {i + 1}/{n_layers}")
            streamed.load_rest(device)
            streamed.load_head(device)
            scratch = _head_scratch(model)
            with torch.inference_mode():
                for k, r in runs:
                    for sl in batches(len(r.windows), batch_size):
                        with _replaying(streamed, [r.hidden[sl].to(device)]):
                            nll_sum, n = _score_batch(model, jobs[k].ids, r.windows[sl], device, scratch)
                        totals[k] += nll_sum
                        scored[k] += n
            streamed.release_rest()
            bar.update(advance=1, info="head")
        finally:
            for _, r in runs:
                if hasattr(r.hidden, "close"):
                    r.hidden.close()
    seconds = time.perf_counter() - t0
    results = [
        _result(totals[k], scored[k], job_windows[k], j.ids, j.seqlen, j.stride, seconds) for k, j in enumerate(jobs)
    ]
    if len(jobs) > 1:
        all_tokens = sum(w.length for ws in job_windows for w in ws)
        for r in results:
            r["tokens_per_s"] = round(all_tokens / seconds, 1) if seconds > 0 else None
            r["shared_pass_sources"] = len(jobs)
    return results


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    source: str = "wikitext2",
    seqlen: int | None = None,
    stride: int | None = None,
    limit_windows: int | None = None,
    batch_size: int = 1,
    data_dir: str | os.PathLike[str] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Perplexity of an in-memory model on a named set (wikitext2, c4) or a local text file.

    Returns a dict with `ppl`, `nll` (mean token NLL), `windows`, `tokens_scored`, `seqlen`, `tokens_per_s`, ...
    and `dataset`, the source's label (`wikitext2 (embedded sample)` when the embedded sample was used).
    `seqlen=None` means 2048 capped at the model's max positions.
    """
    seq = resolve_seqlen(seqlen, structure.max_positions(model))
    ids, label = eval_source(tokenizer, source, data_dir)
    protocol = protocol_for(source)
    if protocol.max_windows is not None:
        limit_windows = min(limit_windows or protocol.max_windows, protocol.max_windows)
    result = perplexity_on_ids(model, ids, seq, stride, limit_windows, batch_size, show_progress, label=label)
    return {"source": source, "dataset": label, **result}
