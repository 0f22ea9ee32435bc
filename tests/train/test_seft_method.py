"""`seft --method seft` on the training loop, tiny models: exact counts and N:M after every reselection, the logged
counts, the merged weights, the merged model's and the adapter's logits, measured memory, 8-bit state, the NaN stop,
the drift re-prune, and masked-ft's fixed mask."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights, make_pruned, save_weights, seft_settings, write_alpaca, write_text

from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern, nm_violations
from sparsetune.train.seft import FinetuneRun
from sparsetune.train.seft_config import SeftConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class WatchedRun(FinetuneRun):
    """Checks every reselection against an independent recount of the module's support (base non-zeros not
    re-pruned, plus the positions carrying an entry) and of the logged counts."""

    def setup(self) -> None:
        super().setup()
        self.problems: list[str] = []

    def topology_update(self, step: int):
        if not self.method.reselection_due(step):
            return super().topology_update(step)
        layers = self.method.layers
        before = {n: (set(l.indices.tolist()), set(l.repruned.tolist())) for n, l in layers.items()}
        stats = super().topology_update(step)
        reactivated_at_least = repruned = restored = 0
        for name, layer in layers.items():
            entries, now_repruned = set(layer.indices.tolist()), set(layer.repruned.tolist())
            old_entries, old_repruned = before[name]
            input_nonzero = layer.input_nonzero().reshape(-1)
            support = input_nonzero.clone()
            support[list(now_repruned)] = False
            support[list(entries)] = True
            if int(support.sum()) != self.start.active_counts[name] or self.start.masks:  # released after the build
                self.problems.append(f"step {step}: {name} holds {int(support.sum())} non-zeros")
            pattern = self.start.pattern
            if pattern is not None and bool((support.view(-1, pattern.m).sum(1) != pattern.n).any()):
                self.problems.append(f"step {step}: {name} breaks {pattern}")
            reactivated_at_least += sum(1 for p in entries - old_entries if not input_nonzero[p] or p in old_repruned)
            repruned += len(now_repruned - old_repruned)
            restored += len(old_repruned - now_repruned)
        if stats["grown"] != stats["dropped"] or stats["grown"] == 0:
            self.problems.append(f"step {step}: grown {stats['grown']} dropped {stats['dropped']}")
        if (stats["repruned"], stats["restored"]) != (repruned, restored) or stats[
            "reactivated"
        ] < reactivated_at_least:
            self.problems.append(f"step {step}: logged {stats}, counted {repruned} re-pruned, {restored} restored")
        return stats


# reactivation on: these tests check the re-prune after every reselection (the default grows on non-zeros only)
SEFT = {"delta_rank": 4, "reselect_every": 3, "select_window": 2, "reactivate": True}


def run(tmp_path, pruned, data, run_cls=WatchedRun, **settings):
    method_settings = SEFT if settings.get("method", "seft") == "seft" else {}
    cfg = SeftConfig(**seft_settings(pruned, data, tmp_path / "out", **{**method_settings, **settings}))
    recipe = run_cls(cfg, overwrite=True, show_progress=False)
    recipe.setup()
    recipe.train()
    report = recipe.finish()
    return recipe, report


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_seft_keeps_every_count_and_pattern_and_returns_dropped_weights_to_the_base(tmp_path, pattern):
    pruned = make_pruned(tmp_path, pattern)
    recipe, report = run(tmp_path, pruned, write_text(tmp_path / "t.txt"))
    assert recipe.problems == []
    updates = recipe.state.topology
    assert [u["step"] for u in updates] == [3, 6]
    k = 8192  # rank 4 over q, k, v, o (in + out = 128, 96, 96, 128), gate, up, down (192 each), in 2 layers
    assert updates[0]["replace_fraction"] == 1.0 and updates[0]["grown"] == k  # the random start is replaced
    assert updates[1]["replace_fraction"] == pytest.approx(0.2 * (1 - 6 / 8))
    assert sum(u["reactivated"] for u in updates) > 0 and sum(u["repruned"] for u in updates) > 0
    summary = report["summary"]
    assert summary["sparsity"] == summary["sparsity_after"] == summary["sparsity_before"]
    assert summary["trainable_params"] == k and summary["grad_bytes"] == 4 * k
    # fp32 m and v and a one-byte step cohort per entry (13 bytes with the gradient, a LoRA's 12 plus one), and an
    # int64 start per cohort: the start, each reselection's grown entries (ids of emptied cohorts are reused)
    cohorts = sum(c.starts.numel() for c in recipe.method.adamw.steps.values())
    assert cohorts <= 3 * 14
    assert summary["optimizer_state_bytes"] == 9 * k + 8 * cohorts
    assert summary["final_loss"] < summary["first_loss"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    logged = [r["topology"] for r in rows if "topology" in r]
    assert [sorted(t) for t in logged] == [sorted(["step", "replace_fraction", "grown", "dropped", "reactivated",
                                                   "repruned", "restored"])] * 2  # fmt: skip
    # The merged weight: the input's value where no entry sits (bit for bit), 0 where re-pruned, base + delta at
    # the entries; the same non-zero count as the input, and the same N:M pattern.
    original = load_weights(pruned)
    merged = load_weights(tmp_path / "out")
    for name, layer in recipe.method.layers.items():
        w0, w1 = original[name + ".weight"].reshape(-1), merged[name + ".weight"].reshape(-1)
        entries, repruned = layer.indices.long(), layer.repruned
        untouched = torch.ones_like(w0, dtype=torch.bool)
        untouched[entries] = False
        untouched[repruned] = False
        assert torch.equal(w1[untouched], w0[untouched]), name
        bare = repruned[~torch.isin(repruned, entries)]  # a later growth may reactivate a re-pruned position
        assert bare.numel() > 0 and not bool(w1[bare].any()), name
        want = torch.where(torch.isin(entries, repruned), 0.0, w0[entries]) + layer.delta.detach()
        assert torch.equal(w1[entries], want), name
        assert int((w1 != 0).sum()) == int((w0 != 0).sum()), name
        if pattern:
            assert nm_violations(w1.view_as(original[name + ".weight"]), NMPattern(2, 4)) == 0


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_no_reactivate_grows_only_on_input_nonzeros_and_never_reprunes(tmp_path, pattern):
    pruned = make_pruned(tmp_path, pattern)
    recipe, report = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), reactivate=False)
    assert recipe.problems == []
    updates = recipe.state.topology
    assert len(updates) == 2 and all(u["grown"] > 0 for u in updates)
    assert sum(u["reactivated"] + u["repruned"] + u["restored"] for u in updates) == 0
    original = load_weights(pruned)
    merged = load_weights(tmp_path / "out")
    moved = 0
    for name, layer in recipe.method.layers.items():
        w0, w1 = original[name + ".weight"].reshape(-1), merged[name + ".weight"].reshape(-1)
        entries = layer.indices.long()
        assert bool((w0[entries] != 0).all()), name  # every entry on a non-zero of the input
        assert layer.repruned.numel() == 0
        assert torch.equal(w1 == 0, w0 == 0), name  # the merged zeros are exactly the input's
        moved += int((w1 != w0).sum())
    assert moved > 0
    assert report["summary"]["reactivated"] == report["summary"]["repruned"] == 0


class LogitsAtTheEnd(WatchedRun):
    """Records the training-time model's logits (DeltaLinear modules) on a fixed batch before the merge."""

    def finish(self):
        self.batch_ids = torch.randint(4, 200, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            self.training_logits = self.model(input_ids=self.batch_ids).logits
        return super().finish()


@pytest.mark.parametrize("base_dtype", ["auto", "nf4"])
def test_merged_model_and_adapter_give_the_training_time_logits(tmp_path, base_dtype):

    import sparsetune
    from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE, read_adapter

    pruned = make_pruned(tmp_path)
    weights = load_weights(pruned)
    w = weights["model.layers.0.mlp.up_proj.weight"].view(-1)
    small = w.nonzero().squeeze(1)[::2]  # more than the re-prune (which takes the smallest first) can remove
    w[small] = 1e-6 * w[small].sign()  # kept weights far below their block's largest: NF4 reads them as 0
    save_weights(pruned, weights)
    data = write_text(tmp_path / "t.txt")
    recipe, report = run(tmp_path, pruned, data, LogitsAtTheEnd, steps=4, base_dtype=base_dtype)
    original = load_weights(pruned)
    merged_weights = load_weights(tmp_path / "out")
    for name in recipe.method.layers:  # the input's sparsity, with any base precision
        assert int((merged_weights[name + ".weight"] == 0).sum()) == int((original[name + ".weight"] == 0).sum())
    if base_dtype == "nf4":
        # input non-zeros not re-pruned that NF4 rounds to 0 (bitsandbytes directly, 64-weight blocks): the merge
        # gives them back their input values
        import bitsandbytes.functional as bnbf

        zeroed = 0
        for name, layer in recipe.method.layers.items():
            w0 = original[name + ".weight"].reshape(-1)
            packed, state = bnbf.quantize_4bit(w0.view_as(original[name + ".weight"]), blocksize=64, quant_type="nf4")
            back = (w0 != 0) & (bnbf.dequantize_4bit(packed, state).reshape(-1) == 0)
            back[layer.repruned] = False
            zeroed += int(back.sum())
            back[layer.indices.long()] = False  # (an entry there holds the input value plus its delta)
            assert torch.equal(merged_weights[name + ".weight"].reshape(-1)[back], w0[back])
        assert report["summary"]["nf4_zeroed"] == zeroed > 0
    merged = sparsetune.load(str(tmp_path / "out"), device="cpu")
    with torch.no_grad():
        logits = merged(input_ids=recipe.batch_ids).logits
    assert torch.allclose(logits, recipe.training_logits, atol=1e-5, rtol=1e-5)
    _, config = read_adapter(tmp_path / "out" / ADAPTER_FILE)
    assert config["base_model"] == str(pruned.resolve())

    # --no-merge: the adapter (and report, log, recipe) only; loading the dir applies it to the base it names
    nomerge, _ = run(tmp_path, pruned, data, LogitsAtTheEnd, steps=4, base_dtype=base_dtype, merge=False)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted([ADAPTER_FILE, "recipe.yaml", "sparsity_report.json", "train_log.jsonl"])
    applied = sparsetune.load(str(tmp_path / "out"), device="cpu")
    with torch.no_grad():
        assert torch.allclose(applied(input_ids=nomerge.batch_ids).logits, nomerge.training_logits, atol=1e-5)


def test_adamw8bit_keeps_the_counts_with_a_smaller_state(tmp_path):
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    _, fp32 = run(tmp_path, pruned, data, steps=7)
    eight, report = run(tmp_path, pruned, data, steps=7, optim="adamw8bit")
    assert eight.problems == [] and len(eight.state.topology) == 2
    k = report["summary"]["trainable_params"]
    # 8-bit m and v (1 byte each) plus a float32 absmax per 256-entry block of each, per module; step cohorts
    blocks = sum(-(-layer.k // 256) for layer in eight.method.layers.values())
    cohorts = sum(c.starts.numel() for c in eight.method.adamw.steps.values())
    assert report["summary"]["optimizer_state_bytes"] == 2 * k + 2 * 4 * blocks + k + 8 * cohorts
    assert report["summary"]["optimizer_state_bytes"] < fp32["summary"]["optimizer_state_bytes"]
    assert report["summary"]["final_loss"] < report["summary"]["first_loss"]


class MaskWatch(FinetuneRun):
    def sparsity(self) -> float:
        self.history = [
            *getattr(self, "history", []),
            {n: m.weight.detach() != 0 for n, m in self.start.modules.items()},
        ]
        return super().sparsity()


def test_masked_ft_never_changes_the_mask_and_reports_measured_memory(tmp_path):
    pruned = make_pruned(tmp_path)
    recipe, report = run(tmp_path, pruned, write_alpaca(tmp_path / "a.json"), MaskWatch, method="masked-ft", seqlen=96)
    assert recipe.state.topology == [] and len(recipe.history) == 8
    for name in recipe.start.modules:
        assert all(torch.equal(h[name] | recipe.history[0][name], recipe.history[0][name]) for h in recipe.history)
    summary = report["summary"]
    assert summary["final_loss"] < summary["first_loss"]
    active = sum(int(m.sum()) for m in recipe.start.masks.values())
    assert summary["trainable_params"] == active and summary["grad_bytes"] == 4 * active


def test_adamw8bit_keeps_sparsity_with_a_smaller_state(tmp_path):
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    fp32, _ = run(tmp_path, pruned, data, steps=4)
    eight, _ = run(tmp_path, pruned, data, steps=4, optim="adamw8bit")
    assert eight.problems == []
    assert eight.memory_report()["optimizer_state_bytes"] < fp32.memory_report()["optimizer_state_bytes"]


class NanAtStep5(FinetuneRun):
    def nll(self, batch):
        loss = super().nll(batch)
        return loss * float("nan") if self.state.step == 4 else loss


def test_nan_loss_stops_with_the_last_checkpoint_intact(tmp_path):
    pruned = make_pruned(tmp_path)
    ckpt = tmp_path / "ckpt"
    # The loss of step 5 is the loss of the weights after step 4, so the checkpoint due after step 4 is not trusted
    # (not written); the one of step 2, whose weights gave a finite loss at step 3, is the intact one.
    with pytest.raises(SparsetuneError, match=r"nan at step 5.*\(step 2\) is intact"):
        run(tmp_path, pruned, write_text(tmp_path / "t.txt"), NanAtStep5, checkpoint_every=2, checkpoint_dir=str(ckpt))
    saved = torch.load(ckpt / "checkpoint" / "state.pt", weights_only=True)
    assert saved["state"]["step"] == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sensitivity_reprune_restores_a_drifted_mask(tmp_path, pattern):

    pruned = make_pruned(tmp_path, pattern)
    weights = load_weights(pruned)
    name = "model.layers.0.mlp.up_proj.weight"
    zeros = (weights[name] == 0).nonzero()[:40]
    weights[name][zeros[:, 0], zeros[:, 1]] = 0.01  # a later dense edit filled 40 pruned entries
    save_weights(pruned, weights)
    recipe, report = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), steps=3)
    assert recipe.problems == []
    assert recipe.state.reprunes == [{"step": 0, "modules": 1, "before": recipe.start.targets[name[:-7]] + 40,
                                      "after": recipe.start.targets[name[:-7]]}]  # fmt: skip
    original = json.loads((pruned / "sparsity_report.json").read_text())["modules"]
    for module, stats in report["modules"].items():
        assert stats["zeros"] == original[module]["zeros"], module
