"""Issue 32: an exported compressed dir and a seft adapter dir stream like any other input.

`prune` and `eval` perplexity read them block by block (`sparsetune.stream_inputs`): an export's compressed
modules decompressed on read, an adapter's trained Linears merged on read over its base's tensors. Each result
equals loading the input whole (`load_exported`, `load_model(adapter_dir)`) and running in memory, bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from architectures import make_family_model
from helpers import delta_run, load_weights, make_tiny_model, make_tokenizer, pruned_tiny, random_text
from stream_cases import CALIB
from torch import nn
from typer.testing import CliRunner

from sparsetune import stream_inputs
from sparsetune.cli.app import app
from sparsetune.evaluate import compare, ppl
from sparsetune.export.config import ExportConfig
from sparsetune.export.loader import decompress_state, integrity_record, module_keys, read_tensors
from sparsetune.export.stream_input import ExportedFiles
from sparsetune.export.writer import run_export
from sparsetune.loading import load_model
from sparsetune.prune.api import run_prune
from sparsetune.prune.config import PruneConfig
from sparsetune.streaming import StreamedModel
from sparsetune.train.sparse_delta.adapter import ADAPTER_FILE
from sparsetune.train.sparse_delta.config import DeltaSettings

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
EXPORTS = [
    ("llama", "sparse-bitmask"),
    ("llama", "sparse-24-bitmask"),
    ("llama", "semi-structured-2:4"),
    ("qwen3_moe", "sparse-bitmask"),
    ("qwen3_moe", "sparse-24-bitmask"),
]
ADAPTERS = [("llama", "auto"), ("llama", "bf16"), ("qwen2", "bf16")]  # qwen2: q/k/v biases, rounded by a bf16 base
WANDA = {"method": "wanda", "sparsity": 0.5, **CALIB}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream-inputs")
    (root / "calib.txt").write_text("\n\n".join(random_text(300, seed=40 + i) for i in range(10)))
    return root


def _pruned_24(root, family):
    dense, pruned = root / family, root / f"{family}-24"
    if not pruned.exists():
        make_family_model(family, seed=7).save_pretrained(dense)
        make_tokenizer().save_pretrained(dense)
        run_prune(PruneConfig(model=str(dense), output=str(pruned), method="magnitude", pattern="2:4"), False, False)
    return pruned


def exported(root, family, fmt):
    out = root / f"{family}-{fmt.replace(':', '')}"
    if not out.exists():
        run_export(ExportConfig(model=str(_pruned_24(root, family)), output=str(out), format=fmt))
    return out


def adapter_dir(root, family, base_dtype):
    """A `seft --no-merge`-style dir: seft_adapter.safetensors naming its (pruned) base dir, trained a few steps."""
    out = root / f"adapter-{family}-{base_dtype}"
    if out.exists():
        return out
    if family == "llama":
        model = pruned_tiny(0.5)
    else:
        model = make_tiny_model(family, seed=2)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if isinstance(mod, nn.Linear) and ".layers." in name:
                    mod.weight.mul_(mod.weight.abs() >= mod.weight.abs().median())
                    if mod.bias is not None:
                        mod.bias.normal_()
    base = root / f"base-{family}-{base_dtype}"
    model.save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    settings = DeltaSettings(delta_rank=2, reselect_every=3, select_window=1, reactivate=True, base_dtype=base_dtype)
    method = delta_run(model, settings, 6, root / f"run-{family}-{base_dtype}").method  # the real loop, in memory
    out.mkdir()
    method.save_adapter(str(out / ADAPTER_FILE), {"base_model": str(base)})
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key  # bits, -0.0 and NaN too


def _prune_both(model_dir, out_root, **settings):
    reports, weights = {}, {}
    for stream in (True, False):
        out = out_root / f"pruned-{stream}"
        calib = str(out_root / "calib.txt")
        cfg = PruneConfig(model=str(model_dir), output=str(out), calib=calib, stream=stream, **settings)
        reports[stream] = run_prune(cfg, False, False)
        weights[stream] = load_weights(out)
    assert reports[True]["weights"]["streamed"] is True and reports[False]["weights"]["streamed"] is False
    _equal(weights[True], weights[False])
    return out_root / "pruned-True", out_root / "pruned-False"


def _ppl_both(location, ids, dtype="float32", **kwargs):
    model, _ = load_model(str(location), dtype=dtype, device="cpu")
    memory = ppl.perplexity_on_ids(model, ids, **kwargs)
    source, why = stream_inputs.stream_input(location)
    assert source is not None, why
    streamed = ppl.streamed_perplexity_on_ids(stream_inputs.open_streamed(source, getattr(torch, dtype)), ids, **kwargs)
    drop = ("seconds", "tokens_per_s")
    return ({k: v for k, v in r.items() if k not in drop} for r in (memory, streamed))


# ----- exported compressed dirs ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "fmt"), EXPORTS)
def test_exported_files_read_what_the_loader_decompresses(root, family, fmt):
    path = exported(root, family, fmt)
    files = ExportedFiles(path)
    whole = decompress_state(read_tensors(path, integrity_record(path)), fmt, module_keys(path))
    assert sorted(files.names()) == sorted(whole)
    assert {k: (e.dtype, e.shape) for k, e in files.entries.items()} == {
        k: (t.dtype, tuple(t.shape)) for k, t in whole.items()
    }
    _equal(files.read(files.names()), whole)
    assert files.nbytes() < sum(t.numel() * t.itemsize for t in whole.values())  # the compressed bytes are read
    assert files.fingerprint() == ExportedFiles(path, verify=False).fingerprint()  # what a resume compares


@pytest.mark.parametrize(("family", "fmt"), EXPORTS)
def test_prune_streams_an_export_as_the_whole_model_run(root, family, fmt, tmp_path):
    (tmp_path / "calib.txt").write_text((root / "calib.txt").read_text())
    path = exported(root, family, fmt)
    streamed, whole = _prune_both(path, tmp_path, **WANDA)
    config = json.loads((streamed / "config.json").read_text())
    assert "quantization_config" not in config
    assert config == json.loads((whole / "config.json").read_text())


@pytest.mark.parametrize(("family", "fmt"), [EXPORTS[0], EXPORTS[4]])
def test_perplexity_streams_an_export_as_in_memory(root, family, fmt):
    ids = ppl.eval_source(make_tokenizer(), str(root / "calib.txt"))[0]
    memory, streamed = _ppl_both(exported(root, family, fmt), ids, seqlen=48, batch_size=2)
    assert streamed == memory


def test_a_tampered_export_is_refused_before_any_work(root, tmp_path, monkeypatch):
    import shutil

    path = tmp_path / "export"
    shutil.copytree(exported(root, "llama", "sparse-bitmask"), path)
    shard = next(path.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one value changed
    shard.write_bytes(bytes(data))
    monkeypatch.setattr(StreamedModel, "load_block", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(path), "--method", "magnitude", "--sparsity", "0.6", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "sha256 mismatch" in result.output and not out.exists()


# ----- seft adapter dirs ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "base_dtype"), ADAPTERS)
def test_prune_streams_an_adapter_dir_as_the_whole_model_run(root, family, base_dtype, tmp_path):
    (tmp_path / "calib.txt").write_text((root / "calib.txt").read_text())
    path = adapter_dir(root, family, base_dtype)
    source, _ = stream_inputs.stream_input(path)
    assert source is not None and source.kind == "adapter"
    _prune_both(path, tmp_path, **WANDA)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_adapter_dir_reads_the_merged_model(root, dtype):
    """Every tensor the streamed adapter dir materialises equals `load_model(adapter_dir)`'s, and the trained
    Linears (weights and biases) differ from the base's."""
    for family, base_dtype in ADAPTERS:
        path = adapter_dir(root, family, base_dtype)
        source, _ = stream_inputs.stream_input(path)
        streamed = stream_inputs.open_streamed(source, getattr(torch, dtype))
        for i in range(len(streamed.layers)):
            streamed.load_block(i)
        streamed.load_rest()
        streamed.load_head()
        whole, _ = load_model(str(path), dtype=dtype, device="cpu")
        _equal(streamed.model.state_dict(), whole.state_dict())
        assert streamed.files.fingerprint() != streamed.files.base.fingerprint()  # a resume tells them apart
        base, _ = load_model(str(source.model_dir), dtype=dtype, device="cpu")
        changed = {k for k, v in base.state_dict().items() if not torch.equal(v, whole.state_dict()[k])}
        assert changed and all(".layers." in k for k in changed)
        if family == "qwen2" and dtype == "float32":
            assert any(k.endswith(".bias") for k in changed)  # the bf16 base rounds the biases it holds


