"""Training examples as token lists, their batches and the order a run draws them in: packed text windows,
instruction examples with the loss on the response only, the seeded data order and growth-scoring batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from sparsetune import data
from sparsetune.errors import SparsetuneError

IGNORE = -100


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
