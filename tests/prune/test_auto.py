"""`--method auto`: the table built from benchmark rows, the lookup rule, and the prune run that reports its choice."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_weights
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.prune import auto
from sparsetune.prune.config import PruneConfig

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "250"})
CALIB = ["--calib-samples", "4", "--seqlen", "32"]


def row(method: str, target: str, variant: str, ppl: float, prune_s: float) -> dict:
    return {"suite": "table", "quick": False, "run": f"{method}-{target}", "variant": variant, "ppl": ppl,
            "prune_s": prune_s}  # fmt: skip


def test_build_picks_the_lowest_ppl_within_3x_wanda_time(tmp_path):
    rows = [
        row("wanda", "0.7", "plain", 1000.0, 10.0),
        row("sparsegpt", "0.7", "plain", 270.0, 12.0),
        row("sparsegpt", "0.7", "owl", 260.0, 30.0),  # exactly 3x: allowed
        row("alps", "0.7", "plain", 160.0, 30.1),  # best ppl but 3.01x: too slow
        row("wanda", "0.5", "dsnot", 50.0, 1.0),  # no plain wanda row at 0.5: the target is left out
        {**row("wanda", "0.6", "plain", 80.0, 5.0), "quick": True},  # quick rows never count
    ]
    results = tmp_path / "prune.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = auto.build_choices(auto.table_rows(results))
    assert list(choices) == ["0.7"]
    c = choices["0.7"]
    assert (c["method"], c["owl"], c["refine"], c["ppl"], c["time_vs_wanda"]) == ("sparsegpt", True, "none", 260.0, 3.0)
    assert c["rows_compared"] == 3


def test_since_keeps_one_sitting_and_the_newest_row_wins(tmp_path):
    rows = [
        {**row("wanda", "0.7", "plain", 1025.6, 56.4), "date": "2026-12-01 22:21"},  # another machine
        {**row("alps", "0.7", "plain", 160.9, 175.4), "date": "2026-12-01 22:32"},
        {**row("wanda", "0.7", "plain", 1034.1, 27.6), "date": "2026-12-02 10:30"},
        {**row("wanda", "0.7", "plain", 1034.1, 27.0), "date": "2026-12-02 11:30"},  # re-measured: this one counts
        {**row("sparsegpt", "0.7", "plain", 270.0, 28.0), "date": "2026-12-02 10:40"},
    ]
    results = tmp_path / "prune.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = auto.table_rows(results, since="2026-12-02")
    assert sorted(kept) == [("sparsegpt", "0.7", "plain"), ("wanda", "0.7", "plain")]
    assert kept["wanda", "0.7", "plain"]["prune_s"] == 27.0
    assert len(auto.table_rows(results)) == 3  # without since: every sitting, newest per row
    c = auto.build_choices(kept)["0.7"]
    assert (c["method"], c["time_vs_wanda"], c["rows_compared"]) == ("sparsegpt", round(28.0 / 27.0, 3), 2)


def test_the_shipped_choices_are_what_the_committed_bench_rows_give():
    shipped = json.loads(auto.CHOICES_FILE.read_text())
    rows = auto.table_rows(ROOT / "bench" / "results" / "prune.jsonl", shipped.get("since", ""))
    assert shipped["choices"] == json.loads(json.dumps(auto.build_choices(rows)))


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
