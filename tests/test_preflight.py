"""The checks a stage runs before the library import (sparsetune/preflight.py) agree with the library's."""

from __future__ import annotations

import itertools

import pytest

from sparsetune import preflight
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import SweepConfig
from sparsetune.prune import api, auto, registry
from sparsetune.prune.config import PruneConfig
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet_config import SmetConfig


@pytest.mark.parametrize(
    ("method", "owl", "refine"), itertools.product(registry.METHODS, [False, True], ["none", "dsnot"])
)
def test_reads_calibration_is_the_library_s_needs_calibration(method, owl, refine):
    cfg = PruneConfig(model="m", output="o", method=method, owl=owl, refine=refine)
    assert preflight.reads_calibration(cfg) == api.needs_calibration(cfg)


def test_reads_calibration_resolves_auto_first(monkeypatch):
    table = {"0.5": {"method": "magnitude", "owl": False, "refine": "none", "ppl": 30.0, "time_vs_wanda": 0.5}}
    monkeypatch.setattr(auto, "choices", lambda: table)
    assert preflight.reads_calibration(PruneConfig(model="m", sparsity=0.5)) is False
    assert preflight.reads_calibration(PruneConfig(model="m", sparsity=0.5, owl=True)) is True  # an explicit --owl


def test_checks_refuse_a_bad_output_and_then_bad_data(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)))
    (tmp_path / "exists").mkdir()
    seft = SeftConfig(model="m", output=str(tmp_path / "exists"), data=str(binary))
    with pytest.raises(SparsetuneError, match="already exists"):  # the output first, as the library checks it
        preflight.check_training(seft, overwrite=False)
    with pytest.raises(SparsetuneError, match="bin.txt is a binary file"):
        preflight.check_training(seft, overwrite=True)
    val = SeftConfig(model="m", output=str(tmp_path / "new"), val_data=str(binary))
    with pytest.raises(SparsetuneError, match="bin.txt is a binary file"):
        preflight.check_training(val, overwrite=False)
    smet = SmetConfig(output=str(tmp_path / "new"), data=str(tmp_path / "none.txt"))
    with pytest.raises(SparsetuneError, match="not found"):
        preflight.check_training(smet, overwrite=False)
    prune = PruneConfig(model="m", output=str(tmp_path / "new"), method="magnitude", calib=str(binary))
    preflight.check_prune(prune, overwrite=False)  # magnitude reads no calibration data
    with pytest.raises(SparsetuneError, match="bin.txt is a binary file"):
        preflight.check_prune(prune.model_copy(update={"method": "wanda"}), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin.txt", "exists"]


def test_a_sweep_checks_its_calib_only_when_a_point_calibrates(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(bytes(range(256)))
    sweep = SweepConfig(model="m", output=str(tmp_path / "out"), calib=str(binary), methods=["magnitude"])
    preflight.check_sweep(sweep, overwrite=False)
    for update in ({"methods": ["magnitude", "wanda"]}, {"refine": ["none", "dsnot-dense"]}):
        with pytest.raises(SparsetuneError, match="bin.txt is a binary file"):
            preflight.check_sweep(sweep.model_copy(update=update), overwrite=False)
    preflight.check_sweep(sweep.model_copy(update={"methods": ["wanda"], "sparsities": [0.0]}), overwrite=False)
