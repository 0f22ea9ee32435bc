"""A causal LM's structure: where its decoder blocks are, which of their weights are prunable matrices
(`Target`s), which families are known, and choosing targets by `--targets` / `--ignore`.

Works on any loaded `transformers` causal LM (or a streamed skeleton of one); knows nothing of how it was loaded.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from torch import nn

from sparsetune.errors import SparsetuneError

# Decoder families whose blocks have the plain Llama layout (input_layernorm -> self_attn(q,k,v,o) ->
# post_attention_layernorm -> mlp(gate, up, act, down), logits = lm_head(norm(h))): the prune engine's one-pass
# fast path and eval's plain-head shortcut rely on it. Every other decoder is handled generically.
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Families the test matrix (tests/test_architectures.py) prunes, evaluates and exports: metadata only. A family
# not listed here is tried generically, and the prune report says so.
KNOWN_FAMILIES = (
    *SUPPORTED_FAMILIES,
    *("gemma", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "opt", "gpt2", "mixtral", "qwen3_moe"),
    *("gpt_oss", "deepseek_v3"),
)
# Where causal LMs keep their decoder block list, tried in order before a generic search.
DECODER_PATHS = (
    "model.layers",
    "model.decoder.layers",
    "transformer.h",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.text_model.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "transformer.layers",
)
# Where the final norm (lm_head's input) sits, relative to the decoder root (the block list's parent).
FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f")


def model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__)


def is_known_family(model: nn.Module) -> bool:
    """True for the families the test matrix covers; others are tried generically (see `find_decoder`)."""
    return model_type(model) in KNOWN_FAMILIES


def _text_layer_count(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        n = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def find_decoder(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, block list) of a causal LM's decoder: the known paths first, then the one ModuleList whose
    length is the config's num_hidden_layers (a multimodal wrapper's language model included; vision towers,
    whose lists are named `vision`, `visual` or `encoder`, are skipped). Refuses a model with no such list."""
    for path in DECODER_PATHS:
        try:
            found = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            return path, found
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    n_layers = _text_layer_count(model)
    skip = re.compile(r"(^|\.)(vision|visual|encoder|image|audio)")
    fits = [(n, m) for n, m in lists if len(m) == n_layers and not skip.search(n)]
    if len(fits) == 1:
        return fits[0]
    found_lists = ", ".join(f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in lists[:6]) or "no ModuleList"
    raise SparsetuneError(
        f"cannot find the decoder blocks of model type {model_type(model)!r} ({type(model).__name__}): none of "
        f"{', '.join(DECODER_PATHS)} exists, and {len(fits)} module lists hold num_hidden_layers={n_layers} "
        f"blocks (found: {found_lists}); this model is not a decoder-only causal LM sparsetune can walk"
    )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder block list of any causal LM (see `find_decoder`)."""
    return find_decoder(model)[1]


def decoder_root(model: nn.Module) -> tuple[str, nn.Module]:
    """(path, module) of the block list's parent: the module holding the embeddings and the final norm."""
    path = find_decoder(model)[0]
    parent = path.rpartition(".")[0]
    return parent, (model.get_submodule(parent) if parent else model)


def final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied to the last block's output before lm_head, when the decoder root names one."""
    root = decoder_root(model)[1]
    for name in FINAL_NORM_NAMES:
        module = getattr(root, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


# ----- prunable weights: Linear, transformers' Conv1D, and fused 3-D expert parameters ----------------------------


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it
        return None
    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = _conv1d_class()
    return cls is not None and isinstance(module, cls)


EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def expert_params(module: nn.Module) -> list[str]:
    """The fused 3-D expert weights of a transformers experts module (`@use_experts_implementation`: 3-D
    `gate_up_proj` [E, out, in] and `down_proj`, or [E, in, out] when `is_transposed`), else []."""
    if not hasattr(module, "_apply_gate") or not isinstance(getattr(module, "num_experts", None), int):
        return []
    names = []
    for name in EXPERT_PARAMS:
        param = module._parameters.get(name)
        if isinstance(param, torch.Tensor) and param.dim() == 3 and param.shape[0] == module.num_experts:
            names.append(name)
    return names


class Target:
    """One prunable matrix, seen as a 2-D [out, in] weight: a Linear, a Conv1D (its [in, out] weight transposed)
    or one expert's slice of a fused 3-D expert parameter (named `...experts.gate_up_proj[3]`)."""

    __slots__ = ("name", "module", "kind", "param_name", "expert")

    def __init__(self, name: str, module: nn.Module, kind: str, param_name: str = "weight", expert: int | None = None):
        self.name, self.module, self.kind, self.param_name, self.expert = name, module, kind, param_name, expert

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.param_name)

    def weight(self) -> torch.Tensor:
        """The [out, in] view of the stored weight (shares its memory: writing into it changes the model)."""
        return self.view_of(self.param.data)

    def view_of(self, tensor: torch.Tensor) -> torch.Tensor:
        """This target's [out, in] view of any tensor shaped like the stored parameter (a mask, a gradient)."""
        if self.kind == "conv1d":
            return tensor.t()
        if self.kind == "expert":
            return tensor[self.expert].t() if getattr(self.module, "is_transposed", False) else tensor[self.expert]
        return tensor

    @property
    def in_features(self) -> int:
        return int(self.weight().shape[1])

    def numel(self) -> int:
        return int(self.weight().numel())

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.kind})"


