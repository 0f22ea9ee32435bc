"""`sparsetune seft`: flags, input validation, data handling and the LoRA* baseline on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_weights, make_pruned, random_text, tiny_args, write_alpaca, write_text
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.masks import NMPattern, nm_violations

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def decoder_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights = load_weights(model_dir)
    return {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}


def last_json(output: str) -> dict:
    line = [line for line in output.splitlines() if '{"' in line][-1]
    return json.loads(line[line.index('{"') :])


def test_help_comes_from_the_schema():
    result = runner.invoke(app, ["seft", "--help"], env={"COLUMNS": "200"})  # rich reads COLUMNS; 80 truncates names
    assert result.exit_code == 0
    flags = ["--delta-rank", "--delta-density", "--reselect-every", "--select-window", "--replace-fraction"]
    flags += ["--replace-schedule", "--base-dtype", "--no-merge", "--targets", "--ignore", "--optim", "--resume"]
    for flag in flags:
        assert flag in result.output, flag
    for gone in ("--drop-fraction", "--grow-batches", "--update-interval", "--drop-criterion", "--regrow-warmup"):
        assert gone not in result.output  # dst's flags left with it
    assert "LoRA" in result.output  # the budget's description


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "dense-ft"], "method"),
        (["--eval-every", "2"], "--eval-every needs --val-data"),
        (["--batch-size", "3", "--grad-accum", "2"], "not divisible"),
        (["--method", "dst"], "method"),
        (["--delta-rank", "8", "--delta-density", "0.01"], "not both"),
        (["--reselect-every", "2", "--select-window", "3"], "must fit between two reselections"),
        (["--base-dtype", "int8"], "base_dtype"),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path, extra, message):
    result = runner.invoke(app, ["seft", str(tmp_path), "-o", str(tmp_path / "out"), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_refuses_existing_output_dense_model_and_missing_data(tmp_path, tiny_model_dir):
    data = write_text(tmp_path / "t.txt")
    (tmp_path / "exists").mkdir()
    result = runner.invoke(app, tiny_args(tiny_model_dir, tmp_path / "exists", data))
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = runner.invoke(app, tiny_args(tiny_model_dir, tmp_path / "out", data, "--steps", "1"))
    assert result.exit_code == 2
    assert "seft repairs a pruned model" in result.output and "sparsetune prune" in result.output
    assert result.output.count("error:") == 1
    pruned = make_pruned(tmp_path)
    result = runner.invoke(app, tiny_args(pruned, tmp_path / "out", tmp_path / "missing.txt"))
    assert result.exit_code == 2 and "not found" in result.output
    assert not (tmp_path / "out").exists()


def test_a_budget_larger_than_a_module_is_refused(tmp_path):
    """At 70% sparsity q_proj (64 x 64) keeps 1229 of 4096 weights. A rank-16 budget is 16 * (in + out) summed over
    the 14 Linears = 32768 entries, split by size over their 73728 weights: q_proj's share is 32768 * 4096 / 73728 =
    1820.44; the 8 entries left after the floors go to the largest remainders (.89 of the six MLP Linears, then
    .44 of layer 0's q_proj and o_proj), so 1821."""
    pruned = make_pruned(tmp_path, sparsity=0.7)
    data = write_text(tmp_path / "t.txt")
    ckpt = tmp_path / "ck"
    args = tiny_args(pruned, tmp_path / "out", data, "--steps", "2", "--checkpoint-dir", str(ckpt))
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "--delta-rank 16 gives model.layers.0.self_attn.q_proj 1821 entries" in result.output
    assert "only 1229 non-zero weights of 4096" in result.output and "lower --delta-rank" in result.output
    assert not (tmp_path / "out").exists()
    assert runner.invoke(app, [*args, "--delta-rank", "8"]).exit_code == 0  # half the budget fits


def test_nf4_without_a_working_bitsandbytes_is_refused(tmp_path, monkeypatch):
    import sys

    pruned = make_pruned(tmp_path)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)
    args = tiny_args(pruned, tmp_path / "out", write_text(tmp_path / "t.txt"), "--steps", "2", "--base-dtype", "nf4")
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "--base-dtype nf4 needs a working bitsandbytes" in result.output and "--base-dtype bf16" in result.output
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_another_base_is_refused(tmp_path):
    """A --no-merge output loads through its recorded base; once that dir holds another model, eval refuses."""
    import shutil

    pruned = make_pruned(tmp_path)
    other = make_pruned(tmp_path, seed=1)
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "adapter"
    result = runner.invoke(app, tiny_args(pruned, out, data, "--steps", "2", "--delta-rank", "4", "--no-merge"))
    assert result.exit_code == 0, result.output
    assert not (out / "model.safetensors").exists() and (out / "seft_adapter.safetensors").is_file()
    evaluate = ["eval", str(out), "--ppl", str(data), "--seqlen", "32", "--limit-windows", "1"]
    assert runner.invoke(app, [*evaluate, "-o", str(tmp_path / "ok")]).exit_code == 0  # the base it names
    shutil.copytree(other, pruned, dirs_exist_ok=True)  # the base dir now holds a different pruned model
    result = runner.invoke(app, [*evaluate, "-o", str(tmp_path / "bad")])
    assert result.exit_code == 2 and result.output.count("error:") == 1
    assert "was trained on a different base" in result.output and "apply it to the pruned model" in result.output
    assert not (tmp_path / "bad").exists()


