"""`sparsetune export` streams: it reads the checkpoint one decoder block at a time and writes the same files the
in-memory writer wrote (tests/data/export_stream_reference.json, recorded before the change by
scripts/record_export_stream_reference.py), holds about one block, and faults end with one error and no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from architectures import FAMILY_CONFIGS, make_family_model
from export_stream_cases import CARRIED, CASES, PRUNED, file_hashes, pruned_dirs, tensor_hashes
from helpers import small_tmpfs
from safetensors.torch import save_file

from sparsetune.errors import SparsetuneError
from sparsetune.export import stream as stream_mod
from sparsetune.export import writer
from sparsetune.export.config import ExportConfig
from sparsetune.export.stream import safetensors_header, storage_order
from sparsetune.export.writer import run_export
from sparsetune.streaming import CheckpointFiles

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "export_stream_reference.json").read_text())


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield pruned_dirs(tmp_path_factory.mktemp("export-stream"))
    finally:
        torch.set_num_threads(before)


def export_case(case: str, inputs: dict[str, Path], out: Path) -> dict:
    name, settings = CASES[case]
    try:
        report = run_export(ExportConfig(model=str(inputs[name]), output=str(out), **settings))
    except SparsetuneError as err:
        return {"error": str(err)}
    assert report["streamed"]
    return {"files": file_hashes(out)}


@pytest.mark.parametrize("name", sorted(PRUNED))
def test_pruned_inputs_are_the_recorded_ones(name, inputs):
    """The export comparison below is meaningful only on the inputs the reference was recorded from."""
    assert tensor_hashes(inputs[name]) == REFERENCE["inputs"][name]


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_export_is_byte_identical_to_the_in_memory_one(case, inputs, tmp_path):
    if tensor_hashes(inputs[CASES[case][0]]) != REFERENCE["inputs"][CASES[case][0]]:
        pytest.skip("the pruned input differs from the recorded one (see test_pruned_inputs_are_the_recorded_ones)")
    out = tmp_path / "out"
    got, want = export_case(case, inputs, out), REFERENCE["cases"][case]
    assert got.get("error") == want.get("error")
    files, recorded = got.get("files", {}), want.get("files", {})
    assert {k: files.get(k) for k in files.keys() | recorded.keys() if files.get(k) != recorded.get(k)} == {}
    src = inputs[CASES[case][0]]
    for name in CARRIED:
        if out.exists() and (src / name).exists():
            assert (out / name).read_bytes() == (src / name).read_bytes()


@pytest.mark.parametrize("case", ["mixtral-sgpt24-bitmask-shards", "llama-tied-magnitude50-bitmask-shards-bf16"])
def test_the_conversion_path_writes_the_same_files(case, inputs, tmp_path, monkeypatch):
    """A checkpoint whose keys are not save_pretrained's goes through transformers' conversion block by block;
    forced here on a plain checkpoint, it must write the same bytes."""
    init = stream_mod.StreamedCheckpoint.__init__

    def converted(self, streamed):
        init(self, streamed)
        self.direct = False

    monkeypatch.setattr(stream_mod.StreamedCheckpoint, "__init__", converted)
    assert export_case(case, inputs, tmp_path / "out") == REFERENCE["cases"][case]


def test_shard_writer_matches_save_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "a.weight": torch.randn(4, 4, generator=g),
        "a.bitmask": torch.randint(0, 255, (4, 1), dtype=torch.uint8, generator=g),
        "a.shape": torch.tensor([4, 4]),
        "c.meta": torch.randint(-100, 100, (2, 3), dtype=torch.int16, generator=g),
        "c.half": torch.randn(7, generator=g).half(),
        "empty": torch.zeros(0),
        "flag": torch.tensor([True, False]),
        "scalar": torch.tensor(1.5),
    }
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    for spill in (False, True):
        builder = stream_mod.ShardBuilder(tmp_path, 1)
        builder.add(dict(list(tensors.items())[:4]))
        if spill:
            builder._spill()
        builder.add(dict(list(tensors.items())[4:]))
        size, sha = builder.write(tmp_path / "got.safetensors")
        data = (tmp_path / "got.safetensors").read_bytes()
        assert data == (tmp_path / "ref.safetensors").read_bytes()
        assert size == len(data) and not builder.spill_path.exists()
    entries = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    header = safetensors_header(entries, storage_order(entries))
    assert data.startswith(header) and len(data) == len(header) + sum(t.nbytes for t in tensors.values())


def block_bytes_from_headers(folder: Path) -> tuple[int, int]:
    """(largest decoder block's bytes, largest tensor's bytes), summed from the safetensors headers directly."""
    import struct

    blocks: dict[str, int] = {}
    largest = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for key, info in header.items():
            start, end = info["data_offsets"]
            largest = max(largest, end - start)
            parts = key.split(".")
            if "layers" in parts:
                block = ".".join(parts[: parts.index("layers") + 2])
                blocks[block] = blocks.get(block, 0) + end - start
    return max(blocks.values()), largest


@pytest.mark.parametrize("name", ["llama-sgpt24", "mixtral-sgpt24"])
def test_export_reads_at_most_one_block_at_a_time(name, inputs, tmp_path, monkeypatch):
    requested = []
    read = CheckpointFiles.read

    def recording(self, keys):
        keys = list(keys)
        requested.append(self.nbytes(keys))
        return read(self, keys)

    monkeypatch.setattr(CheckpointFiles, "read", recording)
    report = run_export(ExportConfig(model=str(inputs[name]), output=str(tmp_path / "out"), format="sparse-bitmask"))
    block, largest = block_bytes_from_headers(inputs[name])
    assert block >= largest  # tiny configs: a block outweighs the embeddings, so one block is the bound
    assert max(requested) == block == report["read_bytes_max"]
    assert sum(requested) == sum(f.stat().st_size for f in inputs[name].glob("*.safetensors")) - sum(
        8 + int.from_bytes(f.read_bytes()[:8], "little") for f in inputs[name].glob("*.safetensors")
    )


def last_shard(folder: Path) -> Path:
    """The input's last weight file (what the final norm and head are read from, after every block)."""
    return sorted(folder.glob("*.safetensors"))[-1]


