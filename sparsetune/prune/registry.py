"""The pruning methods, registered once: name -> the module that implements it and what it does.

Everything else derives from this table: the `method` choices of `sparsetune prune` and `sparsetune sweep`, their
help text, the engine's lookup (`load`), and the README's list of methods (a test checks the README against it).

Torch-free (module paths, not modules), so the settings schemas and `--help` import it without the library.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class MethodEntry:
    module: str  # the method's module: `init_stats`/`accumulate`, `NEEDS_CALIBRATION`, `prune_group`
    summary: str  # what it does, as the README's list of methods says it
    calibrates: bool = True  # its module's NEEDS_CALIBRATION, known here without importing it (tested equal)


METHODS: dict[str, MethodEntry] = {
    "magnitude": MethodEntry("sparsetune.prune.magnitude", "|W|, one threshold per matrix", calibrates=False),
    "wanda": MethodEntry("sparsetune.prune.wanda", "|W|·‖X‖, per output row or per N:M group"),
    "sparsegpt": MethodEntry(
        "sparsetune.prune.sparsegpt",
        "OBS update from the input Hessian; a failed Cholesky raises the dampening x10 and retries with a warning",
    ),
    "alps": MethodEntry(
        "sparsetune.prune.alps",
        "ADMM on the layer-wise reconstruction, then conjugate gradient on the kept weights; see below",
    ),
}
METHOD_NAMES = tuple(METHODS)


def load(name: str) -> ModuleType:
    """The module of method `name` (imported on first use: the methods import torch)."""
    return importlib.import_module(METHODS[name].module)


def spoken_list(names: tuple[str, ...] = METHOD_NAMES) -> str:
    """`a, b, c or d`, for help texts and errors."""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
