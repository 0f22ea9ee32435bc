"""`sparsetune smet-pretrain` on the tiny preset: exact density at every step, compact memory, topology updates,
static and dense variants, bad input, NaN stop, SIGKILL + resume, and two processes against one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tokenizer, random_text
from safetensors.torch import load_file
from test_seft_cli import ONE_THREAD_ENV
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.train.smet import SmetRecipe, run_smet, spike_ratio
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, Path]:
    tok_dir = tmp_path / "tok"
    make_tokenizer().save_pretrained(tok_dir)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(random_text(200, seed=s) for s in range(12)))
    return tok_dir, text


def settings(tok_dir: Path, text: Path, out: Path, **extra) -> dict:
    base = {
        "model_config": "tiny",
        "tokenizer": str(tok_dir),
        "data": str(text),
        "output": str(out),
        "seqlen": 32,
        "batch_size": 4,
        "steps": 12,
        "lr": 3e-3,
        "update_interval": 3,
        "regrow_warmup": 2,
        "drop_fraction": 0.3,
    }
    return {**base, **extra}


class Watched(SmetRecipe):
    """Checks after every step that each sparse layer keeps its exact active count and no stray non-zeros."""

    def sparsity(self) -> float:
        value = super().sparsity()
        self.counts = getattr(self, "counts", [])
        self.counts.append({n: (w.nnz, int((w.param.detach() != 0).sum())) for n, w in self.sparse.items()})
        return value


def test_smet_keeps_density_and_evolves_topology(corpus, tmp_path):
    tok_dir, text = corpus
    recipe = Watched(SmetConfig(**settings(tok_dir, text, tmp_path / "out")), show_progress=False)
    recipe.setup()
    start = {n: set(w.active.tolist()) for n, w in recipe.sparse.items()}
    start_counts = {n: w.nnz for n, w in recipe.sparse.items()}
    recipe.train()
    report = recipe.finish()
    for counts in recipe.counts:
        for name, (nnz, nonzero) in counts.items():
            assert nnz == start_counts[name] and nonzero <= nnz
    changed = sum(len(start[n] - set(w.active.tolist())) for n, w in recipe.sparse.items())
    assert changed > 0
    history = report["topology_history"]
    assert [h["step"] for h in history] == [3, 6, 9]
    assert all(h["dropped"] == h["grown"] > 0 for h in history)
    assert history[0]["drop_fraction"] > history[-1]["drop_fraction"]  # cosine decay

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    total = sum(m.weight.numel() for m in linears.values())
    nonzero = sum(int((m.weight != 0).sum()) for m in linears.values())
    assert nonzero <= sum(start_counts.values())
    assert sum(start_counts.values()) == pytest.approx(0.5 * total, rel=0.01)  # ERK keeps the global budget
    assert float((model.lm_head.weight == 0).float().mean()) < 0.01  # lm_head stays dense
    saved = json.loads((tmp_path / "out" / "sparsity_report.json").read_text())
    assert saved["method"] == "smet" and saved["global_sparsity"] >= 0.49
    assert set(saved["layers"]) == set(linears)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and all({"loss", "lr", "tokens_per_s", "sparsity", "memory"} <= set(r) for r in log)
    assert [r["topology"]["grown"] for r in log if "topology" in r] == [h["grown"] for h in history]
    step_mem = log[-1]["memory"]
    assert (
        step_mem["optimizer_state_bytes"] + step_mem["gradient_bytes"]
        <= 0.52 * (step_mem["dense_adamw_state_and_grad_bytes"])
    )
    assert step_mem["peak_rss_bytes"] > 0
    mem = saved["summary"]
    assert mem["state_and_grad_vs_dense"] <= 0.5 + 0.02
    densities = [layer["density"] for layer in saved["layers"].values()]
    assert max(densities) > min(densities)  # ERK: different densities per layer
    assert all(layer["lr_scale"] == pytest.approx(1 / layer["density"], rel=1e-3) for layer in saved["layers"].values())


def test_static_sparse_never_changes_and_dense_trains(corpus, tmp_path):
    tok_dir, text = corpus
    recipe = SmetRecipe(
        SmetConfig(**settings(tok_dir, text, tmp_path / "static", update_interval=0, init="uniform")),
        show_progress=False,
    )
    recipe.setup()
    before = {n: w.active.clone() for n, w in recipe.sparse.items()}
    recipe.train()
    report = recipe.finish()
    assert all(torch.equal(before[n], w.active) for n, w in recipe.sparse.items())
    assert report["topology_history"] == []
    assert all(layer["density"] == pytest.approx(0.5, abs=1e-3) for layer in report["layers"].values())

    dense = run_smet(SmetConfig(**settings(tok_dir, text, tmp_path / "dense", density=1.0)), show_progress=False)
    assert dense["summary"]["method"] == "dense" and dense["global_sparsity"] == 0.0
    assert dense["summary"]["final_loss"] < dense["summary"]["first_loss"]


def test_cli_runs_and_refuses_bad_input(corpus, tmp_path):
    tok_dir, text = corpus
    args = ["smet-pretrain", "--model-config", "tiny", "--tokenizer", str(tok_dir), "--data", str(text),
            "--seqlen", "32", "--batch-size", "4", "--steps", "4", "--update-interval", "2", "-o",
            str(tmp_path / "out"), "--json"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 4 and summary["topology_updates"] == 1

    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output

    bad = runner.invoke(app, [*args[:2], "huge", *args[3:-2], str(tmp_path / "x")])
    assert bad.exit_code == 2 and "preset" in bad.output and not (tmp_path / "x").exists()

    from sparsetune.train.smet import PRESET_SHAPES

    config = {"model_type": "llama", "max_position_embeddings": 16, "num_key_value_heads": 4, **PRESET_SHAPES["tiny"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    long = runner.invoke(app, [*args, "--model-config", str(tmp_path / "config.json"), "-o", str(tmp_path / "y")])
    assert long.exit_code == 2 and "max_position_embeddings 16" in long.output

    few = runner.invoke(app, [*args[:-3], "--batch-size", "4096", "-o", str(tmp_path / "z"), "--json"])
    assert few.exit_code == 2 and "fewer than one batch" in few.output
    assert len(result.output.strip().splitlines()) >= 1


def test_nan_loss_stops_with_a_clear_error(corpus, tmp_path):
    tok_dir, text = corpus

    class Diverging(SmetRecipe):
        def nll(self, batch):
            loss = super().nll(batch)
            return loss * float("nan") if self.state.step == 5 else loss

    cfg = SmetConfig(**settings(tok_dir, text, tmp_path / "out", checkpoint_every=2))
    recipe = Diverging(cfg, show_progress=False)
    recipe.setup()
    with pytest.raises(SparsetuneError, match=r"loss became nan at step 6.*step 4\) is intact"):
        recipe.train()
    assert not (tmp_path / "out").exists()
    saved = torch.load(tmp_path / "out.ckpt" / "checkpoint" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 4


def test_spike_ratio_reads_the_windows_around_updates():
    losses = [2.0] * 10 + [3.0] * 10 + [2.0] * 5
    assert spike_ratio(losses, [10]) == pytest.approx(1.5)
    assert spike_ratio(losses, [20]) is None  # not enough steps after


def cli_args(s: dict) -> list[str]:
    args = [sys.executable, "-m", "sparsetune", "smet-pretrain", "--json"]
    for key, value in s.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path):
    tok_dir, text = corpus
    common = {"steps": 40, "grad_accum": 2, "checkpoint_every": 5, "growth": "gradient"}
    reference = settings(tok_dir, text, tmp_path / "ref", checkpoint_dir=str(tmp_path / "ref.ckpt"), **common)
    run_smet(SmetConfig(**reference), show_progress=False)

    killed = settings(tok_dir, text, tmp_path / "out", checkpoint_dir=str(tmp_path / "out.ckpt"), **common)
    env = {**os.environ, **ONE_THREAD_ENV}
    proc = subprocess.Popen(cli_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "out.ckpt" / "checkpoint" / "state.pt"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "out").exists(), "the run finished before the kill"
    step = torch.load(state, weights_only=True)["state"]["step"]
    assert 0 < step < 40

    done = subprocess.run([*cli_args(killed), "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_file(str(tmp_path / "ref" / "model.safetensors"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert ref.keys() == out.keys()
    for name in ref:
        assert torch.equal(ref[name], out[name]), name
    ref_report = json.loads((tmp_path / "ref" / "sparsity_report.json").read_text())
    out_report = json.loads((tmp_path / "out" / "sparsity_report.json").read_text())
    assert ref_report["topology_history"] == out_report["topology_history"]


@pytest.mark.dist
def test_two_processes_match_one(corpus, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this python")
    tok_dir, text = corpus
    common = cli_args(settings(tok_dir, text, tmp_path / "unused", steps=8, growth="gradient"))[3:]
    common = common[: common.index("--output")] + common[common.index("--output") + 2 :]
    env = {**os.environ, **ONE_THREAD_ENV, "ACCELERATE_USE_CPU": "1"}
    one = subprocess.run(
        [sys.executable, "-m", "sparsetune", *common, "-o", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "sparsetune", *common, "-o", str(tmp_path / "two")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model.safetensors"))
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), (
            f"{name}: max diff {(a[name] - b[name]).abs().max()}"
        )
