"""The registry of input formats that wrap a model, and the two the package registers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sparsetune import input_formats
from sparsetune.errors import SparsetuneError


def _never(path: Path) -> bool:
    return False


def _no_files(path: Path, base_files, verify: bool):
    return None


def test_importing_sparsetune_registers_both_formats_without_torch():
    code = (
        "import json, sys, sparsetune\n"
        "from sparsetune.input_formats import _FORMATS\n"
        "print(json.dumps([[f.name, f.base_model is not None] for f in _FORMATS] + ['torch' in sys.modules]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    *formats, torch_imported = json.loads(out)
    assert sorted(formats) == [["adapter", True], ["exported", False]]
    assert torch_imported is False


def test_a_format_gives_either_its_loader_or_its_base(monkeypatch):
    monkeypatch.setattr(input_formats, "_FORMATS", [])
    for kwargs in ({}, {"load": print, "base_model": str, "apply": print}, {"base_model": str}, {"apply": print}):
        with pytest.raises(ValueError, match="either load, or base_model and apply"):
            input_formats.register_format("bad", "bad dir", _never, _no_files, **kwargs)
    assert input_formats._FORMATS == []
    input_formats.register_format("ok", "ok dir", _never, _no_files, load=print)
    with pytest.raises(ValueError, match="registered twice"):
        input_formats.register_format("ok", "ok dir", _never, _no_files, load=print)
    assert [f.name for f in input_formats._FORMATS] == ["ok"]
    assert input_formats.format_named("ok").load is print


def test_detect_format_finds_the_one_format_claiming_a_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(input_formats, "_FORMATS", [])
    input_formats.register_format("a", "a dir", lambda p: (p / "a").exists(), _no_files, load=print)
    input_formats.register_format("b", "b dir", lambda p: (p / "b").exists(), _no_files, load=print)
    assert input_formats.detect_format(tmp_path) is None
    (tmp_path / "b").write_text("")
    assert input_formats.detect_format(str(tmp_path)).name == "b"
    (tmp_path / "a").write_text("")
    with pytest.raises(SparsetuneError, match=r"is both a a dir and a b dir"):
        input_formats.detect_format(tmp_path)


def test_the_registered_formats_tell_their_dirs_apart(tmp_path):
    adapter, exported, plain = tmp_path / "adapter", tmp_path / "exported", tmp_path / "plain"
    for d in (adapter, exported, plain):
        d.mkdir()
    (adapter / "seft_adapter.safetensors").write_bytes(b"")
    (exported / "sparsetune_config.json").write_text(json.dumps({"format": "sparse-bitmask"}))
    (exported / "config.json").write_text("{}")
    (plain / "config.json").write_text("{}")
    (plain / "seft_adapter.safetensors").write_bytes(b"")  # a merged seft output keeps its adapter: a plain model
    assert input_formats.detect_format(adapter).name == "adapter"
    assert input_formats.detect_format(exported).name == "exported"
    assert input_formats.detect_format(plain) is None
