"""`sparsetune eval`, `sparsetune sweep` and `sparsetune report`: flags (or a recipe) -> settings -> library."""

from __future__ import annotations

import json
from typing import Any

import typer

from sparsetune.cli.common import setup_logging, split_list, user_errors
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig, ReportConfig, SweepConfig
from sparsetune.recipes import field_help, merge_settings, recipe_settings, validate_config


def _e(name: str) -> str:
    return field_help(EvalConfig, name)


def _s(name: str) -> str:
    return field_help(SweepConfig, name)


def _floats(value: str | None, flag: str) -> list[float] | None:
    items = split_list(value)
    if items is None:
        return None
    try:
        return [float(v) for v in items]
    except ValueError as err:
        raise SparsetuneError(f"{flag} {value!r} is not a comma-separated list of numbers; e.g. 0.3,0.5") from err


def _settings(recipe: str | None, stage: str, flags: dict[str, Any]) -> dict[str, Any]:
    return merge_settings(recipe_settings(recipe, stage), flags)


def _eval_flags(
    ppl: str | None,
    seqlen: int | None,
    stride: int | None,
    limit_windows: int | None,
    ppl_batch_size: int | None,
    tasks: str | None,
    num_fewshot: int | None,
    limit: float | None,
    batch_size: int | None,
    include_path: str | None,
    data_dir: str | None,
    dtype: str | None,
    device: str | None,
    trust_remote_code: bool | None,
) -> dict[str, Any]:
    return {
        "ppl": split_list(ppl),
        "seqlen": seqlen,
        "stride": stride,
        "limit_windows": limit_windows,
        "ppl_batch_size": ppl_batch_size,
        "tasks": split_list(tasks),
        "num_fewshot": num_fewshot,
        "limit": limit,
        "batch_size": batch_size,
        "include_path": split_list(include_path),
        "data_dir": data_dir,
        "dtype": dtype,
        "device": device,
        "trust_remote_code": trust_remote_code,
    }


# Options shared by eval and sweep, declared once (help texts from the EvalSettings schema).
PPL = typer.Option(None, help=_e("ppl") + " (comma-separated)", show_default=False)
SEQLEN = typer.Option(None, help=_e("seqlen"), show_default=False)
STRIDE = typer.Option(None, help=_e("stride"), show_default=False)
LIMIT_WINDOWS = typer.Option(None, help=_e("limit_windows"), show_default=False)
PPL_BATCH = typer.Option(None, help=_e("ppl_batch_size"), show_default=False)
TASKS = typer.Option(None, help=_e("tasks") + " (comma-separated)", show_default=False)
FEWSHOT = typer.Option(None, help=_e("num_fewshot"), show_default=False)
LIMIT = typer.Option(None, help=_e("limit"), show_default=False)
BATCH = typer.Option(None, help=_e("batch_size"), show_default=False)
INCLUDE = typer.Option(None, help=_e("include_path") + " (comma-separated)", show_default=False)
DATA_DIR = typer.Option(None, help=_e("data_dir"), show_default=False)
DTYPE = typer.Option(None, help=_e("dtype"), show_default=False)
DEVICE = typer.Option(None, help=_e("device"), show_default=False)
TRUST = typer.Option(None, "--trust-remote-code", help=_e("trust_remote_code"), show_default=False)
RECIPE = typer.Option(None, help="YAML recipe with these settings (flags given on the command line override it)")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace an existing output dir")
JSON_OUT = typer.Option(False, "--json", help="Print the machine-readable results as JSON on stdout")
VERBOSE = typer.Option(False, "--verbose", "-v", help="Debug logging")


def eval_command(
    models: list[str] | None = typer.Argument(None, help=_e("models"), show_default=False),
    output: str | None = typer.Option(None, "--output", "-o", help=_e("output"), show_default=False),
    ppl: str | None = PPL,
    seqlen: int | None = SEQLEN,
    stride: int | None = STRIDE,
    limit_windows: int | None = LIMIT_WINDOWS,
    ppl_batch_size: int | None = PPL_BATCH,
    tasks: str | None = TASKS,
    num_fewshot: int | None = FEWSHOT,
    limit: float | None = LIMIT,
    batch_size: int | None = BATCH,
    include_path: str | None = INCLUDE,
    data_dir: str | None = DATA_DIR,
    dtype: str | None = DTYPE,
    device: str | None = DEVICE,
    trust_remote_code: bool | None = TRUST,
    recipe: str | None = RECIPE,
    overwrite: bool = OVERWRITE,
    json_out: bool = JSON_OUT,
    verbose: bool = VERBOSE,
) -> None:
    """Perplexity and lm-eval tasks for one or more models, compared in one table (deltas vs the first)."""
    setup_logging(verbose)
    with user_errors():
        from sparsetune.evaluate.compare import print_comparison, run_eval

        flags = _eval_flags(
            ppl,
            seqlen,
            stride,
            limit_windows,
            ppl_batch_size,
            tasks,
            num_fewshot,
            limit,
            batch_size,
            include_path,
            data_dir,
            dtype,
            device,
            trust_remote_code,
        )
        flags.update({"models": models or None, "output": output})
        settings = _settings(recipe, "eval", flags)
        if not settings.get("models"):
            raise SparsetuneError("missing MODEL; pass one or more model dirs, hub ids, .gguf files or smollm2")
        cfg = validate_config(EvalConfig, settings, where=f"recipe {recipe}" if recipe else "eval")
        report = run_eval(cfg, overwrite=overwrite, show_progress=not json_out)
        if json_out:
            typer.echo(json.dumps(report, default=str))
        else:
            print_comparison(report)


