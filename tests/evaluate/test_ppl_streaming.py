"""Streamed perplexity (one decoder block in memory at a time) against the in-memory loop, and lm-eval's memory
rule (the whole model, accelerate's offload, or one error line before anything loads)."""

from __future__ import annotations

import collections
import json
import shutil

import psutil
import pytest
import torch
from architectures import make_family_model
from helpers import make_tiny_model, make_tokenizer, random_text, run_cli, write_choice_task

from sparsetune.evaluate import compare, ppl
from sparsetune.loading import load_model
from sparsetune.streaming import StreamedModel

TIMING_KEYS = ("seconds", "tokens_per_s")


def save_dir(model, path):
    model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "eval.txt"
    path.write_text("\n\n".join(random_text(250, seed=20 + i) for i in range(3)))
    return path


@pytest.fixture(scope="module")
def ids(text_file):
    return ppl.eval_source(make_tokenizer(), str(text_file))[0]


def both(path, ids, dtype=torch.float32, **kwargs):
    """(in-memory result, streamed result) on the model dir `path`, timing fields dropped."""
    model, _ = load_model(str(path), dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], device="cpu")
    memory = ppl.perplexity_on_ids(model, ids, **kwargs)
    streamed = ppl.streamed_perplexity_on_ids(StreamedModel(path, dtype), ids, **kwargs)
    return ({k: v for k, v in r.items() if k not in TIMING_KEYS} for r in (memory, streamed))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen3_moe", "opt"])
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, ids, family):
    """Same batches, same operations on the same shapes: NLL sums equal exactly (gemma2: sliding-window layers
    and logit soft-capping; gpt2: Conv1D and learned positions; opt: its own decoder; qwen3_moe: routed experts)."""
    path = save_dir(make_family_model(family, seed=3), tmp_path / family)
    assert len(ids) > 5 * 64
    settings = [
        dict(seqlen=64, batch_size=1),
        dict(seqlen=64, batch_size=3),  # a short last batch
        dict(seqlen=64, stride=40, batch_size=2),  # sliding windows, a shorter last window
    ]
    for kwargs in settings:
        memory, streamed = both(path, ids, **kwargs)
        assert streamed == memory, kwargs  # every field, nll and ppl by ==


def test_bf16_tied_head_and_disk_offloaded_hidden_states(tmp_path, ids):
    path = save_dir(make_tiny_model("llama", seed=4, tie=True), tmp_path / "tied")
    memory, streamed = both(path, ids, dtype=torch.bfloat16, seqlen=48, batch_size=2)
    assert streamed == memory
    model, _ = load_model(str(path), dtype="float32", device="cpu")
    expected = ppl.perplexity_on_ids(model, ids, seqlen=48, batch_size=2)
    on_disk = ppl.streamed_perplexity_on_ids(
        StreamedModel(path, torch.float32), ids, seqlen=48, batch_size=2, hidden_budget=0
    )
    assert ppl.hidden_store(model, ppl.make_windows(len(ids), 48), torch.device("cpu"), budget=0).mode == "disk"
    assert on_disk["nll"] == expected["nll"]


