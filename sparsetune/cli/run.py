"""`sparsetune run` and `sparsetune validate`: recipes that chain the commands (see sparsetune/pipeline.py).
The recipe and OUT are checked before any stage imports the library (torch)."""

from __future__ import annotations

import json
from typing import Any

import typer

from sparsetune.cli.common import setup_logging, user_errors
from sparsetune.errors import SparsetuneError
from sparsetune.pipeline import plan_recipe, run_plan

SET_HELP = "Set a recipe variable: --set model=path/to/model (repeatable)"


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Positional args: KEY=VALUE ones are overrides, the others recipe files."""
    overrides = [a for a in args if "=" in a]
    return [a for a in args if "=" not in a], overrides


def print_plan(plan: Any) -> None:
    import yaml

    typer.echo(f"recipe {plan.recipe} ({plan.name}): {len(plan.stages)} stages -> {plan.out}")
    if plan.variables:
        typer.echo("vars: " + ", ".join(f"{k}={v}" for k, v in plan.variables.items()))
    for stage in plan.stages:
        typer.echo(f"\n{stage.dirname}  [{stage.kind}]")
        typer.echo(f"  inputs: {', '.join(stage.inputs) or '(none: trains from scratch)'}")
        typer.echo(f"  output: {stage.output}")
        settings = {k: v for k, v in stage.settings().items() if k not in ("model", "models", "output")}
        text = yaml.safe_dump(settings, sort_keys=False, default_flow_style=False, width=100)
        typer.echo("  settings:\n" + "".join(f"    {line}\n" for line in text.splitlines()), nl=False)
    if plan.gates:
        typer.echo("\ngates: " + ", ".join(f"{k} {v}" for k, v in plan.gates.items()))


def print_gates(summary: dict[str, Any]) -> None:
    typer.echo(f"\nrun {summary['name']}: {summary['output']}")
    for row in summary["stages"]:
        took = f"{row['seconds']:.1f} s" if row.get("seconds") is not None else ""
        typer.echo(f"  {row['stage']:<20} {row['status']:<9} {took}")
    for gate in summary["gates"]:
        value = "not measured" if gate["value"] is None else f"{gate['value']:.4g}"
        mark = "PASS" if gate["passed"] else "FAIL"
        typer.echo(f"  gate {gate['gate']:<28} {mark}  {value} (bound {gate['bound']:g})")


def run_command(
    args: list[str] = typer.Argument(..., help="RECIPE.yaml, then optional overrides like prune.sparsity=0.6"),
    output: str | None = typer.Option(None, "--output", "-o", help="Run dir: stage outputs go to OUT/<nn>-<stage>"),
    set_vars: list[str] = typer.Option([], "--set", help=SET_HELP),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the resolved plan (stages, inputs, outputs, settings)"
    ),
    check: bool = typer.Option(False, "--check", help="Exit with code 1 if a gate fails (for CI)"),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Run every stage again, and allow an OUT that is not a previous run dir"
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the plan or the run summary as JSON on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """Run a recipe's stages in order; finished stages (same settings, same input) are skipped on re-run."""
    setup_logging(verbose)
    with user_errors():
        recipes, overrides = _split_args(args)
        if len(recipes) != 1:
            raise SparsetuneError(f"give one recipe file (got {len(recipes)}); overrides look like prune.sparsity=0.6")
        if output is None and not dry_run:
            raise SparsetuneError("missing --output; pass -o OUT_DIR (stage outputs go to OUT/<nn>-<stage>)")
        plan = plan_recipe(recipes[0], output, overrides, set_vars)
        if dry_run:
            if json_out:
                typer.echo(json.dumps(plan.as_dict()))
            else:
                print_plan(plan)
            return
        summary = run_plan(plan, overwrite=overwrite, verbose_output=not json_out)
    if summary["rank"] != 0:  # under torchrun / accelerate launch only rank 0 reports
        return
    if json_out:
        typer.echo(json.dumps(summary))
    else:
        print_gates(summary)
    if check and not summary["passed"]:
        failed = ", ".join(g["gate"] for g in summary["gates"] if not g["passed"])
        typer.echo(f"error: gate failed: {failed}", err=True)
        raise typer.Exit(1)


def validate_command(
    args: list[str] = typer.Argument(..., help="RECIPE.yaml files, then optional overrides like prune.sparsity=0.6"),
    set_vars: list[str] = typer.Option([], "--set", help=SET_HELP),
) -> None:
    """Check recipes without loading any model: unknown keys, bad values, stage order, variables and gates."""
    with user_errors():
        recipes, overrides = _split_args(args)
        if not recipes:
            raise SparsetuneError("give at least one recipe file")
        for path in recipes:
            plan = plan_recipe(path, None, overrides, set_vars)
            kinds = " -> ".join(s.kind for s in plan.stages)
            typer.echo(f"ok {path}: {kinds}" + (f"; gates {', '.join(plan.gates)}" if plan.gates else ""))


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)
    app.command("validate")(validate_command)
