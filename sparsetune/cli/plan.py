"""`sparsetune plan`: flags -> PlanConfig -> `sparsetune.plan` (pure Python) -> a table or JSON, and a PNG.
Imports no torch: the whole process answers in well under a second."""

from __future__ import annotations

import json
from typing import Any

import typer

from sparsetune.cli.common import user_errors
from sparsetune.cli.options import schema_command, schema_parameters, settings_from_flags, shared_parameters
from sparsetune.errors import SparsetuneError
from sparsetune.plan_config import PlanConfig
from sparsetune.recipes import merge_settings, validate_config


def plan(values: dict[str, Any]) -> None:
    from sparsetune import plan as law

    json_out = values.pop("json_out")
    with user_errors():
        settings = merge_settings({}, settings_from_flags(PlanConfig, values))  # None: not given
        cfg = validate_config(PlanConfig, settings, where="plan")
        if cfg.params is None or cfg.unique_tokens is None:
            raise SparsetuneError("missing --params N (dense-equivalent parameters) or --unique-tokens U")
        params, source = law.count_params(cfg.params)
        result = law.make_plan(params, cfg.unique_tokens, cfg.tokens, cfg.flops, cfg.density, params_source=source)
        model_config = cfg.params if source.startswith("counted from") and cfg.params.endswith(".json") else None
        command = law.smet_command(result, cfg.batch_size, cfg.seqlen, model_config)
        if cfg.plot:
            from sparsetune.plan_plot import plot_plan  # matplotlib: only when a plot is asked for

            plot_plan(result, cfg.plot)
    if json_out:
        typer.echo(json.dumps({**result.as_dict(), "smet_command": command, "plot": cfg.plot}))
        return
    print_plan(result, command, cfg.plot)


def print_plan(result: Any, command: str, plot: str | None) -> None:
    from rich.console import Console
    from rich.table import Table

    from sparsetune import plan as law

    budget = f"{result.tokens:.3g} tokens" if result.tokens is not None else f"{result.flops:.3g} FLOPs"
    table = Table(
        title=f"sparsetune plan: {result.params:.3g} parameters, {result.unique_tokens:.3g} unique tokens, {budget}"
    )
    for name in ("density", "sparsity", "active params", "tokens", "epochs", "predicted loss"):
        table.add_column(name, justify="right")
    for row in law.iter_table(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    echo = typer.echo
    if result.loss_optimal is not None:
        p = result.loss_optimal
        echo(f"loss-optimal density: {p.density:.4g} (sparsity {1 - p.density:.1%}), predicted loss {p.loss:.4f}")
    if result.compute_optimal is not None:
        p = result.compute_optimal
        echo(
            f"compute-optimal for this model: density {p.density:.4g} (sparsity {1 - p.density:.1%}) on "
            f"{p.tokens:.3g} tokens ({p.tokens / result.unique_tokens:.2f} epochs), predicted loss {p.loss:.4f}"
        )
    if result.budget_choice is not None:
        p = result.budget_choice
        echo(
            f"with the model size free (the paper's per-budget choice): density {p.density:.4g}, "
            f"{p.params:.3g} parameters ({p.active_params:.3g} active) on {p.tokens:.3g} tokens, "
            f"predicted loss {p.loss:.4f}"
        )
    if result.requested is not None:
        p = result.requested
        echo(f"at density {p.density:g}: {p.tokens:.3g} tokens, predicted loss {p.loss:.4f}")
    dense = result.curve[-1]
    echo(f"dense (density 1): {dense.tokens:.3g} tokens, predicted loss {dense.loss:.4f}")
    echo(f"recommended: {command}")
    if result.tokens is not None:  # smet-pretrain's --density auto: this choice for its own model and token count
        echo(f"  (or: sparsetune smet-pretrain --density auto --unique-tokens {result.unique_tokens:.4g} ...)")
    for note in result.notes:
        echo(f"note: {note}")
    echo(f"law: {law.PAPER}; coefficients from {law.SOURCE}")
    if plot:
        echo(f"wrote {plot}")


def register(app: typer.Typer) -> None:
    doc = (
        "Pick the density for a data and compute budget from the data-constrained sparse scaling law "
        "(Wu, Xiao, Okanovic et al. 2026): predicted loss over densities, the loss- or compute-optimal one, "
        "and the smet-pretrain command line. No torch."
    )
    parameters = schema_parameters(PlanConfig, short={"plot": "-o"}) + shared_parameters(["json_out"])
    app.command("plan")(schema_command(PlanConfig, plan, doc, parameters))
