"""Testbed pieces shared by the benchmark drivers and their workers (plain torch at import: importable from any
venv; the helpers that run or load sparsetune import it when called)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

CALIB_WINDOWS, CALIB_SEQLEN = 32, 512
EVAL_WINDOWS, EVAL_SEQLEN = 32, 1024
ROOT = Path(__file__).resolve().parents[1]


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


def sparsetune(*args: str, tree: Path | None = None) -> tuple[dict[str, object], float]:
    """Run the CLI in its own process; returns its --json summary and the wall time. `tree`: run the sparsetune
    package of that checkout instead (same venv)."""
    cmd = [sys.executable, "-m", "sparsetune", *args]
    env = {**os.environ, "PYTHONPATH": str(tree)} if tree is not None else None
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tree or ROOT, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(cmd)}")
    last = [line for line in done.stdout.splitlines() if line.startswith("{")]
    return (json.loads(last[-1]) if last else {}), wall


def sparsetune_measured(
    *args: str, tree: Path | None = None, env: dict[str, str] | None = None
) -> tuple[dict[str, object], float, int]:
    """`sparsetune(...)`, also returning the peak RSS of the whole process in bytes (its rusage, from wait4).
    `tree`: run the sparsetune package of that checkout instead (same venv); `env`: extra environment variables."""
    cmd = [sys.executable, "-m", "sparsetune", *args]
    env = {**os.environ, **(env or {}), **({"PYTHONPATH": str(tree)} if tree is not None else {})}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=tree or ROOT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        sys.stderr.write(stderr[-4000:])
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}")
    last = [line for line in stdout.splitlines() if line.startswith("{")]
    return (json.loads(last[-1]) if last else {}), wall, int(usage.ru_maxrss) * 1024  # Linux: KiB


def append_row(results: Path, row: dict[str, object]) -> None:
    """Print one JSON line and append it to the results file as it lands."""
    line = json.dumps(row)
    print(line, flush=True)
    results.parent.mkdir(parents=True, exist_ok=True)
    with open(results, "a") as f:
        f.write(line + "\n")


def recorded_rows(results: Path, match: dict[str, object]) -> dict[str, dict[str, object]]:
    """The latest recorded row of each run whose settings equal `match`, so a suite can run in several sittings."""
    rows: dict[str, dict[str, object]] = {}
    if results.exists():
        for line in results.read_text().splitlines():
            row = json.loads(line)
            if "run" in row and all(row.get(k) == v for k, v in match.items()):
                rows[str(row["run"])] = row
    return rows


def testbed_prune_dir(work: Path, calib_windows: int, sparsity: float, method: str, model: str) -> Path:
    label = "smollm2" if model == "smollm2" else Path(model).name
    return work / f"{label}-{method}{round(sparsity * 100)}-calib{calib_windows}x{CALIB_SEQLEN}"


def prune_testbed(
    work: Path, calib_windows: int, sparsity: float, method: str = "wanda", model: str = "smollm2", tree=None
) -> Path:
    """`model` (the bundled SmolLM2-135M by default) pruned by `method` to `sparsity` on the testbed's calibration
    (the first `calib_windows` x 512 tokens of the C4 sample, consecutive); reused when already written."""
    out = testbed_prune_dir(work, calib_windows, sparsity, method, model)
    if not (out / "sparsity_report.json").exists():
        sparsetune(
            "prune", model, "-o", str(out), "--method", method, "--sparsity", str(sparsity),
            "--calib", "c4", "--calib-samples", str(calib_windows), "--seqlen", str(CALIB_SEQLEN),
            "--calib-sampling", "consecutive", "--overwrite", "--json", tree=tree,
        )  # fmt: skip
    return out


def training_schedule(steps: int, batch_size: int, seqlen: int, calib_windows: int) -> list[str]:
    """The `sparsetune seft` data and schedule options of a run: C4 past the tokens the pruning calibrated on."""
    return [
        "--data", "c4", "--skip-tokens", str(calib_windows * CALIB_SEQLEN), "--seqlen", str(seqlen),
        "--batch-size", str(batch_size), "--steps", str(steps), "--warmup-steps", str(min(10, steps // 10)),
    ]  # fmt: skip


def decoder_zero_counts(model) -> list[tuple[int, int]]:
    """(zeros, entries) of every Linear weight inside the decoder blocks."""
    lin = [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return [(int((w == 0).sum()), w.numel()) for w in lin]


def decoder_sparsity(model) -> float:
    counts = decoder_zero_counts(model)
    return sum(z for z, _ in counts) / sum(n for _, n in counts)


def sparsity_check(counts: list[tuple[int, int]], target: float) -> dict[str, object]:
    """The decoder's zeros against `target`, counted as sparsetune's pruners count (int(entries * target) per
    matrix, or once over all of them for a global threshold): exact when they equal either count."""
    zeros, entries = sum(z for z, _ in counts), sum(n for _, n in counts)
    per_matrix = sum(int(n * target + 1e-9) for _, n in counts)
    total = int(entries * target + 1e-9)
    return {
        "decoder_zeros": zeros,
        "decoder_weights": entries,
        "target_zeros_per_matrix": per_matrix,
        "target_zeros_total": total,
        "zeros_off_target": zeros - total,
        "sparsity_exact": zeros in (per_matrix, total),
    }


def evaluate(model_dir, eval_ids, arc_limit: float | None, sparsity_target: float | None = None) -> dict[str, object]:
    """Testbed perplexity and ARC-Easy accuracy (offline lm-eval task) of a saved model; with `sparsity_target`,
    also its decoder's zeros against that sparsity (`sparsity_check`)."""
    from sparsetune import loading
    from sparsetune.evaluate import harness

    model, tok = loading.load_model(str(model_dir), dtype="float32", device="cpu")
    result: dict[str, object] = {
        "wikitext2_ppl": round(perplexity(model, eval_ids), 4),
        "decoder_sparsity": decoder_sparsity(model),
    }
    if sparsity_target is not None:
        result |= sparsity_check(decoder_zero_counts(model), sparsity_target)
    if arc_limit != 0:
        with harness.prepared_tasks(["arc_easy"]) as setup:
            tasks = harness.run_tasks(model, tok, setup, limit=arc_limit)
        result["arc_easy_acc"] = tasks["arc_easy"].get("acc")
    return result
