"""`sparsetune sweep` on a tiny model: every point equals a separate prune + eval, and --resume skips work."""

from __future__ import annotations

import json

import pytest
from helpers import random_text, run_cli


@pytest.fixture
def eval_text(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("\n\n".join(random_text(300, seed=20 + i) for i in range(3)))
    return path


def sweep_args(model_dir, out, eval_text, calib_text, *extra):
    return (
        "sweep", model_dir, "-o", out, "--methods", "magnitude,wanda", "--sparsities", "0.5,0.7",
        "--patterns", "2:4", "--ppl", eval_text, "--seqlen", "64", "--calib", calib_text,
        "--calib-samples", "4", "--calib-seqlen", "32", *extra,
    )  # fmt: skip


def test_sweep_points_equal_separate_prune_runs(tmp_path, tiny_model_dir, eval_text, text_file):
    from sparsetune.data import calibration_set
    from sparsetune.evaluate.ppl import perplexity
    from sparsetune.loading import load_model
    from sparsetune.prune.api import prune_model
    from sparsetune.prune.config import PruneConfig

    out = tmp_path / "sweep"
    result = run_cli(*sweep_args(tiny_model_dir, out, eval_text, text_file))
    assert result.exit_code == 0, result.output
    report = json.loads((out / "sweep.json").read_text())
    keys = [p["key"] for p in report["points"]]
    assert keys == ["dense", "magnitude-0.5", "magnitude-0.7", "magnitude-2of4", "wanda-0.5", "wanda-0.7", "wanda-2of4"]
    assert (out / "sweep.png").stat().st_size > 10_000 and "| wanda | 2:4 |" in (out / "sweep.md").read_text()
    assert not (tmp_path / "sweep.partial").exists()

    # Each point equals a fresh load + prune + eval: restoring the dense weights between points is exact,
    # and the one shared calibration set is the one a standalone prune draws.
    by_key = {p["key"]: p for p in report["points"]}
    for key, method, sparsity, pattern in (("dense", None, None, None), ("wanda-0.7", "wanda", 0.7, None),
                                           ("magnitude-2of4", "magnitude", None, "2:4")):  # fmt: skip
        model, tok = load_model(str(tiny_model_dir), device="cpu")
        if method:
            cfg = PruneConfig(model=str(tiny_model_dir), method=method, sparsity=sparsity, pattern=pattern,
                              calib=str(text_file), calib_samples=4, seqlen=32)  # fmt: skip
            calib = calibration_set(tok, str(text_file), 4, 32)
            prune_model(model, tok, cfg, calib, show_progress=False)
        direct = perplexity(model, tok, str(eval_text), seqlen=64)["ppl"]
        assert by_key[key]["ppl"][str(eval_text)]["ppl"] == pytest.approx(direct, rel=1e-6)
    assert by_key["wanda-0.7"]["global_sparsity"] == pytest.approx(0.7, abs=0.02)
    ppls = [p["ppl"][str(eval_text)]["ppl"] for p in report["points"]]
    assert len(set(ppls)) == len(ppls)  # every point really ran on differently pruned weights


def test_sweep_resume_skips_finished_points(tmp_path, tiny_model_dir, eval_text, text_file, monkeypatch):
    import sparsetune.prune.api as api

    out = tmp_path / "sweep"
    real_prune = api.prune_and_report
    calls: list[str] = []

    def failing_prune(model, tokenizer, cfg, *args, **kwargs):
        calls.append(f"{cfg.method}-{cfg.pattern or cfg.sparsity}")
        if len(calls) == 3:
            raise RuntimeError("killed")  # a crash in the middle of the sweep
        return real_prune(model, tokenizer, cfg, *args, **kwargs)

    monkeypatch.setattr(api, "prune_and_report", failing_prune)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(*sweep_args(tiny_model_dir, out, eval_text, text_file))
    partial = tmp_path / "sweep.partial"
    assert not out.exists() and sorted(p.name for p in (partial / "points").iterdir()) == [
        "dense.json", "magnitude-0.5.json", "magnitude-0.7.json",
    ]  # fmt: skip
    refused = run_cli(*sweep_args(tiny_model_dir, out, eval_text, text_file))
    assert refused.exit_code == 2 and "--resume" in refused.output

    calls.clear()
    monkeypatch.setattr(api, "prune_and_report", real_prune)
    monkeypatch.setattr(api, "prune_and_report", lambda *a, **k: calls.append("x") or real_prune(*a, **k))
    resumed = run_cli(*sweep_args(tiny_model_dir, out, eval_text, text_file, "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert len(calls) == 4  # magnitude-2:4 and the three wanda points; nothing finished is redone
    assert len(json.loads((out / "sweep.json").read_text())["points"]) == 7

    other = run_cli(*sweep_args(tiny_model_dir, tmp_path / "s2", eval_text, text_file, "--resume"))
    assert other.exit_code == 2 and "no unfinished sweep" in other.output
