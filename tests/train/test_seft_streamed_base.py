"""`seft --base-dtype nf4` reads the model block by block and quantizes each block as it loads: its results equal
the whole-model load's (`--no-stream`) bit for bit, and at most one block's full-precision targeted Linears exist
at a time."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from architectures import make_family_model
from helpers import load_weights, make_pruned, make_pruned_dir, make_tokenizer, seft_settings, write_text
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from sparsetune.errors import SparsetuneError
from sparsetune.streaming import StreamedModel
from sparsetune.train import heap
from sparsetune.train.seft import FinetuneRun, run_seft
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.sparse_delta import streamed_base
from sparsetune.train.sparse_delta.delta_linear import DeltaLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def nf4_settings(pruned, data, out, **extra) -> dict:
    method = {"base_dtype": "nf4", "delta_rank": 4, "reselect_every": 3, "select_window": 2, "reactivate": True}
    return seft_settings(pruned, data, out, **{**method, **extra})


def losses(out) -> list[float]:
    return [json.loads(r)["loss"] for r in (out / "train_log.jsonl").read_text().splitlines()]


TIMINGS = {"step_s", "tokens_per_s", "mean_step_s", "finish_s", "teacher_s_per_step", "teacher_step_share"}
TIMINGS |= {"peak_rss_bytes", "cuda_peak_bytes"}


def without_timings(value, path: tuple[str, ...] = ()):
    """`value` (a report or a log line) less what a run measures (times, memory peaks) and the run's own output
    path and --stream setting."""
    if isinstance(value, dict):
        skip = TIMINGS | ({"output", "stream"} if path[-1:] in (("settings",), ("summary",)) else set())
        return {k: without_timings(v, (*path, k)) for k, v in value.items() if k not in skip}
    if isinstance(value, list):
        return [without_timings(v, path) for v in value]
    return value


def assert_same_outputs(a, b, merged: bool = True, settings: bool = True) -> None:
    """The same log, report, adapter and (merged) model tensor for tensor; a streamed run's model (b) is one shard
    per decoder block plus one for the rest, with the index and the same config files, and loads in transformers."""
    assert losses(a) == losses(b)
    log_a, log_b = ([json.loads(r) for r in (d / "train_log.jsonl").read_text().splitlines()] for d in (a, b))
    assert without_timings(log_a) == without_timings(log_b)
    if merged:
        wa, wb = load_weights(a), load_weights(b)
        assert wa.keys() == wb.keys()
        assert all(
            wa[k].dtype == wb[k].dtype and torch.equal(wa[k].view(torch.uint8), wb[k].view(torch.uint8)) for k in wa
        )
        for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
            assert json.loads((a / name).read_text()) == json.loads((b / name).read_text())
        if list(b.glob("model-*.safetensors")):  # streamed: the blocks, then the rest, and their index
            blocks = AutoConfig.from_pretrained(b).num_hidden_layers
            assert len(list(b.glob(f"model-*-of-{blocks + 1:05d}.safetensors"))) == blocks + 1
            index = json.loads((b / "model.safetensors.index.json").read_text())
            assert sorted(index["weight_map"]) == sorted(wb)
        # and transformers loads it as it loads the whole run's (fused experts in its own layout)
        sa, sb = (AutoModelForCausalLM.from_pretrained(d, dtype="auto").state_dict() for d in (a, b))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    else:
        assert not list(a.glob("model*.safetensors")) and not list(b.glob("model*.safetensors"))
    ra, rb = load_file(str(a / "seft_adapter.safetensors")), load_file(str(b / "seft_adapter.safetensors"))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    report_a, report_b = (json.loads((d / "sparsity_report.json").read_text()) for d in (a, b))
    assert report_a["modules"] == report_b["modules"]
    assert report_a["finetune_history"][-1]["nf4_zeroed"] == report_b["finetune_history"][-1]["nf4_zeroed"]
    if not settings:  # runs told apart by their checkpoint settings
        for report in (report_a, report_b):
            del report["finetune_history"][-1]["settings"]
    assert without_timings(report_a) == without_timings(report_b)


class Recorder:
    """Counts the load paths: whole-model loads and streamed blocks."""

    def __init__(self, monkeypatch) -> None:
        from sparsetune import loading

        self.whole, self.blocks = 0, []
        load_model, load_block = loading.load_model, StreamedModel.load_block

        def counting_load(*args, **kwargs):
            self.whole += 1
            return load_model(*args, **kwargs)

        def counting_block(streamed, index, device="cpu"):
            self.blocks.append(index)
            return load_block(streamed, index, device)

        monkeypatch.setattr(loading, "load_model", counting_load)
        monkeypatch.setattr(StreamedModel, "load_block", counting_block)


@pytest.mark.parametrize("merge", [True, False])
def test_streamed_nf4_base_equals_the_whole_load(tmp_path, monkeypatch, merge):
    """A magnitude-pruned input with its report and an untied head; --no-merge compares the adapters."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    calls = Recorder(monkeypatch)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "whole", stream=False, merge=merge)), False, False)
    assert calls.whole == 1 and calls.blocks == []
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "streamed", merge=merge)), False, False)
    assert calls.whole == 1 and calls.blocks == [0, 1]  # each block read once, the model never whole
    assert_same_outputs(tmp_path / "whole", tmp_path / "streamed", merged=merge)


