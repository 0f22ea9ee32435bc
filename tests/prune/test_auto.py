"""`--method auto`: the lookup rule in the shipped table, and the prune run that reports its choice (the table is built
from the benchmark rows by scripts/auto_table.py: tests/scripts/test_auto_table.py)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.prune import auto
from sparsetune.prune.config import PruneConfig

runner = CliRunner(env={"COLUMNS": "250"})
CALIB = ["--calib-samples", "4", "--seqlen", "32"]


TABLE = {
    "0.5": {"method": "wanda", "owl": False, "refine": "none", "ppl": 50.0, "time_vs_wanda": 1.0},
    "0.7": {"method": "sparsegpt", "owl": True, "refine": "dsnot", "ppl": 250.0, "time_vs_wanda": 1.5},
    "2:4": {"method": "sparsegpt", "owl": False, "refine": "none", "ppl": 98.0, "time_vs_wanda": 1.1},
}


@pytest.fixture
def table(monkeypatch):
    monkeypatch.setattr(auto, "choices", lambda: TABLE)


@pytest.mark.parametrize(
    ("sparsity", "pattern", "key"),
    [(0.5, None, "0.5"), (None, None, "0.5"), (0.6, None, "0.7"), (0.7, None, "0.7"), (0.8, None, "0.7"),
     (0.45, None, "0.5"), (0.35, None, None), (0.85, None, None), (None, "2:4", "2:4"), (None, "4:8", "2:4"),
     (None, "1:4", None)],
)  # fmt: skip
def test_lookup_uses_the_nearest_measured_target_at_or_above_within_0_1(table, sparsity, pattern, key):
    assert auto.table_key(sparsity, pattern) == key


def test_an_unmeasured_target_falls_back_to_wanda_and_says_so(table):
    choice = auto.choose(None, "1:4")
    assert (choice["method"], choice["owl"], choice["refine"]) == ("wanda", False, "none")
    assert "no benchmark row at 1:4" in choice["why"]


def test_resolve_keeps_explicit_settings(table):
    cfg, choice = auto.resolve(PruneConfig(model="m", sparsity=0.7))
    assert (cfg.method, cfg.owl, cfg.refine) == ("sparsegpt", True, "dsnot")
    assert choice["requested"] == "auto" and "sparsegpt + OWL + DSnoT" in choice["why"] and "70%" in choice["why"]
    cfg, _ = auto.resolve(PruneConfig(model="m", sparsity=0.7, owl=False))  # an explicit --no-owl stays off
    assert (cfg.method, cfg.owl, cfg.refine) == ("sparsegpt", False, "dsnot")
    explicit = PruneConfig(model="m", sparsity=0.7, method="wanda")
    assert auto.resolve(explicit) == (explicit, None)


def test_prune_defaults_to_auto_runs_the_choice_and_reports_it(table, tiny_model_dir, text_file, tmp_path, caplog):
    out, same = tmp_path / "auto", tmp_path / "explicit"
    with caplog.at_level("INFO"):
        result = runner.invoke(app, ["prune", str(tiny_model_dir), "--pattern", "2:4", "--calib", str(text_file),
                                     *CALIB, "-o", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sum("method auto -> sparsegpt" in r.getMessage() for r in caplog.records) == 1
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["summary"]["method"] == "sparsegpt"
    assert report["method_choice"]["requested"] == "auto" and report["method_choice"]["table_key"] == "2:4"
    result = runner.invoke(app, ["prune", str(tiny_model_dir), "--method", "sparsegpt", "--pattern", "2:4",
                                 "--calib", str(text_file), *CALIB, "-o", str(same)])  # fmt: skip
    assert result.exit_code == 0, result.output
    a, b = load_weights(out), load_weights(same)
    assert all(torch.equal(a[k], b[k]) for k in a)  # auto ran exactly the method it names
    assert "method_choice" not in json.loads((same / "sparsity_report.json").read_text())
