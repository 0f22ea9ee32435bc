"""The one calibration engine every method shares: block by block over the decoder layers.

For each block it makes one forward pass over the calibration samples (in mini-batches), in true-sequential
order: statistics for [q, k, v] from the block input -> prune them -> attention with the pruned q, k, v gives
the o_proj input -> prune o -> residual + norm give the [gate, up] input -> prune them -> act(gate) * up gives
the down input -> prune down -> the pruned block's output becomes the next block's input. Every sublayer is
computed once, except that `dense_down_stats` (Wanda's default) adds one gate/up matmul for down's statistic.
`sequential=False` is the reference two-pass behaviour (statistics from the dense block, then a second pass
through the pruned block).

A method is a module of pure functions: `init_stats(in_features, device)`, `accumulate(stats, x)` and
`prune_group(weights, stats, target, **options) -> pruned fp32 weights`. Linears that read the same input share
one statistic. `prune_group` may instead return `(weights, infos)`, one dict (or None) per weight; the engine
files each dict under the module's name in `EngineOptions.module_info` for the report. A statistic may be a
tensor or a tuple/list of tensors (all-reduced element by element).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import torch
from torch import nn

from sparsetune.distributed import sum_in_place
from sparsetune.masks import NMPattern
from sparsetune.prune.activations import ActivationStore, DiskTensor
from sparsetune.prune.checkpoint import Checkpointer

# Which input each Linear of a Llama-layout block reads; Linears of one group share a statistic.
GROUP_OF = {
    "self_attn.q_proj": "attn_in",
    "self_attn.k_proj": "attn_in",
    "self_attn.v_proj": "attn_in",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "mlp_in",
    "mlp.up_proj": "mlp_in",
    "mlp.down_proj": "mlp_mid",
}
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
GROUP_READER = {"attn_in": "self_attn.q_proj", "attn_out": "self_attn.o_proj", "mlp_in": "mlp.gate_proj"}
GROUP_READER["mlp_mid"] = "mlp.down_proj"


@dataclass
class BlockTargets:
    """The Linears to prune in one decoder block, by group: group -> [(full name, module)]."""

    index: int
    groups: dict[str, list[tuple[str, nn.Linear]]] = field(default_factory=dict)

    def modules(self) -> list[tuple[str, nn.Linear]]:
        return [item for group in GROUPS for item in self.groups.get(group, [])]


@dataclass
class EngineOptions:
    method: ModuleType
    target: float | NMPattern
    method_options: dict[str, Any]
    sequential: bool = True
    # Sequential engine: take down_proj's statistic from act(gate) * up before gate and up are pruned, in the
    # same loop that feeds their statistic (one extra gate/up matmul, no act(gate) * up cache).
    dense_down_stats: bool = False
    batch_size: int = 4
    device: torch.device = torch.device("cpu")
    # Cache act(gate)*up for the down_proj pass while it fits this budget; above it, recompute (slower, less memory).
    mlp_cache_bytes: int = 8 << 30
    block_targets: list[float | NMPattern] | None = None  # explicit per-block targets; None = uniform `target`
    owl_m: float | None = None  # set to compute per-block targets with OWL before pruning
    owl_lambda: float = 0.08
    store: ActivationStore | None = None  # where activations live (default: memory on the best device)
    checkpoint: Checkpointer | None = None
    resume: bool = False
    keep_placement: bool = False  # device_map runs: compute each block where accelerate placed it
    module_info: dict[str, dict[str, Any]] | None = None  # filled with each module's per-method info, when given


class _StopCapture(Exception):
    """Raised by the recorders once they have what they need, to skip the rest of the model."""


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer: records what the model passes to it and forwards nothing."""

    def __init__(self, index: int, sink: dict[str, Any], stop_at: int) -> None:
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink.setdefault("kwargs", {})[self.index] = kwargs
        if self.index == self.stop_at:
            raise _StopCapture
        return hidden_states


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _record(model: nn.Module, input_ids: torch.Tensor, stop_at: int) -> dict[str, Any]:
    layers = model.model.layers
    sink: dict[str, Any] = {}
    model.model.layers = nn.ModuleList(_LayerRecorder(i, sink, stop_at) for i in range(len(layers)))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopCapture:
        pass
    finally:
        model.model.layers = layers
    return sink


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device, store: ActivationStore
) -> tuple[torch.Tensor | DiskTensor, list[dict[str, Any]]]:
    """Hidden states entering block 0 for every sample (N, T, hidden), and each block's extra inputs.

    The extra inputs (attention mask, rotary embeddings, position ids) are recorded for every layer from one
    sample, since families like Qwen2 give sliding-window layers a different mask; batch-1 tensors broadcast.
    """
    n_layers = len(model.model.layers)
    head = [model.model.embed_tokens, model.model.rotary_emb]
    homes = [next(m.parameters(), torch.empty(0)).device for m in head]
    for m in head:
        m.to(device)
    try:
        layer_kwargs_map = _record(model, input_ids[:1].to(device), stop_at=n_layers - 1)["kwargs"]
        layer_kwargs = [layer_kwargs_map[i] for i in range(n_layers)]
        first = None
        for sl in batches(input_ids.shape[0], batch_size):
            hidden = _record(model, input_ids[sl].to(device), stop_at=0)["hidden"]
            if first is None:
                first = store.empty((input_ids.shape[0], *hidden.shape[1:]), hidden.dtype)
            first[sl] = hidden.to(first.device)
    finally:
        for m, home in zip(head, homes, strict=True):
            m.to(home)
    assert first is not None
    return first, layer_kwargs