@pytest.mark.parametrize("merge", [True, False])
def test_tied_embeddings_and_no_report(tmp_path, merge):
    """A tied head, and masks read from the zeros (no sparsity report): the start's matrices in named order."""
    pruned = make_pruned_dir(tmp_path / "tied", make_tokenizer(), tie=True)
    assert not (pruned / "sparsity_report.json").exists()
    data = write_text(tmp_path / "t.txt")
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "whole", stream=False, merge=merge)), False, False)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "streamed", merge=merge)), False, False)
    assert_same_outputs(tmp_path / "whole", tmp_path / "streamed", merged=merge)
    if merge:
        assert "lm_head.weight" not in load_weights(tmp_path / "streamed")  # tied: written once, as save_pretrained


def test_resume_of_a_streamed_run_is_bit_identical(tmp_path):
    """Stopped after step 5 (checkpoint of step 4), resumed streamed: equals the uninterrupted whole-load run; the
    run identity ignores --no-stream, so a whole-load checkpoint resumes streamed."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    reference = nf4_settings(pruned, data, tmp_path / "ref", stream=False, steps=8)
    run_seft(SeftConfig(**reference), False, False)
    cut = {**reference, "output": str(tmp_path / "cut"), "checkpoint_dir": str(tmp_path / "cut.ckpt")}
    cut["checkpoint_every"] = 4

    class Stop(Exception):
        pass

    class StopAfter5(FinetuneRun):
        def train_step(self, step):
            if step == 5:
                raise Stop
            return super().train_step(step)

    with pytest.raises(Stop):
        StopAfter5(SeftConfig(**cut), show_progress=False).run()
    run_seft(SeftConfig(**{**cut, "resume": True}), False, False)
    assert_same_outputs(tmp_path / "ref", tmp_path / "cut", settings=False)
    cut2 = {**cut, "output": str(tmp_path / "cut2"), "checkpoint_dir": str(tmp_path / "cut2.ckpt")}
    with pytest.raises(Stop):
        StopAfter5(SeftConfig(**{**cut2, "stream": False}), False, False).run()
    run_seft(SeftConfig(**{**cut2, "resume": True}), False, False)
    assert_same_outputs(tmp_path / "ref", tmp_path / "cut2", settings=False)


def test_at_most_one_block_of_full_precision_linears_exists(tmp_path, monkeypatch):
    """As each block loads, every earlier block's targeted Linears are NF4 DeltaLinears already and their
    full-precision weights are freed (nothing keeps them alive): the full-precision targeted weights in memory never
    exceed one block's."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    load_block = StreamedModel.load_block
    seen: list[int] = []
    loaded: list[weakref.ref] = []  # every full-precision targeted weight read so far

    def full_precision_linears(model: nn.Module) -> dict[str, nn.Linear]:
        return {
            name: m
            for name, m in model.named_modules()
            if type(m) is nn.Linear and ".layers." in name and m.weight.device.type != "meta"
        }

    def checked(streamed, index, device="cpu"):
        gc.collect()
        assert not full_precision_linears(streamed.model)  # the blocks before were wrapped
        assert all(ref() is None for ref in loaded)  # and their input weights let go
        layer = load_block(streamed, index, device)
        linears = full_precision_linears(streamed.model)
        seen.append(len(linears))
        loaded.extend(weakref.ref(m.weight) for m in linears.values())
        return layer

    monkeypatch.setattr(StreamedModel, "load_block", checked)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "out", steps=2)), False, False)
    assert seen == [7, 7]  # one block's q, k, v, o, gate, up, down
    gc.collect()
    assert len(loaded) == 14 and all(ref() is None for ref in loaded)

    class Inspect(FinetuneRun):
        def build_method(self, context):
            method = super().build_method(context)
            layers = [m for n, m in self.model.named_modules() if isinstance(m, DeltaLinear)]
            assert len(layers) == 14 and all(type(m.base).__name__ == "Linear4bit" for m in layers)
            return method

    Inspect(SeftConfig(**nf4_settings(pruned, data, tmp_path / "out2", steps=1)), show_progress=False).run()


