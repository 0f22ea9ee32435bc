"""`sparsetune seft --method granet` end to end on tiny models: from a dense model (and from a pruned one) to the
exact target sparsity or N:M pattern, per matrix or global, magnitude or Wanda score, with and without distillation
from the dense model; resume bit-identical; bad settings refused in one line."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights, make_pruned, make_tiny_model, make_tokenizer, tiny_args, write_text
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern, nm_violations
from sparsetune.train.seft import FinetuneRun, run_seft
from sparsetune.train.seft_config import SeftConfig

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

GRANET = ["--method", "granet", "--steps", "12", "--granet-interval", "3", "--granet-end", "9", "--lr", "1e-3"]


def decoder_weights(model_dir) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_weights(model_dir).items() if ".layers." in k and k.endswith("proj.weight")}


def run_cli(args: list[str]) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output[-3000:]
    line = [line for line in result.output.splitlines() if '{"' in line][-1]  # stderr's progress may precede it
    return json.loads(line[line.index('{"') :])


def test_dense_to_the_exact_target_sparsity(tmp_path, tiny_model_dir):
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    summary = run_cli(tiny_args(tiny_model_dir, out, data, *GRANET, "--target-sparsity", "0.7"))
    weights = decoder_weights(out)
    assert len(weights) == 14
    for name, w in weights.items():
        assert int((w == 0).sum()) == int(w.numel() * 0.7), name  # every matrix exactly at 70% (floor, per matrix)
    report = json.loads((out / "sparsity_report.json").read_text())
    assert report["method"] == "granet" and report["pattern"] == "unstructured"
    assert report["source_model"] == str(tiny_model_dir)
    entry = report["finetune_history"][-1]
    assert entry["sparsity_before"] == 0.0 and entry["granet"]["final_sparsity"] == 0.7
    assert summary["sparsity_after"] == pytest.approx(0.7, abs=1e-3)
    rows = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
    updates = [r["topology"] for r in rows if "topology" in r]
    assert [u["step"] for u in updates] == [3, 6, 9]
    # start 0, end 9, interval 3: n = 3; s_k = 0.7 - 0.7 * (1 - k/3)^3 -> 0.4926, 0.6741, 0.7 (floors per matrix)
    assert [u["sparsity"] for u in updates] == pytest.approx([0.492593, 0.674074, 0.7], abs=3e-4)
    assert all(u["dropped"] == u["grown"] for u in updates)
    assert updates[0]["grown"] > 0
    # the regeneration fraction of the cosine over 12 steps: 0.005 + 0.495 * (1 + cos(pi * t / 12)) / 2
    assert [u["regrow_fraction"] for u in updates] == pytest.approx([0.427509, 0.2525, 0.077491], abs=1e-6)


def test_dense_to_two_of_four(tmp_path, tiny_model_dir):
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    run_cli(tiny_args(tiny_model_dir, out, data, *GRANET, "--pattern", "2:4"))
    for name, w in decoder_weights(out).items():
        assert nm_violations(w, NMPattern(2, 4)) == 0, name
        assert int((w != 0).sum()) == w.numel() // 2, name
    assert json.loads((out / "sparsity_report.json").read_text())["pattern"] == "2:4"


def test_global_wanda_from_a_pruned_input(tmp_path):
    pruned = make_pruned(tmp_path, sparsity=0.5)
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    extra = ["--target-sparsity", "0.6", "--granet-scope", "global", "--granet-score", "wanda"]
    summary = run_cli(tiny_args(pruned, out, data, *GRANET, *extra))
    weights = decoder_weights(out)
    total = sum(w.numel() for w in weights.values())
    assert sum(int((w != 0).sum()) for w in weights.values()) == total - int(total * 0.6)
    assert summary["sparsity_before"] == pytest.approx(0.5, abs=1e-3)
    assert summary["granet"]["initial_sparsity"] == pytest.approx(0.5, abs=1e-3)  # default: the input's


def test_distillation_from_the_dense_model(tmp_path, tiny_model_dir):
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    extra = ["--target-sparsity", "0.7", "--distill-loss", "squarehead", "--distill-from", str(tiny_model_dir)]
    summary = run_cli(tiny_args(tiny_model_dir, out, data, *GRANET, *extra))
    for name, w in decoder_weights(out).items():
        assert int((w == 0).sum()) == int(w.numel() * 0.7), name
    distill = summary["distillation"]
    teacher_params = sum(p.numel() for p in make_tiny_model("llama").parameters())
    # bf16 weights, plus the rotary embedding's small fp32 buffer
    assert 2 * teacher_params <= distill["teacher_weight_bytes"] <= 2 * teacher_params + 1024
    assert 0 < distill["teacher_step_share"] < 1
    assert distill["mean_feature_loss"] > 0 and distill["mean_kl_per_token"] > 0


def test_distillation_teacher_defaults_to_the_recorded_source(tmp_path):
    pruned = make_pruned(tmp_path, sparsity=0.5)  # its report's settings name dense-0 as the model it pruned
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    summary = run_cli(tiny_args(pruned, out, data, "--method", "masked-ft", "--steps", "3", "--distill-loss", "kl"))
    assert summary["distillation"]["teacher"] == str(tmp_path / "dense-0")
    assert summary["distillation"]["mean_feature_loss"] is None


def settings(model, data, out, **extra) -> dict:
    return {
        "model": str(model),
        "output": str(out),
        "data": str(data),
        "seqlen": 32,
        "batch_size": 4,
        "grad_accum": 2,
        "steps": 12,
        "lr": 1e-3,
        "method": "granet",
        "target_sparsity": 0.7,
        "granet_interval": 3,
        "granet_end": 9,
        "checkpoint_every": 4,
        "checkpoint_dir": str(out) + ".ckpt",
        **extra,
    }


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"granet_scope": "global", "granet_score": "wanda", "distill_loss": "kl", "distill_temperature": 2.0},
    ],
    ids=["magnitude", "global-wanda-distilled"],
)
def test_resume_is_bit_identical(tmp_path, tiny_model_dir, extra):
    """Stop during step 7 (the checkpoint of step 4, after the update of step 3, is on disk), resume, and match the
    uninterrupted run's weights and losses, through the updates of steps 6 and 9."""
    data = write_text(tmp_path / "t.txt")
    if extra.get("distill_loss"):
        extra = {**extra, "distill_from": str(tiny_model_dir)}
    run_seft(SeftConfig(**settings(tiny_model_dir, data, tmp_path / "ref", **extra)), show_progress=False)

    class Stop(Exception):
        pass

    class StopAt7(FinetuneRun):
        def train_step(self, step):
            if step == 6:
                raise Stop
            return super().train_step(step)

    cut = settings(tiny_model_dir, data, tmp_path / "cut", **extra)
    with pytest.raises(Stop):
        StopAt7(SeftConfig(**cut), show_progress=False).run()
    saved = torch.load(tmp_path / "cut.ckpt" / "checkpoint" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 4
    run_seft(SeftConfig(**{**cut, "resume": True}), show_progress=False)
    ref, got = decoder_weights(tmp_path / "ref"), decoder_weights(tmp_path / "cut")
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    ref_log = [json.loads(r) for r in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    got_log = [json.loads(r) for r in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got_log] == [r["loss"] for r in ref_log]
    assert [r.get("topology") for r in got_log] == [r.get("topology") for r in ref_log]


def test_a_teacher_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir):
    teacher = tmp_path / "teacher"
    make_tiny_model("llama", vocab_size=300).save_pretrained(teacher)
    make_tokenizer().save_pretrained(teacher)
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    extra = ["--target-sparsity", "0.7", "--distill-loss", "kl", "--distill-from", str(teacher)]
    result = runner.invoke(app, tiny_args(tiny_model_dir, out, data, *GRANET, *extra))
    assert result.exit_code == 2, result.output
    assert result.output.count("error:") == 1
    assert "vocabulary holds 300 tokens" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "granet"], "needs --target-sparsity or --pattern"),
        (["--method", "granet", "--target-sparsity", "0.7", "--pattern", "2:4"], "one of them"),
        (["--method", "masked-ft", "--target-sparsity", "0.7"], "applies to --method granet only"),
        (["--method", "granet", "--target-sparsity", "0.7", "--steps", "5", "--granet-end", "5"], "below --steps"),
        (["--method", "granet", "--pattern", "2:5:1"], "pattern"),
        (["--distill-from", "x"], "--distill-from needs --distill-loss"),
    ],
)
def test_bad_settings_fail_in_one_line(tmp_path, extra, message):
    result = runner.invoke(app, ["seft", str(tmp_path), "-o", str(tmp_path / "out"), *extra])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("error:") == 1
    assert not (tmp_path / "out").exists()