def split_method_result(result: Any) -> tuple[list[torch.Tensor], list[dict[str, Any] | None]]:
    """A method's `prune_group` output as (weights, one info dict or None per weight)."""
    return result if isinstance(result, tuple) else (result, [None] * len(result))


def _prune_group(items: list[tuple[str, nn.Linear]], stats: Any, opts: EngineOptions) -> None:
    if not items:
        return
    weights = [module.weight.data for _, module in items]
    pruned, infos = split_method_result(opts.method.prune_group(weights, stats, opts.target, **opts.method_options))
    for (name, module), new, info in zip(items, pruned, infos, strict=True):
        module.weight.data.copy_(new.to(module.weight.dtype))
        if info is not None and opts.module_info is not None:
            opts.module_info[name] = info


def _accumulate_over(stats: Any, n: int, opts: EngineOptions, make_input: Callable[[slice], torch.Tensor]) -> Any:
    for sl in batches(n, opts.batch_size):
        opts.method.accumulate(stats, make_input(sl))
    return reduce_stats(stats)


def reduce_stats(stats: Any) -> Any:
    """Sum statistics over processes when calibration is sharded across ranks (no-op in one process)."""
    return sum_in_place(stats)


@torch.no_grad()
def prune_block_sequential(
    layer: nn.Module, X: torch.Tensor | DiskTensor, kwargs: dict[str, Any], targets: BlockTargets, opts: EngineOptions
) -> None:
    """Prune one block in true-sequential order with one pass of compute; X becomes the block output in place."""
    dev, n = opts.device, X.shape[0]
    attn, mlp = layer.self_attn, layer.mlp
    groups = targets.groups
    init = opts.method.init_stats

    def to_dev(t: torch.Tensor) -> torch.Tensor:
        return t.to(dev, non_blocking=True)

    # 1. q, k, v read the normed block input.
    if groups.get("attn_in"):
        stats = init(X.shape[-1], dev)
        _accumulate_over(stats, n, opts, lambda sl: layer.input_layernorm(to_dev(X[sl])))
        _prune_group(groups["attn_in"], stats, opts)

    # 2. o_proj reads the attention output computed with the pruned q, k, v. o_proj is swapped for an
    #    identity while capturing, so its dense matmul is never computed.
    o_proj = attn.o_proj
    store = opts.store or ActivationStore("memory", X.device)
    A = store.empty((*X.shape[:-1], o_proj.in_features), X.dtype)
    prune_o = bool(groups.get("attn_out"))
    stats = init(o_proj.in_features, dev) if prune_o else None
    attn.o_proj = nn.Identity()
    try:
        for sl in batches(n, opts.batch_size):
            a = attn(hidden_states=layer.input_layernorm(to_dev(X[sl])), **kwargs)[0]
            if prune_o:
                opts.method.accumulate(stats, a)
            A[sl] = a.to(A.device)
    finally:
        attn.o_proj = o_proj
    if prune_o:
        _prune_group(groups["attn_out"], reduce_stats(stats), opts)

    # 3. gate and up read the normed residual stream after the pruned attention. With `dense_down_stats`, down's
    #    statistic comes from this loop too: act(gate) * up with gate and up not yet pruned.
    H1 = A if o_proj.in_features == X.shape[-1] else store.empty(tuple(X.shape), X.dtype)
    prune_mlp_in = bool(groups.get("mlp_in"))
    prune_down = bool(groups.get("mlp_mid"))
    down_early = prune_down and opts.dense_down_stats
    stats = init(X.shape[-1], dev) if prune_mlp_in else None
    down_stats = init(mlp.down_proj.in_features, dev) if down_early else None
    for sl in batches(n, opts.batch_size):
        h1 = to_dev(X[sl]) + o_proj(to_dev(A[sl]))
        if prune_mlp_in or down_early:
            hn = layer.post_attention_layernorm(h1)
            if prune_mlp_in:
                opts.method.accumulate(stats, hn)
            if down_early:
                opts.method.accumulate(down_stats, mlp.act_fn(mlp.gate_proj(hn)) * mlp.up_proj(hn))
        H1[sl] = h1.to(H1.device)
    if prune_mlp_in:
        _prune_group(groups["mlp_in"], reduce_stats(stats), opts)
    if down_early:
        _prune_group(groups["mlp_mid"], reduce_stats(down_stats), opts)

    # 4. down reads act(gate) * up computed with the pruned gate and up.
    def mlp_mid(sl: slice) -> torch.Tensor:
        hn = layer.post_attention_layernorm(to_dev(H1[sl]))
        return mlp.act_fn(mlp.gate_proj(hn)) * mlp.up_proj(hn)

    if prune_down and not down_early:
        inter = mlp.down_proj.in_features
        z_bytes = n * X.shape[1] * inter * X.element_size() if store.mode != "disk" else 0
        Z = (
            torch.empty((*X.shape[:-1], inter), dtype=X.dtype, device=X.device)
            if z_bytes <= opts.mlp_cache_bytes
            else None
        )
        stats = init(inter, dev)
        for sl in batches(n, opts.batch_size):
            z = mlp_mid(sl)
            opts.method.accumulate(stats, z)
            if Z is not None:
                Z[sl] = z.to(Z.device)
        _prune_group(groups["mlp_mid"], reduce_stats(stats), opts)
        # 5. The block output (residual + pruned down) overwrites the block input.
        for sl in batches(n, opts.batch_size):
            z = to_dev(Z[sl]) if Z is not None else mlp_mid(sl)
            X[sl] = (to_dev(H1[sl]) + mlp.down_proj(z)).to(X.device)
    else:
        for sl in batches(n, opts.batch_size):
            X[sl] = (to_dev(H1[sl]) + mlp.down_proj(mlp_mid(sl))).to(X.device)


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune_block_two_pass(
    layer: nn.Module, X: torch.Tensor | DiskTensor, kwargs: dict[str, Any], targets: BlockTargets, opts: EngineOptions
) -> None:
    """Reference semantics: every statistic from the dense block, prune all, then run the pruned block."""
    dev, n = opts.device, X.shape[0]
    stats = _dense_group_stats(layer, X, kwargs, targets, opts)
    for group in GROUPS:
        if group in stats:
            _prune_group(targets.groups[group], stats[group], opts)
    for sl in batches(n, opts.batch_size):
        X[sl] = _layer_output(layer(X[sl].to(dev), **kwargs)).to(X.device)