def sweep_command(
    model: str | None = typer.Argument(None, help=_s("model"), show_default=False),
    output: str | None = typer.Option(None, "--output", "-o", help=_s("output"), show_default=False),
    methods: str | None = typer.Option(None, help=_s("methods") + " (comma-separated)", show_default=False),
    sparsities: str | None = typer.Option(None, help=_s("sparsities") + " (comma-separated)", show_default=False),
    patterns: str | None = typer.Option(None, help=_s("patterns") + " (comma-separated)", show_default=False),
    refine: str | None = typer.Option(None, help=_s("refine") + " (comma-separated)", show_default=False),
    calib: str | None = typer.Option(None, help=_s("calib"), show_default=False),
    calib_samples: int | None = typer.Option(None, help=_s("calib_samples"), show_default=False),
    calib_seqlen: int | None = typer.Option(None, help=_s("calib_seqlen"), show_default=False),
    calib_sampling: str | None = typer.Option(None, help=_s("calib_sampling"), show_default=False),
    calib_batch_size: int | None = typer.Option(None, help=_s("calib_batch_size"), show_default=False),
    seed: int | None = typer.Option(None, help=_s("seed"), show_default=False),
    resume: bool | None = typer.Option(None, "--resume", help=_s("resume"), show_default=False),
    ppl: str | None = PPL,
    seqlen: int | None = SEQLEN,
    stride: int | None = STRIDE,
    limit_windows: int | None = LIMIT_WINDOWS,
    ppl_batch_size: int | None = PPL_BATCH,
    tasks: str | None = TASKS,
    num_fewshot: int | None = FEWSHOT,
    limit: float | None = LIMIT,
    batch_size: int | None = BATCH,
    include_path: str | None = INCLUDE,
    data_dir: str | None = DATA_DIR,
    dtype: str | None = DTYPE,
    device: str | None = DEVICE,
    recipe: str | None = RECIPE,
    overwrite: bool = OVERWRITE,
    json_out: bool = JSON_OUT,
    verbose: bool = VERBOSE,
) -> None:
    """Prune + evaluate every method x sparsity (and N:M pattern); writes sweep.json, sweep.md, sweep.png."""
    setup_logging(verbose)
    with user_errors():
        from sparsetune.evaluate.sweep import run_sweep

        flags = _eval_flags(
            ppl,
            seqlen,
            stride,
            limit_windows,
            ppl_batch_size,
            tasks,
            num_fewshot,
            limit,
            batch_size,
            include_path,
            data_dir,
            dtype,
            device,
            None,
        )
        flags.update(
            {
                "model": model,
                "output": output,
                "methods": split_list(methods),
                "sparsities": _floats(sparsities, "--sparsities"),
                "patterns": split_list(patterns),
                "refine": split_list(refine),
                "calib": calib,
                "calib_samples": calib_samples,
                "calib_seqlen": calib_seqlen,
                "calib_sampling": calib_sampling,
                "calib_batch_size": calib_batch_size,
                "seed": seed,
                "resume": resume,
            }
        )
        settings = _settings(recipe, "sweep", flags)
        if settings.get("model") is None:
            raise SparsetuneError("missing MODEL; pass a model dir, hub id, .gguf file or the alias smollm2")
        if settings.get("output") is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        cfg = validate_config(SweepConfig, settings, where=f"recipe {recipe}" if recipe else "sweep")
        report = run_sweep(cfg, overwrite=overwrite, show_progress=not json_out)
        if json_out:
            typer.echo(json.dumps(report, default=str))
        else:
            _print_sweep(report)


def _print_sweep(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    from sparsetune.evaluate.sweep import markdown_sweep

    text = markdown_sweep(report).split("![")[0]
    console = Console()
    console.print(Markdown(text))
    console.print(f"wrote {report['output']}/sweep.json, sweep.md, sweep.png")


def report_command(
    model: str = typer.Argument(..., help=field_help(ReportConfig, "model"), show_default=False),
    output: str | None = typer.Option(
        None, "--output", "-o", help=field_help(ReportConfig, "output"), show_default=False
    ),
    overwrite: bool = OVERWRITE,
) -> None:
    """Sparsity bar charts (per block, per module) and a Markdown summary of a pruned model dir."""
    with user_errors():
        from sparsetune.evaluate.report import run_report

        cfg = validate_config(ReportConfig, {"model": model, "output": output}, where="report")
        written = run_report(cfg.model, cfg.output, overwrite=overwrite)
        typer.echo(f"wrote {written['output']}: {', '.join(written['files'])}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("sweep")(sweep_command)
    app.command("report")(report_command)