def test_perplexity_streams_an_adapter_dir_as_in_memory(root):
    ids = ppl.eval_source(make_tokenizer(), str(root / "calib.txt"))[0]
    memory, streamed = _ppl_both(adapter_dir(root, "llama", "bf16"), ids, seqlen=48, batch_size=2)
    assert streamed == memory


def test_eval_streams_exports_and_adapter_dirs_and_records_it(root, tmp_path):
    text = root / "calib.txt"
    for path in (exported(root, "llama", "sparse-24-bitmask"), adapter_dir(root, "llama", "auto")):
        assert compare.stream_location(str(path)) is None  # lm-eval's estimate: plain checkpoints only
        assert compare.ppl_stream_location(str(path)) == path
        out = tmp_path / path.name
        args = ["eval", str(path), "--ppl", str(text), "--seqlen", "48", "--ppl-batch-size", "2", "-o", str(out)]
        result = runner.invoke(app, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        entry = json.loads((out / "eval.json").read_text())["models"][0]
        assert entry["weights"] == "streamed"
        model, tokenizer = load_model(str(path), device="cpu")
        direct = ppl.perplexity(model, tokenizer, str(text), seqlen=48, batch_size=2)
        assert entry["ppl"][str(text)]["nll"] == direct["nll"]


def test_an_adapter_on_another_base_is_refused(root, tmp_path):
    """The base's weights changed since training: the module's hashes say so when its block is read, one error
    line, no output."""
    import shutil

    from safetensors.torch import load_file, save_file

    path = adapter_dir(root, "llama", "auto")
    source, _ = stream_inputs.stream_input(path)
    base = tmp_path / "base"
    shutil.copytree(source.model_dir, base)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.1.self_attn.q_proj.weight"] *= 2
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    moved = tmp_path / "adapter"
    moved.mkdir()
    from sparsetune.train.sparse_delta.adapter import read_adapter, save_adapter

    tensors, config = read_adapter(path)
    save_adapter(moved / ADAPTER_FILE, tensors, {**config, "base_model": str(base)})
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", str(moved), "--method", "magnitude", "--sparsity", "0.6", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert "different base" in result.output and not out.exists()


def test_an_adapter_on_an_nf4_base_loads_whole(root, tmp_path):
    from sparsetune.train.sparse_delta.adapter import read_adapter, save_adapter

    tensors, config = read_adapter(adapter_dir(root, "llama", "auto"))
    nf4 = tmp_path / "nf4"
    nf4.mkdir()
    save_adapter(nf4 / ADAPTER_FILE, tensors, {**config, "base_dtype": "nf4"})
    source, why = stream_inputs.stream_input(nf4)
    assert source is None and "NF4" in why
    assert compare.ppl_stream_location(str(nf4)) is None


def _counting(loads: list[int]):
    load_block = StreamedModel.load_block

    def counting(self, index, device="cpu"):
        loads.append(index)
        return load_block(self, index, device)

    return counting


def test_resume_from_an_export_or_an_adapter_dir_is_bit_identical(root, tmp_path, monkeypatch):
    """Interrupted after block 1's shard (block 0 checkpointed), then resumed: the output equals a straight run's."""
    from sparsetune.streaming import ShardWriter

    write = ShardWriter.write

    def interrupted(self, k, tensors):
        path = write(self, k, tensors)
        if k == 2:
            raise KeyboardInterrupt
        return path

    for path in (exported(root, "qwen3_moe", "sparse-bitmask"), adapter_dir(root, "llama", "bf16")):
        out, ckpt = tmp_path / f"a-{path.name}", tmp_path / f"ckpt-{path.name}"
        cfg = PruneConfig(
            model=str(path), output=str(out), calib=str(root / "calib.txt"), checkpoint_dir=str(ckpt), **WANDA
        )
        with monkeypatch.context() as m:
            m.setattr(ShardWriter, "write", interrupted)
            with pytest.raises(KeyboardInterrupt):
                run_prune(cfg, False, False)
        assert not out.exists()
        loads: list[int] = []
        with monkeypatch.context() as m:
            m.setattr(StreamedModel, "load_block", _counting(loads))
            run_prune(cfg.model_copy(update={"resume": True}), False, False)
        assert loads == [1]  # block 0 came from the checkpoint
        straight = tmp_path / f"b-{path.name}"
        run_prune(cfg.model_copy(update={"output": str(straight), "checkpoint_dir": None}), False, False)
        _equal(load_weights(out), load_weights(straight))
