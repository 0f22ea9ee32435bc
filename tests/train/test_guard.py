"""The divergence guard of `seft` and `smet-pretrain`: absurd learning rates stop with one error and write nothing,
a diverging loss stops after DIVERGENCE_STEPS steps, the checkpoint called intact predates the divergence (and
resumes), and the end-of-run sparsity invariant catches weights that became exactly 0."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import load_weights, make_pruned, seft_settings, tiny_args, write_text
from helpers import smet_settings as settings
from safetensors.torch import load_file
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.train import loop
from sparsetune.train.guard import DIVERGENCE_STEPS, loss_bound
from sparsetune.train.seft import FinetuneRun, run_seft
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet import PretrainRun
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_seft_with_an_absurd_lr_stops_with_one_error_and_writes_nothing(tmp_path):
    pruned, data, out = make_pruned(tmp_path), write_text(tmp_path / "t.txt"), tmp_path / "out"
    result = runner.invoke(app, tiny_args(pruned, out, data, "--steps", "10", "--lr", "1e9", "--warmup-steps", "0"))
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    # AdamW's first step moves every active weight by lr: magnitude 1e9, over the limit 1000 (start |w| < 1).
    assert len(lines) == 1 and "training diverged: after step 1" in lines[0], result.output
    assert "magnitude 1e+09, over its limit 1e+03" in lines[0] and "lower --lr" in lines[0]
    assert not out.exists()


def test_lr_1e30_leaves_no_checkpoint_holding_the_diverged_weights(tmp_path):
    pruned, data, out = make_pruned(tmp_path), write_text(tmp_path / "t.txt"), tmp_path / "out"
    args = tiny_args(
        pruned, out, data, "--steps", "6", "--lr", "1e30", "--warmup-steps", "0", "--checkpoint-every", "1"
    )
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = error_lines(result.output)
    assert len(lines) == 1 and "no checkpoint was written" in lines[0], result.output
    assert not (tmp_path / "out.ckpt" / "checkpoint").exists() and not out.exists()


def guard_settings(tmp_path, pruned, data, out, **extra) -> SeftConfig:
    base = {"method": "masked-ft", "checkpoint_every": 2, "checkpoint_dir": str(tmp_path / f"{out}.ckpt")}
    return SeftConfig(**seft_settings(pruned, data, tmp_path / out, **{**base, **extra}))


def test_a_divergence_after_a_checkpoint_keeps_the_sane_one_which_resumes(tmp_path, monkeypatch):
    pruned, data = make_pruned(tmp_path), write_text(tmp_path / "t.txt")
    reference = run_seft(guard_settings(tmp_path, pruned, data, "ref"), show_progress=False)
    assert reference["summary"]["steps"] == 8

    sane_lr = loop.lr_at
    monkeypatch.setattr(loop, "lr_at", lambda step, cfg: 1e30 if step >= 4 else sane_lr(step, cfg))
    cfg = guard_settings(tmp_path, pruned, data, "out")
    with pytest.raises(SparsetuneError, match=r"after step 5, .* \(step 4\) is intact"):
        run_seft(cfg, show_progress=False)
    ckpt = tmp_path / "out.ckpt" / "checkpoint"
    assert torch.load(ckpt / "state.pt", weights_only=True)["state"]["step"] == 4
    weights = load_file(str(ckpt / "weights.safetensors"))
    assert max(float(w.abs().max()) for w in weights.values()) < 1.0  # taken before the 1e30 step

    monkeypatch.setattr(loop, "lr_at", sane_lr)
    run_seft(cfg.model_copy(update={"resume": True}), show_progress=False)
    ref, got = (
        load_weights(tmp_path / "ref"),
        load_weights(tmp_path / "out"),
    )
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


class LossTimesTenFromStep13(FinetuneRun):
    def nll(self, batch):
        loss = super().nll(batch)
        return loss * 10 if self.state.step >= 12 else loss


def test_a_loss_that_stays_high_stops_the_run(tmp_path):
    pruned, data = make_pruned(tmp_path), write_text(tmp_path / "t.txt", n_docs=16)
    cfg = guard_settings(tmp_path, pruned, data, "out", steps=40, checkpoint_every=5)
    recipe = LossTimesTenFromStep13(cfg, show_progress=False)
    recipe.setup()
    with pytest.raises(SparsetuneError) as err:
        recipe.train()
    losses = [row["loss"] for row in recipe.state.log]  # steps 1-21; step 22 stopped before its log row
    assert len(losses) == 21 and DIVERGENCE_STEPS == 10
    reference = min(sum(losses[i : i + 10]) / 10 for i in range(len(losses) - 9))
    bound = max(2 * reference, reference + 1)
    assert bound == loss_bound(reference) and all(x > bound for x in losses[12:])
    message = str(err.value)
    assert f"stayed at or above {bound:.4g} (2x its best 10-step mean, at least 1 above it) for 10 steps" in message
    assert "up to step 22" in message
    # Checkpoints were due after steps 5, 10, 15 and 20; those of 15 and 20 met a diverging loss and were not written.
    assert "(step 10) is intact" in message
    saved = torch.load(tmp_path / "out.ckpt" / "checkpoint" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 10


class DestroyedAfterStep1(FinetuneRun):
    """Step 1's loss is half the real one (a model well below uniform guessing); from step 2 on, 1.2x the real one
    (the tiny random model sits at ln(256), so that is above uniform guessing, as a destroyed model is)."""

    def nll(self, batch):
        loss = super().nll(batch)
        return loss * 0.5 if self.state.step == 0 else loss * 1.2


def test_a_model_destroyed_in_its_first_steps_stops_at_uniform_guessing(tmp_path):
    pruned, data = make_pruned(tmp_path), write_text(tmp_path / "t.txt")
    cfg = guard_settings(tmp_path, pruned, data, "out", steps=30, checkpoint_every=1)
    recipe = DestroyedAfterStep1(cfg, show_progress=False)
    recipe.setup()
    with pytest.raises(SparsetuneError) as err:
        recipe.train()
    uniform = math.log(256)  # the tiny model's vocabulary
    losses = [row["loss"] for row in recipe.state.log]
    assert len(losses) == 10 and losses[0] < uniform - 1 and all(x >= uniform for x in losses[1:])
    # Steps 2-11 stay at or above ln(256): the 10th such step stops the run. No step since the first gave a sane
    # loss, so no checkpoint was trusted; the 2x rule alone would not have fired (no clean 10-step reference).
    message = str(err.value)
    assert f"at or above {uniform:.4g} (ln(vocab), no better than uniform guessing, where it had reached" in message
    assert "up to step 11" in message and "no checkpoint was written" in message
    assert not (tmp_path / "out.ckpt" / "checkpoint").exists()


class ZeroesActiveWeightsAtTheEnd(FinetuneRun):
    """Simulates weights that overflowed or cancelled to exactly 0: 1000 active weights of q_proj become 0."""

    def train(self):
        super().train()
        w = self.start.modules["model.layers.0.self_attn.q_proj"].weight
        with torch.no_grad():
            w.view(-1)[self.method.sparse["model.layers.0.self_attn.q_proj"].active[:1000]] = 0.0


def test_the_end_sparsity_must_equal_the_start_sparsity(tmp_path):
    pruned, data = make_pruned(tmp_path), write_text(tmp_path / "t.txt")
    cfg = guard_settings(tmp_path, pruned, data, "out", steps=3, checkpoint_every=0, checkpoint_dir=None)
    recipe = ZeroesActiveWeightsAtTheEnd(cfg, show_progress=False)
    recipe.setup()
    recipe.train()
    # 73,728 weights in the 14 sparse Linears, half of them zero (magnitude 50%); q_proj is 64 x 64 with 2,048 zeros.
    with pytest.raises(SparsetuneError, match=r"sparsity changed from 0\.5000 to 0\.5136 .*q_proj with 3048 zeros"):
        recipe.finish()
    assert not (tmp_path / "out").exists()


class GrownWhereNoGradientReaches(ZeroesActiveWeightsAtTheEnd):
    """The same zeros, but with Adam's v at 0: entries grown at 0 that never had a gradient, which is no divergence."""

    def train(self):
        super().train()
        state = self.optimizer.sparse_state["model.layers.0.self_attn.q_proj"]
        m, v = state.moments.load()
        v[:1000] = 0.0
        state.moments.store(m, v)


