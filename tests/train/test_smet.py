"""`sparsetune smet-pretrain` on the tiny preset: exact density at every step, compact memory, topology updates,
static and dense variants, bad input, NaN stop, SIGKILL + resume, and two processes against one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from helpers import ONE_THREAD_ENV, cli_flags, kill_after_logged_step, load_weights, run_sparsetune, torchrun_or_skip
from helpers import smet_settings as settings
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.errors import SparsetuneError
from sparsetune.train.smet import PretrainRun, run_smet, spike_ratio
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


def peak_rss() -> int:
    """This process's peak resident set so far, in bytes (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Watched(PretrainRun):
    """Checks after every step that each sparse layer keeps its exact active count and no stray non-zeros."""

    def sparsity(self) -> float:
        value = super().sparsity()
        self.counts = getattr(self, "counts", [])
        self.counts.append({n: (w.nnz, int((w.param.detach() != 0).sum())) for n, w in self.sparse.items()})
        return value


def test_smet_keeps_density_and_evolves_topology(corpus, tmp_path):
    tok_dir, text = corpus
    rss_before = peak_rss()
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
    # Exact bytes: an fp32 gradient and fp32 m, v per active entry, 16 bytes per cohort (birth step and size), and,
    # for dense AdamW, m, v and a gradient for every weight of the sparse layers.
    active = sum(start_counts.values())
    cohorts = sum(len(s.cohort_sizes) for s in recipe.optimizer.sparse_state.values())
    assert step_mem["gradient_bytes"] == 4 * active
    assert step_mem["optimizer_state_bytes"] == 8 * active + 16 * cohorts
    assert step_mem["dense_adamw_state_and_grad_bytes"] == 12 * total
    # The peak RSS logged during the run lies between this process's peak before the run and its peak after it.
    assert rss_before <= step_mem["peak_rss_bytes"] <= peak_rss()
    mem = saved["summary"]
    assert mem["state_and_grad_vs_dense"] <= 0.5 + 0.02
    densities = [layer["density"] for layer in saved["layers"].values()]
    assert max(densities) > min(densities)  # ERK: different densities per layer
    assert all(layer["lr_scale"] == pytest.approx(1 / layer["density"], rel=1e-3) for layer in saved["layers"].values())


