"""Self-calibration: calibration text sampled from the model itself (Williams et al.), cached on disk.

Samples start from BOS and are drawn at `temperature` with top-p and top-k off, `seqlen` tokens each, batched
and seeded. The cache key covers the model's weights, the seed and every setting, so a re-run reuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune.data import CalibrationSet, token_hash
from sparsetune.loading import cache_dir
from sparsetune.structure import model_fingerprint

log = logging.getLogger(__name__)


def start_token(tokenizer: Any, model: nn.Module) -> int:
    for candidate in (tokenizer.bos_token_id, model.config.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start sampling from")


def cache_key(model: nn.Module, n_samples: int, seqlen: int, seed: int, temperature: float) -> str:
    import transformers

    settings = {
        "model": model_fingerprint(model),
        "n": n_samples,
        "seqlen": seqlen,
        "seed": seed,
        "temperature": temperature,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]


@torch.no_grad()
def generate_samples(
    model: nn.Module, tokenizer: Any, n_samples: int, seqlen: int, seed: int, temperature: float, batch_size: int
) -> torch.Tensor:
    """(n_samples, seqlen) token ids: BOS followed by seqlen-1 sampled tokens (EOS suppressed until full length)."""
    device = next(model.parameters()).device
    bos = start_token(tokenizer, model)
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n_samples, batch_size):
            b = min(batch_size, n_samples - start)
            prompt = torch.full((b, 1), bos, dtype=torch.long, device=device)
            out = model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
                max_new_tokens=seqlen - 1,
                min_new_tokens=seqlen - 1,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else bos,
            )
            rows.append(out[:, :seqlen].cpu())
    return torch.cat(rows)


def self_calibration_set(
    model: nn.Module,
    tokenizer: Any,
    n_samples: int,
    seqlen: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch_size: int = 16,
    cache: Path | None = None,
) -> tuple[CalibrationSet, dict[str, Any]]:
    """The self-generated calibration set, from the on-disk cache when the same one was made before."""
    from safetensors.torch import load_file, save_file

    folder = (cache or cache_dir()) / "self-calibration"
    path = folder / f"{cache_key(model, n_samples, seqlen, seed, temperature)}.safetensors"
    info: dict[str, Any] = {"cache_file": str(path), "temperature": temperature}
    if path.exists():
        ids = load_file(str(path))["input_ids"]
        info.update(cached=True, generation_s=0.0)
    else:
        t0 = time.perf_counter()
        ids = generate_samples(model, tokenizer, n_samples, seqlen, seed, temperature, batch_size)
        info.update(cached=False, generation_s=round(time.perf_counter() - t0, 3))
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"input_ids": ids.contiguous()}, str(tmp))
        tmp.replace(path)
        log.info("generated %d self-calibration samples in %.1f s", n_samples, info["generation_s"])
    return CalibrationSet(ids, "self", "self-generated", seed, token_hash(ids)), info
