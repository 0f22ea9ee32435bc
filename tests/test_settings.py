"""Shared settings bases (`sparsetune.settings`, `train/training_config.py`): each help text written once, and
renamed settings that keep their old names for one release."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from pydantic import ValidationError

from sparsetune.evaluate.config import EvalConfig, SweepConfig
from sparsetune.export.config import ExportConfig
from sparsetune.prune.config import PruneConfig
from sparsetune.settings import CalibrationSettings, DeviceSettings, without_renamed
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet_config import SmetConfig
from sparsetune.train.training_config import TrainingSettings

PACKAGE = Path(__file__).resolve().parents[1] / "sparsetune"


def written_descriptions(root: Path = PACKAGE) -> dict[str, list[str]]:
    """Every `Field(description=...)` text written in the package's source, with where each is written."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Field":
                for kw in node.keywords:
                    if kw.arg == "description" and isinstance(kw.value, ast.Constant):
                        found[kw.value.value].append(f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_no_help_text_is_written_twice(tmp_path):
    (tmp_path / "copied.py").write_text(
        'a = Field(1, description="Steps")\nb = Field(2, description="St" "eps")\nc = Field(3, description="x")\n'
    )
    assert written_descriptions(tmp_path) == {"Steps": ["copied.py:1", "copied.py:2"], "x": ["copied.py:3"]}
    texts = written_descriptions()
    assert len(texts) > 100  # the scan sees the schemas
    assert {text: where for text, where in texts.items() if len(where) > 1} == {}


@pytest.mark.parametrize(
    ("schema", "bases"),
    [
        (PruneConfig, (CalibrationSettings, DeviceSettings)),
        (SweepConfig, (CalibrationSettings, DeviceSettings)),
        (EvalConfig, (DeviceSettings,)),
        (SeftConfig, (TrainingSettings,)),
        (SmetConfig, (TrainingSettings,)),
    ],
)
def test_commands_share_one_declaration_of_each_common_setting(schema, bases):
    for base in bases:
        assert issubclass(schema, base)
        for name, info in base.model_fields.items():
            if name in vars(schema).get("__annotations__", {}):  # redeclared on purpose: another default or text
                continue
            assert schema.model_fields[name].description == info.description, name
    assert (
        ExportConfig.model_fields["trust_remote_code"].description
        == PruneConfig.model_fields["trust_remote_code"].description
    )


def test_seft_and_smet_keep_their_own_defaults_under_one_help_text():
    seft, smet = SeftConfig(model="m"), SmetConfig()
    assert (seft.batch_size, seft.steps, smet.batch_size, smet.steps) == (8, 300, 16, 1000)
    for name in ("batch_size", "steps", "beta1", "eps", "grad_accum", "checkpoint_dir", "data_dir", "device"):
        assert SeftConfig.model_fields[name].description == SmetConfig.model_fields[name].description
    assert SeftConfig(model="m", output="out/", checkpoint_every=5).checkpoint_path() == "out.ckpt"
    assert SmetConfig(output="o", resume=True).checkpoint_path() == "o.ckpt"
    assert SmetConfig(output="o", checkpoint_dir="c").checkpoint_path() == "c" and smet.checkpoint_path() is None
    with pytest.raises(ValidationError, match="batch_size 16 is not divisible by grad_accum 3"):
        SmetConfig(grad_accum=3)
    with pytest.raises(ValidationError, match="warmup_steps 5 must be below steps 5"):
        SmetConfig(steps=5, warmup_steps=5)


@pytest.mark.parametrize("steps", [1, 19, 20, 299, 1000, 12345])
def test_the_warmup_is_what_each_command_ran_before_the_rename(steps):
    # seft: --warmup-steps, default steps // 20; smet: --warmup-ratio R (default 0.05) meant int(R * steps)
    assert SeftConfig(model="m", steps=steps).warmup == steps // 20
    assert SmetConfig(steps=steps).warmup == int(0.05 * steps)
    for ratio in (0.0, 0.05, 0.1, 0.37):
        smet = SmetConfig(steps=steps, warmup_ratio=ratio)
        assert smet.warmup_steps == smet.warmup == int(ratio * steps)


def test_a_renamed_settings_old_name_is_read_as_the_new_one():
    assert PruneConfig(model="m", seqlen=64).calib_seqlen == 64
    assert "seqlen" not in PruneConfig(model="m", seqlen=64).model_dump()
    with pytest.raises(ValidationError, match="seqlen is the old name of calib_seqlen; give only calib_seqlen"):
        PruneConfig(model="m", seqlen=64, calib_seqlen=32)
    with pytest.raises(ValidationError, match="calib_seqlen"):
        PruneConfig(model="m", seqlen=0)
    with pytest.raises(ValidationError, match=r"warmup_ratio 1\.0 must be a fraction in \[0, 1\)"):
        SmetConfig(warmup_ratio=1.0)
    with pytest.raises(ValidationError, match="unknown|Extra inputs"):
        SeftConfig(model="m", warmup_ratio=0.1)  # only smet had it


def test_a_given_value_under_either_name_replaces_the_other():
    recipe = {"calib_seqlen": 64, "seqlen": 8, "sparsity": 0.5}
    assert without_renamed(PruneConfig, recipe, {"seqlen": 32}) == {"sparsity": 0.5}
    assert without_renamed(PruneConfig, recipe, {"calib_seqlen": 32}) == {"sparsity": 0.5}
    assert without_renamed(PruneConfig, recipe, {"seqlen": None, "method": "wanda"}) == recipe  # None: not given
    sweep = {"seqlen": 128, "calib_seqlen": 64}  # sweep's seqlen is the perplexity window: no rename there
    assert without_renamed(SweepConfig, sweep, {"calib_seqlen": 32}) == sweep


def test_the_rename_keeps_prune_checkpoints_valid():
    """A prune checkpoint is keyed by a hash of its settings; these are the hashes from before the rename."""
    from sparsetune.prune.api import settings_hash

    assert settings_hash(PruneConfig(model="m", seqlen=64, method="wanda")) == "e0718f14ea8fe398"
    assert settings_hash(PruneConfig(model="m", calib_seqlen=64, method="wanda")) == "e0718f14ea8fe398"
    assert settings_hash(PruneConfig(model="m", method="sparsegpt", refine="dsnot")) == "a9b48b691bbd47f7"