def test_each_block_hands_the_block_caches_freed_blocks_back(tmp_path, monkeypatch):
    """With the CPU block cache on (a 1 KB threshold, so the tiny blocks' tensors go through it), quantizing a block
    leaves freed temporaries in the cache; they are unmapped before the next block is read, not kept for sizes the
    next block would only partly reuse."""
    if not heap.install_block_cache(0.001):
        pytest.skip("no C++ compiler to build the block cache with")
    heap.stop_block_cache()
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    load_block, release = StreamedModel.load_block, streamed_base.release_cached_blocks
    cached_at_read: list[int] = []  # as each block is read
    cached_at_release: list[int] = []  # as the load hands the cache's blocks back

    def checked_read(streamed, index, device="cpu"):
        cached_at_read.append(heap.block_cache_stats()["cached_bytes"])
        return load_block(streamed, index, device)

    def checked_release():
        cached_at_release.append(heap.block_cache_stats()["cached_bytes"])
        return release()

    monkeypatch.setattr(StreamedModel, "load_block", checked_read)
    monkeypatch.setattr(streamed_base, "release_cached_blocks", checked_release)
    settings = nf4_settings(pruned, data, tmp_path / "out", steps=1, cpu_block_cache_mb=0.001)
    report = run_seft(SeftConfig(**settings), False, False)
    assert report["summary"]["cpu_block_cache"]["hits"] > 0  # the cache served the run
    assert len(cached_at_release) == 3 and cached_at_release[0] > 0  # each block, then the head: block 0 left some
    assert cached_at_read[1:] == [0]  # and they were handed back before block 1 was read


@pytest.mark.parametrize("merge", [True, False])
def test_the_final_write_holds_one_merged_block_at_a_time(tmp_path, monkeypatch, merge):
    """The end of a streamed run merges, checks and writes one block at a time: when a block is merged, no earlier
    block's merged weights are alive (merged into the model: its full-precision Linears; --no-merge: the weights
    computed for the check and the report), and each shard is written while only its own block's exist."""
    from sparsetune.streaming import ShardWriter
    from sparsetune.train.sparse_delta import method as method_module

    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    model: list[nn.Module] = []
    computed: list[tuple[str, weakref.ref]] = []  # --no-merge: every merged weight computed, by its module
    merges: list[list[str]] = []  # --merge: the modules of each merge
    shards: list[set[str]] = []  # the merged modules alive at each shard's write

    def block_of(name: str) -> str:
        return name.split(".layers.")[1].split(".")[0] if ".layers." in name else "rest"

    def merged_alive() -> set[str]:
        gc.collect()
        linears = {n for n, m in model[0].named_modules() if type(m) is nn.Linear and ".layers." in n}
        linears = {n for n in linears if model[0].get_submodule(n).weight.device.type != "meta"}
        return linears | {n for n, ref in computed if ref() is not None}

    merge_model, merged_weight, write = method_module.merge_model, method_module.merged_weight, ShardWriter.write

    def checked_merge(m, layers):
        assert not merged_alive()  # the blocks before were written and freed
        merges.append(list(layers))
        return merge_model(m, layers)

    def checked_weight(layer):
        name = next(n for n, m in model[0].named_modules() if m is layer)
        assert {block_of(n) for n in merged_alive()} <= {block_of(name)}
        weight = merged_weight(layer)
        computed.append((name, weakref.ref(weight)))
        return weight

    def checked_write(writer, k, tensors):
        shards.append(merged_alive())
        return write(writer, k, tensors)

    monkeypatch.setattr(method_module, "merge_model", checked_merge)
    monkeypatch.setattr(method_module, "merged_weight", checked_weight)
    monkeypatch.setattr(ShardWriter, "write", checked_write)

    class Keep(FinetuneRun):
        def build_method(self, context):
            model.append(self.model)
            return super().build_method(context)

    Keep(SeftConfig(**nf4_settings(pruned, data, tmp_path / "out", steps=2, merge=merge)), show_progress=False).run()
    if merge:
        assert [sorted({block_of(n) for n in names}) for names in merges] == [["0"], ["1"], []]
        assert [len(names) for names in merges] == [7, 7, 0]  # q, k, v, o, gate, up, down; the head is not trained
        assert [sorted({block_of(n) for n in alive}) for alive in shards] == [["0"], ["1"], []]
    else:
        assert [block_of(n) for n, _ in computed] == ["0"] * 7 + ["1"] * 7
        assert not shards  # the adapter only


