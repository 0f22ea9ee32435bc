"""`sparsetune eval` and `sparsetune report` through the real CLI on tiny models."""

from __future__ import annotations

import json

import pytest
from helpers import random_text
from typer.testing import CliRunner

from sparsetune.cli.app import app


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(random_text(300, seed=10 + i) for i in range(4)))
    return path


@pytest.fixture
def pruned_dir(tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "pruned"
    result = run("prune", tiny_model_dir, "-o", out, "--method", "magnitude", "--sparsity", "0.5", "--calib", text_file)
    assert result.exit_code == 0, result.output
    return out


def test_eval_compares_dense_and_pruned(tmp_path, tiny_model_dir, pruned_dir, eval_text, tiny_tokenizer):
    from sparsetune.evaluate.ppl import perplexity
    from sparsetune.loading import load_model

    out = tmp_path / "cmp"
    result = run(
        "eval", tiny_model_dir, pruned_dir, "--ppl", eval_text, "--seqlen", "64", "--ppl-batch-size", "2", "-o", out
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "eval.json").read_text())
    dense, pruned = report["models"]
    for entry, path in ((dense, tiny_model_dir), (pruned, pruned_dir)):
        model, tok = load_model(str(path), device="cpu")
        direct = perplexity(model, tok, str(eval_text), seqlen=64)
        assert entry["ppl"][str(eval_text)]["ppl"] == pytest.approx(direct["ppl"], rel=1e-6)
    assert dense["sparsity"] is None
    assert pruned["sparsity"]["method"] == "magnitude"
    assert pruned["sparsity"]["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert report["settings"]["seqlen"] == 64 and "torch" in report["versions"]
    delta = pruned["ppl"][str(eval_text)]["ppl"] - dense["ppl"][str(eval_text)]["ppl"]
    table = result.output
    assert "magnitude" in table and "dense" in table and f"({delta:+.2f})" in table
    md = (out / "eval.md").read_text()
    assert "| metric | tiny-llama | pruned |" in md and f"({delta:+.2f})" in md
    # A second run refuses to clobber the result.
    again = run("eval", tiny_model_dir, "--ppl", eval_text, "--seqlen", "64", "-o", out)
    assert again.exit_code == 2 and "already exists" in again.output


def test_bad_input_exits_2(tmp_path, tiny_model_dir, eval_text):
    too_long = run("eval", tiny_model_dir, "--ppl", eval_text, "--seqlen", "512")
    assert too_long.exit_code == 2
    assert "longer than the model allows (256 positions)" in too_long.output

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    missing_tok = run("eval", no_tok, "--ppl", eval_text)
    assert missing_tok.exit_code == 2 and "has no tokenizer" in missing_tok.output

    empty_mirror = tmp_path / "mirror"
    empty_mirror.mkdir()
    no_file = run("eval", tiny_model_dir, "--ppl", "c4", "--data-dir", empty_mirror)
    assert no_file.exit_code == 2
    assert f"{empty_mirror}/c4/c4_validation.jsonl" in no_file.output

    unknown = run("eval", tiny_model_dir, "--ppl", "none", "--tasks", "arc_eassy")
    assert unknown.exit_code == 2
    assert "unknown lm-eval task arc_eassy" in unknown.output and "arc_easy" in unknown.output


def test_report_writes_readable_charts(tmp_path, pruned_dir):
    import matplotlib.image

    out = tmp_path / "rep"
    result = run("report", pruned_dir, "-o", out)
    assert result.exit_code == 0, result.output
    sparsity = json.loads((pruned_dir / "sparsity_report.json").read_text())
    for name in ("block_sparsity.png", "module_sparsity.png"):
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 300 and image.shape[1] > 500
    md = (out / "report.md").read_text()
    assert "method: magnitude" in md
    q_numel = sum(m["numel"] for n, m in sparsity["modules"].items() if n.endswith("q_proj"))
    q_zeros = sum(m["zeros"] for n, m in sparsity["modules"].items() if n.endswith("q_proj"))
    assert f"| self_attn.q_proj | {q_zeros / q_numel:.4f} |" in md
    missing = run("report", tmp_path)
    assert missing.exit_code == 2 and "sparsity_report.json not found" in missing.output


def test_undecodable_ppl_files_are_one_line_errors(tmp_path, tiny_model_dir):
    binary = tmp_path / "weights.txt"
    binary.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:4096])
    latin = tmp_path / "latin.txt"
    latin.write_bytes("na\u00efve caf\u00e9\n".encode("latin-1"))
    for path, expected in ((binary, "weights.txt is a binary file"), (latin, "latin.txt is not UTF-8 text")):
        result = run("eval", tiny_model_dir, "--ppl", path, "-o", tmp_path / "out")
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], result.output
        assert not (tmp_path / "out").exists()