def test_only_one_block_is_ever_materialised(tmp_path, ids, monkeypatch):
    path = save_dir(make_family_model("llama", seed=5), tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    h, inter, heads, kv = (
        config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    )
    head_dim = h // heads
    # q, o: h x h; k, v: h x (kv heads x head dim); gate, up, down: h x inter; two RMSNorm weights of h.
    block_numel = 2 * h * h + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    seen = []
    load_block = StreamedModel.load_block

    def materialised(self):
        return sum(p.numel() for p in self.layers.parameters() if p.device.type != "meta")

    def counting(self, index, device="cpu"):
        before = materialised(self)
        layer = load_block(self, index, device)
        seen.append((index, before, materialised(self)))
        return layer

    monkeypatch.setattr(StreamedModel, "load_block", counting)
    streamed = StreamedModel(path, torch.float32)
    ppl.streamed_perplexity_on_ids(streamed, ids, seqlen=64, batch_size=2)
    assert seen == [(i, 0, block_numel) for i in range(config["num_hidden_layers"])]
    assert materialised(streamed) == 0


def test_several_sources_share_one_pass_over_the_weights(tmp_path, ids, monkeypatch):
    path = save_dir(make_family_model("gemma2", seed=9), tmp_path / "gemma2")
    loads = []
    load_block = StreamedModel.load_block
    monkeypatch.setattr(
        StreamedModel, "load_block", lambda self, i, device="cpu": loads.append(i) or load_block(self, i, device)
    )
    jobs = [ppl.PplJob(ids, 64, label="a"), ppl.PplJob(ids[:300], 48, stride=20, label="b")]
    results = ppl.streamed_perplexities(StreamedModel(path, torch.float32), jobs, batch_size=2)
    assert loads == [0, 1]  # each block read once for both sources
    model, _ = load_model(str(path), dtype="float32", device="cpu")
    for job, result in zip(jobs, results, strict=True):
        expected = ppl.perplexity_on_ids(model, job.ids, job.seqlen, job.stride, batch_size=2)
        assert result["nll"] == expected["nll"] and result["tokens_scored"] == expected["tokens_scored"]
        assert result["shared_pass_sources"] == 2


def test_eval_streams_plain_dirs_and_records_it(tmp_path, text_file):
    dense = save_dir(make_tiny_model("llama", seed=6), tmp_path / "dense")
    out = tmp_path / "eval"
    result = run_cli("eval", dense, "--ppl", text_file, "--seqlen", "64", "--ppl-batch-size", "2", "-o", out)
    assert result.exit_code == 0, result.output
    entry = json.loads((out / "eval.json").read_text())["models"][0]
    assert entry["weights"] == "streamed" and "tasks_weights" not in entry
    model, tokenizer = load_model(str(dense), device="cpu")
    direct = ppl.perplexity(model, tokenizer, str(text_file), seqlen=64, batch_size=2)
    assert entry["ppl"][str(text_file)]["nll"] == direct["nll"]
    assert entry["ppl"][str(text_file)]["dataset"] == direct["dataset"]
    # A GGUF file loads whole. An exported compressed dir streams its perplexity, decompressed on read (lossless:
    # the same figure); lm-eval's memory estimate (stream_location) reads plain checkpoints only.
    fake_gguf = tmp_path / "model.gguf"
    fake_gguf.write_bytes(b"")
    assert compare.stream_location(str(fake_gguf)) is None
    exported = tmp_path / "bitmask"
    assert run_cli("export", dense, "--format", "sparse-bitmask", "--max-density", "1", "-o", exported).exit_code == 0
    assert compare.stream_location(str(exported)) is None and compare.stream_location(str(dense)) == dense
    out2 = tmp_path / "eval2"
    result = run_cli("eval", exported, "--ppl", text_file, "--seqlen", "64", "--ppl-batch-size", "2", "-o", out2)
    assert result.exit_code == 0, result.output
    entry2 = json.loads((out2 / "eval.json").read_text())["models"][0]
    assert entry2["weights"] == "streamed" and compare.ppl_stream_location(str(exported)) == exported
    assert entry2["ppl"][str(text_file)]["nll"] == direct["nll"]


# ----- lm-eval: the whole model, offloaded, or refused --------------------------------------------------------------


def fake_memory(monkeypatch, available: int) -> None:
    real = psutil.virtual_memory()
    fake = collections.namedtuple("svmem", real._fields)(
        *[available if f == "available" else getattr(real, f) for f in real._fields]
    )
    monkeypatch.setattr(psutil, "virtual_memory", lambda: fake)


@pytest.fixture
def task_dir(tmp_path):
    words = ["man", "it", "on", "world", "time"]
    questions = [(f"the {w}", i % 2) for i, w in enumerate(words)]
    return write_choice_task(tmp_path / "tasks", "tiny_task", questions, ["is good", "was long"])


def test_tasks_that_do_not_fit_are_refused_before_anything_loads(tmp_path, task_dir, monkeypatch):
    dense = save_dir(make_tiny_model("llama", seed=7), tmp_path / "dense")
    weights = compare.model_bytes(dense, torch.float32)
    assert weights == sum(p.numel() * 4 for p in make_tiny_model("llama", seed=7).parameters())
    fake_memory(monkeypatch, weights // 2)
    free = collections.namedtuple("usage", "total used free")(10**12, 10**12 - 1000, 1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: free)

    def no_loading(*args, **kwargs):
        raise AssertionError("nothing may load before the memory check")

    monkeypatch.setattr(compare.loading, "load_model", no_loading)
    monkeypatch.setattr(compare, "streamed_perplexities", no_loading)
    result = run_cli("eval", dense, "--tasks", "tiny_task", "--include-path", task_dir, "--dtype", "float32")
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    need = weights * (1 + compare.TASK_MEMORY_OVERHEAD)
    assert "lm-eval tasks run the model whole" in errors[0]
    assert (
        f"needs about {need / 1e9:.1f} GB" in errors[0] and f"{weights / 2 / 1e9:.1f} GB of RAM available" in errors[0]
    )


def test_tasks_that_do_not_fit_run_offloaded(tmp_path, task_dir, text_file, monkeypatch):
    """With too little RAM but room on disk, accelerate's offload runs the task, with the in-memory accuracy; the
    perplexity is streamed with its hidden states on disk (they exceed the share of the faked RAM)."""
    dense = save_dir(make_tiny_model("llama", seed=8), tmp_path / "dense")
    args = ["eval", dense, "--tasks", "tiny_task", "--include-path", task_dir, "--ppl", text_file, "--seqlen", "64"]
    whole = run_cli(*args, "-o", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    fake_memory(monkeypatch, 1000)
    offloaded = run_cli(*args, "-o", tmp_path / "offloaded")
    assert offloaded.exit_code == 0, offloaded.output
    a, b = (json.loads((tmp_path / name / "eval.json").read_text())["models"][0] for name in ("whole", "offloaded"))
    assert a["tasks_weights"] == "in-memory" and b["tasks_weights"] == "offload"
    assert a["weights"] == b["weights"] == "streamed"
    assert a["tasks"]["tiny_task"]["acc"] == b["tasks"]["tiny_task"]["acc"]
    assert a["tasks"]["tiny_task"]["n_samples"] == 5
    assert a["ppl"][str(text_file)]["nll"] == b["ppl"][str(text_file)]["nll"]


def test_hub_ids_stream_from_their_local_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    dense = save_dir(make_tiny_model("llama", seed=10), tmp_path / "snapshot")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(dense))
    assert compare.stream_location("someone/tiny-llama") == dense

    def not_cached(repo_id, **kwargs):
        raise OSError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)
    assert compare.stream_location("someone/tiny-llama") is None  # the ordinary load then reports it