def test_a_failed_end_check_writes_nothing(tmp_path):
    """The end-of-run check runs over the blocks as they are written: a module off its start count (here the start
    is told down_proj of block 1, the last block written, had 1000 more non-zeros) stops the run with the whole
    load's error, and nothing is left at -o."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")

    class OffCount(FinetuneRun):
        def finish(self):
            self.start.active_counts["model.layers.1.mlp.down_proj"] += 1000
            return super().finish()

    errors = []
    for stream in (False, True):
        out = tmp_path / f"out-{stream}"
        with pytest.raises(SparsetuneError, match="the sparsity changed") as err:
            OffCount(SeftConfig(**nf4_settings(pruned, data, out, steps=2, stream=stream)), show_progress=False).run()
        errors.append(str(err.value))
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))
    assert errors[0] == errors[1]


def test_a_drifted_start_loads_the_whole_model(tmp_path, monkeypatch):
    """A mask off its report's target needs the whole model in full precision for its re-prune: the run falls back
    to the whole load, and equals --no-stream."""
    pruned = make_pruned(tmp_path)
    report_path = pruned / "sparsity_report.json"
    report = json.loads(report_path.read_text())
    name = next(iter(report["modules"]))
    report["modules"][name]["zeros"] -= 3  # the report says 3 more weights are active than the model holds
    report_path.write_text(json.dumps(report))
    data = write_text(tmp_path / "t.txt")
    calls = Recorder(monkeypatch)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "streamed")), False, False)
    assert calls.whole == 1
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "whole", stream=False)), False, False)
    assert_same_outputs(tmp_path / "whole", tmp_path / "streamed")


@pytest.mark.parametrize("family", ["qwen2", "phi3", "mixtral"])
def test_other_families_equal_the_whole_load(tmp_path, monkeypatch, family):
    """Biased q/k/v (qwen2), fused qkv and gate_up Linears (phi3), and fused 3-D experts that stay frozen beside the
    wrapped attention Linears (mixtral): the masks come from the zeros of every decoder matrix."""
    model = make_family_model(family)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".layers." in name and param.dim() >= 2:
                param.masked_fill_(torch.rand(param.shape, generator=gen) < 0.5, 0.0)
    pruned = tmp_path / family
    model.save_pretrained(pruned)
    make_tokenizer().save_pretrained(pruned)
    data = write_text(tmp_path / "t.txt")
    calls = Recorder(monkeypatch)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "whole", stream=False)), False, False)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "streamed")), False, False)
    assert calls.whole == 1 and calls.blocks == list(range(model.config.num_hidden_layers))
    assert_same_outputs(tmp_path / "whole", tmp_path / "streamed")


def test_a_budget_larger_than_a_module_is_refused_as_it_loads(tmp_path):
    """The same one-line refusal as the whole load's (tests/cli/test_seft.py), and nothing written."""
    pruned = make_pruned(tmp_path, sparsity=0.7)
    data = write_text(tmp_path / "t.txt")
    for out, stream in ((tmp_path / "whole", False), (tmp_path / "streamed", True)):
        with pytest.raises(SparsetuneError) as err:
            run_seft(SeftConfig(**nf4_settings(pruned, data, out, delta_rank=16, stream=stream)), False, False)
        assert "--delta-rank 16 gives model.layers.0.self_attn.q_proj 1821 entries" in str(err.value)
        assert "only 1229 non-zero weights of 4096" in str(err.value)
        assert not out.exists()


def test_distillation_over_a_streamed_base_equals_the_whole_load(tmp_path):
    """SquareHead distillation (per-block features of the student) from the dense model the report names."""
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    extra = {"distill_loss": "squarehead", "steps": 4}
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "whole", stream=False, **extra)), False, False)
    run_seft(SeftConfig(**nf4_settings(pruned, data, tmp_path / "streamed", **extra)), False, False)
    assert_same_outputs(tmp_path / "whole", tmp_path / "streamed")
