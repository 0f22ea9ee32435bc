"""Issue 32: `prune` streams the weights block by block from the input's safetensors to the output's shards.

The streamed outputs are checked bit for bit against tests/data/stream_reference.json, which the in-memory path
wrote before streaming existed (scripts/record_stream_reference.py, main 3a686ca): every output tensor's sha256,
for all 16 tested families (MoE, fused experts and Conv1D included) and the engine's settings. Then: one block in
memory at a time, a tied head pruned after --untie-embeddings, resume after a kill between a block's shard and
its checkpoint, and the faults (missing / mis-shaped tensor, a shard truncated mid-run, a full disk), each one
`error:` line, exit 2 and no output.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from architectures import make_family_model
from helpers import load_weights, make_tiny_model, make_tokenizer, small_tmpfs
from safetensors.torch import save_file
from stream_cases import CALIB, CASES, case_dirs
from typer.testing import CliRunner

from sparsetune import streaming, structure
from sparsetune.cli.app import app
from sparsetune.prune.api import run_prune
from sparsetune.prune.config import PruneConfig

REFERENCE = json.loads((Path(__file__).parents[1] / "data" / "stream_reference.json").read_text())
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return case_dirs(tmp_path_factory.mktemp("stream-cases"))


def _hashes(out: Path) -> dict[str, str]:
    return {
        key: hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for key, t in load_weights(out).items()
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_streamed_prune_writes_the_in_memory_paths_tensors(case, dirs, tmp_path):
    family, settings = CASES[case]
    model_dir, calib = dirs[family]
    out = tmp_path / "out"
    report = run_prune(PruneConfig(model=str(model_dir), output=str(out), calib=str(calib), **settings), False, False)
    assert report["weights"]["streamed"] is True
    assert _hashes(out) == REFERENCE[case]
    # an ordinary sharded HF dir: one shard per block, one for the rest, one for a separate head; an index naming
    # every tensor once
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    dense = make_family_model(family)
    separate_head = not structure.embeddings_tied(dense)
    assert len(shards) == dense.config.num_hidden_layers + 1 + separate_head
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(REFERENCE[case])
    assert not list(out.glob("*stats.json")) and not list(out.glob(".*"))


def _without_run_details(report: dict) -> dict:
    drop = {"timings", "memory", "output", "weights", "prune_s", "versions", "settings"}
    report = {k: v for k, v in report.items() if k not in drop}
    report["summary"] = {k: v for k, v in report["summary"].items() if k not in drop}
    return report


@pytest.mark.parametrize("case", ["llama-wanda50", "qwen3_moe-wanda50", "gpt2-sparsegpt24", "llama-owl-wanda70"])
def test_streamed_output_dir_equals_the_whole_model_runs(case, dirs, tmp_path):
    """Config, generation config, tokenizer and report (less timings and memory) as the --no-stream run writes."""
    family, settings = CASES[case]
    model_dir, calib = dirs[family]
    outs = {}
    for stream in (True, False):
        outs[stream] = tmp_path / f"out-{stream}"
        cfg = PruneConfig(model=str(model_dir), output=str(outs[stream]), calib=str(calib), stream=stream, **settings)
        run_prune(cfg, show_progress=False)
    streamed, whole = outs[True], outs[False]
    assert load_weights(streamed).keys() == load_weights(whole).keys()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (streamed / name).exists() == (whole / name).exists(), name
        if (whole / name).exists():
            assert json.loads((streamed / name).read_text()) == json.loads((whole / name).read_text()), name
    a, b = (json.loads((d / "sparsity_report.json").read_text()) for d in (streamed, whole))
    assert _without_run_details(a) == _without_run_details(b)
    assert a["weights"]["streamed"] and not b["weights"]["streamed"] and b["weights"]["why"] == "--no-stream"


def test_at_most_one_block_is_in_memory(dirs, tmp_path, monkeypatch):
    """Count the materialised parameters of every block whenever one is loaded: never more than one block's."""
    model_dir, calib = dirs["qwen3_moe"]
    block_numel = sum(p.numel() for p in make_family_model("qwen3_moe").model.layers[0].parameters())
    seen, embeddings = [], []
    load = streaming.StreamedModel.load_block

    def counting(self, index, device="cpu"):
        layer = load(self, index, device)
        seen.append(sum(p.numel() for p in self.layers.parameters() if p.device.type != "meta"))
        embeddings.append(self.model.get_input_embeddings().weight.device.type)
        return layer

    monkeypatch.setattr(streaming.StreamedModel, "load_block", counting)
    settings = {**CASES["qwen3_moe-wanda50"][1], "owl": True}  # OWL's pass loads every block once more
    run_prune(PruneConfig(model=str(model_dir), output=str(tmp_path / "o"), calib=str(calib), **settings), False, False)
    assert seen == [block_numel] * 4
    assert embeddings == ["meta"] * 4  # written and freed once the calibration inputs were captured


def test_tied_head_pruned_after_untie_matches_the_whole_model_run(tmp_path):
    model_dir = tmp_path / "tied"
    make_tiny_model("llama", tie=True).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(["the of and to in a is that"] * 40) for _ in range(4)))
    weights = {}
    for stream in (True, False):
        out = tmp_path / f"out-{stream}"
        cfg = PruneConfig(
            model=str(model_dir),
            output=str(out),
            calib=str(calib),
            method="wanda",
            sparsity=0.5,
            targets=["proj$", "lm_head"],
            untie_embeddings=True,
            stream=stream,
            **CALIB,
        )
        run_prune(cfg, show_progress=False)
        weights[stream] = load_weights(out)
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert weights[True].keys() == weights[False].keys() and "lm_head.weight" in weights[True]
    assert all(torch.equal(weights[True][k], weights[False][k]) for k in weights[False])
    head, emb = weights[True]["lm_head.weight"], weights[True]["model.embed_tokens.weight"]
    assert ((head == 0).sum(dim=1) >= 32).all()  # Wanda: int(64 x 0.5) of every row of the separate head
    assert torch.equal(emb, load_weights(model_dir)["model.embed_tokens.weight"])  # the table itself untouched


