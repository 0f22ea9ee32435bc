"""`sparsetune smet-pretrain`: flags (or a recipe) -> SmetConfig -> sparse pretraining; options from the schema."""

from __future__ import annotations

import typer

from sparsetune.cli.options import stage_command
from sparsetune.train.smet_config import SmetConfig

MISSING = {"output": "--output; pass -o OUT_DIR"}


def register(app: typer.Typer) -> None:
    doc = (
        "Pretrain a sparse Llama model from scratch with dynamic sparse training (SMET): compact optimizer state, "
        "regrowth warm-up and density-aware learning rates."
    )
    app.command("smet-pretrain")(stage_command("smet-pretrain", SmetConfig, doc, MISSING, argument=None))
