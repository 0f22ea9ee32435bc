"""Recipe plumbing shared by every command: YAML loading, CLI-over-recipe merging, one-line validation errors.

Each command owns its settings schema (a pydantic model with a description on every field); Typer help texts
and recipe validation both come from that one schema.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sparsetune.errors import SparsetuneError

ConfigT = TypeVar("ConfigT", bound=BaseModel)


def field_help(cls: type[BaseModel], name: str) -> str:
    """A field's description plus its default, for `--help`."""
    info = cls.model_fields[name]
    text = info.description or ""
    if not info.is_required() and info.get_default(call_default_factory=True) is not None:
        default = info.get_default(call_default_factory=True)
        if isinstance(default, bool):
            default = str(default).lower()
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "none"
        text += f" (default: {default})"
    return text


def recipe_settings(path: str | os.PathLike[str] | None, kind: str) -> dict[str, Any]:
    """The `kind` settings of a command's `--recipe` file ({} without one): a flat mapping, `{kind: {...}}`,
    or a `sparsetune run` recipe with exactly one `kind` stage."""
    if path is None:
        return {}
    from sparsetune.pipeline import command_settings

    return command_settings(path, kind)


def validate_config(cls: type[ConfigT], data: dict[str, Any], where: str = "settings") -> ConfigT:
    """Validate `data` against `cls`, turning pydantic's report into one actionable line."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(root)"
        if first["type"] == "extra_forbidden":
            valid = ", ".join(sorted(cls.model_fields))
            raise SparsetuneError(f"{where}: unknown key {key!r}; valid keys: {valid}") from err
        msg = first["msg"].removeprefix("Value error, ")
        raise SparsetuneError(f"{where}: {key}: {msg}") from err


def merge_settings(recipe: dict[str, Any], cli_values: dict[str, Any]) -> dict[str, Any]:
    """CLI values that were given (not None) override the recipe's."""
    merged = dict(recipe)
    merged.update({k: v for k, v in cli_values.items() if v is not None})
    return merged


# Settings that name local files or dirs (when they are not a hub id, a bundled alias or a dataset name).
INPUT_PATH_KEYS = ("model", "models", "model_config", "tokenizer", "calib", "data", "val_data", "ppl", "include_path")
OUTPUT_PATH_KEYS = ("output", "checkpoint_dir", "data_dir")  # always paths


def reproducible_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Settings as a recipe that reproduces the run from any working directory: local paths made absolute,
    and `data_dir` set to the mirror actually used (from SPARSETUNE_DATA_DIR when the flag was not given)."""
    from sparsetune.data import NAMED_DATASETS, mirror_dir
    from sparsetune.models import BUNDLED_ALIASES

    def absolute(value: Any) -> Any:
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if not isinstance(value, str) or value in BUNDLED_ALIASES or value in NAMED_DATASETS:
            return value
        path = Path(value).expanduser()
        return str(path.resolve()) if path.exists() else value  # else a hub id (or a name lm-eval knows)

    out = dict(data)
    if "data_dir" in out and out["data_dir"] is None:
        mirror = mirror_dir(None)
        out["data_dir"] = None if mirror is None else str(mirror)
    for key in INPUT_PATH_KEYS:
        if key in out:
            out[key] = absolute(out[key])
    for key in OUTPUT_PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def dump_yaml(cfg: BaseModel, path: str | os.PathLike[str], header: str = "") -> None:
    data = reproducible_settings(cfg.model_dump(mode="json", by_alias=True))
    text = yaml.safe_dump(data, sort_keys=False)
    Path(path).write_text((f"# {header}\n" if header else "") + text)
