"""Settings that several commands share, declared once so each help text is written once.

A command's schema (`prune/config.py`, `evaluate/config.py`, `train/seft_config.py`, ...) inherits the bases it
needs; `sparsetune <cmd> --help` lists a schema's own options first, then the shared ones.

`Settings.RENAMED` keeps an old setting name working for one release: the old key is accepted in recipes and
overrides, and the CLI keeps the old flag as a hidden alias of the new one (`cli/options.py`).

Torch-free: the CLI builds its flags from these schemas, and `--help` must not import torch.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Settings(BaseModel):
    """The root of every command's schema: unknown keys are refused, renamed keys are read as their new name."""

    model_config = ConfigDict(extra="forbid")

    # old setting name -> its new name; accepted, and hidden from --help, until the release after next
    RENAMED: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not any(old in data for old in cls.RENAMED):
            return data
        data = dict(data)
        for old, new in cls.RENAMED.items():
            if old not in data:
                continue
            if data.get(new) is not None:  # None stands for the default: not given
                raise ValueError(f"{old} is the old name of {new}; give only {new}")
            data[new] = cls.renamed_value(old, data.pop(old), data)
        return data

    @classmethod
    def renamed_value(cls, old: str, value: Any, data: dict[str, Any]) -> Any:
        """The value of renamed setting `old` under its new name (the same, unless the meaning changed too)."""
        return value


class RemoteCodeSettings(Settings):
    trust_remote_code: bool = Field(False, description="Allow model code from the hub (off unless you trust it)")


class DeviceSettings(RemoteCodeSettings):
    device: str = Field("auto", description="Compute device: auto, cpu, cuda, cuda:N")


class DataSettings(Settings):
    data_dir: str | None = Field(None, description="Local mirror dir for named datasets (or SPARSETUNE_DATA_DIR)")


class LoadSettings(DataSettings, DeviceSettings):
    """How a pretrained model is loaded to be pruned or evaluated."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype; auto = checkpoint dtype on GPU, float32 on CPU"
    )


class CalibrationSettings(Settings):
    """The calibration windows a pruning method measures its statistics on (`--calib` itself is per command)."""

    calib_samples: int = Field(128, ge=1, description="Number of calibration samples")
    calib_seqlen: int = Field(
        2048, ge=1, description="Tokens per calibration sample (capped at the model's max positions)"
    )
    seed: int = Field(0, description="Random seed for sampling calibration windows")
    calib_sampling: Literal["random", "consecutive"] = Field(
        "random", description="random: windows from random documents; consecutive: join, tokenize once, slice"
    )
    calib_batch_size: int = Field(4, ge=1, description="Samples per forward mini-batch in the calibration pass")


def without_renamed(schema: type[BaseModel], settings: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """`settings` less what `given` (flags or an override, laid over them next) sets under another name: the old
    or new key of a renamed setting, so the given value wins whichever name either side uses."""
    drop: set[str] = set()
    for old, new in getattr(schema, "RENAMED", {}).items():
        if given.get(old) is not None or given.get(new) is not None:
            drop |= {old, new}
    return {key: value for key, value in settings.items() if key not in drop}
