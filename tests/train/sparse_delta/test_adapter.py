"""Merge and seft_adapter.safetensors: merged logits equal training-time logits, round trip, wrong base, NF4."""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path

import pytest
import torch
from helpers import delta_run, pruned_tiny, token_batches
from safetensors import safe_open
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE, apply_adapter, load_with_adapter
from sparsetune.train.sparse_delta.config import DeltaSettings

SETTINGS = DeltaSettings(delta_rank=2, reselect_every=5, select_window=2, reactivate=True)


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"]).logits


def _trained(out: Path, base_dtype: str = "auto", target=0.5, steps: int = 12):
    """The input model, the model trained on the real loop (not merged) and its method."""
    model = pruned_tiny(target)
    base = copy.deepcopy(model)
    settings = SETTINGS.model_copy(update={"base_dtype": base_dtype})
    method = delta_run(model, settings, steps, out).method
    return base, model, method


@pytest.mark.parametrize("base_dtype", ["auto", "bf16"])
def test_merged_and_applied_logits_equal_training_time(tmp_path, base_dtype, one_thread):
    base, model, method = _trained(tmp_path / "run", base_dtype)
    batch = token_batches(1, seed=5)[0]
    training_time = logits(model, batch)
    path = tmp_path / ADAPTER_FILE
    method.save_adapter(str(path))
    merged = method.merge()
    # the merged Linear holds the very weight the training-time forward built: the logits are identical
    assert torch.equal(logits(merged, batch), training_time)
    for name in method.layers:
        assert merged.get_submodule(name).weight.dtype == torch.float32  # the input's dtype

    applied = copy.deepcopy(base)
    apply_adapter(applied, path)
    assert torch.equal(logits(applied, batch), training_time)
    for name in method.layers:
        assert torch.equal(applied.get_submodule(name).weight, merged.get_submodule(name).weight)


@pytest.mark.parametrize("base_dtype", ["auto", "bf16"])
def test_merge_releases_the_bases_and_keeps_the_counts(base_dtype, one_thread, tmp_path):
    """After the merge no weight is held twice (the model is not held twice at the end of a run): a base in the
    input's dtype holds the merged weight in its own storage (a safetensors-loaded weight is a view of the file's
    mapping, whose pages a new tensor would not free), any other base is released. What a run reads after the merge
    (non-zeros, reactivated entries, untrained zeros) is what it read before."""
    _, _, method = _trained(tmp_path / "run", base_dtype)
    before = (method.nonzero_counts(), method.reactivated_count())
    assert before[1] > 0  # the run reactivated pruned weights: the counts below are not trivially 0
    layer = next(iter(method.layers.values()))
    merged_by_hand = layer.base.weight.detach().float().clone().view(-1)
    merged_by_hand[layer.repruned] = 0
    merged_by_hand[layer.indices.long()] += layer.delta.detach()
    support = layer.base.weight.detach().reshape(-1) != 0
    support[layer.repruned] = False
    support[layer.indices.long()] = True
    zeros_by_hand = int((support & (merged_by_hand.to(layer.input_dtype) == 0)).sum())
    bases = {name: weakref.ref(layer.base.weight) for name, layer in method.layers.items()}
    storage = {name: layer.base.weight.untyped_storage().data_ptr() for name, layer in method.layers.items()}
    model = method.merge()
    gc.collect()
    for name, merged_layer in method.layers.items():
        assert merged_layer.base is None
        weight = model.get_submodule(name).weight
        if base_dtype == "auto":  # merged in place
            assert weight.untyped_storage().data_ptr() == storage[name]
        else:  # a bf16 base under an fp32 input: a new fp32 weight, the base freed
            assert bases[name]() is None and weight.dtype == torch.float32
    name = next(iter(method.layers))
    assert torch.equal(model.get_submodule(name).weight.view(-1), merged_by_hand.to(layer.input_dtype))
    assert (method.nonzero_counts(), method.reactivated_count()) == before
    assert layer.merged_counts["untrained_zeros"] == zeros_by_hand


def test_adapter_file_contents(tmp_path, one_thread):
    _, _, method = _trained(tmp_path / "run", target=0.5)
    path = tmp_path / ADAPTER_FILE
    method.save_adapter(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        name = "model.layers.1.mlp.down_proj"
        layer = method.layers[name]
        assert torch.equal(f.get_tensor(f"{name}.indices"), layer.indices)
        assert torch.equal(f.get_tensor(f"{name}.deltas"), layer.delta.detach())
        assert torch.equal(f.get_tensor(f"{name}.repruned"), layer.repruned)
    assert keys == {f"{n}.{part}" for n in method.layers for part in ("indices", "deltas", "repruned")}
    import json

    config = json.loads(meta["config"])
    assert meta["format"] == "sparsetune-seft-adapter/1"
    assert config["budget"]["total"] == sum(method.budgets.values())
    assert config["settings"]["delta_rank"] == 2 and config["base_dtype"] == "auto"
    assert config["modules"][name]["shape"] == "64x128" and len(config["modules"][name]["mask_blake2b"]) == 32


def test_adapter_on_a_different_base_is_refused(tmp_path, one_thread):
    _, _, method = _trained(tmp_path / "run")
    path = tmp_path / ADAPTER_FILE
    method.save_adapter(str(path))
    with pytest.raises(SparsetuneError, match="different base: .* differs in its zero pattern"):
        apply_adapter(pruned_tiny(0.5, seed=1), path)
    with pytest.raises(SparsetuneError, match="different base: .* differs in its zero pattern"):
        apply_adapter(pruned_tiny(0.6), path)  # same weights, more pruned
    same_mask = pruned_tiny(0.5)
    with torch.no_grad():
        same_mask.model.layers[0].self_attn.q_proj.weight.mul_(1.5)
    with pytest.raises(SparsetuneError, match="different base: .* differs in its weights"):
        apply_adapter(same_mask, path)
    from helpers import make_tiny_model

    with pytest.raises(SparsetuneError, match="different base: .* differs in its shape"):
        apply_adapter(make_tiny_model("llama", hidden_size=32, intermediate_size=64), path)


def test_load_with_adapter_from_a_model_dir(tmp_path, one_thread):
    base, model, method = _trained(tmp_path / "run")
    base.save_pretrained(tmp_path / "base")
    method.save_adapter(str(tmp_path / ADAPTER_FILE))
    batch = token_batches(1, seed=5)[0]
    loaded = load_with_adapter(tmp_path / "base", tmp_path)
    assert torch.equal(logits(loaded, batch), logits(model, batch))


def test_nf4_base_trains_keeps_sparsity_and_merges_dequantized(tmp_path, one_thread):
    pytest.importorskip("bitsandbytes")
    base, model, method = _trained(tmp_path / "run", "nf4", target=0.5)
    for layer in method.layers.values():
        assert type(layer.base.weight).__name__ == "Params4bit"
    assert method.nonzero_counts() == method.targets()
    batch = token_batches(1, seed=5)[0]
    training_time = logits(model, batch)
    path = tmp_path / ADAPTER_FILE
    method.save_adapter(str(path))
    merged = method.merge()
    for name in method.layers:
        w = merged.get_submodule(name).weight
        assert type(w).__name__ == "Parameter" and w.dtype == torch.float32  # dequantized, never re-quantized
    torch.testing.assert_close(logits(merged, batch), training_time)
    applied = copy.deepcopy(base)
    apply_adapter(applied, path)  # re-quantizes the input the same way: the same model
    assert torch.equal(logits(applied, batch), logits(merged, batch))
