"""The cases tests/data/export_stream_reference.json records (scripts/record_export_stream_reference.py) and
tests/export/test_streaming.py replays: tiny random configs of several families (a Llama, GPT-2's Conv1D, MoE with
per-expert and with fused-on-disk experts), pruned through the prune API, then exported in each format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from architectures import make_family_model
from helpers import make_tokenizer, random_text

CALIB = {"calib_samples": 8, "seqlen": 32, "calib_sampling": "consecutive"}
SGPT_24 = {"method": "sparsegpt", "pattern": "2:4", **CALIB}
MAGNITUDE_50 = {"method": "magnitude", "sparsity": 0.5}
ALL_FORMATS = ("sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4")

# pruned input name -> (family, prune settings, tie the embeddings)
PRUNED: dict[str, tuple[str, dict, bool]] = {
    "llama-sgpt24": ("llama", SGPT_24, False),
    "llama-tied-magnitude50": ("llama", MAGNITUDE_50, True),
    "gpt2-sgpt24": ("gpt2", SGPT_24, False),
    "mixtral-sgpt24": ("mixtral", SGPT_24, False),
    "qwen3_moe-sgpt24": ("qwen3_moe", SGPT_24, False),
    "gpt_oss-magnitude50": ("gpt_oss", MAGNITUDE_50, False),
    "gpt_oss-sgpt24": ("gpt_oss", SGPT_24, False),
}

# export case -> (pruned input, export settings besides model/output)
CASES: dict[str, tuple[str, dict]] = {}
for _name in PRUNED:
    for _fmt in ALL_FORMATS:
        CASES[f"{_name}-{_fmt}"] = (_name, {"format": _fmt})
CASES.update(
    {
        "llama-sgpt24-bitmask-bf16": ("llama-sgpt24", {"format": "sparse-bitmask", "dtype": "bfloat16"}),
        "llama-sgpt24-semi-fp16": ("llama-sgpt24", {"format": "semi-structured-2:4", "dtype": "float16"}),
        "llama-sgpt24-bitmask-shards": ("llama-sgpt24", {"format": "sparse-bitmask", "max_shard_size": "20KB"}),
        "llama-sgpt24-bitmask-ignore": ("llama-sgpt24", {"format": "sparse-bitmask", "ignore": ["mlp"]}),
        "llama-tied-magnitude50-force24": ("llama-tied-magnitude50", {"format": "sparse-24-bitmask", "force_24": True}),
        "llama-tied-magnitude50-bitmask-shards-bf16": (
            "llama-tied-magnitude50",
            {"format": "sparse-bitmask", "max_shard_size": "30KB", "dtype": "bfloat16"},
        ),
        "mixtral-sgpt24-bitmask-shards": ("mixtral-sgpt24", {"format": "sparse-bitmask", "max_shard_size": "40KB"}),
        "gpt_oss-sgpt24-bitmask-shards-bf16": (
            "gpt_oss-sgpt24",
            {"format": "sparse-bitmask", "max_shard_size": "50KB", "dtype": "bfloat16"},
        ),
        "qwen3_moe-sgpt24-24-bitmask-density": (
            "qwen3_moe-sgpt24",
            {"format": "sparse-24-bitmask", "max_density": 0.4},
        ),
    }
)
# Fields of sparsetune_config.json that name the software, not the export.
VOLATILE_META = ("sparsetune_version", "versions")
# Copied from the input as they are (compared with the input's file, not recorded).
CARRIED = ("sparsity_report.json",)


def pruned_dirs(root: Path) -> dict[str, Path]:
    """Every PRUNED input, written under `root` through the prune API (one thread: reproducible)."""
    from sparsetune.prune.api import run_prune
    from sparsetune.prune.config import PruneConfig

    tokenizer = make_tokenizer()
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(random_text(400, seed=i) for i in range(12)))
    out = {}
    for name, (family, settings, tie) in PRUNED.items():
        model = make_family_model(family)
        if tie:
            model.config.tie_word_embeddings = True
            model.tie_weights()
        src = root / f"dense-{name}"
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        dst = root / f"pruned-{name}"
        extra = {"calib": str(calib)} if settings["method"] != "magnitude" else {}
        run_prune(PruneConfig(model=str(src), output=str(dst), **settings, **extra), show_progress=False)
        out[name] = dst
    return out


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a dir's safetensors files."""
    from safetensors import safe_open

    hashes = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(key).contiguous().reshape(-1)
                hashes[key] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    return dict(sorted(hashes.items()))


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every output file but the carried ones; sparsetune_config.json without its software versions."""
    out = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        if path.name in CARRIED:
            continue
        data = path.read_bytes()
        if path.name == "sparsetune_config.json":
            meta = json.loads(data)
            for key in VOLATILE_META:
                meta.pop(key, None)
            data = json.dumps(meta, indent=2).encode()
        out[path.name] = hashlib.sha256(data).hexdigest()
    return out