def test_instruction_examples_train_on_the_response_only(tiny_tokenizer):
    from sparsetune.data import alpaca_prompt
    from sparsetune.train.examples import IGNORE, collate, instruction_examples

    records = [{"instruction": "make a list", "input": "", "output": "one two three"}]
    ex = instruction_examples(tiny_tokenizer, records, seqlen=64)
    prompt, response = alpaca_prompt(records[0])
    n_prompt = len(tiny_tokenizer(prompt)["input_ids"])
    labels = ex.labels[0]
    assert (labels[:n_prompt] == IGNORE).all()
    want = tiny_tokenizer(response, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert labels[n_prompt:].tolist() == want
    batch = collate(ex, [0, 0], pad_id=3)
    assert batch["input_ids"].shape == (2, n_prompt + len(want))


def test_packed_windows_skip_leading_tokens(tiny_tokenizer):
    from sparsetune.train.examples import packed_windows

    records = [{"text": random_text(200, seed=1)}, {"text": random_text(200, seed=2)}]
    full = packed_windows(tiny_tokenizer, records, 16, 0, "x")
    skipped = packed_windows(tiny_tokenizer, records, 16, 32, "x")
    assert torch.equal(skipped.inputs[0], full.inputs[2])
    assert len(skipped) == len(full) - 2


def test_data_order_is_a_function_of_the_step():
    from sparsetune.train.examples import DataOrder

    a, b = DataOrder(10, 4, seed=3), DataOrder(10, 4, seed=3)
    seen = [a.batch(s) for s in range(5)]
    assert [b.batch(s) for s in reversed(range(5))][::-1] == seen
    first_epoch = sum(seen, [])[:10]
    assert sorted(first_epoch) == list(range(10))


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_lora_reprune_restores_the_sparsity(tmp_path, pattern):
    pruned = make_pruned(tmp_path, pattern)
    data = write_alpaca(tmp_path / "alpaca.json")
    out = tmp_path / "out"
    args = tiny_args(pruned, out, data, "--method", "lora-reprune", "--steps", "3", "--lr", "1e-2", "--seqlen", "96")
    args.append("--json")
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = last_json(result.output)
    before, after = decoder_weights(pruned), decoder_weights(out)
    for name, w in before.items():
        assert int((after[name] == 0).sum()) == int((w == 0).sum()), name
        if pattern:
            assert nm_violations(after[name], NMPattern(2, 4)) == 0
    changed = sum(int(((after[n] != 0) != (w != 0)).sum()) for n, w in before.items())
    assert changed > 0  # the re-prune picked a new mask on the merged weights
    assert summary["sparsity_after"] == pytest.approx(summary["sparsity_before"], abs=0)
    report = json.loads((out / "sparsity_report.json").read_text())
    history = report["finetune_history"][-1]
    assert history["method"] == "lora-reprune" and history["reprune"]["method"] == "wanda"
    # LoRA r 16 on q, k, v, o (64 -> 64, 32, 32, 64), gate, up (64 -> 128) and down (128 -> 64) in 2 layers: each
    # adapter holds A (16 x in) and B (out x 16); torch's AdamW keeps fp32 m and v per entry and a 4-byte step per
    # tensor, and every entry has an fp32 gradient.
    shapes = [(64, 64), (64, 32), (64, 32), (64, 64), (64, 128), (64, 128), (128, 64)]
    entries = 2 * sum(16 * n_in + n_out * 16 for n_in, n_out in shapes)
    assert entries == 32768
    assert history["memory"]["optimizer_state_bytes"] == 2 * 4 * entries + 4 * 2 * 2 * len(shapes)
    assert history["memory"]["grad_bytes"] == 4 * entries  # measured from the gradients after backward
    assert summary["trainable_params"] == entries and summary["grad_bytes"] == 4 * entries
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
