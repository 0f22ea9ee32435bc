"""Module surgery: plan the targeted Linears, swap them for DeltaLinear, and swap merged Linears back.

(Which Linears are targeted is `method.select_targets`, through `sparsetune.structure` as prune's targets are.)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from sparsetune.errors import SparsetuneError
from sparsetune.patterns import NMPattern
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear, pack_bits, quantize_nf4, require_bitsandbytes
from sparsetune.train.sparse_delta.reprune import support_mask

DENSE_BELOW = 0.01  # a module with under 1% zeros was not pruned
NM_CANDIDATES = (4, 8, 16)  # group sizes M tried when reading an N:M pattern off a weight
BASE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModulePlan:
    """What one targeted Linear must keep: its non-zero count in the input and its N:M pattern (or None)."""

    name: str
    shape: tuple[int, int]
    target: int
    pattern: NMPattern | None


def detect_pattern(weight: torch.Tensor) -> NMPattern | None:
    """The N:M pattern a weight follows (smallest M first), or None: every group of M input columns holds at
    most N non-zeros and the weight holds (almost) N/M of its entries, N < M."""
    rows, cols = weight.shape
    nonzero = weight != 0
    total = int(nonzero.sum())
    for m in NM_CANDIDATES:
        if cols % m:
            continue
        n = int(nonzero.view(rows, cols // m, m).sum(dim=2).max())
        if n < m and total >= 0.99 * weight.numel() * n / m:
            return NMPattern(n, m)
    return None


def module_plan(name: str, weight: torch.Tensor) -> ModulePlan:
    """The target (non-zero count) and N:M pattern read off one input weight."""
    w = weight.detach()
    return ModulePlan(name, tuple(w.shape), int((w != 0).sum()), detect_pattern(w))


def plan_modules(modules: dict[str, nn.Linear]) -> dict[str, ModulePlan]:
    """Targets and patterns read off the input weights; refuse a dense input model."""
    return check_sparse({name: module_plan(name, mod.weight) for name, mod in modules.items()})


def check_sparse(plans: dict[str, ModulePlan]) -> dict[str, ModulePlan]:
    """`plans`, unless every targeted Linear is dense (the input was not pruned)."""
    if not any(p.target <= (1 - DENSE_BELOW) * p.shape[0] * p.shape[1] for p in plans.values()):
        raise SparsetuneError(
            "the targeted Linears are dense (under 1% zeros): seft repairs a pruned model; "
            "run `sparsetune prune MODEL -o PRUNED` first and fine-tune PRUNED"
        )
    return plans


def weight_identity(weight: torch.Tensor) -> dict[str, str]:
    """Identity of an input weight: shape, a hash of its zero pattern, and a hash of its values rounded to bf16
    (so the same model loaded in fp32 or bf16 matches)."""
    w = weight.detach()
    mask_hash = hashlib.blake2b(pack_bits(w != 0).cpu().numpy().tobytes(), digest_size=16).hexdigest()
    value_bytes = w.to(torch.bfloat16).view(torch.int16).cpu().numpy().tobytes()
    return {
        "shape": "x".join(map(str, w.shape)),
        "mask_blake2b": mask_hash,
        "bf16_blake2b": hashlib.blake2b(value_bytes, digest_size=16).hexdigest(),
    }


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def make_base(linear: nn.Linear, base_dtype: str) -> tuple[nn.Module, torch.Tensor | None]:
    """The frozen base module in `base_dtype` (auto keeps the input's), and the input's non-zero bitmap when the
    base is NF4 (whose 4-bit values may round small non-zeros to 0)."""
    if base_dtype == "nf4":
        return quantize_nf4(linear), pack_bits(linear.weight.detach() != 0)
    if base_dtype != "auto" and linear.weight.dtype != BASE_DTYPES[base_dtype]:
        linear = linear.to(BASE_DTYPES[base_dtype])  # a copy in the new dtype; the caller swaps it in
    return linear, None


def random_entries(nonzero: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k distinct flat positions drawn uniformly among the non-zeros (so the start adds no non-zero)."""
    positions = nonzero.reshape(-1).nonzero().squeeze(1)
    pick = torch.randperm(positions.numel(), generator=generator)[:k].to(positions.device)
    return positions[pick]


def wrap_model(
    model: nn.Module,
    modules: dict[str, nn.Linear],
    budgets: dict[str, int],
    base_dtype: str = "auto",
    seed: int = 0,
) -> dict[str, DeltaLinear]:
    """Replace each named Linear by a DeltaLinear with `budgets[name]` entries at random non-zero positions.
    Every other parameter of the model is frozen."""
    if base_dtype == "nf4":
        require_bitsandbytes(next(iter(modules.values())).weight.device)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    return {
        name: swap_in_delta(model, name, linear, budgets[name], base_dtype, generator)
        for name, linear in modules.items()
    }


def swap_in_delta(
    model: nn.Module, name: str, linear: nn.Linear, k: int, base_dtype: str, generator: torch.Generator
) -> DeltaLinear:
    """Replace the Linear `name` of `model` by its DeltaLinear: everything seft derives from the input weight (its
    identity, the base, the non-zero bitmap of an NF4 base and the non-zeros NF4 reads as 0, and k entries drawn
    from `generator` at random non-zero positions) is taken here, so the caller may let the input weight go.
    Both loading paths (the whole model, or one block at a time) wrap through this, in the same module order and
    with one generator, so their draws are the same."""
    input_dtype = linear.weight.dtype
    identity = weight_identity(linear.weight)
    base, support = make_base(linear, base_dtype)
    layer = DeltaLinear(base, k, input_dtype, support)
    layer.identity = identity
    with torch.no_grad():
        layer.indices.copy_(random_entries(linear.weight.detach() != 0, k, generator))
        if support is not None:
            layer.nf4_zeroed = nf4_zeroed_weights(linear.weight.detach(), layer.base_weight(torch.float32))
    parent, child = _parent(model, name)
    setattr(parent, child, layer)
    return layer


def nf4_zeroed_weights(weight: torch.Tensor, dequantized: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions and input values of the non-zeros that NF4 reads as 0 (under about 4% of their 64-weight
    block's largest): few, so kept exactly, for the merge to give back the input's sparsity."""
    positions = ((weight != 0) & (dequantized == 0)).reshape(-1).nonzero().squeeze(1)
    return positions, weight.reshape(-1)[positions].clone()


@torch.no_grad()
def merged_weight(layer: DeltaLinear) -> torch.Tensor:
    """The layer's merged weight in the input's dtype: base plus deltas, re-pruned positions 0."""
    weight = layer.effective_weight(torch.float32)
    if layer.nf4_zeroed is not None:
        # Input non-zeros that the 4-bit base read as 0 take back their input values (under any delta) unless
        # re-pruned, so the merged model keeps the input's sparsity. Each is below half an NF4 step, the rounding
        # the training-time model already differs from the input by at every weight.
        positions, values = layer.nf4_zeroed
        back = ~torch.isin(positions, layer.repruned)
        weight.view(-1)[positions[back]] += values[back].float()
    return weight.to(layer.input_dtype)


@torch.no_grad()
def merge_model(model: nn.Module, layers: dict[str, DeltaLinear]) -> nn.Module:
    """In place: replace every DeltaLinear by a plain nn.Linear holding its merged weight in the input's dtype (an
    NF4 base is merged into a dequantized copy, never re-quantized; see `nf4_zeroed_weights`). Returns the model.

    A base in the input's dtype becomes the merged Linear, written in place; any other base (bf16/fp32 conversion,
    NF4) is let go as soon as its merged Linear exists. Either way the merge holds one module's weight twice at
    most, not the model's (keeping the bases made the end of a run its memory peak). What a run reads after the merge
    (the layer's non-zeros, reactivated entries and untrained zeros) is recorded first in `layer.merged_counts`.
    """
    for name, layer in layers.items():
        weight = merged_weight(layer)
        layer.merged_counts = merged_counts(layer, weight)
        if isinstance(layer.base, nn.Linear) and layer.base.weight.dtype == layer.input_dtype:
            # The base is the input Linear: merge into its own storage. A weight loaded from safetensors on CPU is a
            # copy-on-write view of the file's mapping, which other tensors keep alive, so swapping in a new tensor
            # would leave the old pages resident (bench/results/seft.jsonl, suite memory, config 1B, run seft: the
            # peak_rss_bytes of the rows before and after this merge went in place); the write copies each page
            # once, and the file is never written.
            linear = layer.base
            linear.weight.copy_(weight)
            del weight
        else:
            # built on the meta device: a real nn.Linear would first fill a random init, then be overwritten
            bias = layer.base.bias
            linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias.detach().to(layer.input_dtype), requires_grad=False)
        parent, child = _parent(model, name)
        setattr(parent, child, linear)
        layer.base = None
    return model


def merged_counts(layer: DeltaLinear, merged: torch.Tensor) -> dict[str, int]:
    """Counts over the layer's support (input non-zeros not re-pruned, plus the entries' positions): its size, the
    entries on positions the base read as 0 (reactivated), and support positions whose merged weight is exactly 0
    (an untouched reactivated entry, or a delta that cancels its base value)."""
    support = support_mask(layer.input_nonzero(), layer.repruned, layer.indices)
    return {
        "nonzero": int(support.sum()),
        "reactivated": int(layer.zero_in_base(layer.indices).sum()),
        "untrained_zeros": int((support & (merged.reshape(-1) == 0)).sum()),
    }