# ----- resume and faults ------------------------------------------------------------------------------------------

# Killed after block 0's shard is written but before its checkpoint is committed: the resumed run redoes block 0.
KILLED_BETWEEN_SHARD_AND_CHECKPOINT = """
import os, signal
from sparsetune.cli.app import main
from sparsetune.streaming import ShardWriter
write = ShardWriter.write
def write_then_die(self, k, tensors):
    path = write(self, k, tensors)
    if k == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return path
ShardWriter.write = write_then_die
main()
"""


def test_resume_after_a_kill_between_a_shard_and_its_checkpoint_is_bit_identical(dirs, tmp_path):
    model_dir, calib = dirs["mixtral"]
    common = ["prune", model_dir, "--method", "sparsegpt", "--calib", calib, "--calib-samples", "8", "--seqlen", "32"]
    common = [str(a) for a in common]
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-c", KILLED_BETWEEN_SHARD_AND_CHECKPOINT, *common, "-o", str(tmp_path / "a")]
    killed = subprocess.run([*cmd, "--checkpoint-dir", str(ckpt)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9 and not (tmp_path / "a").exists()
    assert (ckpt / "shards").is_dir() and not (ckpt / "state.json").exists()
    cli = [sys.executable, "-m", "sparsetune"]
    resumed = subprocess.run(
        [*cli, *common, "-o", str(tmp_path / "a"), "--checkpoint-dir", str(ckpt)], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([*cli, *common, "-o", str(tmp_path / "b")], capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    a, b = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def _prune_cli(model_dir, calib, out, *extra):
    args = ["prune", str(model_dir), "--calib", str(calib), "--calib-samples", "4", "--seqlen", "32", "-o", str(out)]
    return runner.invoke(app, [*args, *extra])


def _one_error(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def _copy_model(src: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    weights = load_weights(src)
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_a_missing_tensor_is_refused_before_any_work(dirs, tmp_path):
    model_dir, calib = dirs["llama"]
    broken = _copy_model(model_dir, tmp_path / "m", lambda w: w.pop("model.layers.1.mlp.up_proj.weight"))
    error = _one_error(_prune_cli(broken, calib, tmp_path / "out"))
    assert "missing" in error and "model.layers.1.mlp.up_proj.weight" in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_a_mis_shaped_tensor_is_refused_before_any_work(dirs, tmp_path):
    model_dir, calib = dirs["qwen3_moe"]

    def shrink(w):
        w["model.layers.1.mlp.experts.2.down_proj.weight"] = w["model.layers.1.mlp.experts.2.down_proj.weight"][
            :, :16
        ].contiguous()

    broken = _copy_model(model_dir, tmp_path / "m", shrink)
    error = _one_error(_prune_cli(broken, calib, tmp_path / "out"))
    assert "shape" in error and "does not match its config.json" in error
    assert not (tmp_path / "out").exists()


def test_a_shard_truncated_while_the_run_reads_it_is_one_error(dirs, tmp_path, monkeypatch):
    model_dir, calib = dirs["llama"]
    copy = _copy_model(model_dir, tmp_path / "m", lambda w: None)
    load = streaming.StreamedModel.load_block

    def truncate_before_block_1(self, index, device="cpu"):
        if index == 1:  # what another process rewriting the file does between two reads
            path = copy / "model.safetensors"
            os.truncate(path, path.stat().st_size - 1000)
        return load(self, index, device)

    monkeypatch.setattr(streaming.StreamedModel, "load_block", truncate_before_block_1)
    error = _one_error(_prune_cli(copy, calib, tmp_path / "out"))
    assert "model.safetensors" in error and "changed while this run read it" in error
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs."""
    with small_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def test_too_little_free_space_is_refused_before_any_work(dirs, small_disk, tmp_path):
    model_dir, calib = dirs["llama"]
    (small_disk / "filler").write_bytes(b"\0" * (800 << 10))  # leaves less than the 430 KB the output needs
    error = _one_error(_prune_cli(model_dir, calib, small_disk / "out"))
    assert "not enough disk space" in error and "free under" in error
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_disk_that_fills_while_writing_is_one_error_and_no_output(dirs, small_disk, monkeypatch):
    model_dir, calib = dirs["llama"]
    write = streaming.ShardWriter.write

    def fill_after_first_shard(self, k, tensors):
        if k == 2:  # another program takes the rest of the disk
            with open(small_disk / "filler", "wb", buffering=0) as f, pytest.raises(OSError):
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
        return write(self, k, tensors)

    monkeypatch.setattr(streaming.ShardWriter, "write", fill_after_first_shard)
    error = _one_error(_prune_cli(model_dir, calib, small_disk / "out"))
    assert "disk full" in error and "free" in error
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_an_input_without_generation_config_gets_the_one_from_pretrained_builds(dirs, tmp_path):
    model_dir, calib = dirs["llama"]
    bare = _copy_model(model_dir, tmp_path / "bare", lambda w: None)
    (bare / "generation_config.json").unlink()
    outs = []
    for stream in (True, False):
        outs.append(tmp_path / f"out-{stream}")
        cfg = PruneConfig(model=str(bare), output=str(outs[-1]), calib=str(calib), stream=stream, **CALIB)
        run_prune(cfg, show_progress=False)
    a, b = (json.loads((o / "generation_config.json").read_text()) for o in outs)
    assert a == b
