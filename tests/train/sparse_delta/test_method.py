"""Sparse-delta fine-tuning (`SparseDelta` on the real loop) end to end on a tiny Llama pruned to 50% and to 2:4."""

from __future__ import annotations

import pytest
import torch
from helpers import delta_run, in_memory_seft, make_tiny_model, pruned_tiny, token_batches
from torch import nn

from sparsetune import masks
from sparsetune.errors import SparsetuneError
from sparsetune.patterns import NMPattern
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.reprune import support_counts

TINY_LORA_R2 = (
    2 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
)  # rank 2 * layers * sum(in + out) of q k v o gate up down


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


SETTINGS = DeltaSettings(delta_rank=2, reselect_every=10, select_window=3, reactivate=True)


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)], ids=["50%", "2:4"])
def test_training_keeps_sparsity_exact_and_learns(target, one_thread, tmp_path):
    model = pruned_tiny(target)
    batches = token_batches()
    before = batch_loss(model, batches[0])
    input_nz = {n: m.weight.detach() != 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pattern = target if isinstance(target, NMPattern) else None
    checks = []

    def check(method, row):
        for name, layer in method.layers.items():
            size = 4 if pattern else layer.numel
            counts = support_counts(layer.input_nonzero(), layer.repruned, layer.indices, pattern)
            assert torch.equal(counts, input_nz[name].reshape(-1, size).sum(1)), (row["step"], name)
            literal = layer.effective_weight(torch.float32)
            # every position without an entry (including all just dropped) holds its base value bit for bit
            free = torch.ones(layer.numel, dtype=torch.bool)
            free[layer.indices.long()] = False
            assert torch.equal(literal.view(-1)[free], layer.base_weight(torch.float32).view(-1)[free])
            assert int((literal != 0).sum()) <= int(input_nz[name].sum())
            if pattern:
                assert masks.nm_violations(literal, pattern) == 0
            assert layer.base.weight.grad is None and not layer.base.weight.requires_grad
        checks.append(row["step"])

    run = delta_run(model, SETTINGS, 30, tmp_path / "out", on_topology=check)
    method = run.method
    assert checks == [10, 20]
    first, second = run.state.topology
    assert first["replace_fraction"] == 1.0 and first["grown"] == first["dropped"] == TINY_LORA_R2
    assert first["reactivated"] > 0 and first["repruned"] > 0
    # later reselections replace round(k * 0.2 * (1 - step / steps)) entries per module
    assert second["replace_fraction"] == pytest.approx(0.2 * (1 - 20 / 30))
    assert second["dropped"] == second["grown"] == sum(round(k * 0.2 * (1 - 20 / 30)) for k in method.budgets.values())
    assert method.reactivated_count() == method.repruned_count() > 0  # every gained non-zero was paid for
    assert batch_loss(model, batches[0]) < before
    for name, p in model.named_parameters():
        assert p.grad is None, name  # optimizer.zero_grad cleared the deltas; nothing else ever had one
        assert p.requires_grad == name.endswith(".delta"), name

    # bytes measured from the tensors that exist, against the budget by hand: 4 B of fp32 gradient per entry (its
    # peak, measured while the gradients existed); m, v fp32 and a one-byte step cohort per entry, plus an int64
    # start per cohort (a few per module)
    memory = method.report().memory
    assert sum(method.budgets.values()) == TINY_LORA_R2
    assert memory["trainable_params"] == TINY_LORA_R2
    assert memory["grad_bytes"] == 4 * TINY_LORA_R2
    cohorts = sum(counts.starts.numel() for counts in method.adamw.steps.values())
    assert cohorts <= 3 * len(method.layers)
    assert memory["optimizer_state_bytes"] == 9 * TINY_LORA_R2 + 8 * cohorts
    assert memory["index_bytes"] == 4 * TINY_LORA_R2

    merged = method.merge()
    for name, mod in merged.named_modules():
        if name in input_nz:
            assert not isinstance(mod, DeltaLinear)
            if name in method.layers:
                assert int((mod.weight != 0).sum()) == int(input_nz[name].sum()), name
                if pattern:
                    assert masks.nm_violations(mod.weight, pattern) == 0


def test_dense_input_is_refused(one_thread, tmp_path):
    with pytest.raises(SparsetuneError, match="seft repairs a pruned model; run `sparsetune prune"):
        delta_run(make_tiny_model("llama"), SETTINGS, 2, tmp_path / "out")


def test_budget_larger_than_a_module_is_refused(one_thread, tmp_path):
    with pytest.raises(SparsetuneError, match=r"entries but it has only \d+ non-zero weights"):
        delta_run(pruned_tiny(0.5), DeltaSettings(delta_density=0.6), 2, tmp_path / "out")


def test_nf4_without_working_bitsandbytes_is_refused(monkeypatch, one_thread, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    with pytest.raises(SparsetuneError, match="--base-dtype nf4 needs a working bitsandbytes") as err:
        delta_run(pruned_tiny(0.5), DeltaSettings(delta_rank=2, base_dtype="nf4"), 2, tmp_path / "out")
    assert "\n" not in str(err.value)


class StopAfter18(Exception):
    pass


def test_resume_mid_window_is_bit_identical(one_thread, tmp_path):
    straight = delta_run(pruned_tiny(0.5), SETTINGS, 25, tmp_path / "straight").method

    ckpt = {"checkpoint_every": 18, "checkpoint_dir": str(tmp_path / "ckpt")}
    first = in_memory_seft(pruned_tiny(0.5), SETTINGS, 25, tmp_path / "first", **ckpt)
    first.setup()
    train_step = first.train_step

    def stop_after_18(step: int):
        result = train_step(step)
        if step == 18:  # the checkpoint of step 18, inside the window of steps 18-20, is written during step 19
            raise StopAfter18
        return result

    first.train_step = stop_after_18
    with pytest.raises(StopAfter18):
        first.train()
    saved = torch.load(tmp_path / "ckpt" / "checkpoint" / "optimizer.pt", weights_only=True)
    assert saved["windows"] and saved["window_steps"] == 1  # as of the end of step 18, before step 19's backward
    resumed_run = in_memory_seft(pruned_tiny(0.5), SETTINGS, 25, tmp_path / "resumed", resume=True, **ckpt)
    resumed_run.setup()
    assert resumed_run.state.step == 18
    resumed_run.train()
    resumed = resumed_run.method
    for name, layer in straight.layers.items():
        assert torch.equal(layer.indices, resumed.layers[name].indices)
        assert torch.equal(layer.delta, resumed.layers[name].delta)
        assert torch.equal(layer.repruned, resumed.layers[name].repruned)
    assert straight.totals == resumed.totals


def test_targets_and_eight_bit_state(one_thread, tmp_path):
    pytest.importorskip("bitsandbytes")
    settings = DeltaSettings(delta_rank=2, reselect_every=5, select_window=2, targets=["self_attn"], ignore=["o_proj"])
    run = delta_run(pruned_tiny(0.5), settings, 8, tmp_path / "out", optim="adamw8bit")
    method, memory = run.method, run.method.report().memory
    assert sorted(method.layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kqv"]
    total = 2 * 2 * (128 + 96 + 96)  # rank 2 * layers * (in + out) of q, k, v
    assert sum(method.budgets.values()) == total
    assert all(torch.isfinite(torch.tensor([row["loss"] for row in run.state.log])))
    # 8-bit m and v (1 byte each) plus a one-byte step cohort per entry, one fp32 absmax per 256-entry block of m
    # and v, and an int64 start per step cohort
    blocks = sum(-(-k // 256) for k in method.budgets.values())
    cohorts = sum(counts.starts.numel() for counts in method.adamw.steps.values())
    assert memory["optimizer_state_bytes"] == total * 3 + blocks * 2 * 4 + 8 * cohorts
    assert memory["grad_bytes"] == total * 4
