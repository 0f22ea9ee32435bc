"""The one calibration engine every method shares: block by block over the decoder layers of any causal LM.

Targets are 2-D [out, in] matrices (`structure.Target`): Linears, transformers' Conv1D (its weight transposed) and each
expert's slice of a fused 3-D expert parameter. Per block, targets that read the same input tensor form a group
sharing one statistic, and groups run in true-sequential order: each group is calibrated on the output of the
already-pruned ones. Two paths compute that:

- The Llama-layout fast path (the families in `structure.SUPPORTED_FAMILIES`, whose block forward is known): one pass
  of compute per block: statistics for [q, k, v] from the block input -> prune them -> attention with the pruned
  q, k, v gives the o_proj input -> prune o -> residual + norm give the [gate, up] input -> prune them ->
  act(gate) * up gives the down input -> prune down -> the pruned block's output becomes the next block's input.
  `dense_down_stats` (Wanda's default) adds one gate/up matmul for down's statistic.
- The generic path (every other block): the groups and their order are derived once per block structure from
  the forward execution order of the targets (forward pre-hooks, and a wrapper around fused experts modules),
  recorded on one calibration sample. Each stage then runs the block forward on every sample until its last
  reader has seen its input (the rest of the block is skipped), prunes, and a last pass through the pruned block
  gives the block output. Expert slices: every expert's statistic comes from the tokens routed to it, each token's
  input scaled by its routing weight (Wanda's norms and SparseGPT's Hessian are quadratic in the input, so this
  weights a token as the expert's contribution to the layer output does); `moe_calibrate="all"` feeds every token
  to every expert, for statistics only. A group no calibration token reaches is pruned by magnitude, with a warning.

`sequential=False` is the reference two-pass behaviour (statistics from the dense block, then a second pass
through the pruned block). A method needing no calibration (magnitude) prunes every target on its own, with no
forward pass at all.

A method is a module of pure functions: `init_stats(in_features, device)`, `accumulate(stats, x)` and
`prune_group(weights, stats, target, **options) -> pruned fp32 weights`. `prune_group` may instead return
`(weights, infos)`, one dict (or None) per weight; the engine files each dict under the target's name in
`EngineOptions.module_info` for the report. A statistic may be a tensor or a tuple/list of tensors (all-reduced
element by element).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any, Protocol

import torch
from torch import nn

from sparsetune import structure
from sparsetune.distributed import sum_in_place
from sparsetune.errors import SparsetuneError
from sparsetune.masks import NMPattern
from sparsetune.prune import magnitude, owl, wanda
from sparsetune.prune.activations import ActivationStore, DiskTensor
from sparsetune.prune.checkpoint import Checkpointer

# The Llama-layout fast path: which input each Linear of the block reads; Linears of one group share a statistic.
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

Item = tuple[str, structure.Target]


@dataclass
class BlockTargets:
    """The targets to prune in one decoder block. `groups` is set for a Llama-layout block (the fast path:
    group name -> [(full name, target)]); other blocks get their groups derived from the forward pass."""

    index: int
    targets: list[structure.Target] = field(default_factory=list)
    groups: dict[str, list[Item]] | None = None
    prefix: str = ""

    def modules(self) -> list[Item]:
        return [(t.name, t) for t in self.targets]

    @property
    def fast(self) -> bool:
        return self.groups is not None


class BlockWeights(Protocol):
    """Where a block's weights live between its turns when they are streamed (`sparsetune.streaming`): `load`
    materialises block i on the device, `commit` takes its final (pruned) weights, `release` frees them."""

    def load(self, index: int, device: torch.device) -> None: ...

    def commit(self, index: int) -> None: ...

    def release(self, index: int) -> None: ...


@dataclass
class EngineOptions:
    method: ModuleType | Any
    target: float | NMPattern
    method_options: dict[str, Any]
    sequential: bool = True
    # Take down_proj's statistic (the block's last, MLP-output stage; each expert's down slice) from its input
    # before the stage feeding it is pruned, in the same pass (one extra gate/up matmul on the fast path).
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
    moe_calibrate: str = "routed"  # routed: each expert sees its routed tokens; all: every token, statistics only
    weights: BlockWeights | None = None  # streamed weights: each block is loaded for its turn, None = all in memory


@dataclass
class BlockCall:
    """What the model passes a block besides its hidden states (masks, rotary embeddings, ...)."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _StopCapture(Exception):
    """Raised by the recorders once they have what they need, to skip the rest of the model."""