def _dense_group_stats(
    layer: nn.Module, X: torch.Tensor | DiskTensor, kwargs: dict[str, Any], targets: BlockTargets, opts: EngineOptions
) -> dict[str, Any]:
    """Statistics of every targeted group from one forward pass of the block as it is (all-reduced)."""
    dev, n = opts.device, X.shape[0]
    stats: dict[str, Any] = {}
    hooks = []
    for group, items in targets.groups.items():
        if not items:
            continue
        reader = layer.get_submodule(GROUP_READER[group])
        stats[group] = opts.method.init_stats(reader.in_features, dev)

        def hook(_mod: nn.Module, args: tuple[Any, ...], group: str = group) -> None:
            opts.method.accumulate(stats[group], args[0])

        hooks.append(reader.register_forward_pre_hook(hook))
    try:
        for sl in batches(n, opts.batch_size):
            layer(X[sl].to(dev), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return {group: reduce_stats(value) for group, value in stats.items()}


@torch.no_grad()
def prune_head(
    model: nn.Module, X: torch.Tensor | DiskTensor, head: tuple[str, nn.Linear], opts: EngineOptions
) -> None:
    """Prune lm_head (only when explicitly targeted) from the final-norm output of the pruned blocks."""
    norm = model.model.norm
    home = next(norm.parameters()).device
    norm.to(opts.device)
    stats = opts.method.init_stats(head[1].in_features, opts.device)
    _accumulate_over(stats, X.shape[0], opts, lambda sl: norm(X[sl].to(opts.device)))
    norm.to(home)
    _prune_group([head], stats, opts)


def run_blocks(
    model: nn.Module,
    input_ids: torch.Tensor,
    blocks: list[BlockTargets],
    head: tuple[str, nn.Linear] | None,
    opts: EngineOptions,
    on_block_done: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Run the engine over every block; returns phase timings (seconds) and the per-block targets used."""
    if opts.store is None:
        opts = replace(opts, store=ActivationStore("memory", activation_device(model, input_ids, opts.device)))
    assert opts.store is not None
    t0 = time.perf_counter()
    X, layer_kwargs = capture_block_inputs(model, input_ids, opts.batch_size, opts.device, opts.store)
    result: dict[str, Any] = {"capture_s": time.perf_counter() - t0}
    layers = model.model.layers
    start = 0
    if opts.resume and opts.checkpoint is not None and opts.checkpoint.exists():
        start, targets = opts.checkpoint.restore(model, X)
        result["resumed_from_block"] = start
        if opts.module_info is not None:  # the finished blocks' per-module info
            opts.module_info.update(opts.checkpoint.load_state().get("module_info", {}))
    elif opts.block_targets is not None:
        targets = list(opts.block_targets)
    elif opts.owl_m is not None:
        t0 = time.perf_counter()
        targets, result["owl_outlier_ratios"] = owl_targets(model, X, layer_kwargs, blocks, opts)
        result["owl_s"] = time.perf_counter() - t0
    else:
        targets = [opts.target] * len(layers)
    prune_block = prune_block_sequential if opts.sequential else prune_block_two_pass
    t_blocks = time.perf_counter()
    for i in range(start, len(layers)):
        t_block = time.perf_counter()
        with _block_on_device(layers[i], opts) as dev:
            block_opts = replace(opts, target=targets[i], device=dev)
            prune_block(layers[i], X, _on_device(layer_kwargs[i], dev), blocks[i], block_opts)
        if opts.checkpoint is not None:
            opts.checkpoint.save(i, layers[i], X, targets, opts.module_info)
        if on_block_done is not None:
            on_block_done(i, time.perf_counter() - t_block)
    result["blocks_s"] = time.perf_counter() - t_blocks
    result["block_targets"] = [str(t) if isinstance(t, NMPattern) else float(t) for t in targets]
    if head is not None:
        t_head = time.perf_counter()
        prune_head(model, X, head, opts)
        result["head_s"] = time.perf_counter() - t_head
    return result


class _block_on_device:  # noqa: N801 - a context manager
    """Move a block to the compute device for its turn (or keep accelerate's placement), then back home."""

    def __init__(self, layer: nn.Module, opts: EngineOptions) -> None:
        self.layer, self.opts = layer, opts
        self.home = next(layer.parameters()).device

    def __enter__(self) -> torch.device:
        if self.opts.keep_placement:
            return self.home
        self.layer.to(self.opts.device)
        return self.opts.device

    def __exit__(self, *exc: Any) -> None:
        if not self.opts.keep_placement:
            self.layer.to(self.home)


@torch.no_grad()
def owl_targets(
    model: nn.Module,
    X: torch.Tensor | DiskTensor,
    layer_kwargs: list[dict[str, Any]],
    blocks: list[BlockTargets],
    opts: EngineOptions,
) -> tuple[list[float | NMPattern], list[float]]:
    """OWL pre-pass through the dense model: each block's Wanda outlier ratio, then per-block targets."""
    from sparsetune.prune import owl, wanda

    assert opts.store is not None and opts.owl_m is not None
    H = opts.store.copy(X)
    ratios, sizes = [], []
    for i, layer in enumerate(model.model.layers):
        with _block_on_device(layer, opts) as dev:
            kwargs = _on_device(layer_kwargs[i], dev)
            stats = _dense_group_stats(layer, H, kwargs, blocks[i], replace(opts, method=wanda, device=dev))
            scores = [wanda.scores(m.weight.data, stats[g]) for g, items in blocks[i].groups.items() for _, m in items]
            ratios.append(owl.outlier_ratio(scores, opts.owl_m))
            sizes.append(sum(m.weight.numel() for _, m in blocks[i].modules()))
            for sl in batches(H.shape[0], opts.batch_size):
                H[sl] = _layer_output(layer(H[sl].to(dev), **kwargs)).to(H.device)
    if isinstance(H, DiskTensor):
        H.close()
    uniform = opts.target.sparsity if isinstance(opts.target, NMPattern) else float(opts.target)
    sparsities = owl.block_sparsities(ratios, sizes, uniform, opts.owl_lambda)
    if isinstance(opts.target, NMPattern):
        return list(owl.block_patterns(sparsities, opts.target)), ratios
    return list(sparsities), ratios


def activation_device(model: nn.Module, input_ids: torch.Tensor, device: torch.device) -> torch.device:
    """Keep activations on the compute device when about 3 copies fit in half its free memory, else on CPU."""
    if device.type != "cuda":
        return torch.device("cpu")
    cfg = model.config
    per_token = (2 * cfg.hidden_size + cfg.intermediate_size) * torch.finfo(model.dtype).bits // 8
    need = input_ids.numel() * per_token
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


def _on_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_on_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_on_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _on_device(v, device) for k, v in obj.items()}
    return obj
