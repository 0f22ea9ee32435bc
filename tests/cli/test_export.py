"""`sparsetune export` from the command line, and `prune` / `eval` reading exported dirs directly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_pruned_dir
from typer.testing import CliRunner

import sparsetune
from sparsetune.cli.app import app
from sparsetune.export.codecs import nm_group_violations

runner = CliRunner(env={"COLUMNS": "250"})


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_export_cli_then_prune_and_eval_read_the_export(tmp_path, tiny_tokenizer, text_file):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer, "2:4", "bfloat16")
    out = tmp_path / "out"
    result = _run("export", src, "--format", "sparse-24-bitmask", "-o", out, "--max-shard-size", "50KB", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["format"] == "sparse-24-bitmask" and report["modules_compressed"] == 14 and report["shards"] > 1

    pruned = tmp_path / "pruned"  # prune reads the exported dir: 2:4 -> 60% magnitude on top
    result = _run("prune", out, "--method", "magnitude", "--sparsity", "0.6", "--dtype", "bfloat16", "-o", pruned)
    assert result.exit_code == 0, result.output
    assert json.loads((pruned / "sparsity_report.json").read_text())["global_sparsity"] == pytest.approx(0.6, abs=0.01)

    result = _run("eval", src, out, "--ppl", text_file, "--seqlen", "32", "--limit-windows", "2", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout.strip().splitlines()[-1])["models"]
    assert rows[0]["ppl"][str(text_file)]["ppl"] == rows[1]["ppl"][str(text_file)]["ppl"]


def test_export_cli_recipe_and_summary(tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"export:\n  model: {src}\n  format: semi-structured-2:4\n  force_24: true\n")
    out = tmp_path / "out"
    result = _run("export", "--recipe", recipe, "-o", out)
    assert result.exit_code == 0, result.output
    assert "as semi-structured-2:4" in result.stdout and "14 Linears compressed" in result.stdout
    model = sparsetune.load(str(out), dtype="float32")
    up = model.model.layers[0].mlp.up_proj.weight
    assert nm_group_violations(up) == 0 and 0.4 * up.numel() < torch.count_nonzero(up) <= up.numel() // 2


@pytest.mark.parametrize(
    "args,match",
    [
        (["--format", "zip"], "format"),
        (["--format", "sparse-24-bitmask"], "needs exact 2:4 weights"),
        (["--max-shard-size", "lots"], "is not a size"),
        (["--ignore", "("], "not a valid regex"),
        (["--max-density", "0"], "max_density"),
    ],
)
def test_bad_input_exits_2_with_one_line(args, match, tmp_path, tiny_tokenizer):
    src = make_pruned_dir(tmp_path / "src", tiny_tokenizer)
    result = _run("export", src, "-o", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and match in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_missing_output_and_help():
    result = _run("export", "somewhere")
    assert result.exit_code == 2 and "missing --output" in result.stderr
    result = _run("export", "--help")
    for flag in ("--format", "--ignore", "--max-density", "--force-24", "--max-shard-size", "--dtype", "--overwrite"):
        assert flag in result.stdout
    assert "sparse-24-bitmask" in result.stdout and "(default: 0.9)" in result.stdout
