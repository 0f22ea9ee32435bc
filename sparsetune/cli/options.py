"""Typer commands generated from a command's pydantic settings schema, and the one path a command takes:
flags (over a `--recipe`) -> settings -> validated config -> the library -> a summary table or JSON.

Every schema field is a flag `--field-name` (its alias when it has one) whose help is the field's description
plus its default, so a field added to a schema is a flag with no CLI code and help text lives once, in the schema.
Types: bool -> a flag (`--x`; `--x/--no-x` when it defaults to true), Literal -> its choices as the metavar (the
schema checks the value, so a bad one is one `error:` line), list -> a comma-separated value, int / float / str
-> themselves.

A renamed setting (`RENAMED` of the schema, `sparsetune.settings`) keeps its old flag for one release: hidden from
`--help`, its value passed on under the old key, which the schema reads as the new one.

Typer builds a command from a function's signature, so `schema_command` gives a `**values` function a generated
`__signature__`. Torch-free: this imports the schemas and the stage table only; a stage's checks run before
its library is imported.
"""

from __future__ import annotations

import inspect
import json
import types
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union, get_args, get_origin

import typer
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from sparsetune.cli.common import setup_logging, split_list, user_errors
from sparsetune.errors import SparsetuneError
from sparsetune.pipeline import STAGES
from sparsetune.recipes import merge_settings, recipe_settings, validate_config
from sparsetune.settings import without_renamed

SHARED_HELP = {
    "recipe": "YAML recipe with these settings (flags given on the command line override it)",
    "overwrite": "Replace an existing output dir",
    "json_out": "Print the machine-readable result as JSON on stdout",
    "verbose": "Debug logging",
}
STAGE_SHARED = ("recipe", "overwrite", "json_out", "verbose")


def shared_parameters(names: Iterable[str] = STAGE_SHARED) -> list[inspect.Parameter]:
    """The options every command that runs a stage has, besides its schema's: --recipe, --overwrite, --json, -v."""
    options = {
        "recipe": (str | None, typer.Option(None, help=SHARED_HELP["recipe"])),
        "overwrite": (bool, typer.Option(False, "--overwrite", help=SHARED_HELP["overwrite"])),
        "json_out": (bool, typer.Option(False, "--json", help=SHARED_HELP["json_out"])),
        "verbose": (bool, typer.Option(False, "--verbose", "-v", help=SHARED_HELP["verbose"])),
    }
    return [_parameter(name, *options[name]) for name in names]


def field_help(cls: type[BaseModel], name: str) -> str:
    """A field's description plus its default (unless the description already names it), for `--help`."""
    info = cls.model_fields[name]
    text = info.description or ""
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if default is not None and "(default:" not in text:
        if isinstance(default, bool):
            default = str(default).lower()
        if isinstance(default, list):
            default = ",".join(map(str, default)) or "none"
        text += f" (default: {default})"
    return text


def field_shape(annotation: Any) -> tuple[str, Any]:
    """('flag' | 'choice' | 'list' | 'value', detail) of a field type, None stripped from unions: choices of a
    Literal, the element type of a list, the Python type of a value (text for any type the CLI has no parser for:
    the schema checks it)."""
    if get_origin(annotation) in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        annotation = inner[0] if len(inner) == 1 else str
    if annotation is bool:
        return "flag", None
    if get_origin(annotation) is Literal:
        return "choice", tuple(str(c) for c in get_args(annotation))
    if get_origin(annotation) in (list, tuple, set):
        return "list", (get_args(annotation) or (str,))[0]
    return "value", annotation if annotation in (int, float, str) else str


def setting_key(name: str, info: FieldInfo) -> str:
    """The name recipes and flags use: the alias (smet's `model_config`) when the field has one."""
    return info.alias or name


