"""Resume after SIGKILL reproduces an uninterrupted run bit for bit; a foreign checkpoint is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import (
    ONE_THREAD_ENV,
    cli_flags,
    kill_after_logged_step,
    load_weights,
    make_pruned,
    seft_settings,
    write_text,
)
from safetensors.torch import load_file

from sparsetune.errors import SparsetuneError
from sparsetune.train.seft import FinetuneRun, run_seft
from sparsetune.train.seft_config import SeftConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def settings(pruned, data, out, ckpt) -> dict:
    return seft_settings(
        pruned,
        data,
        out,
        grad_accum=2,
        steps=60,
        delta_rank=4,
        reselect_every=4,
        select_window=3,
        reactivate=True,
        checkpoint_every=5,
        checkpoint_dir=str(ckpt),
    )


def cli_args(s: dict) -> list[str]:
    flags = cli_flags({k: v for k, v in s.items() if k != "model"})
    return [sys.executable, "-m", "sparsetune", "seft", s["model"], "--json", *flags]


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    pruned = make_pruned(tmp_path, "2:4")
    data = write_text(tmp_path / "t.txt")
    reference = settings(pruned, data, tmp_path / "ref", tmp_path / "ref.ckpt")
    run_seft(SeftConfig(**reference), show_progress=False)

    killed = settings(pruned, data, tmp_path / "out", tmp_path / "out.ckpt")
    env = {**os.environ, **ONE_THREAD_ENV}
    proc = subprocess.Popen(cli_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "out.ckpt" / "checkpoint" / "state.pt"
    # The checkpoint of step 5 is written during step 6, so once step 7 is logged it is on disk and the kill lands
    # between checkpoints: the steps after it are lost and the resume must redo them. Most checkpoints (10, 15, ...)
    # are taken with a selection window open (windows are steps 2-4, 6-8, 10-12, ...), and written after the next
    # step's backward has already added to it: the state saved is the one captured at the step boundary.
    kill_after_logged_step(proc, tmp_path / "out.ckpt" / "train_log.jsonl", 7)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "out").exists(), "the run finished before the kill"
    step = torch.load(state, weights_only=True)["state"]["step"]
    assert 0 < step < 60 and step % 5 == 0

    done = subprocess.run([*cli_args(killed), "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_weights(tmp_path / "ref")
    out = load_weights(tmp_path / "out")
    assert ref.keys() == out.keys()
    for name in ref:
        assert torch.equal(ref[name], out[name]), name
    ref_log = (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()
    out_log = (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()
    assert len(out_log) == len(ref_log) == 60
    assert [json.loads(r)["loss"] for r in out_log] == [json.loads(r)["loss"] for r in ref_log]
    adapter_ref = load_file(str(tmp_path / "ref" / "seft_adapter.safetensors"))
    adapter_out = load_file(str(tmp_path / "out" / "seft_adapter.safetensors"))
    assert all(torch.equal(adapter_ref[k], adapter_out[k]) for k in adapter_ref)


@pytest.mark.parametrize("reactivate", [True, False])
def test_a_checkpoint_inside_a_window_resumes_bit_identically(tmp_path, reactivate):
    """In process: stop after step 11 (checkpoint of step 10 written during step 11, while the window of steps
    10-12 holds step 11's gradients too), resume, and match the uninterrupted run's entries, deltas and log.
    Without reactivation the window keeps no row/column sums and its candidates come from the input's non-zeros."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    reference = {
        **settings(pruned, data, tmp_path / "ref", tmp_path / "ref.ckpt"),
        "steps": 14,
        "reactivate": reactivate,
    }
    run_seft(SeftConfig(**reference), show_progress=False)
    cut = {**reference, "output": str(tmp_path / "cut"), "checkpoint_dir": str(tmp_path / "cut.ckpt"), "steps": 14}

    class Stop(Exception):
        pass

    class StopAfter11(FinetuneRun):
        def train_step(self, step):
            if step == 11:
                raise Stop
            return super().train_step(step)

    with pytest.raises(Stop):
        StopAfter11(SeftConfig(**cut), show_progress=False).run()
    saved = torch.load(tmp_path / "cut.ckpt" / "checkpoint" / "optimizer.pt", weights_only=True)
    assert torch.load(tmp_path / "cut.ckpt" / "checkpoint" / "state.pt", weights_only=True)["state"]["step"] == 10
    assert saved["window_steps"] == 1 and all(w["backwards"] == 2 for w in saved["windows"].values())  # 2 micro
    assert all((w["row_g2"] is None) == (not reactivate) for w in saved["windows"].values())
    run_seft(SeftConfig(**{**cut, "resume": True}), show_progress=False)
    ref = load_file(str(tmp_path / "ref" / "seft_adapter.safetensors"))
    out = load_file(str(tmp_path / "cut" / "seft_adapter.safetensors"))
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    ref_log = [json.loads(r) for r in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    out_log = [json.loads(r) for r in (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in ref_log] == [r["loss"] for r in out_log]


def test_resume_refuses_another_runs_checkpoint(tmp_path):
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    s = {**settings(pruned, data, tmp_path / "a", tmp_path / "ck"), "steps": 5}
    run_seft(SeftConfig(**s), show_progress=False)
    with pytest.raises(SparsetuneError, match="already holds a checkpoint"):
        run_seft(SeftConfig(**{**s, "output": str(tmp_path / "b")}), show_progress=False)
    with pytest.raises(SparsetuneError, match=r"another run \(lr differ"):
        run_seft(SeftConfig(**{**s, "output": str(tmp_path / "b"), "lr": 1e-3, "resume": True}), show_progress=False)
