"""Recipes: reading YAML (with line numbers for errors, and a bound on alias expansion), settings merged from a
recipe and the command line, and validation against a command's schema in one actionable line.

Each command owns its settings schema (a pydantic model with a description on every field); its flags
(sparsetune/cli/options.py), its `--recipe` and the stages of a `sparsetune run` recipe (sparsetune/pipeline.py)
are all checked against that one schema. Torch-free: the CLI imports this module to parse flags.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from sparsetune.errors import SparsetuneError

ConfigT = TypeVar("ConfigT", bound=BaseModel)
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
STAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass
class Located:
    """Parsed YAML plus the line of every key and list item, for errors that point into the file."""

    data: Any
    lines: dict[tuple[Any, ...], int]
    source: str

    def where(self, path: tuple[Any, ...]) -> str:
        """'recipe r.yaml line 7' for the deepest known prefix of `path`."""
        for end in range(len(path), -1, -1):
            if path[:end] in self.lines:
                return f"{self.source} line {self.lines[path[:end]]}"
        return self.source


def _record_lines(node: yaml.Node, path: tuple[Any, ...], lines: dict[tuple[Any, ...], int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key_path = (*path, key_node.value)
            lines[key_path] = key_node.start_mark.line + 1
            _record_lines(value_node, key_path, lines)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            lines[(*path, i)] = item.start_mark.line + 1
            _record_lines(item, (*path, i), lines)


# Aliases (&name / *name) let a few hundred bytes of YAML stand for billions of nodes; everything after
# parsing (line recording, ${var} substitution, validation) walks the expanded tree. So the expansion, not
# the file size, is bounded: a long recipe written out in full costs time in proportion to its size and is
# accepted; aliases may add at most this much on top of what is written.
MAX_ALIAS_NODES = 100_000
MAX_ALIAS_CHARS = 10_000_000  # one long string referenced many times


def alias_growth(root: yaml.Node) -> tuple[int, int]:
    """(nodes, scalar characters) that aliases add when `root` is expanded, counted without expanding it.

    PyYAML's composer makes each alias the very node object of its anchor, so the document is a graph of
    shared nodes: one memoised walk gives every node's expanded size. Raises ValueError on a recursive alias.
    """
    sizes: dict[int, tuple[int, int] | None] = {}  # id(node) -> expanded (nodes, chars); None while being walked
    written = [0, 0]  # the same counts with every node once

    def expanded(node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in sizes:
            if sizes[key] is None:
                raise ValueError("an alias refers to a node that contains it")
            return sizes[key]
        sizes[key] = None
        own = (1, len(node.value)) if isinstance(node, yaml.ScalarNode) else (1, 0)
        written[0], written[1] = written[0] + own[0], written[1] + own[1]
        children = (
            [n for pair in node.value for n in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
            if isinstance(node, yaml.SequenceNode)
            else []
        )
        nodes, chars = own
        for child in children:
            child_nodes, child_chars = expanded(child)
            nodes, chars = nodes + child_nodes, chars + child_chars
        sizes[key] = (nodes, chars)
        return nodes, chars

    nodes, chars = expanded(root)
    return nodes - written[0], chars - written[1]


def read_recipe(path: str | os.PathLike[str]) -> Located:
    p = Path(path)
    if not p.is_file():
        raise SparsetuneError(f"recipe {p} not found; pass an existing YAML file")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SparsetuneError(
            f"recipe {p} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
            "pass a YAML file saved as UTF-8"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)  # libyaml's parser when present: 10x faster
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_aliases(node, p)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise SparsetuneError(f"recipe {p}{where} is not valid YAML; fix the syntax") from err
    except RecursionError:
        raise SparsetuneError(f"recipe {p} is nested too deeply to read; flatten it") from None
    finally:
        loader.dispose()
    lines: dict[tuple[Any, ...], int] = {}
    if node is not None:
        _record_lines(node, (), lines)
    return Located(data if data is not None else {}, lines, f"recipe {p}")


def _check_aliases(node: yaml.Node, path: Path) -> None:
    try:
        nodes, chars = alias_growth(node)
    except ValueError:
        raise SparsetuneError(
            f"recipe {path}: an alias (*name) refers to a mapping or list that contains it; write the value out"
        ) from None
    if nodes > MAX_ALIAS_NODES or chars > MAX_ALIAS_CHARS:
        size = f"{nodes:,} nodes" if nodes > MAX_ALIAS_NODES else f"{chars:,} characters"
        raise SparsetuneError(
            f"recipe {path}: its aliases (*name) expand to {size} more than the file holds "
            f"(at most {MAX_ALIAS_NODES:,} nodes and {MAX_ALIAS_CHARS:,} characters); "
            "use fewer or less nested aliases, or write the settings out"
        )


def is_pipeline(data: Any) -> bool:
    return isinstance(data, dict) and "stages" in data


def parse_assignment(text: str, what: str) -> tuple[str, Any]:
    """'prune.sparsity=0.6' -> ('prune.sparsity', 0.6); the value is read as YAML (numbers, lists, null)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SparsetuneError(f"{what} {text!r} is not KEY=VALUE; write it like prune.sparsity=0.6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, int) and ":" in raw:  # YAML 1.1 reads 2:4 as the base-60 number 124
        value = raw.strip()
    return key.strip(), value


def substitute(value: Any, variables: dict[str, Any], where: str) -> Any:
    """${name} -> its value; a string that is only `${name}` takes the variable's type (0.6 stays a float)."""
    if isinstance(value, str):
        whole = VAR.fullmatch(value)
        for name in VAR.findall(value):
            if name not in variables:
                known = ", ".join(sorted(variables)) or "none"
                raise SparsetuneError(
                    f"{where}: variable ${{{name}}} is not defined; add it under `vars:` "
                    f"or pass --set {name}=VALUE (defined: {known})"
                )
        if whole:
            return variables[whole.group(1)]
        return VAR.sub(lambda m: str(variables[m.group(1)]), value)
    if isinstance(value, list):
        return [substitute(v, variables, where) for v in value]
    if isinstance(value, dict):
        return {k: substitute(v, variables, where) for k, v in value.items()}
    return value


def stage_entries(loc: Located, kinds: list[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """[(name, kind, settings)] from a run recipe's `stages` list, with names unique (eval, eval-2, ...)."""
    entries: list[tuple[str, str, dict[str, Any]]] = []
    used: dict[str, int] = {}
    known = ", ".join(kinds)
    for i, item in enumerate(loc.data["stages"]):
        where = loc.where(("stages", i))
        if not isinstance(item, dict):
            raise SparsetuneError(f"{where}: a stage is a mapping like `- prune: {{sparsity: 0.5}}`")
        found = [k for k in item if k in kinds]
        extra = [k for k in item if k not in kinds and k != "name"]
        if extra:
            raise SparsetuneError(
                f"{loc.where(('stages', i, extra[0]))}: unknown stage kind {extra[0]!r}; use one of {known}"
            )
        if len(found) != 1:
            raise SparsetuneError(f"{where}: each stage needs exactly one of {known} (found {len(found)})")
        kind = found[0]
        settings = item[kind] if item[kind] is not None else {}
        if not isinstance(settings, dict):
            raise SparsetuneError(f"{loc.where(('stages', i, kind))}: {kind} settings must be a mapping")
        name = item.get("name")
        if name is None:
            used[kind] = used.get(kind, 0) + 1
            name = kind if used[kind] == 1 else f"{kind}-{used[kind]}"
        elif not isinstance(name, str) or not STAGE_NAME.match(name):
            raise SparsetuneError(
                f"{loc.where(('stages', i, 'name'))}: stage name {name!r} must be lower-case letters, digits, - or _"
            )
        if name in [e[0] for e in entries]:
            raise SparsetuneError(f"{where}: two stages are named {name!r}; give each a unique `name`")
        entries.append((name, kind, dict(settings)))
    return entries


def validate_stage(schema: type[ConfigT], settings: dict[str, Any], where: Callable[[str], str], label: str) -> ConfigT:
    """Validate one stage's settings; an error names the recipe line of the offending key.

    `where(key)` is that line (or the override that set the key); `label` is e.g. 'stage 2 (seft)'.
    """
    try:
        return schema.model_validate(settings)
    except ValidationError as err:
        first = err.errors()[0]
        key = str(first["loc"][0]) if first["loc"] else ""
        if first["type"] == "extra_forbidden":
            valid = ", ".join(sorted(f.alias or n for n, f in schema.model_fields.items() if n != "output"))
            raise SparsetuneError(f"{where(key)}: {label}: unknown key {key!r}; valid keys: {valid}") from err
        msg = first["msg"].removeprefix("Value error, ")
        shown = ".".join(str(p) for p in first["loc"])
        raise SparsetuneError(f"{where(key)}: {label}: {shown + ': ' if shown else ''}{msg}") from err


def command_settings(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    """A command's `--recipe`: a flat mapping of its settings, `{kind: {...}}`, or a run recipe with one `kind`
    stage (variables take their defaults; `@` references are left for the MODEL argument)."""
    loc = read_recipe(path)
    data = loc.data
    if not isinstance(data, dict):
        raise SparsetuneError(f"{loc.source} must be a YAML mapping of settings")
    if not is_pipeline(data):
        return dict(data[kind]) if isinstance(data.get(kind), dict) else dict(data)
    entries = [(i, e) for i, e in enumerate(data["stages"]) if isinstance(e, dict) and kind in e]
    if len(entries) != 1:
        raise SparsetuneError(
            f"{loc.source} has {len(entries)} {kind} stages; a command's --recipe needs exactly one "
            "(run multi-stage recipes with `sparsetune run`)"
        )
    i, entry = entries[0]
    variables = dict(data.get("vars") or {})
    settings = {
        key: substitute(value, variables, loc.where(("stages", i, kind, key)))
        for key, value in (entry[kind] or {}).items()
    }
    for key in ("model", "models"):
        value = settings.get(key)
        if (isinstance(value, str) and value.startswith("@")) or (
            isinstance(value, list) and any(isinstance(v, str) and v.startswith("@") for v in value)
        ):
            settings.pop(key)  # an earlier stage's output: the command line names the model instead
    return settings


def recipe_settings(path: str | os.PathLike[str] | None, kind: str) -> dict[str, Any]:
    """The `kind` settings of a command's `--recipe` file ({} without one)."""
    return {} if path is None else command_settings(path, kind)


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


# Settings that exclude each other: giving one (a flag or an override) removes the other from the recipe.
REPLACES = {"sparsity": "pattern", "pattern": "sparsity"}


def merge_settings(recipe: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """Values that were given (not None) override the recipe's; a given `pattern` drops the recipe's `sparsity`
    and the other way round."""
    merged = dict(recipe)
    for key, value in given.items():
        if value is not None:
            merged.pop(REPLACES.get(key, ""), None)
            merged[key] = value
    return merged


# Settings that name local files or dirs (when they are not a hub id, a bundled alias or a dataset name).
INPUT_PATH_KEYS = ("model", "models", "model_config", "tokenizer", "calib", "data", "val_data", "ppl", "include_path")
OUTPUT_PATH_KEYS = ("output", "checkpoint_dir", "data_dir")  # always paths


def reproducible_settings(data: dict[str, Any]) -> dict[str, Any]:
    """Settings as a recipe that reproduces the run from any working directory: local paths made absolute,
    and `data_dir` set to the mirror actually used (from SPARSETUNE_DATA_DIR when the flag was not given)."""
    from sparsetune.data import NAMED_DATASETS, mirror_dir  # data and loading import torch: the CLI imports
    from sparsetune.loading import BUNDLED_ALIASES  # this module for --help

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
