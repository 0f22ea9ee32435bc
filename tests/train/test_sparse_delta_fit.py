"""Sparse-delta fine-tuning end to end on a tiny Llama pruned to 50% and to 2:4."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_model, pruned_tiny, token_batches
from torch import nn

from sparsetune import masks
from sparsetune.errors import SparsetuneError
from sparsetune.patterns import NMPattern
from sparsetune.train.sparse_delta.config import DeltaSettings
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear
from sparsetune.train.sparse_delta.fit import fit
from sparsetune.train.sparse_delta.reprune import support_counts

TINY_LORA_R2 = (
    2 * 2 * (128 + 96 + 96 + 128 + 192 + 192 + 192)
)  # rank 2 * layers * sum(in + out) of q k v o gate up down


def batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


SETTINGS = DeltaSettings(delta_rank=2, reselect_every=10, select_window=3, reactivate=True)


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)], ids=["50%", "2:4"])
def test_fit_keeps_sparsity_exact_and_learns(target, one_thread):
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

    method, result = fit(model, batches, SETTINGS, 30, lr=1e-2, on_reselection=check)
    assert checks == [10, 20]
    first, second = result.reselections
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

    # bytes measured from the tensors that exist, against the budget by hand: 4 B of fp32 gradient per entry;
    # m, v fp32 and a one-byte step cohort per entry, plus an int64 start per cohort (a few per module)
    assert sum(method.budgets.values()) == TINY_LORA_R2
    assert result.memory["trainable_params"] == TINY_LORA_R2
    assert result.memory["grad_bytes"] == 4 * TINY_LORA_R2
    cohorts = sum(counts.starts.numel() for counts in method.optimizer.steps.values())
    assert cohorts <= 3 * len(method.layers)
    assert result.memory["optimizer_state_bytes"] == 9 * TINY_LORA_R2 + 8 * cohorts
    assert result.memory["index_bytes"] == 4 * TINY_LORA_R2

    merged = method.merge()
    for name, mod in merged.named_modules():
        if name in input_nz:
            assert not isinstance(mod, DeltaLinear)
            if name in method.layers:
                assert int((mod.weight != 0).sum()) == int(input_nz[name].sum()), name
                if pattern:
                    assert masks.nm_violations(mod.weight, pattern) == 0


def test_dense_input_is_refused(one_thread):
    with pytest.raises(SparsetuneError, match="seft repairs a pruned model; run `sparsetune prune"):
        fit(make_tiny_model("llama"), token_batches(1), SETTINGS, 2)


def test_budget_larger_than_a_module_is_refused(one_thread):
    with pytest.raises(SparsetuneError, match=r"entries but it has only \d+ non-zero weights"):
        fit(pruned_tiny(0.5), token_batches(1), DeltaSettings(delta_density=0.6), 2)


def test_nf4_without_working_bitsandbytes_is_refused(monkeypatch, one_thread):
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes.functional", None)
    with pytest.raises(SparsetuneError, match="--base-dtype nf4 needs a working bitsandbytes") as err:
        fit(pruned_tiny(0.5), token_batches(1), DeltaSettings(delta_rank=2, base_dtype="nf4"), 2)
    assert "\n" not in str(err.value)


def _run(method, model, batches, steps, start=1):
    for step in range(start, steps + 1):
        method.before_step(step)
        model(**batches[(step - 1) % len(batches)]).loss.backward()
        method.optimizer.step()
        method.after_step(step)
        method.optimizer.zero_grad()


def test_resume_mid_window_is_bit_identical(one_thread):
    from sparsetune.train.sparse_delta.method import SparseDelta

    batches = token_batches()
    straight_model = pruned_tiny(0.5)
    straight = SparseDelta(straight_model, SETTINGS, 25, lr=1e-2)
    _run(straight, straight_model, batches, 25)

    first_model = pruned_tiny(0.5)
    first = SparseDelta(first_model, SETTINGS, 25, lr=1e-2)
    _run(first, first_model, batches, 18)  # stop inside the window of steps 18-20
    saved = first.state_dict()
    assert saved["windows"] and saved["window_steps"] == 1
    resumed_model = pruned_tiny(0.5)
    resumed = SparseDelta(resumed_model, SETTINGS, 25, lr=1e-2, seed=7)  # another start: the state overrides it
    resumed.load_state_dict(saved)
    _run(resumed, resumed_model, batches, 25, start=19)
    for name, layer in straight.layers.items():
        assert torch.equal(layer.indices, resumed.layers[name].indices)
        assert torch.equal(layer.delta, resumed.layers[name].delta)
        assert torch.equal(layer.repruned, resumed.layers[name].repruned)
    assert straight.totals == resumed.totals


def test_targets_and_eight_bit_state(one_thread):
    pytest.importorskip("bitsandbytes")
    settings = DeltaSettings(delta_rank=2, reselect_every=5, select_window=2, targets=["self_attn"], ignore=["o_proj"])
    method, result = fit(pruned_tiny(0.5), token_batches(), settings, 8, lr=1e-2, eight_bit=True)
    assert sorted(method.layers) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "kqv"]
    total = 2 * 2 * (128 + 96 + 96)  # rank 2 * layers * (in + out) of q, k, v
    assert sum(method.budgets.values()) == total
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # 8-bit m and v (1 byte each) plus a one-byte step cohort per entry, one fp32 absmax per 256-entry block of m
    # and v, and an int64 start per step cohort
    blocks = sum(-(-k // 256) for k in method.budgets.values())
    cohorts = sum(counts.starts.numel() for counts in method.optimizer.steps.values())
    assert result.memory["optimizer_state_bytes"] == total * 3 + blocks * 2 * 4 + 8 * cohorts
    assert result.memory["grad_bytes"] == total * 4
