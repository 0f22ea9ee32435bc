"""`sparsetune eval`, `sparsetune sweep` and `sparsetune report`: flags (or a recipe) -> settings -> library;
the options come from the schemas."""

from __future__ import annotations

from typing import Any

import typer

from sparsetune.cli.common import user_errors
from sparsetune.cli.options import schema_command, schema_parameters, shared_parameters, stage_command
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig, ReportConfig, SweepConfig
from sparsetune.evaluate.report import run_report  # torch-free (matplotlib is imported when it draws)
from sparsetune.recipes import validate_config

MISSING_MODEL = "MODEL; pass a model dir, hub id, .gguf file or the alias smollm2"
MISSING_OUTPUT = "--output; pass -o OUT_DIR"


def report(values: dict[str, Any]) -> None:
    with user_errors():
        if not values["model"]:
            raise SparsetuneError("missing MODEL; pass a pruned model dir")
        cfg = validate_config(ReportConfig, {"model": values["model"], "output": values["output"]}, where="report")
        written = run_report(cfg.model, cfg.output, overwrite=values["overwrite"])
        typer.echo(f"wrote {written['output']}: {', '.join(written['files'])}")


def register(app: typer.Typer) -> None:
    eval_doc = "Perplexity and lm-eval tasks for one or more models, compared in one table (deltas vs the first)."
    missing = {"models": "MODEL; pass one or more model dirs, hub ids, .gguf files or smollm2"}
    app.command("eval")(stage_command("eval", EvalConfig, eval_doc, missing, argument="models"))
    sweep_doc = "Prune + evaluate every method x sparsity (and N:M pattern); writes sweep.json, sweep.md, sweep.png."
    missing = {"model": MISSING_MODEL, "output": MISSING_OUTPUT}
    # a sweep loads its model through the prune path, which takes no remote code
    app.command("sweep")(stage_command("sweep", SweepConfig, sweep_doc, missing, skip=("trust_remote_code",)))
    report_doc = "Sparsity bar charts (per block, per module) and a Markdown summary of a pruned model dir."
    parameters = schema_parameters(ReportConfig, "model") + shared_parameters(["overwrite"])
    app.command("report")(schema_command(ReportConfig, report, report_doc, parameters))
