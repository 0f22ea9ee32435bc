"""Perplexity: exact agreement with a hand-computed NLL, windowing protocols, sources and bad input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_tiny_model

from sparsetune.errors import SparsetuneError
from sparsetune.evaluate import ppl


def hand_nll(model, ids: torch.Tensor, spans: list[tuple[int, int, int]]) -> tuple[float, int]:
    """Sum of -log p(token) in float64 straight from full-model logits; spans are (begin, end, first_target)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for begin, end, first in spans:
            logp = torch.log_softmax(model(ids[begin:end][None]).logits[0].double(), dim=-1)  # (T, V)
            targets = torch.arange(first, end)  # predicted from the logits one position earlier
            total -= float(logp[targets - begin - 1, ids[targets]].sum())
            count += len(targets)
    return total, count


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=1)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("batch_size", [1, 3])
def test_disjoint_windows_match_hand_computed_nll(model, ids, batch_size):
    result = ppl.perplexity_on_ids(model, ids, seqlen=64, batch_size=batch_size)
    n_windows = 1000 // 64  # the 40-token tail is dropped, as in the papers' protocol
    total, count = hand_nll(model, ids, [(i * 64, (i + 1) * 64, i * 64 + 1) for i in range(n_windows)])
    assert result["windows"] == n_windows
    assert result["tokens_scored"] == count == n_windows * 63
    assert result["nll"] == pytest.approx(total / count, rel=1e-6)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_sliding_windows_score_every_token_once(model, ids):
    result = ppl.perplexity_on_ids(model, ids, seqlen=64, stride=24, batch_size=4)
    spans, scored_to = [], 0
    for begin in range(0, 1000, 24):  # the Hugging Face perplexity guide's loop
        end = min(begin + 64, 1000)
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == 1000:
            break
    total, count = hand_nll(model, ids, spans)
    assert count == result["tokens_scored"] == 999
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # More context per token than disjoint windows gives, so a real model would do better; here it just differs.
    assert result["ppl"] != ppl.perplexity_on_ids(model, ids, seqlen=64)["ppl"]


def test_limit_windows_and_general_path(model, ids, monkeypatch):
    first3 = ppl.perplexity_on_ids(model, ids, seqlen=64, limit_windows=3)
    total, count = hand_nll(model, ids, [(i * 64, (i + 1) * 64, i * 64 + 1) for i in range(3)])
    assert first3["windows"] == 3
    assert first3["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)
    # Models whose logits are not a plain lm_head (soft-capping, scaling) go through the full forward.
    monkeypatch.setattr(ppl, "_has_plain_head", lambda m: False)
    assert ppl.perplexity_on_ids(model, ids, seqlen=64, limit_windows=3)["ppl"] == pytest.approx(first3["ppl"])


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_head_chunks_and_the_reused_logits_buffer_change_nothing(model, ids, monkeypatch, chunk):
    """Chunk sizes that split windows and batches unevenly; the scratch buffer is reused across batches."""
    monkeypatch.setattr(ppl, "HEAD_CHUNK_TOKENS", chunk)
    result = ppl.perplexity_on_ids(model, ids, seqlen=64, stride=40, batch_size=3, limit_windows=6)
    spans, scored_to = [], 0
    for begin in range(0, 6 * 40, 40):
        end = begin + 64
        spans.append((begin, end, max(scored_to, begin + 1)))
        scored_to = end
    total, count = hand_nll(model, ids, spans)
    assert result["tokens_scored"] == count
    assert result["nll"] == pytest.approx(total / count, rel=1e-6)


def test_perplexity_on_a_text_file(tmp_path, tiny_tokenizer, model):
    from helpers import random_text

    path = tmp_path / "doc.txt"
    path.write_text(random_text(600, seed=4))
    result = ppl.perplexity(model, tiny_tokenizer, str(path), seqlen=128, batch_size=2)
    ids = torch.tensor(tiny_tokenizer(path.read_text())["input_ids"])
    total, count = hand_nll(model, ids, [(i * 128, (i + 1) * 128, i * 128 + 1) for i in range(len(ids) // 128)])
    assert result["source"] == str(path)
    assert result["ppl"] == pytest.approx(math.exp(total / count), rel=1e-6)


def test_wikitext2_stream_is_hf_rows_joined(shared_data):
    text = ppl.eval_text("wikitext2", shared_data)
    raw = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    rows = raw.splitlines(keepends=True)
    assert len(rows) == 4358
    assert text == "\n\n".join(r if r.strip() else "" for r in rows)
    assert text.startswith("\n\n = Robert Boulter = \n")


def test_seqlen_default_and_limits():
    assert ppl.resolve_seqlen(None, 8192) == 2048
    assert ppl.resolve_seqlen(None, 256) == 256
    with pytest.raises(SparsetuneError, match="longer than the model allows"):
        ppl.resolve_seqlen(512, 256)
    with pytest.raises(SparsetuneError, match="fewer than one window"):
        ppl.make_windows(100, 128)
    with pytest.raises(SparsetuneError, match="--stride"):
        ppl.make_windows(1000, 64, stride=65)


def test_bad_sources(tmp_path, tiny_tokenizer, model):
    with pytest.raises(SparsetuneError, match=r"mirror file .*c4/c4_validation.jsonl .* is missing"):
        ppl.perplexity(model, tiny_tokenizer, "c4", seqlen=64, data_dir=tmp_path)
    with pytest.raises(SparsetuneError, match="no evaluation split"):
        ppl.perplexity(model, tiny_tokenizer, "alpaca", seqlen=64, data_dir=tmp_path)
    with pytest.raises(SparsetuneError, match="not found"):
        ppl.perplexity(model, tiny_tokenizer, str(tmp_path / "nope.txt"), seqlen=64)


@pytest.mark.slow
def test_bundled_model_wikitext2_matches_hf_loss(bundled_model_dir, shared_data):
    """On the real model: our chunked NLL equals the model's own loss (labels=) on the same window."""
    from sparsetune.loading import load_model

    model, tokenizer = load_model(str(bundled_model_dir), device="cpu")
    stream = ppl.eval_token_ids(tokenizer, "wikitext2", shared_data)
    result = ppl.perplexity_on_ids(model, stream, seqlen=256, limit_windows=2)
    ids = stream[:512].view(2, 256)
    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    assert result["ppl"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert 5 < result["ppl"] < 100
