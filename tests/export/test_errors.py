"""Export refusals and load-time validation: non-2:4 models, --force-24, truncated/corrupted files, output safety."""

from __future__ import annotations

import json
import logging
import struct

import pytest
import torch
from helpers import bits, make_pruned_dir
from safetensors.torch import load_file, save_file

import sparsetune
from sparsetune.errors import SparsetuneError
from sparsetune.export.codecs import force_24, nm_group_violations
from sparsetune.export.config import ExportConfig
from sparsetune.export.writer import run_export


def _export(src, out, fmt="sparse-bitmask", overwrite=False, **kw):
    return run_export(ExportConfig(model=str(src), output=str(out), format=fmt, **kw), overwrite=overwrite)


@pytest.fixture
def unstructured_dir(tmp_path, tiny_tokenizer):
    return make_pruned_dir(tmp_path / "src", tiny_tokenizer, dtype="bfloat16")


@pytest.mark.parametrize("fmt", ["sparse-24-bitmask", "semi-structured-2:4"])
def test_non_24_model_names_first_offender_and_writes_nothing(fmt, unstructured_dir, tmp_path):
    weights = load_file(str(unstructured_dir / "model.safetensors"))
    w = weights["model.layers.0.self_attn.q_proj.weight"]
    with pytest.raises(SparsetuneError) as err:
        _export(unstructured_dir, tmp_path / "out", fmt)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and f"has {nm_group_violations(w)} of 1024 groups" in msg
    assert "and 13 more Linears" in msg and "--force-24" in msg
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_force_24_reprunes_by_magnitude_with_warning(unstructured_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        report = _export(unstructured_dir, tmp_path / "out", "sparse-24-bitmask", force_24=True)
    assert report["forced_24"] == 14 and any("quality may drop" in r.getMessage() for r in caplog.records)
    got = sparsetune.load(str(tmp_path / "out"), dtype="bfloat16").state_dict()
    src = load_file(str(unstructured_dir / "model.safetensors"))
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert nm_group_violations(got[key]) == 0
        assert torch.equal(bits(got[key]), bits(force_24(src[key])))
    assert torch.equal(got["model.embed_tokens.weight"], src["model.embed_tokens.weight"])


def test_dense_model_is_refused_for_compressed_formats(tmp_path, tiny_model_dir):
    with pytest.raises(SparsetuneError, match="no Linear is sparse enough"):
        _export(tiny_model_dir, tmp_path / "out")


def test_output_safety(unstructured_dir, tmp_path):
    out = tmp_path / "out"
    _export(unstructured_dir, out)
    with pytest.raises(SparsetuneError, match="already exists"):
        _export(unstructured_dir, out)
    _export(unstructured_dir, out, fmt="sparse-24-bitmask", overwrite=True, force_24=True)
    assert json.loads((out / "sparsetune_config.json").read_text())["format"] == "sparse-24-bitmask"
    before = sorted(p.name for p in unstructured_dir.iterdir())
    for bad in (unstructured_dir, unstructured_dir / "inside"):
        with pytest.raises(SparsetuneError, match="overlaps the input"):
            _export(unstructured_dir, bad, overwrite=True)
    assert sorted(p.name for p in unstructured_dir.iterdir()) == before


def _header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


@pytest.fixture
def exported(unstructured_dir, tmp_path):
    out = tmp_path / "out"
    _export(unstructured_dir, out)
    return out


def test_truncated_file_is_refused(exported):
    path = exported / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(SparsetuneError, match="truncated or corrupted"):
        sparsetune.load(str(exported))
    (exported / "sparsetune_config.json").unlink()  # compressed-tensors style dir: no digests to check
    with pytest.raises(SparsetuneError, match="truncated or corrupted"):
        sparsetune.load(str(exported))


def test_corrupted_bytes_are_refused(exported):
    path = exported / "model.safetensors"
    start, header = _header(path)
    data = bytearray(path.read_bytes())
    lo, hi = header["model.layers.0.mlp.up_proj.bitmask"]["data_offsets"]
    data[start + lo + 3] ^= 0b1  # one mask bit flipped: the values no longer line up
    path.write_bytes(bytes(data))
    with pytest.raises(SparsetuneError, match="sha256 mismatch"):
        sparsetune.load(str(exported))
    (exported / "sparsetune_config.json").unlink()
    with pytest.raises(SparsetuneError, match="model.layers.0.mlp.up_proj: bitmask marks"):
        sparsetune.load(str(exported))


@pytest.mark.parametrize(
    "key,bad,match",
    [
        ("model.layers.0.mlp.up_proj.row_offsets", torch.zeros(5, dtype=torch.int64), "row_offsets has shape"),
        ("model.layers.0.mlp.up_proj.bitmask", torch.zeros(128, 8, dtype=torch.int16), "bitmask has dtype"),
        ("model.layers.0.mlp.up_proj.shape", torch.tensor([128, 64, 1]), "should hold 2 int64"),
        ("model.layers.0.mlp.up_proj.compressed", None, "lacks model.layers.0.mlp.up_proj.compressed"),
        ("model.norm.weight", None, "missing weights"),
    ],
)
def test_wrong_tensors_are_refused(exported, key, bad, match):
    (exported / "sparsetune_config.json").unlink()
    path = exported / "model.safetensors"
    tensors = load_file(str(path))
    if bad is None:
        del tensors[key]
    else:
        tensors[key] = bad
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(SparsetuneError, match=match):
        sparsetune.load(str(exported))


def _swap_two_mask_bits(path, key):
    """Move one kept position of a bitmask row to a pruned one: every count (popcount, row offsets) still fits."""
    start, header = _header(path)
    data = bytearray(path.read_bytes())
    lo, hi = header[key]["data_offsets"]
    for pos in range(start + lo, start + hi):
        byte = data[pos]
        if 0 < byte < 0xFF:  # holds a kept and a pruned position
            one = next(b for b in range(8) if byte >> b & 1)
            zero = next(b for b in range(8) if not byte >> b & 1)
            data[pos] = byte ^ (1 << one) ^ (1 << zero)
            path.write_bytes(bytes(data))
            return
    raise AssertionError("no mixed byte in the bitmask")


def test_missing_integrity_record_warns_and_a_tampered_bitmask_is_refused_with_it(exported, caplog):
    key = "model.layers.0.mlp.up_proj"
    want = {k: v.clone() for k, v in load_file(str(exported / "model.safetensors")).items()}  # not the mmap
    meta_file = exported / "sparsetune_config.json"
    meta = json.loads(meta_file.read_text())
    _swap_two_mask_bits(exported / "model.safetensors", f"{key}.bitmask")
    with pytest.raises(SparsetuneError, match="sha256 mismatch"):  # the record catches the edit
        sparsetune.load(str(exported))

    meta.pop("files")  # the record removed: the edit loads, but not silently
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="sparsetune.export.loader"):
        got = sparsetune.load(str(exported)).state_dict()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "has no sha256 record" in warnings[0] and "re-export" in warnings[0]
    from sparsetune.export.codecs import bitmask_decompress

    parts = {p: want[f"{key}.{p}"] for p in ("shape", "compressed", "bitmask", "row_offsets")}
    original = bitmask_decompress(parts)
    moved = got[f"{key}.weight"]
    assert int((moved != 0).sum()) == int((original != 0).sum())
    assert not torch.equal(moved, original)  # different weights: exactly what only the sha256 would catch


def test_intact_export_loads_without_warning_and_a_bad_record_is_refused(exported, caplog):
    with caplog.at_level(logging.WARNING, logger="sparsetune.export.loader"):
        sparsetune.load(str(exported))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    meta_file = exported / "sparsetune_config.json"
    meta = json.loads(meta_file.read_text())
    meta["files"] = {"model.safetensors": "abc"}
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(SparsetuneError, match="must map each weight file to its bytes and sha256"):
        sparsetune.load(str(exported))
