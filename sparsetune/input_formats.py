"""Input formats that wrap a model, registered by the packages that write them.

`sparsetune.loading` (the whole-model load) and `sparsetune.stream_inputs` (block-by-block reads) ask this
registry about every local model dir, so neither imports those packages. A format either holds its own weights
(an exported compressed dir: `load` builds the model) or stands on a base model (a `seft --no-merge` adapter dir:
`base_model` names the base, which loads like any model, and `apply` turns it into the model the dir stands for).
`stream_files` reads its tensors a few at a time for streamed runs.

The packages register when `sparsetune` itself is imported (its `__init__` imports them), so every entry point,
the CLI and library calls alike, finds them before it loads anything. Torch-free, like the registering modules:
the CLI imports them for `--help`; a format's loaders import what they need when they run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError


@dataclass(frozen=True)
class InputFormat:
    name: str  # also the kind of a streamed input (`stream_inputs.StreamInput.kind`)
    label: str  # how messages name a dir of this format
    detect: Callable[[Path], bool]  # cheap: reads no weights and imports no torch (asked about every dir)
    stream_files: Callable[[Path, Any, bool], Any]  # (dir, its base's files or None, verify) -> the files to stream
    load: Callable[..., Any] | None = None  # (dir, dtype=torch dtype or None, **load kwargs) -> the model
    base_model: Callable[[Path], str] | None = None  # the spec of the model a wrapping format stands on
    apply: Callable[[Any, Path], Any] | None = None  # (the loaded base, dir): make it the model the dir stands for
    stream_refusal: Callable[[Path], str] | None = None  # why a dir of this format loads whole ("" if it streams)


_FORMATS: list[InputFormat] = []


def register_format(
    name: str,
    label: str,
    detect: Callable[[Path], bool],
    stream_files: Callable[[Path, Any, bool], Any],
    *,
    load: Callable[..., Any] | None = None,
    base_model: Callable[[Path], str] | None = None,
    apply: Callable[[Any, Path], Any] | None = None,
    stream_refusal: Callable[[Path], str] | None = None,
) -> InputFormat:
    """Add a format. Give either `load` (the format holds its weights) or `base_model` and `apply` (it stands on a
    base model)."""
    if (load is None) == (base_model is None and apply is None) or (base_model is None) != (apply is None):
        raise ValueError(f"input format {name!r}: give either load, or base_model and apply")
    if any(f.name == name for f in _FORMATS):
        raise ValueError(f"input format {name!r} is registered twice")
    fmt = InputFormat(name, label, detect, stream_files, load, base_model, apply, stream_refusal)
    _FORMATS.append(fmt)
    return fmt


def format_named(name: str) -> InputFormat:
    return next(fmt for fmt in _FORMATS if fmt.name == name)


def detect_format(path: str | Path) -> InputFormat | None:
    """The registered format of a local dir, or None for a plain model dir (or anything else). Formats do not
    overlap, so the order they registered in does not matter: a dir two of them claim is refused."""
    path = Path(path)
    found = [fmt for fmt in _FORMATS if fmt.detect(path)]
    if len(found) > 1:
        raise SparsetuneError(f"{path} is both a {found[0].label} and a {found[1].label}; pass one or the other")
    return found[0] if found else None