def test_truncated_shard_is_one_error_and_no_output(inputs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(inputs["llama-sgpt24"], src)
    shard = last_shard(src)
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsetune", "export", str(src), "-o", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "truncated" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_shard_truncated_while_read_is_refused(inputs, tmp_path, monkeypatch):
    src = tmp_path / "src"
    shutil.copytree(inputs["llama-sgpt24"], src)
    read = CheckpointFiles.read
    calls = []

    def truncating(self, keys):
        calls.append(1)
        if len(calls) == 2:
            shard = last_shard(src)
            with open(shard, "r+b") as f:
                f.truncate(shard.stat().st_size // 2)
        return read(self, keys)

    monkeypatch.setattr(CheckpointFiles, "read", truncating)
    out = tmp_path / "out"
    with pytest.raises(SparsetuneError, match="shard .* (truncated|changed) while this run read it"):
        run_export(ExportConfig(model=str(src), output=str(out)))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "small", "200k") as mount:
        yield mount


def test_too_little_free_space_is_refused_before_any_work(inputs, small_disk):
    out = small_disk / "out"
    with pytest.raises(SparsetuneError, match="not enough disk space for the export .* GB needed"):
        run_export(ExportConfig(model=str(inputs["mixtral-sgpt24"]), output=str(out)))
    assert list(small_disk.iterdir()) == []


def test_disk_full_while_writing_is_one_error_and_no_output(inputs, small_disk, monkeypatch):
    monkeypatch.setattr(writer, "check_free_space", lambda *a, **k: None)  # as if the disk filled meanwhile
    out = small_disk / "out"
    with pytest.raises(SparsetuneError, match="disk full writing"):
        run_export(ExportConfig(model=str(inputs["mixtral-sgpt24"]), output=str(out)))
    assert list(small_disk.iterdir()) == []


def test_a_bin_checkpoint_loads_whole_and_says_so(tmp_path, tiny_tokenizer, caplog):
    from safetensors.torch import load_file

    src = tmp_path / "bin"
    make_family_model("llama").save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with caplog.at_level("INFO", logger="sparsetune.export.writer"):
        report = run_export(ExportConfig(model=str(src), output=str(tmp_path / "out"), max_density=1.0))
    assert not report["streamed"]
    assert "holds no safetensors weights" in caplog.text


@pytest.mark.parametrize(
    ("name", "fmt"),
    [("mixtral-sgpt24", "sparse-24-bitmask"), ("mixtral-sgpt24", "semi-structured-2:4"), ("llama-sgpt24", "dense")],
)
def test_an_exported_dir_streams_to_the_in_memory_files(name, fmt, inputs, tmp_path, monkeypatch):
    """An export re-exported (its tensors decompressed on read) writes what loading it whole and exporting does."""
    exported = tmp_path / "exported"
    run_export(ExportConfig(model=str(inputs[name]), output=str(exported), format="sparse-bitmask"))
    streamed, whole = export_both_ways(exported, tmp_path, monkeypatch, format=fmt, max_shard_size="60KB")
    assert file_hashes(streamed) == file_hashes(whole)


def export_both_ways(src: Path, tmp_path: Path, monkeypatch, **settings) -> tuple[Path, Path]:
    """(streamed output, output of the in-memory path forced) of the same export."""
    streamed, whole = tmp_path / "streamed", tmp_path / "whole"
    assert run_export(ExportConfig(model=str(src), output=str(streamed), **settings))["streamed"]
    with monkeypatch.context() as m:
        m.setattr(writer, "streamable_input", lambda cfg: (None, "forced"))
        assert not run_export(ExportConfig(model=str(src), output=str(whole), **settings))["streamed"]
    return streamed, whole


def test_spilled_shards_and_a_dir_without_generation_config_match_the_in_memory_path(inputs, tmp_path, monkeypatch):
    """Shards past SPILL_BYTES go through the spill file; a dir without generation_config.json gets the one
    from_pretrained builds from config.json."""
    src = tmp_path / "src"
    shutil.copytree(inputs["qwen3_moe-sgpt24"], src)
    (src / "generation_config.json").unlink()
    monkeypatch.setattr(stream_mod, "SPILL_BYTES", 10_000)
    streamed, whole = export_both_ways(src, tmp_path, monkeypatch, format="sparse-24-bitmask", max_shard_size="60KB")
    assert len(list(streamed.glob("*.safetensors"))) > 1
    assert file_hashes(streamed) == file_hashes(whole)
    assert not list(streamed.glob(".*"))


def test_a_hub_id_streams_from_its_cached_snapshot(inputs, tmp_path, monkeypatch):
    import huggingface_hub

    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-pruned"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(inputs["llama-sgpt24"], snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    out = tmp_path / "out"
    report = run_export(ExportConfig(model="someone/tiny-pruned", output=str(out)))
    assert report["streamed"]
    assert file_hashes(out) == REFERENCE["cases"]["llama-sgpt24-sparse-bitmask"]["files"]


@pytest.mark.slow
def test_the_bundled_alias_streams(bundled_model_dir, tmp_path, monkeypatch):
    streamed, whole = export_both_ways(Path("smollm2"), tmp_path, monkeypatch, max_density=1.0)
    assert file_hashes(streamed) == file_hashes(whole)


# Families whose checkpoint layout transformers converts on load (experts fused in memory, split per expert on
# save): save_pretrained's views share one storage, so its shard split is not known from the skeleton.
DENSE_LOADS_WHOLE = ("mixtral", "qwen3_moe", "deepseek_v3")


@pytest.mark.parametrize("fmt", ["sparse-bitmask", "dense"])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_every_family_streams_to_the_in_memory_files(family, fmt, tmp_path, monkeypatch, tiny_tokenizer, one_thread):
    """Random (dense) tiny models of every tested family, cast to bf16 and sharded (the embeddings alone exceed a
    shard): the streamed export writes the files the whole-model path (for dense: save_pretrained) writes."""
    src = tmp_path / family
    make_family_model(family).save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    settings = {"format": fmt, "max_density": 1.0, "dtype": "bfloat16", "max_shard_size": "50KB"}
    if fmt == "dense" and family in DENSE_LOADS_WHOLE:
        report = run_export(ExportConfig(model=str(src), output=str(tmp_path / "out"), **settings))
        assert not report["streamed"]
        return
    streamed, whole = export_both_ways(src, tmp_path, monkeypatch, **settings)
    assert file_hashes(streamed) == file_hashes(whole)


def test_dense_of_a_tied_model_streams_to_save_pretrained_files(inputs, tmp_path, monkeypatch):
    streamed, whole = export_both_ways(inputs["llama-tied-magnitude50"], tmp_path, monkeypatch, format="dense")
    assert file_hashes(streamed) == file_hashes(whole)
    assert (streamed / "model.safetensors").is_file()


@pytest.mark.parametrize("base_dtype", ["auto", "bf16"])
def test_a_seft_adapter_dir_streams_to_the_in_memory_files(base_dtype, tmp_path, monkeypatch):
    """A `seft --no-merge` dir: its base streamed, the trained Linears merged on read, as load_model merges."""
    from test_stream_inputs import adapter_dir

    adapter = adapter_dir(tmp_path, "llama", base_dtype)
    streamed, whole = export_both_ways(adapter, tmp_path, monkeypatch, max_density=1.0)
    assert file_hashes(streamed) == file_hashes(whole)