class _StopBlock(Exception):
    """Raised once a stage's last reader has seen its input, to skip the rest of the block."""


class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer: records what the model passes to it and forwards nothing."""

    def __init__(self, index: int, sink: dict[str, Any], stop_at: int) -> None:
        super().__init__()
        self.index, self.sink, self.stop_at = index, sink, stop_at

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        hidden_states = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink.setdefault("calls", {})[self.index] = BlockCall(tuple(args[1:]), kwargs)
        if self.index == self.stop_at:
            raise _StopCapture
        return hidden_states


def batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _record(model: nn.Module, input_ids: torch.Tensor, stop_at: int) -> dict[str, Any]:
    path, layers = structure.find_decoder(model)
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    sink: dict[str, Any] = {}
    setattr(parent, attr, nn.ModuleList(_LayerRecorder(i, sink, stop_at) for i in range(len(layers))))
    try:
        model(input_ids=input_ids, use_cache=False)
    except _StopCapture:
        pass
    finally:
        setattr(parent, attr, layers)
    return sink


def _outside_blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder root's modules other than the block list (embeddings, rotary, final norm): what runs first."""
    path, layers = structure.find_decoder(model)
    root = structure.decoder_root(model)[1]
    return [m for m in root.children() if m is not layers]


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, input_ids: torch.Tensor, batch_size: int, device: torch.device, store: ActivationStore
) -> tuple[torch.Tensor | DiskTensor, list[BlockCall]]:
    """Hidden states entering block 0 for every sample (N, T, hidden), and each block's extra inputs.

    The extra inputs (attention mask, rotary embeddings, position ids, positional extras such as GPT-2's) are
    recorded for every layer from one sample, since families like Qwen2 give sliding-window layers a different
    mask; batch-1 tensors broadcast.
    """
    n_layers = len(structure.decoder_layers(model))
    head = [m for m in _outside_blocks(model) if any(True for _ in (*m.parameters(), *m.buffers()))]
    homes = [_module_device(m) for m in head]
    for m in head:
        m.to(device)
    try:
        calls_map = _record(model, input_ids[:1].to(device), stop_at=n_layers - 1)["calls"]
        calls = [calls_map[i] for i in range(n_layers)]
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
    return first, calls


def _module_device(module: nn.Module) -> torch.device:
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def split_method_result(result: Any) -> tuple[list[torch.Tensor], list[dict[str, Any] | None]]:
    """A method's `prune_group` output as (weights, one info dict or None per weight)."""
    return result if isinstance(result, tuple) else (result, [None] * len(result))


def _prune_group(items: list[Item], stats: Any, opts: EngineOptions) -> None:
    if not items:
        return
    weights = [target.weight() for _, target in items]
    pruned, infos = split_method_result(opts.method.prune_group(weights, stats, opts.target, **opts.method_options))
    for (name, _), weight, new, info in zip(items, weights, pruned, infos, strict=True):
        weight.copy_(new.to(weight.dtype))
        if info is not None and opts.module_info is not None:
            opts.module_info.setdefault(name, {}).update(info)


def _accumulate_over(stats: Any, n: int, opts: EngineOptions, make_input: Callable[[slice], torch.Tensor]) -> Any:
    for sl in batches(n, opts.batch_size):
        opts.method.accumulate(stats, make_input(sl))
    return reduce_stats(stats)


def reduce_stats(stats: Any) -> Any:
    """Sum statistics over processes when calibration is sharded across ranks (no-op in one process)."""
    return sum_in_place(stats)


