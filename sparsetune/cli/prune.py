"""`sparsetune prune`: flags (or a recipe) -> PruneConfig -> the library; the options come from the schema."""

from __future__ import annotations

import typer

from sparsetune.cli.options import stage_command
from sparsetune.prune.config import PruneConfig

MISSING = {
    "model": "MODEL; pass a model dir, hub id, .gguf file or the alias smollm2",
    "output": "--output; pass -o OUT_DIR",
}


def register(app: typer.Typer) -> None:
    doc = "Prune a model in one shot (magnitude, Wanda, SparseGPT or ALPS; unstructured or N:M) and save it."
    command = stage_command("prune", PruneConfig, doc, MISSING, skip=("block_sparsity",))
    app.command("prune")(command)
