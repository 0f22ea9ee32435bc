"""`sparsetune export`: parse flags (or a recipe) into an ExportConfig and call the library."""

from __future__ import annotations

import json

import typer

from sparsetune.cli.common import setup_logging, split_list, user_errors
from sparsetune.export.config import ExportConfig
from sparsetune.recipes import field_help, merge_settings, recipe_settings, validate_config


def _h(name: str) -> str:
    return field_help(ExportConfig, name)


def export_command(
    model: str | None = typer.Argument(None, help=_h("model"), show_default=False),
    output: str | None = typer.Option(None, "--output", "-o", help=_h("output"), show_default=False),
    format: str | None = typer.Option(None, "--format", "-f", help=_h("format"), show_default=False),
    ignore: str | None = typer.Option(None, help=_h("ignore") + " (comma-separated)", show_default=False),
    max_density: float | None = typer.Option(None, help=_h("max_density"), show_default=False),
    force_24: bool | None = typer.Option(None, "--force-24", help=_h("force_24"), show_default=False),
    max_shard_size: str | None = typer.Option(None, help=_h("max_shard_size"), show_default=False),
    dtype: str | None = typer.Option(None, help=_h("dtype"), show_default=False),
    trust_remote_code: bool | None = typer.Option(
        None, "--trust-remote-code", help=_h("trust_remote_code"), show_default=False
    ),
    recipe: str | None = typer.Option(
        None, help="YAML recipe with these settings (flags given on the command line override it)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir"),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """Export a (pruned) model as compressed sparse safetensors, 2:4 semi-structured, or dense."""
    setup_logging(verbose)
    with user_errors():
        from sparsetune.errors import SparsetuneError
        from sparsetune.export.writer import run_export

        flags = {
            "model": model,
            "output": output,
            "format": format,
            "ignore": split_list(ignore),
            "max_density": max_density,
            "force_24": force_24,
            "max_shard_size": max_shard_size,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
        }
        base = recipe_settings(recipe, "export")
        settings = merge_settings(base, flags)
        if settings.get("model") is None:
            raise SparsetuneError("missing MODEL; pass a pruned model dir")
        if settings.get("output") is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        cfg = validate_config(ExportConfig, settings, where=f"recipe {recipe}" if recipe else "export")
        report = run_export(cfg, overwrite=overwrite)
        if json_out:
            typer.echo(json.dumps(report))
        else:
            print_summary(report)


def print_summary(report: dict) -> None:
    mb = 1e6
    line = f"exported {report['model']} as {report['format']} to {report['output']}: {report['disk_bytes'] / mb:.1f} MB"
    if "bytes_dense" in report:
        line += (
            f" ({report['bytes_written'] / max(1, report['bytes_dense']):.2f}x of dense); "
            f"{report['modules_compressed']} Linears compressed, {report['modules_dense']} kept dense, "
            f"sparsity {report['global_sparsity']:.4f}"
        )
    typer.echo(line)


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)
