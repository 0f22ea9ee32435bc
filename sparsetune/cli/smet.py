"""`sparsetune smet-pretrain`: parse flags (or a recipe) into a SmetConfig and run sparse pretraining."""

from __future__ import annotations

import json

import typer

from sparsetune.cli.common import setup_logging, user_errors
from sparsetune.recipes import field_help, merge_settings, recipe_settings, validate_config
from sparsetune.train.smet_config import SmetConfig


def _opt(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(None, *flags, help=field_help(SmetConfig, name), show_default=False)


def smet_command(
    model_config_name: str | None = _opt("model_config_name", "--model-config"),
    tokenizer: str | None = _opt("tokenizer"),
    data: str | None = _opt("data"),
    data_dir: str | None = _opt("data_dir"),
    val_fraction: float | None = _opt("val_fraction"),
    output: str | None = _opt("output", "--output", "-o"),
    density: float | None = _opt("density"),
    init: str | None = _opt("init"),
    growth: str | None = _opt("growth"),
    update_interval: int | None = _opt("update_interval"),
    drop_fraction: float | None = _opt("drop_fraction"),
    drop_fraction_end: float | None = _opt("drop_fraction_end"),
    regrow_warmup: int | None = _opt("regrow_warmup"),
    lr_density_exponent: float | None = _opt("lr_density_exponent"),
    lr: float | None = _opt("lr"),
    warmup_ratio: float | None = _opt("warmup_ratio"),
    min_lr_ratio: float | None = _opt("min_lr_ratio"),
    weight_decay: float | None = _opt("weight_decay"),
    beta1: float | None = _opt("beta1"),
    beta2: float | None = _opt("beta2"),
    eps: float | None = _opt("eps"),
    optim: str | None = _opt("optim"),
    batch_size: int | None = _opt("batch_size"),
    grad_accum: int | None = _opt("grad_accum"),
    seqlen: int | None = _opt("seqlen"),
    steps: int | None = _opt("steps"),
    seed: int | None = _opt("seed"),
    dtype: str | None = _opt("dtype"),
    device: str | None = _opt("device"),
    eval_every: int | None = _opt("eval_every"),
    val_batches: int | None = _opt("val_batches"),
    log_every: int | None = _opt("log_every"),
    checkpoint_every: int | None = _opt("checkpoint_every"),
    checkpoint_dir: str | None = _opt("checkpoint_dir"),
    resume: bool | None = _opt("resume", "--resume"),
    trust_remote_code: bool | None = _opt("trust_remote_code", "--trust-remote-code"),
    recipe: str | None = typer.Option(
        None, help="YAML recipe with these settings (flags given on the command line override it)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir"),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """Pretrain a sparse Llama model from scratch with dynamic sparse training (SMET): compact optimizer state,
    regrowth warm-up and density-aware learning rates."""
    setup_logging(verbose)
    flags = {k: v for k, v in locals().items() if k in SmetConfig.model_fields}
    flags["model_config"] = flags.pop("model_config_name")  # the recipe key and flag name
    with user_errors():
        from sparsetune.errors import SparsetuneError
        from sparsetune.train.smet import print_summary, run_smet

        base = recipe_settings(recipe, "smet-pretrain")
        settings = merge_settings(base, flags)
        if settings.get("output") is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        cfg = validate_config(SmetConfig, settings, where=f"recipe {recipe}" if recipe else "smet-pretrain")
        report = run_smet(cfg, overwrite=overwrite, show_progress=not json_out)
        if report.get("rank", 0) != 0:  # in multi-process runs only rank 0 reports
            return
        if json_out:
            typer.echo(json.dumps(report["summary"]))
        else:
            print_summary(report)


def register(app: typer.Typer) -> None:
    app.command("smet-pretrain")(smet_command)