def test_static_sparse_never_changes_and_dense_trains(corpus, tmp_path):
    tok_dir, text = corpus
    recipe = PretrainRun(
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

    class Diverging(PretrainRun):
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


class Recording(PretrainRun):
    """Records every sparse layer's mask at setup and after each topology update, and the sparse weights before and
    after every optimizer step: the brute-force references for the ITOP rate and the update magnitudes."""

    def setup(self) -> None:
        super().setup()
        self.masks = {0: {n: w.mask().clone() for n, w in self.sparse.items()}}
        self.changes: dict[int, dict[str, torch.Tensor]] = {}

    def train_step(self, step):
        before = {n: w.param.detach().clone() for n, w in self.sparse.items()}
        result = super().train_step(step)
        self.changes[step + 1] = {n: (w.param.detach() - before[n]).abs() for n, w in self.sparse.items()}
        return result

    def topology_update(self, step):
        stats = super().topology_update(step)
        if stats is not None:
            self.masks[step] = {n: w.mask().clone() for n, w in self.sparse.items()}
        return stats


def test_itop_rate_is_the_union_of_every_mask_so_far(corpus, tmp_path):
    np = pytest.importorskip("numpy")
    tok_dir, text = corpus
    recipe = Recording(SmetConfig(**settings(tok_dir, text, tmp_path / "out")), show_progress=False)
    recipe.setup()
    recipe.train()
    report = recipe.finish()
    assert sorted(recipe.masks) == [0, 3, 6, 9]
    numel = sum(w.param.numel() for w in recipe.sparse.values())

    def union_until(step: int) -> dict[str, torch.Tensor]:
        masks = [m for s, m in recipe.masks.items() if s <= step]
        return {n: torch.stack([m[n] for m in masks]).any(0) for n in recipe.sparse}

    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    for row in log:
        assert row["itop_rate"] == sum(int(u.sum()) for u in union_until(row["step"]).values()) / numel, row["step"]
    final = union_until(12)
    for name, bitmap in recipe.itop.items():
        assert bitmap.tolist() == np.packbits(final[name].reshape(-1).numpy(), bitorder="little").tolist(), name
    summary = report["summary"]
    assert summary["itop_rate"] == log[-1]["itop_rate"] == sum(int(u.sum()) for u in final.values()) / numel
    active = sum(w.nnz for w in recipe.sparse.values())
    assert active / numel < log[2]["itop_rate"] < summary["itop_rate"]  # grows with every update
    assert log[0]["itop_rate"] == active / numel
    expected_bytes = sum((w.param.numel() + 7) // 8 for w in recipe.sparse.values())
    assert summary["itop_bitmap_bytes"] == expected_bytes == report["memory"]["itop_bitmap_bytes"]


def test_regrown_update_ratio_matches_the_weight_changes(corpus, tmp_path):
    """Every logged ratio, recomputed from the weights before and after the step and the masks around the update:
    regrown = active after the update but not before, established = active before and after."""
    tok_dir, text = corpus
    cfg = SmetConfig(**settings(tok_dir, text, tmp_path / "out", regrow_warmup=0, lr_density_exponent=0))
    recipe = Recording(cfg, show_progress=False)
    recipe.setup()
    recipe.train()
    recipe.finish()
    measured = [r for r in recipe.state.log if "regrown_update_ratio" in r]
    assert [r["step"] for r in measured] == [4, 5, 7, 8, 10, 11, 12]
    for row in recipe.state.log:
        last = max((u for u in (3, 6, 9) if u <= row["step"]), default=None)
        assert row.get("steps_since_update") == (None if last is None else row["step"] - last)
    for row in measured:
        update = row["step"] - row["steps_since_update"]
        previous = max(s for s in recipe.masks if s < update)
        sums = {"regrown": [0.0, 0], "established": [0.0, 0]}
        for name in recipe.sparse:
            before, after = recipe.masks[previous][name], recipe.masks[update][name]
            change = recipe.changes[row["step"]][name]
            for key, where in (("regrown", after & ~before), ("established", after & before)):
                sums[key][0] += float(change[where].double().sum())
                sums[key][1] += int(where.sum())
        regrown, established = (sums[k][0] / sums[k][1] for k in ("regrown", "established"))
        assert row["regrown_abs_update"] == pytest.approx(regrown, rel=1e-6)
        assert row["established_abs_update"] == pytest.approx(established, rel=1e-6)
        assert row["regrown_update_ratio"] == pytest.approx(regrown / established, rel=1e-6)
    summary = recipe.build_report({}, None)["summary"]
    assert summary["first_step_update_ratios"] == [
        next(r["regrown_update_ratio"] for r in measured if r["step"] == u + 1) for u in (3, 6, 9)
    ]


def test_steps_around_an_update_are_always_logged(corpus, tmp_path):
    """With --log-every 7 the log still holds the 10 losses before and after the update at step 20, and the summary's
    spike ratio is their ratio of means."""
    tok_dir, text = corpus
    cfg = SmetConfig(**settings(tok_dir, text, tmp_path / "out", steps=30, update_interval=20, log_every=7))
    report = run_smet(cfg, show_progress=False)
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [7, *range(11, 31)]
    loss = {r["step"]: r["loss"] for r in log}
    expected = (sum(loss[s] for s in range(21, 31)) / 10) / (sum(loss[s] for s in range(11, 21)) / 10)
    summary = report["summary"]
    assert summary["spike_ratios"] == [pytest.approx(expected, rel=1e-12)]
    assert summary["spike_ratio"] == summary["spike_ratios"][0]
    assert [r["steps_since_update"] for r in log if r["step"] > 20] == list(range(1, 11))
    assert [r["step"] for r in log if "regrown_update_ratio" in r] == list(range(21, 31))
    assert summary["first_step_update_ratios"] == [log[11]["regrown_update_ratio"]] and log[11]["step"] == 21
    assert summary["mean_first_step_update_ratio"] == log[11]["regrown_update_ratio"]


class Snapshots(PretrainRun):
    """Keeps a copy of every parameter after each step (after its topology update, when it has one)."""

    def sparsity(self) -> float:  # the loop calls it once a step, after any topology update
        self.after = getattr(self, "after", [])
        self.after.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        return super().sparsity()


@pytest.mark.parametrize("density", [0.5, 1.0])
def test_spike_probe_is_the_loss_of_one_fixed_held_out_batch(corpus, tmp_path, density):
    """--spike-probe logs, after steps u-10..u+9 of the update at u = 20, the mean token loss of the first batch of
    held-out windows (recomputed here with HF's own loss from each step's saved weights), and reports the ratio of
    the mean after (u..u+9) to the mean before (u-10..u-1). A dense run probes at the same steps."""
    tok_dir, text = corpus
    cfg = SmetConfig(
        **settings(tok_dir, text, tmp_path / "out", steps=32, update_interval=20, log_every=50, spike_probe=True),
        density=density,
    )
    recipe = Snapshots(cfg, show_progress=False)
    recipe.setup()
    recipe.train()
    report = recipe.finish()
    probes = {r["step"]: r["probe_loss"] for r in recipe.state.log if "probe_loss" in r}
    assert sorted(probes) == list(range(10, 30))
    ids = torch.stack(recipe.val_data.inputs[: cfg.batch_size])
    for step in (10, 19, 20, 29):
        recipe.model.load_state_dict(recipe.after[step - 1])
        with torch.no_grad():
            expected = recipe.model(input_ids=ids, labels=ids).loss.item()
        assert probes[step] == pytest.approx(expected, rel=1e-5)
    before = sum(probes[s] for s in range(10, 20)) / 10
    after = sum(probes[s] for s in range(20, 30)) / 10
    assert report["summary"]["probe_spike_ratios"] == [pytest.approx(after / before, rel=1e-12)]
    assert report["summary"]["probe_spike_ratio"] == report["summary"]["probe_spike_ratios"][0]
    assert len(report["topology_history"]) == (1 if density < 1 else 0)


def test_spike_probe_needs_held_out_data():
    with pytest.raises(ValueError, match="val-fraction"):
        SmetConfig(spike_probe=True, val_fraction=0.0)


def test_byte_tokenizer_trains_a_259_token_model(shared_data, tmp_path):
    cfg = SmetConfig(
        model_config="tiny", tokenizer="bytes", data="c4", data_dir=str(shared_data), output=str(tmp_path / "out"),
        seqlen=32, batch_size=4, steps=2, update_interval=0,
    )  # fmt: skip
    report = run_smet(cfg, show_progress=False)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(tmp_path / "out").vocab_size == 259
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok("ab")["input_ids"] == [ord("a") + 3, ord("b") + 3, tok.eos_token_id]  # bytes after pad, eos, unk
    assert report["summary"]["steps"] == 2


def finished_run(settings_: dict) -> PretrainRun:
    """An uninterrupted run of `settings_`, set up, trained and finished: the reference a resumed run must equal."""
    run = PretrainRun(SmetConfig(**settings_), show_progress=False)
    run.setup()
    run.train()
    run.finish()
    return run


def crashed_at_step_7(cfg: dict) -> PretrainRun:
    """A run of `cfg` that raises at step 7, after its step-6 checkpoint (checkpoint_every=3) was written."""

    class Crashing(PretrainRun):
        def nll(self, batch):
            if self.state.step == 7:
                raise RuntimeError("simulated crash")
            return super().nll(batch)

    crashed = Crashing(SmetConfig(**cfg), show_progress=False)
    crashed.setup()
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.train()
    return crashed


def test_resume_after_a_crash_restores_the_itop_bitmap(corpus, tmp_path):
    """A run that fails at step 8 resumes from its step-6 checkpoint (right after the update at step 6) and ends
    exactly like an uninterrupted run: weights, ITOP bitmaps and the logged update fields."""
    tok_dir, text = corpus
    reference = finished_run(settings(tok_dir, text, tmp_path / "ref"))
    cfg = settings(tok_dir, text, tmp_path / "out", checkpoint_every=3)
    crashed = crashed_at_step_7(cfg)
    resumed = PretrainRun(SmetConfig(**cfg, resume=True), show_progress=False)
    resumed.setup()
    assert resumed.state.step == 6
    for name, bitmap in crashed.itop.items():  # no update between the checkpoint and the crash
        assert torch.equal(resumed.itop[name], bitmap), name
    assert resumed.itop_rate() == crashed.itop_rate() > resumed.state.log[0]["itop_rate"]
    resumed.train()
    resumed.finish()
    for name, param in reference.model.named_parameters():
        assert torch.equal(param, dict(resumed.model.named_parameters())[name]), name
    for name, bitmap in reference.itop.items():
        assert torch.equal(resumed.itop[name], bitmap), name
    keys = ("step", "loss", "itop_rate", "steps_since_update", "regrown_update_ratio", "topology")
    assert [{k: r.get(k) for k in keys} for r in resumed.state.log] == [
        {k: r.get(k) for k in keys} for r in reference.state.log
    ]


def test_a_checkpoint_with_the_old_warmup_ratio_resumes(corpus, tmp_path):
    """A checkpoint written before --warmup-ratio became --warmup-steps (its identity names warmup_ratio 0.25 of
    12 steps) resumes a run given --warmup-steps 3, and ends as an uninterrupted run does; another value refuses."""
    tok_dir, text = corpus
    reference = finished_run(settings(tok_dir, text, tmp_path / "ref", warmup_steps=3))
    cfg = settings(tok_dir, text, tmp_path / "out", checkpoint_every=3, warmup_steps=3)
    crashed = crashed_at_step_7(cfg)
    state_file = crashed.ckpt_dir / "checkpoint" / "state.pt"
    saved = torch.load(state_file, weights_only=True)
    assert saved["identity"].pop("warmup_steps") == 3
    saved["identity"]["warmup_ratio"] = 0.25  # as the code before the rename wrote it: int(0.25 x 12) = 3 steps
    torch.save(saved, state_file)
    with pytest.raises(SparsetuneError, match="warmup_steps differ"):
        PretrainRun(SmetConfig(**{**cfg, "warmup_steps": 2}, resume=True), show_progress=False).setup()
    resumed = PretrainRun(SmetConfig(**cfg, resume=True), show_progress=False)
    resumed.setup()
    assert resumed.state.step == 6
    resumed.train()
    resumed.finish()
    for name, param in reference.model.named_parameters():
        assert torch.equal(param, dict(resumed.model.named_parameters())[name]), name


def cli_args(s: dict) -> list[str]:
    return [sys.executable, "-m", "sparsetune", "smet-pretrain", "--json", *cli_flags(s)]


def test_sigkill_then_resume_is_bit_identical(corpus, tmp_path):
    tok_dir, text = corpus
    common = {"steps": 40, "grad_accum": 2, "checkpoint_every": 5, "growth": "gradient"}
    reference = settings(tok_dir, text, tmp_path / "ref", checkpoint_dir=str(tmp_path / "ref.ckpt"), **common)
    run_smet(SmetConfig(**reference), show_progress=False)

    killed = settings(tok_dir, text, tmp_path / "out", checkpoint_dir=str(tmp_path / "out.ckpt"), **common)
    env = {**os.environ, **ONE_THREAD_ENV}
    proc = subprocess.Popen(cli_args(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    state = tmp_path / "out.ckpt" / "checkpoint" / "state.pt"
    # The checkpoint of step 5 is written during step 6, so once step 7 is logged it is on disk and the kill lands
    # between checkpoints: the steps after it are lost and the resume must redo them.
    kill_after_logged_step(proc, tmp_path / "out.ckpt" / "train_log.jsonl", 7)
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "out").exists(), "the run finished before the kill"
    step = torch.load(state, weights_only=True)["state"]["step"]
    assert 0 < step < 40 and step % 5 == 0

    done = subprocess.run([*cli_args(killed), "--resume"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ref = load_weights(tmp_path / "ref")
    out = load_weights(tmp_path / "out")
    assert ref.keys() == out.keys()
    for name in ref:
        assert torch.equal(ref[name], out[name]), name
    ref_report = json.loads((tmp_path / "ref" / "sparsity_report.json").read_text())
    out_report = json.loads((tmp_path / "out" / "sparsity_report.json").read_text())
    assert ref_report["topology_history"] == out_report["topology_history"]
    assert ref_report["summary"]["itop_rate"] == out_report["summary"]["itop_rate"] > 0.5
    keys = ("step", "loss", "itop_rate", "steps_since_update", "regrown_update_ratio")
    logs = [
        [{k: r.get(k) for k in keys} for r in map(json.loads, (tmp_path / d / "train_log.jsonl").open())]
        for d in ("ref", "out")
    ]
    assert logs[0] == logs[1]


@pytest.mark.dist
def test_two_processes_match_one(corpus, tmp_path):
    torchrun_or_skip()
    tok_dir, text = corpus
    common = cli_args(settings(tok_dir, text, tmp_path / "unused", steps=8, growth="gradient"))[3:]
    common = common[: common.index("--output")] + common[common.index("--output") + 2 :]
    one = run_sparsetune([*common, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_sparsetune([*common, "-o", str(tmp_path / "two")], processes=2)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "sparsity_report.json").read_text())["summary"] for d in ("one", "two")]
    assert reports[0]["itop_rate"] == reports[1]["itop_rate"] > 0.5  # the same topology history on every rank
    a = load_weights(tmp_path / "one")
    b = load_weights(tmp_path / "two")
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), (
            f"{name}: max diff {(a[name] - b[name]).abs().max()}"
        )
