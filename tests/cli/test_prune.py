"""`sparsetune prune` end to end on a tiny model, and every bad-input case (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from helpers import load_weights
from typer.testing import CliRunner

from sparsetune.cli.app import app

runner = CliRunner(env={"COLUMNS": "250"})
CALIB = ["--calib-samples", "4", "--seqlen", "32"]


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _weights(path):
    return load_weights(path)


def test_prune_cli_end_to_end_and_recipe_reproduces(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    result = _run(
        "prune",
        tiny_model_dir,
        "--method",
        "sparsegpt",
        "--pattern",
        "2:4",
        "--calib",
        text_file,
        *CALIB,
        "-o",
        out,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["pattern"] == "2:4" and summary["global_sparsity"] == pytest.approx(0.5)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert float((model.model.layers[1].mlp.down_proj.weight == 0).float().mean()) == pytest.approx(0.5)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["calibration"]["token_hash"] and report["versions"]["torch"]
    assert set(report["timings"]) >= {"load_s", "prune_s", "save_s", "calibration_data_s"}
    assert list(report)[-1] == "schema_version" and report["schema_version"] == 1
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["method"] == "sparsegpt" and recipe["pattern"] == "2:4"
    assert recipe["calib_seqlen"] == 32 and "seqlen" not in recipe  # given as the old --seqlen: written new
    out2 = tmp_path / "out2"
    result = _run("prune", "--recipe", out / "recipe.yaml", "-o", out2)
    assert result.exit_code == 0, result.output
    a, b = _weights(out), _weights(out2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the input model is untouched
    assert float((_weights(tiny_model_dir)["model.layers.1.mlp.down_proj.weight"] == 0).float().mean()) == 0.0


def test_prune_cli_defaults_and_overwrite(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    assert _run("prune", tiny_model_dir, "--calib", text_file, *CALIB, "-o", out).exit_code == 0
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["method"] == "wanda" and report["target_sparsity"] == 0.5 and report["sequential"] is True
    assert report["down_stats"] == "dense" and report["settings"]["down_stats"] == "auto"
    again = _run("prune", tiny_model_dir, "--calib", text_file, *CALIB, "--sparsity", "0.7", "-o", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    forced = _run("prune", tiny_model_dir, "--calib", text_file, *CALIB, "--sparsity", "0.7", "-o", out, "--overwrite")
    assert forced.exit_code == 0, forced.output
    assert json.loads((out / "sparsity_report.json").read_text())["target_sparsity"] == 0.7


def test_help_lists_every_flag_with_defaults():
    result = _run("prune", "--help")
    assert result.exit_code == 0
    for flag in (
        "--method",
        "--sparsity",
        "--pattern",
        "--calib",
        "--calib-samples",
        "--calib-seqlen",
        "--seed",
        "--calib-sampling",
        "--no-sequential",
        "--targets",
        "--ignore",
        "--untie-embeddings",
        "--recipe",
        "--overwrite",
        "--json",
        "--dtype",
        "--device",
        "--trust-remote-code",
        "--data-dir",
    ):
        assert flag in result.output, flag
    assert "default: auto" in result.output and "default: 128" in result.output
    assert "--seqlen" not in result.output  # the old name of --calib-seqlen: accepted, not listed


def _corrupt_model(tiny_model_dir):
    (tiny_model_dir / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    return tiny_model_dir


BAD_CASES = {
    "missing model": (lambda d, f: ["./no/such/model", "--calib", f], "not found"),
    "corrupt weights": (lambda d, f: [_corrupt_model(d), "--calib", f], "could not load model"),
    "sparsity 1.0": (lambda d, f: [d, "--sparsity", "1.0", "--calib", f], "outside [0, 1)"),
    "negative sparsity": (lambda d, f: [d, "--sparsity", "-0.1", "--calib", f], "outside [0, 1)"),
    "pattern N>=M": (lambda d, f: [d, "--pattern", "4:2", "--calib", f], "0 < N < M"),
    "pattern garbage": (lambda d, f: [d, "--pattern", "half", "--calib", f], "not N:M"),
    "indivisible in_features": (lambda d, f: [d, "--pattern", "1:3", "--calib", f], "not divisible by M=3"),
    "missing calibration": (lambda d, f: [d, "--calib", "/no/such.jsonl"], "not found"),
    "empty calibration": (lambda d, f: [d, "--calib", _empty(f)], "is empty"),
    "too-short calibration": (
        lambda d, f: [d, "--calib", f, "--calib-samples", "500", "--calib-sampling", "consecutive"],
        "are needed",
    ),
    "unknown recipe key": (lambda d, f: [d, "--recipe", _recipe(f, "sparsty: 0.5\n")], "unknown key 'sparsty'"),
    "targets match nothing": (lambda d, f: [d, "--calib", f, "--targets", "nothing_here"], "matched no Linear"),
    "binary calibration": (lambda d, f: [d, "--calib", _bad_file(f, "bin.txt")], "bin.txt is a binary file"),
    "latin-1 calibration": (lambda d, f: [d, "--calib", _bad_file(f, "l1.txt")], "l1.txt is not UTF-8 text (byte 0xe9"),
    "utf-16 calibration": (lambda d, f: [d, "--calib", _bad_file(f, "u16.jsonl")], "u16.jsonl is UTF-16 text"),
    "malformed jsonl": (
        lambda d, f: [d, "--calib", _bad_file(f, "bad.jsonl")],
        "bad.jsonl line 3 is not valid JSON (Expecting ',' delimiter, column 14)",
    ),
    "malformed json": (lambda d, f: [d, "--calib", _bad_file(f, "bad.json")], "bad.json is not valid JSON"),
    "binary jsonl": (lambda d, f: [d, "--calib", _bad_file(f, "bin.jsonl")], "bin.jsonl is a binary file"),
    "corrupt parquet": (lambda d, f: [d, "--calib", _bad_file(f, "bad.parquet")], "not a readable parquet file"),
}

BAD_FILES = {
    "bin.txt": b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4,
    "l1.txt": "caf\u00e9 au lait\n".encode("latin-1"),
    "u16.jsonl": '{"text": "hello"}\n'.encode("utf-16"),
    "bad.jsonl": b'{"text": "one"}\n{"text": "two"}\n{"text": "x" "y"}\n{"text": "four"}\n',
    "bad.json": b'[{"text": "one"},\n {"text": ',
    "bin.jsonl": bytes(range(256)),
    "bad.parquet": b"PAR1" + bytes(100) + b"PAR1",
}


def _bad_file(text_file, name):
    path = text_file.parent / name
    path.write_bytes(BAD_FILES[name])
    return path


def _empty(text_file):
    path = text_file.parent / "empty.jsonl"
    path.write_text("")
    return path


def _recipe(text_file, body):
    path = text_file.parent / "recipe.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, tiny_model_dir, text_file, tmp_path):
    make_args, expected = BAD_CASES[case]
    out = tmp_path / "out"
    result = _run("prune", *make_args(tiny_model_dir, text_file), *CALIB[:0], "-o", out)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp dir left behind


def test_existing_output_dir_is_refused_before_any_work(tiny_model_dir, text_file, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("prune", tiny_model_dir, "--calib", text_file, "-o", out)
    assert result.exit_code == 2 and "already exists" in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_the_input_is_refused(tiny_model_dir, text_file):
    result = _run("prune", tiny_model_dir, "--calib", text_file, "-o", tiny_model_dir / "pruned")
    assert result.exit_code == 2 and "overlaps the input" in result.output


def test_magnitude_needs_no_tokenizer_and_warns_once(tmp_path, caplog):
    from helpers import make_tiny_model

    bare = tmp_path / "bare"
    make_tiny_model("llama").save_pretrained(bare)  # weights and config only
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        result = _run("prune", bare, "--method", "magnitude", "--sparsity", "0.5", "-o", out)
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "holds no tokenizer" in warnings[0] and "without one" in warnings[0]
    assert not [p for p in out.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab"))]
    before, after = _weights(bare), _weights(out)
    for name, w in before.items():
        if ".layers." in name and name.endswith("proj.weight"):  # one threshold per matrix: exactly half pruned
            assert int((after[name] == 0).sum()) == w.numel() // 2, name
            kept = after[name] != 0
            assert torch.equal(after[name][kept], w[kept])
            assert float(w[~kept].abs().max()) <= float(w[kept].abs().min())

    wanda = _run("prune", bare, "--method", "wanda", "--calib", "c4", "-o", tmp_path / "w")
    assert wanda.exit_code == 2
    lines = [line for line in wanda.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "holds no tokenizer" in lines[0] and "tokenizer.save_pretrained" in lines[0]
    assert "one of: ;" not in wanda.output and not (tmp_path / "w").exists()


def test_unreachable_sparsity_says_what_was_reached(tiny_model_dir, text_file, tmp_path, caplog):
    # The tiny model's Linears: q, o, gate, up (64 inputs; 64x64, 64x64, 128x64, 128x64), k, v (32x64) and
    # down (64x128), in 2 blocks. Wanda prunes int(in * 0.999) per row: 63 of 64, 127 of 128.
    numel = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2 + 64 * 128)
    wanda_zeros = 2 * ((64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 2) // 64 * 63 + 64 * 127)
    with caplog.at_level(logging.WARNING):
        result = _run("prune", tiny_model_dir, "--sparsity", "0.999", "--calib", text_file, *CALIB, "-o",
                      tmp_path / "w", "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["weights_targeted"] == numel and summary["weights_pruned"] == wanda_zeros
    reached = f"{wanda_zeros / numel:.4f}"
    assert reached == "0.9861"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and summary["warnings"] == warnings
    assert f"reached sparsity {reached}, not the requested 0.999" in warnings[0]
    assert "63 of 64, 127 of 128" in warnings[0]
    report = json.loads((tmp_path / "w" / "sparsity_report.json").read_text())
    assert report["target_sparsity"] == 0.999 and report["global_sparsity"] == wanda_zeros / numel
    assert report["warnings"] == warnings

    caplog.clear()  # magnitude counts per matrix: int(numel * 0.999) zeros in each, within one weight per module
    with caplog.at_level(logging.WARNING):
        result = _run("prune", tiny_model_dir, "--method", "magnitude", "--sparsity", "0.999", "-o", tmp_path / "m")
    assert result.exit_code == 0, result.output
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    magnitude_zeros = 0
    for name, w in _weights(tmp_path / "m").items():
        if ".layers." in name and name.endswith("proj.weight"):
            assert int((w == 0).sum()) == w.numel() * 999 // 1000, name
            magnitude_zeros += w.numel() * 999 // 1000

    caplog.clear()  # pruning that model again to 0.5 keeps its zeros: over the request, and said so
    with caplog.at_level(logging.WARNING):
        result = _run("prune", tmp_path / "m", "--method", "magnitude", "--sparsity", "0.5", "-o", tmp_path / "m2")
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    reached = f"{magnitude_zeros / numel:.4f}"
    assert reached == "0.9988" and len(warnings) == 1
    assert f"reached sparsity {reached}, not the requested 0.5" in warnings[0]
    assert f"zero before pruning (sparsity {reached})" in warnings[0]


def test_a_bad_calibration_file_fails_before_the_model_loads(tiny_model_dir, text_file, tmp_path):
    _corrupt_model(tiny_model_dir)  # loading it would be an error of its own
    result = _run("prune", tiny_model_dir, "--calib", _bad_file(text_file, "bad.jsonl"), "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "bad.jsonl line 3" in result.output and "could not load model" not in result.output