def block_targets(layer: nn.Module, prefix: str) -> list[Target]:
    """Every prunable matrix of one decoder block, in module order (expert slices expert by expert)."""
    out = []
    for local, module in layer.named_modules():
        name = f"{prefix}.{local}" if local else prefix
        if isinstance(module, nn.Linear):
            out.append(Target(name, module, "linear"))
        elif is_conv1d(module):
            out.append(Target(name, module, "conv1d"))
        else:
            for param in expert_params(module):
                n = getattr(module, param).shape[0]
                out.extend(Target(f"{name}.{param}[{e}]", module, "expert", param, e) for e in range(n))
    return out


def unknown_weights(layer: nn.Module, prefix: str) -> list[tuple[str, str]]:
    """(name, what it is) of each block weight (a parameter with 2+ dims) that is neither a prunable matrix nor an
    MoE router: the engine does not know how the block uses them. A router (the weights of the `gate` / `router`
    module next to an experts module) is known and stays dense."""
    known: set[int] = set()
    for _, module in layer.named_modules():
        if isinstance(module, nn.Linear) or is_conv1d(module):
            known.add(id(module.weight))
        if expert_params(module):  # its fused weights, and their per-expert biases [E, out]
            known.update(id(p) for p in module.parameters(recurse=False))
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.Module) and expert_params(experts):
            for child_name in ("gate", "router"):
                router = getattr(module, child_name, None)
                if isinstance(router, nn.Module):
                    known.update(id(p) for p in router.parameters())
    out = []
    for local, param in layer.named_parameters():
        if param.dim() >= 2 and id(param) not in known:
            owner = layer.get_submodule(local.rpartition(".")[0]) if "." in local else layer
            out.append((f"{prefix}.{local}", f"{type(owner).__name__}, shape {list(param.shape)}"))
    return out


def named_targets(model: nn.Module) -> dict[str, Target]:
    """name -> Target of every prunable matrix inside the decoder blocks, in block and module order."""
    path, layers = find_decoder(model)
    return {t.name: t for i, layer in enumerate(layers) for t in block_targets(layer, f"{path}.{i}")}


def prunable_targets(model: nn.Module) -> dict[str, Any]:
    """name -> accessor returning the [out, in] weight view of every prunable matrix inside the decoder blocks
    (Linears, Conv1D transposed, expert slices `...experts.gate_up_proj[3]`); for training and reports."""
    return {name: t.weight for name, t in named_targets(model).items()}


def select_targets(
    model: nn.Module, targets: list[str], ignore: list[str], untie_embeddings: bool = False
) -> tuple[list[list[Target]], Target | None]:
    """The matrices `--targets` / `--ignore` (regexes searched in full names) choose: those of each decoder block,
    in block order (all of them when `targets` is empty), and lm_head when a target names it.

    A block weight of any other kind (not an MoE router) is refused unless `ignore` matches it: nothing would know
    how the block uses it, and skipping it silently would leave the model partly pruned. A tied lm_head is refused
    unless the caller unties it (`untie_embeddings`), and so is a choice that matches nothing.
    """
    path, layers = find_decoder(model)
    include = [re.compile(p) for p in targets]
    exclude = [re.compile(p) for p in ignore]

    def chosen(name: str, in_block: bool) -> bool:
        if any(p.search(name) for p in exclude):
            return False
        return any(p.search(name) for p in include) if include else in_block

    blocks = []
    for i, layer in enumerate(layers):
        prefix = f"{path}.{i}"
        unknown = [(n, what) for n, what in unknown_weights(layer, prefix) if not any(p.search(n) for p in exclude)]
        if unknown:
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise SparsetuneError(
                f"model type {model_type(model)!r}: {unknown[0][0]} ({unknown[0][1]}){more} is a weight the "
                "prune engine does not know (it prunes Linear, Conv1D and fused MoE expert parameters); nothing was "
                "pruned. --ignore it to leave it dense"
            )
        blocks.append([t for t in block_targets(layer, prefix) if chosen(t.name, in_block=True)])

    head = None
    lm_head = model.get_output_embeddings()
    if include and isinstance(lm_head, nn.Linear) and chosen("lm_head", in_block=False):
        if embeddings_tied(model) and not untie_embeddings:
            raise SparsetuneError(
                "lm_head shares its weight with the embedding table, so pruning it would prune the embeddings; "
                "pass --untie-embeddings to prune a separate copy, or --ignore lm_head"
            )
        head = Target("lm_head", lm_head, "linear")

    if not any(blocks) and head is None:
        raise SparsetuneError(
            f"--targets {','.join(targets) or '(default)'} matched no Linear, Conv1D or expert weight "
            f"(model type {model_type(model)!r}); use regexes such as 'q_proj|k_proj' or drop --targets"
        )
    return blocks, head


def max_positions(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def embeddings_tied(model: nn.Module) -> bool:
    """True when lm_head shares its weight tensor with the input embedding table."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    return head is not None and emb is not None and head.weight is emb.weight


def untie_embeddings(model: nn.Module) -> None:
    """Give lm_head its own copy of the weight so pruning it leaves the embedding table alone."""
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    for cfg in (getattr(model.config, "text_config", None),):
        if cfg is not None:
            cfg.tie_word_embeddings = False


def model_fingerprint(model: nn.Module) -> str:
    """A cheap content hash of a model's weights (a strided sample of every tensor), for cache keys."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]
