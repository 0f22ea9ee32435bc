"""The real bundled model (SmolLM2-135M, tied embeddings) through the CLI. Slow: skipped when not installed."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from sparsetune.cli.app import app


def _nll(model, ids):
    with torch.inference_mode():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.slow
def test_wanda_on_the_bundled_model(bundled_model_dir, shared_data, tmp_path):
    out = tmp_path / "pruned"
    args = [
        "prune",
        "smollm2",
        "--calib",
        "c4",
        "--data-dir",
        str(shared_data),
        "--calib-samples",
        "8",
        "--seqlen",
        "128",
        "--calib-sampling",
        "consecutive",
        "-o",
        str(out),
        "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["modules_pruned"] == 30 * 7
    assert summary["global_sparsity"] == pytest.approx(0.5, abs=1e-6)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    dense = AutoModelForCausalLM.from_pretrained(bundled_model_dir)
    pruned = AutoModelForCausalLM.from_pretrained(out)
    # the tied embedding table was left alone (its few zeros come from the Q4_1 quantization)
    assert torch.equal(dense.model.embed_tokens.weight, pruned.model.embed_tokens.weight)
    assert summary["embedding_sparsity"] == pytest.approx(float((dense.model.embed_tokens.weight == 0).float().mean()))
    assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    tok = AutoTokenizer.from_pretrained(out)
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text()[:20000]
    ids = torch.tensor(tok(text)["input_ids"][:512]).view(2, 256)
    dense_nll, pruned_nll = _nll(dense, ids), _nll(pruned, ids)
    # 50% Wanda costs some quality but keeps the model working (dense ~3.2 nats/token here).
    assert dense_nll < pruned_nll < dense_nll + 1.5
    assert math.isfinite(pruned_nll)
