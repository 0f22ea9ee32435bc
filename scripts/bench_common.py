"""Testbed pieces shared by the benchmark drivers and their workers (plain torch: importable from any venv)."""

from __future__ import annotations

import json
import math
import resource
import time

import torch

CALIB_WINDOWS, CALIB_SEQLEN = 32, 512
EVAL_WINDOWS, EVAL_SEQLEN = 32, 1024


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def testbed_ids(tokenizer, c4_jsonl: str, wiki_raw: str, calib_windows: int, eval_windows: int):
    """Calibration: the C4 sample's documents joined with "\\n\\n", tokenized once, first windows of 512.
    Evaluation: `wikitext_eval_ids`."""
    with open(c4_jsonl) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    calib = tokenizer("\n\n".join(docs), verbose=False)["input_ids"][: calib_windows * CALIB_SEQLEN]
    calib_ids = torch.tensor(calib, dtype=torch.int64).view(calib_windows, CALIB_SEQLEN)
    return calib_ids, wikitext_eval_ids(tokenizer, wiki_raw, eval_windows)


def wikitext_eval_ids(tokenizer, wiki_raw: str, eval_windows: int) -> torch.Tensor:
    """The WikiText-2 raw test file's text as it is, tokenized once, first `eval_windows` windows of 1024."""
    with open(wiki_raw) as f:
        wiki = tokenizer(f.read(), verbose=False)["input_ids"][: eval_windows * EVAL_SEQLEN]
    return torch.tensor(wiki, dtype=torch.int64).view(eval_windows, EVAL_SEQLEN)


@torch.inference_mode()
def perplexity(model, eval_ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over the windows (all windows have the same length, so window means average)."""
    total, count = 0.0, 0
    for i in range(0, eval_ids.shape[0], batch_size):
        batch = eval_ids[i : i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    return math.exp(total / count)


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