def llama_layout(model: nn.Module, layer: nn.Module) -> bool:
    """A block of a family whose forward the fast path knows (see `structure.SUPPORTED_FAMILIES`)."""
    if structure.model_type(model) not in structure.SUPPORTED_FAMILIES:
        return False
    try:
        return all(isinstance(layer.get_submodule(local), nn.Linear) for local in GROUP_OF) and all(
            isinstance(getattr(layer, n, None), nn.Module) for n in ("input_layernorm", "post_attention_layernorm")
        )
    except AttributeError:
        return False


@torch.no_grad()
def prune_block_sequential(
    layer: nn.Module, X: torch.Tensor | DiskTensor, call: BlockCall, targets: BlockTargets, opts: EngineOptions
) -> None:
    """Llama-layout fast path: prune one block in true-sequential order with one pass of compute; X becomes the
    block output in place."""
    dev, n = opts.device, X.shape[0]
    attn, mlp = layer.self_attn, layer.mlp
    groups = targets.groups or {}
    kwargs = call.kwargs
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
    return out[0] if isinstance(out, (tuple, list)) else out


# ----- the generic path: groups and stages derived from the forward pass ------------------------------------------


@dataclass
class Stage:
    """Targets whose statistics one pass collects. `groups` share a statistic each (local target names). An
    expert stage covers one fused parameter of an experts module: one group per expert slice."""

    groups: list[list[str]]
    experts: str | None = None  # local name of the experts module, for an expert stage
    param: str | None = None  # its fused parameter ("gate_up_proj", "up_proj" or "down_proj")
    with_previous: bool = False  # dense_down_stats: collected in the previous stage's pass, before it is pruned


@dataclass
class BlockPlan:
    stages: list[Stage]

    def describe(self) -> list[list[str]]:
        """Per stage, its groups (comma-joined targets); `+` marks a stage collected in the previous one's pass."""
        return [
            [
                ("+" if s.with_previous else "") + (",".join(g) if s.experts is None else f"{s.experts}.{s.param}[*]")
                for g in (s.groups if s.experts is None else s.groups[:1])
            ]
            for s in self.stages
        ]


def _structure_key(layer: nn.Module, targets: BlockTargets) -> tuple[Any, ...]:
    prefix = targets.prefix + "."
    return (type(layer), tuple(t.name.removeprefix(prefix) for t in targets.targets))


def _expert_order(experts: nn.Module) -> list[str]:
    """An experts module's fused parameters in the order its forward uses them (gate/up before down)."""
    return [p for p in structure.EXPERT_PARAMS if p in structure.expert_params(experts)]


@torch.no_grad()
def derive_plan(
    layer: nn.Module, x: torch.Tensor, call: BlockCall, targets: BlockTargets, dense_down_stats: bool
) -> BlockPlan:
    """Record, on one sample, the order in which the block's forward reads its targets; targets reading the same
    input tensor form one group. Fused experts read their parameters in one call: one stage per parameter."""
    prefix = targets.prefix + "."
    local = {t.name: t.name.removeprefix(prefix) for t in targets.targets}
    by_module: dict[int, list[str]] = {}
    expert_slices: dict[tuple[str, str], list[str]] = {}
    experts_modules: dict[str, nn.Module] = {}
    for t in targets.targets:
        if t.kind == "expert":
            owner = local[t.name].rpartition(".")[0]
            expert_slices.setdefault((owner, t.param_name), []).append(local[t.name])
            experts_modules[owner] = t.module
        else:
            by_module.setdefault(id(t.module), []).append(local[t.name])
    events: list[tuple[str, Any, Any]] = []  # ("read", names, input) or ("experts", owner, param)
    seen: set[int] = set()  # modules already read: only a module's first call places it in the order

    def reader(module: nn.Module, args: tuple[Any, ...]) -> None:
        if id(module) not in seen:
            seen.add(id(module))
            events.append(("read", by_module[id(module)], args[0]))

    readers = {id(t.module): t.module for t in targets.targets if t.kind != "expert"}
    handles = [module.register_forward_pre_hook(reader) for module in readers.values()]
    wrapped = []
    for owner, module in experts_modules.items():
        original = module.forward

        def recorder(*args: Any, _owner: str = owner, _orig: Callable[..., Any] = original, **kw: Any) -> Any:
            if not any(e[0] == "experts" and e[1] == _owner for e in events):
                for param in _expert_order(experts_modules[_owner]):
                    if (_owner, param) in expert_slices:
                        events.append(("experts", _owner, param))
            return _orig(*args, **kw)

        module.forward = recorder
        wrapped.append(module)
    try:
        layer(x, *call.args, **call.kwargs)
    finally:
        for h in handles:
            h.remove()
        for module in wrapped:
            del module.forward
    stages: list[Stage] = []
    inputs: list[Any] = []  # the input tensor each non-expert stage's group reads
    for kind, what, extra in events:
        if kind == "experts":
            stages.append(Stage([[n] for n in expert_slices[(what, extra)]], experts=what, param=extra))
            inputs.append(None)
            continue
        for stage, seen_input in zip(stages, inputs, strict=True):
            if stage.experts is None and seen_input is extra:
                stage.groups[0].extend(what)
                break
        else:
            stages.append(Stage([list(what)]))
            inputs.append(extra)
    recorded = {n for s in stages for g in s.groups for n in g}
    never = [n for n in local.values() if n not in recorded]
    if never:  # read on other tokens only (e.g. per-expert Linears no token of the sample reached): last stage
        stages.append(Stage([[n] for n in never]))
    if dense_down_stats:
        for i in range(1, len(stages)):
            stages[i].with_previous = _reads_previous_output(stages[i - 1], stages[i], i == len(stages) - 1)
    return BlockPlan(stages)


