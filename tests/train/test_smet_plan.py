"""`smet-pretrain --density auto`: the run takes the loss-optimal density of `sparsetune plan` for its own model,
--unique-tokens and steps x batch x seqlen tokens, and says where it came from. (The law itself is checked
against the paper's notebook in tests/test_plan.py.)"""

from __future__ import annotations

import json
import logging

import pytest
from helpers import smet_settings as settings
from typer.testing import CliRunner

from sparsetune import plan
from sparsetune.cli.app import app
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def test_density_auto_takes_the_planned_density(corpus, tmp_path, caplog):
    tok_dir, text = corpus
    out = tmp_path / "out"
    args = ["smet-pretrain", "--model-config", "tiny", "--tokenizer", str(tok_dir), "--data", str(text),
            "--seqlen", "32", "--batch-size", "4", "--steps", "4", "--update-interval", "2",
            "--density", "auto", "--unique-tokens", "200", "--init", "uniform", "-o", str(out), "--json"]  # fmt: skip
    with caplog.at_level(logging.INFO, logger="sparsetune.train.smet"):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    tokens = 4 * 4 * 32
    expected = plan.loss_optimal(float(summary["parameters"]), 200.0, float(tokens))
    assert summary["density"] == expected.density == summary["density_plan"]["density"]
    assert summary["density_plan"]["tokens"] == tokens and summary["density_plan"]["unique_tokens"] == 200
    assert summary["density_plan"]["unique_tokens_from"] == "--unique-tokens"
    assert "When Data Is Scarce" in summary["density_plan"]["source"]
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["settings"]["density"] == expected.density  # the resolved value, not "auto"
    layers = report["layers"].values()  # uniform init: every layer at the planned density
    assert sum(v["active"] for v in layers) / sum(v["numel"] for v in layers) == pytest.approx(
        expected.density, abs=1e-3
    )
    assert any("--density auto" in r.getMessage() and "loss-optimal" in r.getMessage() for r in caplog.records)


def test_density_auto_defaults_unique_tokens_to_the_training_windows(corpus, tmp_path):
    tok_dir, text = corpus
    from sparsetune.train.smet import PretrainRun

    run = PretrainRun(SmetConfig(**settings(tok_dir, text, tmp_path / "o", density="auto")), show_progress=False)
    try:
        run.setup()
        windows = sum(len(x) for x in run.train_data.inputs)
        assert run.density_plan["unique_tokens"] == windows
        assert run.density_plan["unique_tokens_from"] == "the training windows"
        assert run.cfg.density == plan.loss_optimal(run.density_plan["params"], windows, 12 * 4 * 32).density
    finally:
        run.cleanup()


def test_unique_tokens_needs_density_auto():
    with pytest.raises(ValueError, match="--density auto"):
        SmetConfig(density=0.5, unique_tokens=1e9)
    assert SmetConfig(density="auto").density == "auto" and SmetConfig(density="0.25").density == 0.25
    with pytest.raises(ValueError):
        SmetConfig(density=1.5)
