"""A .gguf file converted once into a sharded HF dir, tensor by tensor, so it streams like any other input.

transformers' own GGUF loading (`from_pretrained(gguf_file=...)`) dequantizes every tensor into one state dict and
then builds the model: the whole model in float32, at once. Here the same pieces of transformers do the work one
tensor at a time: its config reader, its GGUF -> HF name map and its per-architecture tensor processors (which
undo llama.cpp's q/k permutation, for example), with gguf-py's dequantizer. Tensors are gathered per decoder block
and each block is written to its own shard as soon as the file moves past it. The result equals
`from_pretrained(gguf_file=...)` then `save_pretrained`, tensor for tensor (tests/test_gguf_convert.py).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import torch

from sparsetune.errors import SparsetuneError

# (sparsetune.loading imports this module for its GGUF inputs, so nothing here imports loading or streaming.)
SAFE_INDEX = "model.safetensors.index.json"

log = logging.getLogger(__name__)
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def convert_gguf(path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Write `path` as an HF dir into `out_dir` (which the caller renames into place): config, tokenizer, one
    safetensors shard per decoder block plus one for the rest, and the index."""
    from accelerate import init_empty_weights
    from gguf import GGUFReader, dequantize
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        with init_empty_weights(include_buffers=False):  # names and shapes only
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        parsed = load_gguf_checkpoint(str(path), return_tensors=False, model_to_load=skeleton)
        reader = GGUFReader(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SparsetuneError(f"could not read GGUF file {path}: {reason}; check the file is complete") from err
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    mapping = get_gguf_hf_weights_map(skeleton, processor)
    parsed["tensors"] = {}  # MoE processors stash expert tensors here instead of returning them

    groups: dict[int, dict[str, torch.Tensor]] = {}  # block (or -1: everything else) -> its tensors so far
    written: dict[int, Path] = {}
    sizes: dict[int, dict[str, int]] = {}  # block -> bytes of each tensor written

    def flush(block: int) -> None:
        tensors = groups.pop(block)
        tmp = out_dir / f".part-{block + 1:05d}.safetensors"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        written[block] = tmp
        sizes[block] = {k: t.numel() * t.element_size() for k, t in tensors.items()}

    current = None
    for tensor in reader.tensors:
        match = _BLOCK.match(tensor.name)
        block = int(match.group(1)) if match else -1
        if current is not None and block != current and current in groups and current >= 0:
            flush(current)  # llama.cpp writes a block's tensors together: the previous block is complete
        current = block
        weights = dequantize(tensor.data, tensor.tensor_type)
        result = processor.process(
            weights=weights, name=tensor.name, tensor_key_mapping=mapping, parsed_parameters=parsed
        )
        if result.name not in mapping:
            continue
        groups.setdefault(block, {})[mapping[result.name]] = torch.from_numpy(np.copy(result.weights)).to(dtype)
    for name, value in parsed["tensors"].items():  # stashed (MoE experts): their block's group
        match = re.search(r"\.layers\.(\d+)\.", name)
        groups.setdefault(int(match.group(1)) if match else -1, {})[name] = torch.as_tensor(value).to(dtype)
    for block in sorted(groups):
        if block in written:  # a stashed tensor of a block already written: merge them
            from safetensors.torch import load_file

            groups[block].update(load_file(str(written.pop(block))))
        flush(block)
    _name_shards(out_dir, written, sizes)
    drop_gguf_quantization(skeleton)
    skeleton.config.architectures = [type(skeleton).__name__]  # as save_pretrained records it
    skeleton.config.save_pretrained(str(out_dir))
    if skeleton.can_generate():
        skeleton.generation_config.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    total = sum(n for per_block in sizes.values() for n in per_block.values())
    log.info("converted %s to %s (%.1f MB of tensors)", path, out_dir, total / 1e6)


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def drop_gguf_quantization(model: torch.nn.Module) -> None:
    """A GGUF model is dequantized on load; forget the GGUF quantizer so it saves as a plain HF model."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = model.config
    qc = getattr(config, "quantization_config", None)
    if qc is not None and _quant_method(qc) == "gguf":
        del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _quant_method(qc: object) -> str:
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method))


def _name_shards(out_dir: Path, written: dict[int, Path], sizes: dict[int, dict[str, int]]) -> None:
    """Blocks in order, then everything else, as model-0000k-of-0000n with an index."""
    order = sorted(b for b in written if b >= 0) + ([-1] if -1 in written else [])
    weight_map: dict[str, str] = {}
    for k, block in enumerate(order, start=1):
        final = out_dir / shard_name(k, len(order))
        written[block].rename(final)
        weight_map.update(dict.fromkeys(sizes[block], final.name))
    total = sum(n for block in order for n in sizes[block].values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