def _is_attention(stage: Stage) -> bool:
    return any("attn" in n or "attention" in n for g in stage.groups for n in g)


def _reads_previous_output(previous: Stage, stage: Stage, last: bool) -> bool:
    """dense_down_stats applies to an MLP's output projection: an experts module's down slices after its gate/up
    slices, or the block's last stage after a non-attention stage (down after gate/up, fc2 after fc1)."""
    if stage.experts is not None or previous.experts is not None:
        return stage.experts is not None and stage.experts == previous.experts and stage.param == "down_proj"
    return last and not _is_attention(stage) and not _is_attention(previous) and not previous.with_previous


class _Collector:
    """Statistics of the groups of some stages over one or more forward passes, via hooks on their readers."""

    def __init__(
        self,
        layer: nn.Module,
        stages: list[Stage],
        targets: dict[str, structure.Target],
        opts: EngineOptions,
        stop: bool,
    ) -> None:
        self.layer, self.stages, self.targets, self.opts, self.stop = layer, stages, targets, opts, stop
        method, dev = opts.method, opts.device
        self.stats: dict[tuple[int, int], Any] = {}
        self.tokens: dict[tuple[int, int], int] = {}
        for si, stage in enumerate(stages):
            for gi, group in enumerate(stage.groups):
                self.stats[(si, gi)] = method.init_stats(targets[group[0]].in_features, dev)
                self.tokens[(si, gi)] = 0
        self.handles: list[Any] = []
        self.wrapped: list[nn.Module] = []
        self.readers: set[Any] = set()
        self.fired: set[Any] = set()
        self.slot: dict[tuple[int, Any], tuple[int, int]] = {}

    def __enter__(self) -> _Collector:
        experts_stages: dict[str, dict[str, int]] = {}
        for si, stage in enumerate(self.stages):
            if stage.experts is not None:
                assert stage.param is not None
                experts_stages.setdefault(stage.experts, {})[stage.param] = si
                for gi, group in enumerate(stage.groups):  # (stage, expert index) -> its group
                    self.slot[(si, self.targets[group[0]].expert)] = (si, gi)
                continue
            for gi, group in enumerate(stage.groups):
                key = (si, gi)
                module = self.targets[group[0]].module
                self.readers.add(key)
                self.handles.append(module.register_forward_pre_hook(self._hook(key)))
        for owner, params in experts_stages.items():
            module = self.layer.get_submodule(owner)
            self.readers.add(owner)
            module.forward = self._experts_forward(owner, module, params)
            self.wrapped.append(module)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()
        for module in self.wrapped:
            del module.forward

    def _fire(self, key: Any) -> None:
        self.fired.add(key)
        if self.stop and self.fired >= self.readers:
            raise _StopBlock

    def _hook(self, key: tuple[int, int]) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self.opts.method.accumulate(self.stats[key], x)
            self.tokens[key] += x.numel() // max(1, x.shape[-1])
            self._fire(key)

        return hook

    def _experts_forward(self, owner: str, experts: nn.Module, params: dict[str, int]) -> Callable[..., Any]:
        original = type(experts).forward
        accumulate = self.opts.method.accumulate
        in_param = next((p for p in ("gate_up_proj", "up_proj") if p in structure.expert_params(experts)), None)

        def forward(*args: Any, **kwargs: Any) -> Any:
            hidden_states, top_k_index, top_k_weights = (*args, *kwargs.values())[:3]
            for e, x, weight in _routed_inputs(experts, hidden_states, top_k_index, top_k_weights, self.opts):
                if in_param in params and (params[in_param], e) in self.slot:
                    key = self.slot[(params[in_param], e)]
                    accumulate(self.stats[key], x if weight is None else x * weight[:, None])
                    self.tokens[key] += x.shape[0]
                if "down_proj" in params and in_param is not None and (params["down_proj"], e) in self.slot:
                    key = self.slot[(params["down_proj"], e)]
                    z = _expert_hidden(experts, in_param, e, x)
                    accumulate(self.stats[key], z if weight is None else z * weight[:, None])
                    self.tokens[key] += x.shape[0]
            self._fire(owner)
            return original(experts, *args, **kwargs)

        return forward

    def run(self, X: torch.Tensor | DiskTensor, call: BlockCall) -> None:
        dev = self.opts.device
        for sl in batches(X.shape[0], self.opts.batch_size):
            self.fired = set()
            with contextlib.suppress(_StopBlock):
                self.layer(X[sl].to(dev), *call.args, **call.kwargs)
        for value in self.stats.values():
            reduce_stats(value)

    def prune(self, si: int) -> None:
        """Prune stage `si` (of this collector's stages) from its statistics."""
        stage = self.stages[si]
        for gi, group in enumerate(stage.groups):
            items = [(self.targets[n].name, self.targets[n]) for n in group]
            tokens = self.tokens[(si, gi)]
            if self.opts.module_info is not None and stage.experts is not None:
                for name, _ in items:
                    self.opts.module_info.setdefault(name, {})["calibration_tokens"] = tokens
            if tokens == 0 and self.opts.method.NEEDS_CALIBRATION:
                _prune_by_magnitude(items, self.opts)
            else:
                _prune_group(items, self.stats[(si, gi)], self.opts)