def _parameter(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _completer(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def complete(incomplete: str) -> list[str]:
        return [c for c in choices if c.startswith(incomplete)]

    return complete


def _field_parameter(schema: type[BaseModel], name: str, argument: bool, short: str | None) -> inspect.Parameter:
    info = schema.model_fields[name]
    key = setting_key(name, info)
    shape, detail = field_shape(info.annotation)
    text = field_help(schema, name)
    if argument:
        kind = list[str] | None if shape == "list" else str | None
        return _parameter(key, kind, typer.Argument(None, help=text, show_default=False))
    decls = [f"--{key.replace('_', '-')}", *([short] if short else [])]
    extra: dict[str, Any] = {}
    if shape == "flag":
        kind: Any = bool | None
        if info.default is not False:  # a flag that could only set the default would be useless: --x/--no-x
            decls[0] = f"{decls[0]}/--no-{key.replace('_', '-')}"
    elif shape == "choice":
        kind = str | None
        extra = {"metavar": "[" + "|".join(detail) + "]", "autocompletion": _completer(detail)}
    elif shape == "list":
        kind, text = str | None, text + " (comma-separated)"
    else:
        kind = detail | None
    return _parameter(key, kind, typer.Option(None, *decls, help=text, show_default=False, **extra))


def schema_parameters(
    schema: type[BaseModel], argument: str | None = None, skip: Iterable[str] = (), short: dict[str, str] | None = None
) -> list[inspect.Parameter]:
    """One Typer parameter per schema field: `argument` positional, the rest options (`short` adds short names,
    `skip` leaves recipe-only fields out). A class's own fields come before the ones it inherits."""
    short = {"output": "-o", **(short or {})}
    own = list(vars(schema).get("__annotations__", {}))
    names = [n for n in schema.model_fields if n in own] + [n for n in schema.model_fields if n not in own]
    if argument is not None:
        names.insert(0, names.pop(names.index(argument)))
    params = [_field_parameter(schema, n, n == argument, short.get(n)) for n in names if n not in set(skip)]
    params += [_renamed_parameter(old, new) for old, new in renamed_settings(schema).items()]
    clash = {p.name for p in params} & set(SHARED_HELP)
    if clash:
        raise ValueError(f"{schema.__name__} fields {sorted(clash)} clash with the shared options")
    return params


def renamed_settings(schema: type[BaseModel]) -> dict[str, str]:
    """Old setting name -> new name, of the settings `schema` renamed (empty for a schema that renamed none)."""
    return dict(getattr(schema, "RENAMED", {}))


def _renamed_parameter(old: str, new: str) -> inspect.Parameter:
    flag = f"--{old.replace('_', '-')}"
    text = f"Old name of --{new.replace('_', '-')}"
    return _parameter(old, str | None, typer.Option(None, flag, help=text, hidden=True, show_default=False))


def settings_from_flags(schema: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """The given flags (None = not given) as settings: comma-separated lists split, numbers in lists parsed; an old
    flag of a renamed setting under its old key (the schema reads it as the new one)."""
    settings: dict[str, Any] = {old: values[old] for old in renamed_settings(schema) if values.get(old) is not None}
    for name, info in schema.model_fields.items():
        key = setting_key(name, info)
        value = values.get(key)
        shape, element = field_shape(info.annotation)
        if isinstance(value, str) and shape == "list":
            settings[key] = _parse_list(value, element, key)
        elif isinstance(value, list):  # a positional list argument: empty means not given
            settings[key] = value or None
        elif key in values:
            settings[key] = value
    return settings


def _parse_list(value: str, element: Any, key: str) -> list[Any]:
    items = split_list(value) or []
    if element not in (int, float):
        return items
    try:
        return [element(v) for v in items]
    except ValueError as err:
        flag = f"--{key.replace('_', '-')}"
        raise SparsetuneError(f"{flag} {value!r} is not a comma-separated list of numbers; e.g. 0.3,0.5") from err


def schema_command(
    schema: type[BaseModel],
    body: Callable[[dict[str, Any]], None],
    doc: str,
    parameters: list[inspect.Parameter],
) -> Callable[..., None]:
    """A function Typer reads as a command with `parameters` (from `schema_parameters` and `shared_parameters`);
    called with the parsed values, it hands them to `body` as one dict."""

    def command(**values: Any) -> None:
        body(values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in parameters}
    command.__doc__ = doc
    command.__name__ = command.__qualname__ = f"{schema.__name__}_command"
    return command


def run_stage(kind: str, schema: type[BaseModel], values: dict[str, Any], required: dict[str, str]) -> None:
    """The body of every stage command: merge the flags over the `--recipe`, check `required` (key -> what is
    missing and how to fix it), validate, run the library, print its summary (or JSON)."""
    recipe, overwrite, json_out = values.pop("recipe"), values.pop("overwrite"), values.pop("json_out")
    setup_logging(values.pop("verbose"))
    with user_errors():
        flags = settings_from_flags(schema, values)
        settings = merge_settings(without_renamed(schema, recipe_settings(recipe, kind), flags), flags)
        for key, missing in required.items():
            if not settings.get(key):
                raise SparsetuneError(f"missing {missing}")
        cfg = validate_config(schema, settings, where=f"recipe {recipe}" if recipe else kind)
        stage = STAGES[kind]
        stage.check(cfg, overwrite)  # the output dir and local input files, before the library (torch) import
        report = stage.run(cfg, overwrite=overwrite, show_progress=not json_out)
        if report.get("rank", 0) != 0:  # in multi-process runs only rank 0 reports
            return
        if json_out:  # the training and prune reports carry a compact summary; eval, sweep, export are one
            typer.echo(json.dumps(report.get("summary", report), default=str))
        else:
            stage.summary(report)


def stage_command(
    kind: str,
    schema: type[BaseModel],
    doc: str,
    required: dict[str, str],
    argument: str | None = "model",
    skip: Iterable[str] = (),
    short: dict[str, str] | None = None,
) -> Callable[..., None]:
    """The Typer command of one stage kind (`sparsetune prune`, ...): generated options, `run_stage` body."""
    parameters = schema_parameters(schema, argument, skip, short) + shared_parameters()
    return schema_command(schema, lambda values: run_stage(kind, schema, values, required), doc, parameters)