def test_active_weights_that_never_had_a_gradient_may_stay_zero(tmp_path):
    pruned, data = make_pruned(tmp_path), write_text(tmp_path / "t.txt")
    cfg = guard_settings(tmp_path, pruned, data, "out", steps=3, checkpoint_every=0, checkpoint_dir=None)
    recipe = GrownWhereNoGradientReaches(cfg, show_progress=False)
    recipe.setup()
    recipe.train()
    report = recipe.finish()
    assert report["summary"]["sparsity_after"] == (36864 + 1000) / 73728  # they count as zeros in the report


def test_smet_with_an_absurd_lr_stops_and_its_sparsity_is_checked_at_the_end(corpus, tmp_path):  # noqa: F811
    tok_dir, text = corpus
    cfg = SmetConfig(**settings(tok_dir, text, tmp_path / "out", lr=1e9, steps=4))
    with pytest.raises(SparsetuneError, match=r"training diverged: after step 1,"):
        recipe = PretrainRun(cfg, show_progress=False)
        recipe.setup()
        recipe.train()

    class ZeroesActive(PretrainRun):
        def train(self):
            super().train()
            w = next(iter(self.sparse.values()))
            with torch.no_grad():
                w.param.view(-1)[w.active[:5]] = 0.0

    recipe = ZeroesActive(SmetConfig(**settings(tok_dir, text, tmp_path / "out", steps=4)), show_progress=False)
    recipe.setup()
    recipe.train()
    name, w = next(iter(recipe.sparse.items()))
    zeros = w.param.numel() - w.nnz
    with pytest.raises(SparsetuneError, match=rf"{name} with {zeros + 5} zeros instead of {zeros}"):
        recipe.finish()
    assert not (tmp_path / "out").exists()
