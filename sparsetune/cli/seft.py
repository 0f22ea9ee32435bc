"""`sparsetune seft`: flags (or a recipe) -> SeftConfig -> the fine-tuning run; the options come from the schema."""

from __future__ import annotations

import typer

from sparsetune.cli.options import stage_command
from sparsetune.train.seft_config import SeftConfig

MISSING = {
    "model": "MODEL; pass a pruned model dir (the output of `sparsetune prune`)",
    "output": "--output; pass -o OUT_DIR",
}


def register(app: typer.Typer) -> None:
    doc = (
        "Fine-tune a pruned model and keep its sparsity: SEFT sparse deltas, masked fine-tuning, or LoRA + re-prune; "
        "or prune gradually while training (GraNet, dense input allowed); any of them distilling from a teacher."
    )
    app.command("seft")(stage_command("seft", SeftConfig, doc, MISSING))
