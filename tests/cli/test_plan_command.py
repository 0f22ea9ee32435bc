"""`sparsetune plan` from the command line: its table, --json, the PNG, one `error:` line for bad input, no torch.

Expected values: boqian333/sparse-dc-scaling, figures/optimal_sparsity.ipynb's `scaling_law`, run outside this
project (see tests/test_plan.py): for 1e9 dense-equivalent parameters, 1.3e10 unique tokens and 1.3e11 tokens,
the argmin of scaling_law(1e9 s, 1.3e10, 1.3e11, s) over s = k/512 is s = 0.814453125 at loss 2.691020741183382,
and scaling_law(5e8, 1.3e10, 1.3e11, 0.5) = 2.702708945042831; the notebook's density at FLOP budget
1.8721749956502766e22 with 1.3e10 unique tokens is S_vals[55] = 0.4890756302521008 (loss 2.561148383349374).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsetune.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner(env={"COLUMNS": "200"})


def _run(*args):
    return runner.invoke(app, ["plan", *map(str, args)])


def test_plan_json_loss_optimal_and_requested_density():
    result = _run("--params", "1e9", "--unique-tokens", "1.3e10", "--tokens", "1.3e11", "--density", "0.5", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["loss_optimal"]["density"] == pytest.approx(0.814453125, rel=1e-9)
    assert out["loss_optimal"]["loss"] == pytest.approx(2.691020741183382, rel=1e-6)
    assert out["requested"]["loss"] == pytest.approx(2.702708945042831, rel=1e-6)
    assert out["recommended_density"] == out["loss_optimal"]["density"]
    assert out["compute_optimal"] is None and out["flops"] is None
    assert [row["density"] for row in out["grid"]][:2] == [1.0, 0.875]
    assert "boqian333/sparse-dc-scaling" in out["coefficients"] and "When Data Is Scarce" in out["paper"]
    assert "--density 0.814453 " in out["smet_command"]


def test_plan_flops_reports_the_notebooks_budget_choice():
    flops = 1.8721749956502766e22
    result = _run("--params", "2e9", "--unique-tokens", "1.3e10", "--flops", flops, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["budget_choice"]["density"] == pytest.approx(0.4890756302521008, rel=1e-9)
    assert out["budget_choice"]["loss"] == pytest.approx(2.561148383349374, rel=1e-6)
    chosen = out["compute_optimal"]
    assert chosen["flops"] == pytest.approx(flops, rel=1e-9)
    assert out["recommended_density"] == chosen["density"]
    assert chosen["loss"] <= min(row["loss"] for row in out["grid"])  # the table's densities are on the search grid


def test_plan_table_plot_and_notes(tmp_path):
    png = tmp_path / "docs" / "plan.png"
    result = _run("--params", "1.2e8", "--unique-tokens", "1.3e9", "--flops", "5e18", "-o", png)
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "compute-optimal for this model: density 0.666" in text
    assert "recommended: sparsetune smet-pretrain --density 0.666016" in text
    assert "note: fitted on C4 with SET-style dynamic sparse pretraining" in text and "law: Wu, Xiao" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--params", "0", "--unique-tokens", "1e9", "--tokens", "1e10"], "--params must be positive"),
        (["--params", "1e8", "--unique-tokens", "0", "--tokens", "1e10"], "--unique-tokens must be positive"),
        (["--params", "1e8", "--unique-tokens", "1e9", "--flops", "-1e19"], "--flops must be positive"),
        (["--params", "1e8", "--unique-tokens", "2e10", "--tokens", "1e10"], "exceeds --tokens"),
        (["--params", "1e8", "--unique-tokens", "1e9", "--tokens", "1e10", "--density", "1.5"], "(0, 1]"),
        (["--params", "1e8", "--unique-tokens", "1e9", "--tokens", "1e10", "--density", "0"], "(0, 1]"),
        (["--params", "1e8", "--unique-tokens", "1e9", "--tokens", "1e10", "--flops", "1e19"], "not both"),
        (["--params", "1e8", "--unique-tokens", "1e9"], "missing --tokens"),
        (["--unique-tokens", "1e9", "--tokens", "1e10"], "missing --params"),
        (["--params", "many", "--unique-tokens", "1e9", "--tokens", "1e10"], "not a number"),
    ],
)
def test_plan_bad_input_is_one_error_line(args, message):
    result = _run(*args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output


def test_plan_imports_no_ml_stack():
    """A fresh interpreter runs `plan` (no plot) without importing torch & co."""
    code = """
import json, sys
from typer.testing import CliRunner
from sparsetune.cli.app import app
r = CliRunner().invoke(app, ["plan", "--params", "1e9", "--unique-tokens", "1.3e10", "--flops", "1e21", "--json"])
heavy = [m for m in ("torch", "transformers", "datasets", "numpy", "matplotlib") if m in sys.modules]
print(json.dumps({"code": r.exit_code, "heavy": heavy}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out == {"code": 0, "heavy": []}, done.stderr
