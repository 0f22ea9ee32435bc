"""The SEFT training loop on tiny models: exact sparsity at every step, N:M, drop/grow bookkeeping, NaN stop."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_pruned, write_alpaca, write_text

from sparsetune.errors import SparsetuneError
from sparsetune.masks import nm_violations
from sparsetune.train.finetune import FinetuneRun
from sparsetune.train.seft_config import SeftConfig

pytestmark = pytest.mark.usefixtures("one_thread")


class WatchedRecipe(FinetuneRun):
    """Records the masks and checks every invariant after every step (sparsity runs once per step)."""

    def setup(self) -> None:
        super().setup()
        self.history: list[dict[str, torch.Tensor]] = []
        self.problems: list[str] = []

    def sparsity(self) -> float:
        sparsity = super().sparsity()
        masks = {}
        for name, module in self.start.modules.items():
            w = module.weight.detach()
            active = torch.zeros(w.numel(), dtype=torch.bool)
            active[self.sparse[name].active] = True
            if int((w.view(-1)[~active] != 0).sum()):
                self.problems.append(f"step {self.state.step}: {name} has non-zeros outside its active set")
            if int(active.sum()) != self.start.active_counts[name]:
                self.problems.append(f"step {self.state.step}: {name} active count changed")
            if self.start.pattern is not None and nm_violations(active.view_as(w).float(), self.start.pattern):
                self.problems.append(f"step {self.state.step}: {name} breaks {self.start.pattern}")
            masks[name] = active
        self.history.append(masks)
        return sparsity

    def topology_update(self, step: int):
        before = {n: self.sparse[n].active.clone() for n in self.sparse}
        stats = super().topology_update(step)
        grown_total = regrown = 0
        for name, w in self.sparse.items():
            new = sorted(set(w.active.tolist()) - set(before[name].tolist()))
            grown_total += len(new)
            regrown += int((~self.start.masks[name].view(-1)[new]).sum())
            if new and float(w.param.detach().view(-1)[new].abs().max()) != 0.0:
                self.problems.append(f"step {step}: grown weights of {name} do not start at 0")
        if (stats["grown"], stats["regrown_previously_pruned"]) != (grown_total, regrown):
            self.problems.append(f"step {step}: logged {stats} but {grown_total} grown, {regrown} regrown")
        return stats


def run(tmp_path, pruned, data, recipe_cls=WatchedRecipe, **settings):
    base = {"seqlen": 32, "batch_size": 4, "steps": 8, "lr": 5e-3, "update_interval": 2, "drop_fraction": 0.2}
    cfg = SeftConfig(model=str(pruned), output=str(tmp_path / "out"), data=str(data), **{**base, **settings})
    recipe = recipe_cls(cfg, overwrite=True, show_progress=False)
    recipe.setup()
    recipe.train()
    report = recipe.finish()
    return recipe, report


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_seft_keeps_exact_sparsity_and_evolves_the_mask(tmp_path, pattern):
    pruned = make_pruned(tmp_path, pattern)
    recipe, report = run(tmp_path, pruned, write_text(tmp_path / "t.txt"))
    assert recipe.problems == []
    assert len(recipe.history) == 8
    updates = recipe.state.topology
    assert [u["step"] for u in updates] == [2, 4, 6]
    for u in updates:
        expected = sum(int(u["drop_fraction"] * c) for c in recipe.start.active_counts.values())
        assert u["dropped"] == u["grown"] == expected > 0
    assert sum(u["regrown_previously_pruned"] for u in updates) > 0
    changed = sum(int((recipe.history[-1][n] != recipe.history[0][n]).sum()) for n in recipe.sparse)
    assert changed > 0
    summary = report["summary"]
    assert summary["sparsity_after"] == summary["sparsity_before"]
    assert summary["final_loss"] < summary["first_loss"]
    rows = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "topology" in r] == [2, 4, 6]
    assert all({"loss", "lr", "sparsity", "tokens_per_s"} <= set(r) for r in rows)


def test_drop_scores_of_a_hand_computed_weight():
    """W = [[0.5, 0, -2, 1], [0, 3, -0.25, 0]]: active flat positions 0, 2, 3, 5, 6 (columns 0, 2, 3, 1, 2)."""
    from sparsetune.train.dst import drop_score
    from sparsetune.train.sparse_optim import SparseWeight

    w = torch.nn.Parameter(torch.tensor([[0.5, 0.0, -2.0, 1.0], [0.0, 3.0, -0.25, 0.0]]))
    weight = SparseWeight.from_mask("w", w, w.detach() != 0)
    grad = torch.tensor([0.1, 9.0, -0.5, 2.0, 7.0, -1.0, 4.0, 5.0])
    norms = torch.tensor([4.0, 1.0, 9.0, 16.0])  # summed x_j**2 per input column: ||x|| = 2, 1, 3, 4

    class Tracked:
        def tracked_update(self, name):
            assert name == "w"
            return torch.tensor([0.3, -0.1, 0.0, -2.0, 0.5])

    def score(criterion):
        return drop_score(criterion, weight, grad, Tracked(), norms).tolist()

    assert score("magnitude") == [0.5, 2.0, 1.0, 3.0, 0.25]
    assert score("sensitivity") == [0.05000000074505806, 1.0, 2.0, 3.0, 1.0]  # |w * g|; 0.5 * 0.1 in float32
    assert score("wanda") == [1.0, 6.0, 4.0, 3.0, 0.75]  # |w| * ||x_column||
    assert score("update") == [0.30000001192092896, 0.10000000149011612, 0.0, 2.0, 0.5]


@pytest.mark.parametrize("criterion", ["sensitivity", "wanda", "magnitude", "update"])
def test_drop_removes_the_smallest_scores_of_the_criterion(tmp_path, monkeypatch, criterion):
    """Each update drops exactly the k active weights with the smallest score (the scores themselves are checked
    on a hand-computed weight above)."""
    from sparsetune.train import dst

    seen: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    real = dst.drop_score

    def recording(crit, weight, grad, optimizer, input_norms=None):
        assert crit == criterion
        score = real(crit, weight, grad, optimizer, input_norms)
        seen.append((weight.name, weight.active.clone(), score.clone()))
        return score

    monkeypatch.setattr(dst, "drop_score", recording)

    class Checked(WatchedRecipe):
        def topology_update(self, step):
            seen.clear()
            stats = super().topology_update(step)
            for name, before, score in seen:
                after = set(self.sparse[name].active.tolist())
                dropped = sorted(i for i, pos in enumerate(before.tolist()) if pos not in after)
                k = len(dropped)
                assert k == int(stats["drop_fraction"] * before.numel())
                assert set(dropped) == set(torch.topk(score, k, largest=False).indices.tolist()), name
            return stats

    pruned = make_pruned(tmp_path)
    recipe, _ = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), Checked, drop_criterion=criterion, steps=5)
    assert recipe.problems == []
    assert len(recipe.state.topology) == 2


class StreamedGrads(WatchedRecipe):
    """Records, for every gradient handed to the topology choice, how many sparse weights still hold a .grad."""

    def setup(self) -> None:
        super().setup()
        self.live_grads: list[int] = []
        self.norms: dict[str, torch.Tensor] = {}

    def growth_gradients(self, step, weights, consume, input_norms=False):
        def watched(name, grad, norms):
            self.live_grads.append(sum(w.grad is not None for w in weights.values()))
            if norms is not None:
                self.norms[name] = norms.clone()
            consume(name, grad, norms)

        return super().growth_gradients(step, weights, watched, input_norms)


def test_growth_gradients_are_consumed_one_module_at_a_time(tmp_path):
    """With one grow batch no dense gradient outlives its module's turn: peak memory stays at the training step's."""
    pruned = make_pruned(tmp_path)
    recipe, _ = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), StreamedGrads, steps=3, grow_batches=1)
    assert recipe.problems == []
    assert len(recipe.live_grads) == len(recipe.sparse) > 1
    assert max(recipe.live_grads) == 0


def test_wanda_drop_uses_the_grow_batch_input_norms(tmp_path):
    """The norms behind the wanda drop score are the summed squared inputs of each Linear on the grow batch."""
    from sparsetune.train.common import collate

    pruned = make_pruned(tmp_path)
    recipe, _ = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), StreamedGrads, steps=3, drop_criterion="wanda")
    assert recipe.problems == [] and set(recipe.norms) == set(recipe.sparse)
    # Replay the grow batch of step 2 through the final model with the weights as they were: the inputs of the
    # first block's q_proj only depend on the (untrained) embeddings and norm, so they are reproducible exactly.
    idx = recipe.order.batch(1)  # the update after step 2 scores growth on the batch step 2 trained on
    batch = collate(recipe.train_data, idx, recipe.pad_id)
    name = next(n for n in recipe.sparse if n.endswith("layers.0.self_attn.q_proj"))
    seen = []
    module = recipe.start.modules[name]
    hook = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().flatten(0, -2)))
    with torch.no_grad():
        recipe.model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
    hook.remove()
    want = seen[0].pow(2).sum(dim=0)
    assert torch.allclose(recipe.norms[name], want, rtol=1e-5)


def test_masked_ft_never_changes_the_mask(tmp_path):
    pruned = make_pruned(tmp_path)
    recipe, report = run(tmp_path, pruned, write_alpaca(tmp_path / "a.json"), method="masked-ft", seqlen=96)
    assert recipe.problems == []
    assert recipe.state.topology == []
    for name in recipe.sparse:
        assert all(torch.equal(h[name], recipe.history[0][name]) for h in recipe.history)
    assert report["summary"]["final_loss"] < report["summary"]["first_loss"]


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
    from safetensors.torch import load_file, save_file

    pruned = make_pruned(tmp_path, pattern)
    weights = load_file(str(pruned / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    zeros = (weights[name] == 0).nonzero()[:40]
    weights[name][zeros[:, 0], zeros[:, 1]] = 0.01  # a later dense edit filled 40 pruned entries
    save_file(weights, str(pruned / "model.safetensors"), metadata={"format": "pt"})
    recipe, report = run(tmp_path, pruned, write_text(tmp_path / "t.txt"), steps=3, update_interval=10)
    assert recipe.problems == []
    assert recipe.state.reprunes == [{"step": 0, "modules": 1, "before": recipe.start.targets[name[:-7]] + 40,
                                      "after": recipe.start.targets[name[:-7]]}]  # fmt: skip
    original = json.loads((pruned / "sparsity_report.json").read_text())["modules"]
    for module, stats in report["modules"].items():
        assert stats["zeros"] == original[module]["zeros"], module


def test_dst_is_the_drop_and_grow_that_seft_still_selects(tmp_path):
    """`--method dst` names the whole-weight drop-and-grow; `seft` runs the same strategy until the sparse-delta
    method replaces it, so both end with the same weights and the same topology history."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    runs = {}
    for method in ("dst", "seft"):
        recipe, report = run(tmp_path, pruned, data, steps=3, method=method)
        assert recipe.problems == [] and report["summary"]["method"] == method
        runs[method] = (recipe.state.topology, {n: m.weight.detach().clone() for n, m in recipe.start.modules.items()})
    assert runs["dst"][0] == runs["seft"][0] and len(runs["dst"][0]) == 1
    assert all(torch.equal(runs["dst"][1][n], runs["seft"][1][n]) for n in runs["dst"][1])
