"""The cases tests/data/stream_reference.json records (scripts/record_stream_reference.py) and
tests/prune/test_streaming.py replays: tiny random configs of every tested family, saved as HF dirs, pruned from a
calibration text file."""

from __future__ import annotations

from pathlib import Path

from architectures import FAMILY_CONFIGS, make_family_model
from helpers import make_tokenizer, random_text

CALIB = {"calib_samples": 8, "seqlen": 32, "calib_sampling": "consecutive"}
WANDA = {"method": "wanda", "sparsity": 0.5, **CALIB}
SGPT_24 = {"method": "sparsegpt", "pattern": "2:4", **CALIB}
CASES: dict[str, tuple[str, dict]] = {}
for _family in FAMILY_CONFIGS:
    CASES[f"{_family}-wanda50"] = (_family, WANDA)
    CASES[f"{_family}-sparsegpt24"] = (_family, SGPT_24)
CASES.update(
    {
        "llama-magnitude60": ("llama", {"method": "magnitude", "sparsity": 0.6}),
        "llama-alps70": ("llama", {"method": "alps", "sparsity": 0.7, **CALIB}),
        "llama-owl-wanda70": ("llama", {**WANDA, "sparsity": 0.7, "owl": True}),
        "llama-dsnot-wanda60": ("llama", {**WANDA, "sparsity": 0.6, "refine": "dsnot"}),
        "llama-2pass-wanda50": ("llama", {**WANDA, "sequential": False}),
        "llama-bf16-wanda50": ("llama", {**WANDA, "dtype": "bfloat16"}),
        "llama-bf16-sparsegpt24": ("llama", {**SGPT_24, "dtype": "bfloat16"}),
        "llama-lm-head-wanda50": ("llama", {**WANDA, "targets": ["proj$", "lm_head"]}),
        "qwen3_moe-all-wanda50": ("qwen3_moe", {**WANDA, "moe_calibrate": "all"}),
    }
)


def case_dirs(root: Path) -> dict[str, tuple[Path, Path]]:
    """family -> (saved tiny model dir with tokenizer, calibration text file), written under `root`."""
    tokenizer = make_tokenizer()
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(random_text(400, seed=i) for i in range(12)))
    dirs = {}
    for family in sorted({family for family, _ in CASES.values()}):
        path = root / family
        make_family_model(family).save_pretrained(path)
        tokenizer.save_pretrained(path)
        dirs[family] = (path, calib)
    return dirs
