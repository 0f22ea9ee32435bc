"""`sparsetune export`: flags (or a recipe) -> ExportConfig -> the library; the options come from the schema."""

from __future__ import annotations

import typer

from sparsetune.cli.options import stage_command
from sparsetune.export.config import ExportConfig

MISSING = {"model": "MODEL; pass a pruned model dir", "output": "--output; pass -o OUT_DIR"}


def register(app: typer.Typer) -> None:
    doc = "Export a (pruned) model as compressed sparse safetensors, 2:4 semi-structured, or dense."
    app.command("export")(stage_command("export", ExportConfig, doc, MISSING, short={"format": "-f"}))