def _routed_inputs(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    opts: EngineOptions,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """(expert, its input rows, their routing weights or None) for every expert some token reaches."""
    if opts.moe_calibrate == "all":
        for e in range(experts.num_experts):
            yield e, hidden, None
        return
    for e in range(experts.num_experts):
        token_idx, k_pos = torch.where(top_k_index == e)
        if token_idx.numel():
            yield e, hidden[token_idx], top_k_weights[token_idx, k_pos].to(hidden.dtype)


def _expert_weight(experts: nn.Module, param: str, e: int) -> torch.Tensor:
    data = getattr(experts, param)[e]
    return data.t() if getattr(experts, "is_transposed", False) else data


def _expert_hidden(experts: nn.Module, in_param: str, e: int, x: torch.Tensor) -> torch.Tensor:
    """What expert e's down slice reads for inputs x: its gate/up output through the experts' own gating."""
    out = nn.functional.linear(x, _expert_weight(experts, in_param, e))
    bias = getattr(experts, f"{in_param}_bias", None) if getattr(experts, "has_bias", False) else None
    if isinstance(bias, torch.Tensor):
        out = out + bias[e]
    if in_param == "gate_up_proj" and getattr(experts, "has_gate", True):
        return experts._apply_gate(out)
    return experts.act_fn(out)


def _prune_by_magnitude(items: list[Item], opts: EngineOptions) -> None:
    """The fallback for a group no calibration token reached: its statistic is empty, so |W| decides."""

    warning = "no calibration token reached it, so it was pruned by magnitude"
    if opts.moe_calibrate == "routed":
        warning += " (--moe-calibrate all calibrates every expert on every token)"
    for name, target in items:
        weight = target.weight()
        weight.copy_(magnitude.prune_group([weight], None, opts.target)[0].to(weight.dtype))
        if opts.module_info is not None:
            opts.module_info.setdefault(name, {}).update({"fallback": "magnitude", "warning": warning})


def _targets_by_local(targets: BlockTargets) -> dict[str, structure.Target]:
    prefix = targets.prefix + "."
    return {t.name.removeprefix(prefix): t for t in targets.targets}


@torch.no_grad()
def prune_block_generic(
    layer: nn.Module,
    X: torch.Tensor | DiskTensor,
    call: BlockCall,
    targets: BlockTargets,
    plan: BlockPlan,
    opts: EngineOptions,
) -> None:
    """Prune one block stage by stage (each stage's statistics from the block with the earlier stages pruned), or
    all stages from the dense block when not `opts.sequential`; X becomes the pruned block's output in place."""
    by_local = _targets_by_local(targets)
    if opts.sequential:
        units: list[list[Stage]] = []
        for stage in plan.stages:
            if stage.with_previous and units:
                units[-1].append(stage)
            else:
                units.append([stage])
    else:
        units = [list(plan.stages)]
    for unit in units:
        with _Collector(layer, unit, by_local, opts, stop=True) as collector:
            collector.run(X, call)
        for si in range(len(unit)):
            collector.prune(si)
    dev = opts.device
    for sl in batches(X.shape[0], opts.batch_size):
        X[sl] = _layer_output(layer(X[sl].to(dev), *call.args, **call.kwargs)).to(X.device)


@torch.no_grad()
def dense_stats(
    layer: nn.Module,
    X: torch.Tensor | DiskTensor,
    call: BlockCall,
    targets: BlockTargets,
    plan: BlockPlan,
    opts: EngineOptions,
) -> list[tuple[list[structure.Target], Any]]:
    """(group targets, statistic) of every group, from one pass of the block as it is (all-reduced)."""
    by_local = _targets_by_local(targets)
    with _Collector(layer, plan.stages, by_local, opts, stop=False) as collector:
        collector.run(X, call)
    return [
        ([by_local[n] for n in group], collector.stats[(si, gi)])
        for si, stage in enumerate(plan.stages)
        for gi, group in enumerate(stage.groups)
    ]


def plan_for_llama(targets: BlockTargets) -> BlockPlan:
    """The fast path's groups as a plan (what `derive_plan` finds on a Llama block)."""
    assert targets.groups is not None
    prefix = targets.prefix + "."
    return BlockPlan(
        [Stage([[n.removeprefix(prefix) for n, _ in targets.groups[g]]]) for g in GROUPS if targets.groups.get(g)]
    )


@torch.no_grad()
def prune_head(
    model: nn.Module, X: torch.Tensor | DiskTensor, head: tuple[str, structure.Target], opts: EngineOptions
) -> None:
    """Prune lm_head (only when explicitly targeted) from the final-norm output of the pruned blocks."""
    norm = structure.final_norm(model)
    if norm is None:
        raise SparsetuneError(
            f"model type {structure.model_type(model)!r}: no final norm found next to the decoder blocks "
            f"(looked for {', '.join(structure.FINAL_NORM_NAMES)}), so lm_head's input is unknown; --ignore lm_head"
        )
    home = _module_device(norm)
    norm.to(opts.device)
    stats = opts.method.init_stats(head[1].in_features, opts.device)
    _accumulate_over(stats, X.shape[0], opts, lambda sl: norm(X[sl].to(opts.device)))
    norm.to(home)
    _prune_group([head], stats, opts)


class _Plans:
    """Derived plans, one per block structure (blocks alike in class and target names share one)."""

    def __init__(self, opts: EngineOptions) -> None:
        self.opts = opts
        self.cache: dict[tuple[Any, ...], BlockPlan] = {}

    def get(
        self, layer: nn.Module, X: torch.Tensor | DiskTensor, call: BlockCall, targets: BlockTargets, dev: torch.device
    ) -> BlockPlan:
        if targets.fast:
            return plan_for_llama(targets)
        key = _structure_key(layer, targets)
        if key not in self.cache:
            self.cache[key] = derive_plan(layer, X[0:1].to(dev), call, targets, self.opts.dense_down_stats)
        return self.cache[key]


def prune_block(
    layer: nn.Module,
    X: torch.Tensor | DiskTensor,
    call: BlockCall,
    block: BlockTargets,
    opts: EngineOptions,
    plans: _Plans | None = None,
) -> None:
    """Prune one block on `opts.device` (the fast path for a Llama-layout block, else the derived stages); X
    becomes the pruned block's output in place."""
    if block.fast and opts.sequential:
        prune_block_sequential(layer, X, call, block, opts)
    elif block.targets:
        plan = (plans or _Plans(opts)).get(layer, X, call, block, opts.device)
        prune_block_generic(layer, X, call, block, plan, opts)
    else:  # nothing targeted here: the block output is still the next block's input
        for sl in batches(X.shape[0], opts.batch_size):
            X[sl] = _layer_output(layer(X[sl].to(opts.device), *call.args, **call.kwargs)).to(X.device)


def prune_uncalibrated(
    blocks: list[BlockTargets],
    head: tuple[str, structure.Target] | None,
    opts: EngineOptions,
    on_block_done: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Methods that need no calibration data (magnitude): every target pruned on its own, no forward pass."""
    targets = list(opts.block_targets) if opts.block_targets is not None else [opts.target] * len(blocks)
    t_blocks = time.perf_counter()
    for i, block in enumerate(blocks):
        t_block = time.perf_counter()
        block_opts = replace(opts, target=targets[i])
        with _block_weights(i, opts):
            for item in block.modules():
                _prune_group([item], None, block_opts)
        if head is not None and i == len(blocks) - 1:
            _prune_group([head], None, block_opts)
        if on_block_done is not None:
            on_block_done(i, time.perf_counter() - t_block)
    return {
        "blocks_s": time.perf_counter() - t_blocks,
        "block_targets": [str(t) if isinstance(t, NMPattern) else float(t) for t in targets],
    }


def run_blocks(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    blocks: list[BlockTargets],
    head: tuple[str, structure.Target] | None,
    opts: EngineOptions,
    on_block_done: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Run the engine over every block; returns phase timings (seconds) and the per-block targets used.
    `input_ids` None (a method needing no calibration): see `prune_uncalibrated`."""
    if input_ids is None:
        return prune_uncalibrated(blocks, head, opts, on_block_done)
    if opts.store is None:
        opts = replace(opts, store=ActivationStore("memory", activation_device(model, input_ids, opts.device)))
    assert opts.store is not None
    t0 = time.perf_counter()
    X, calls = capture_block_inputs(model, input_ids, opts.batch_size, opts.device, opts.store)
    result: dict[str, Any] = {"capture_s": time.perf_counter() - t0}
    layers = structure.decoder_layers(model)
    plans = _Plans(opts)
    start = 0
    if opts.resume and opts.checkpoint is not None and opts.checkpoint.exists():
        start, targets = opts.checkpoint.restore(model, X, streamed=opts.weights is not None)
        result["resumed_from_block"] = start
        if opts.module_info is not None:  # the finished blocks' per-module info
            opts.module_info.update(opts.checkpoint.load_state().get("module_info", {}))
    elif opts.block_targets is not None:
        targets = list(opts.block_targets)
    elif opts.owl_m is not None:
        t0 = time.perf_counter()
        targets, result["owl_outlier_ratios"] = owl_targets(model, X, calls, blocks, opts, plans)
        result["owl_s"] = time.perf_counter() - t0
    else:
        targets = [opts.target] * len(layers)
    t_blocks = time.perf_counter()
    for i in range(start, len(layers)):
        t_block = time.perf_counter()
        with _block_on_device(layers[i], opts, i, commit=True) as dev:
            block_opts = replace(opts, target=targets[i], device=dev)
            prune_block(layers[i], X, _on_device(calls[i], dev), blocks[i], block_opts, plans)
        if opts.checkpoint is not None:  # streamed blocks are already in their output shard
            layer = None if opts.weights is not None else layers[i]
            opts.checkpoint.save(i, layer, X, targets, opts.module_info)
        if on_block_done is not None:
            on_block_done(i, time.perf_counter() - t_block)
    result["blocks_s"] = time.perf_counter() - t_blocks
    result["block_targets"] = [str(t) if isinstance(t, NMPattern) else float(t) for t in targets]
    result["plans"] = [plan.describe() for plan in plans.cache.values()]
    if head is not None:
        t_head = time.perf_counter()
        prune_head(model, X, head, opts)
        result["head_s"] = time.perf_counter() - t_head
    return result


class _block_on_device:  # noqa: N801 - a context manager
    """Move a block to the compute device for its turn (or keep accelerate's placement), then back home. Streamed
    weights are instead read onto the device for the turn, committed (`commit`: the block is final) and freed."""

    def __init__(self, layer: nn.Module, opts: EngineOptions, index: int, commit: bool = False) -> None:
        self.layer, self.opts, self.index, self.commit = layer, opts, index, commit
        self.home = next(layer.parameters()).device

    def __enter__(self) -> torch.device:
        if self.opts.weights is not None:
            self.opts.weights.load(self.index, self.opts.device)
            return self.opts.device
        if self.opts.keep_placement:
            return self.home
        self.layer.to(self.opts.device)
        return self.opts.device

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.opts.weights is not None:
            try:
                if self.commit and exc_type is None:
                    self.opts.weights.commit(self.index)
            finally:
                self.opts.weights.release(self.index)
        elif not self.opts.keep_placement:
            self.layer.to(self.home)


@contextlib.contextmanager
def _block_weights(index: int, opts: EngineOptions) -> Iterator[None]:
    """A block's streamed weights on the CPU for a pass with no forward (magnitude); a no-op in memory."""
    if opts.weights is None:
        yield
        return
    opts.weights.load(index, opts.device)
    try:
        yield
        opts.weights.commit(index)
    finally:
        opts.weights.release(index)


@torch.no_grad()
def owl_targets(
    model: nn.Module,
    X: torch.Tensor | DiskTensor,
    calls: list[BlockCall],
    blocks: list[BlockTargets],
    opts: EngineOptions,
    plans: _Plans | None = None,
) -> tuple[list[float | NMPattern], list[float]]:
    """OWL pre-pass through the dense model: each block's Wanda outlier ratio, then per-block targets."""

    assert opts.store is not None and opts.owl_m is not None
    plans = plans or _Plans(opts)
    H = opts.store.copy(X)
    ratios, sizes = [], []
    for i, layer in enumerate(structure.decoder_layers(model)):
        with _block_on_device(layer, opts, i) as dev:
            call = _on_device(calls[i], dev)
            plan = plans.get(layer, H, call, blocks[i], dev)
            wanda_opts = replace(opts, method=wanda, device=dev)
            groups = dense_stats(layer, H, call, blocks[i], plan, wanda_opts)
            scores = [wanda.scores(t.weight(), stats) for group, stats in groups for t in group]
            ratios.append(owl.outlier_ratio(scores, opts.owl_m))
            sizes.append(sum(t.numel() for t in blocks[i].targets))
            for sl in batches(H.shape[0], opts.batch_size):
                H[sl] = _layer_output(layer(H[sl].to(dev), *call.args, **call.kwargs)).to(H.device)
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
    cfg = getattr(model.config, "text_config", None) or model.config
    hidden = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "n_embd", 0) or 4096)
    inter = int(getattr(cfg, "intermediate_size", 0) or 4 * hidden)
    per_token = (2 * hidden + inter) * torch.finfo(model.dtype).bits // 8
    need = input_ids.numel() * per_token
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < free // 2 else torch.device("cpu")


def _on_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, BlockCall):
        return BlockCall(_on_device(obj.args, device), _on_device(obj.kwargs, device))
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_on_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [_on_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _on_device(v, device) for k, v in obj.items()}
    return obj
