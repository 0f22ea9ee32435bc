"""Testbed pieces shared by the benchmark drivers and their workers (plain torch: importable from any venv)."""

from __future__ import annotations

import hashlib
import json
import math
import resource
import time
from pathlib import Path

import torch

CALIB_WINDOWS, CALIB_SEQLEN = 32, 512
EVAL_WINDOWS, EVAL_SEQLEN = 32, 1024


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def testbed_ids(tokenizer, c4_jsonl: str, wiki_raw: str, calib_windows: int, eval_windows: int):
    """Calibration: the C4 sample's documents joined with "\\n\\n", tokenized once, first windows of 512.
    Evaluation: `wikitext_eval_ids`."""
    with open(c4_jsonl) as f:
        docs = [json.loads(line)["text"] for line in f if line.strip()]
    calib = tokenizer("\n\n".join(docs), verbose=False)["input_ids"][: calib_windows * CALIB_SEQLEN]
    calib_ids = torch.tensor(calib, dtype=torch.int64).view(calib_windows, CALIB_SEQLEN)
    return calib_ids, wikitext_eval_ids(tokenizer, wiki_raw, eval_windows)


def wikitext_eval_ids(tokenizer, wiki_raw: str, eval_windows: int) -> torch.Tensor:
    """The WikiText-2 raw test file's text as it is, tokenized once, first `eval_windows` windows of 1024."""
    with open(wiki_raw) as f:
        wiki = tokenizer(f.read(), verbose=False)["input_ids"][: eval_windows * EVAL_SEQLEN]
    return torch.tensor(wiki, dtype=torch.int64).view(eval_windows, EVAL_SEQLEN)


@torch.inference_mode()
def perplexity(model, eval_ids: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean token NLL) over the windows (all windows have the same length, so window means average)."""
    total, count = 0.0, 0
    for i in range(0, eval_ids.shape[0], batch_size):
        batch = eval_ids[i : i + batch_size]
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)
        total += float(loss) * n
        count += n
    return math.exp(total / count)


def tensor_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every tensor's raw bytes in a dir's safetensors files, by name, read one tensor at a time (the big
    outputs do not fit in memory)."""
    from safetensors import safe_open

    hashes = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                t = f.get_tensor(key).contiguous()
                hashes[key] = hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return dict(sorted(hashes.items()))


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def make_random_checkpoint(
    folder,
    hidden: int,
    intermediate: int,
    layers: int,
    vocab: int,
    dtype: torch.dtype = torch.bfloat16,
    sparsity: float = 0.0,
    seed: int = 0,
    tokenizer_from=None,
):
    """Write a random-initialised Llama of this config as an HF dir of safetensors shards (one per decoder block,
    one for the embeddings, the final norm and the head) with its index and config.json, without ever holding
    the model: the tensors' names and shapes come from a meta-device skeleton, and each block's tensors are drawn,
    written and dropped in turn. Linear weights are N(0, 0.02) (norms 1); `sparsity` > 0 zeroes the smallest
    magnitudes of the decoder blocks' Linear weights (the threshold of the normal quantile, so about that
    fraction), like a pruned checkpoint. The tokenizer files of `tokenizer_from` (a model dir) are copied when
    given. Returns the dir (a pathlib.Path); the caller deletes it."""
    import shutil
    from pathlib import Path

    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 128)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype=str(dtype).removeprefix("torch."),
    )
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    groups: list[list[str]] = [[] for _ in range(layers)] + [[]]
    for key in shapes:
        parts = key.split(".")
        groups[int(parts[2]) if parts[:2] == ["model", "layers"] else layers].append(key)
    threshold = 0.02 * float(torch.special.ndtri(torch.tensor((1 + sparsity) / 2))) if sparsity > 0 else 0.0
    gen = torch.Generator().manual_seed(seed)
    n = len(groups)
    weight_map, total = {}, 0
    for index, keys in enumerate(groups):
        tensors = {}
        for key in keys:
            shape = shapes[key]
            if len(shape) == 1:  # norms
                tensors[key] = torch.ones(shape, dtype=dtype)
                continue
            t = torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
            if threshold and index < layers:
                t.masked_fill_(t.abs() < threshold, 0)
            tensors[key] = t
        name = f"model-{index + 1:05d}-of-{n:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        for key, t in tensors.items():
            weight_map[key] = name
            total += t.numel() * t.element_size()
        del tensors
    index_data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
    config.save_pretrained(str(folder))
    if tokenizer_from is not None:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
            if (Path(tokenizer_from) / name).is_file():
                shutil.copy2(Path(tokenizer_from) / name, folder / name)
    return folder