def test_below_the_input_sparsity_is_refused(tmp_path):
    pruned = make_pruned(tmp_path, sparsity=0.5)
    data = write_text(tmp_path / "t.txt")
    with pytest.raises(SparsetuneError, match="already 0.5000 sparse"):
        run_seft(SeftConfig(**settings(pruned, data, tmp_path / "out", target_sparsity=0.4)), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_other_methods_still_refuse_a_dense_input(tmp_path, tiny_model_dir):
    data = write_text(tmp_path / "t.txt")
    result = runner.invoke(app, tiny_args(tiny_model_dir, tmp_path / "out", data, "--method", "masked-ft"))
    assert result.exit_code == 2 and "no zero weights" in result.output


@pytest.mark.parametrize(
    "extra",
    [["--optim", "adamw8bit"], ["--dtype", "bfloat16"], ["--granet-start", "3", "--initial-sparsity", "0.3"]],
    ids=["adamw8bit", "bf16", "late-start"],
)
def test_variants_reach_the_exact_target(tmp_path, tiny_model_dir, extra):
    data = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    summary = run_cli(tiny_args(tiny_model_dir, out, data, *GRANET, "--target-sparsity", "0.6", *extra))
    for name, w in decoder_weights(out).items():
        assert int((w == 0).sum()) == int(w.numel() * 0.6), name
    if "--granet-start" in extra:  # updates at 3, 6, 9: s = 0.3, 0.6 - 0.3 / 8 = 0.5625, 0.6
        rows = [json.loads(r) for r in (out / "train_log.jsonl").read_text().splitlines()]
        sparsities = [r["topology"]["sparsity"] for r in rows if "topology" in r]
        assert sparsities == pytest.approx([0.3, 0.5625, 0.6], abs=3e-4)
        assert summary["granet"]["step0_update"] is None
