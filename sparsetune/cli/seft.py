"""`sparsetune seft`: parse flags (or a recipe) into a SeftConfig and run the fine-tuning recipe."""

from __future__ import annotations

import json

import typer

from sparsetune.cli.common import setup_logging, user_errors
from sparsetune.recipes import field_help, merge_settings, recipe_settings, validate_config
from sparsetune.train.seft_config import SeftConfig


def _h(name: str) -> str:
    return field_help(SeftConfig, name)


def _opt(name: str, *flags: str) -> typer.models.OptionInfo:
    return typer.Option(None, *flags, help=_h(name), show_default=False)


def seft_command(
    model: str | None = typer.Argument(None, help=_h("model"), show_default=False),
    output: str | None = _opt("output", "--output", "-o"),
    method: str | None = _opt("method"),
    data: str | None = _opt("data"),
    val_data: str | None = _opt("val_data"),
    eval_every: int | None = _opt("eval_every"),
    val_batches: int | None = _opt("val_batches"),
    data_dir: str | None = _opt("data_dir"),
    skip_tokens: int | None = _opt("skip_tokens"),
    seqlen: int | None = _opt("seqlen"),
    batch_size: int | None = _opt("batch_size"),
    grad_accum: int | None = _opt("grad_accum"),
    steps: int | None = _opt("steps"),
    lr: float | None = _opt("lr"),
    warmup_steps: int | None = _opt("warmup_steps"),
    min_lr_ratio: float | None = _opt("min_lr_ratio"),
    weight_decay: float | None = _opt("weight_decay"),
    beta1: float | None = _opt("beta1"),
    beta2: float | None = _opt("beta2"),
    eps: float | None = _opt("eps"),
    optim: str | None = _opt("optim"),
    update_interval: int | None = _opt("update_interval"),
    drop_fraction: float | None = _opt("drop_fraction"),
    drop_fraction_end: float | None = _opt("drop_fraction_end"),
    drop_criterion: str | None = _opt("drop_criterion"),
    grow_batches: int | None = _opt("grow_batches"),
    regrow_warmup: int | None = _opt("regrow_warmup"),
    regrow_lr_scale: float | None = _opt("regrow_lr_scale"),
    lora_r: int | None = _opt("lora_r"),
    lora_alpha: float | None = _opt("lora_alpha"),
    lora_dropout: float | None = _opt("lora_dropout"),
    reprune_samples: int | None = _opt("reprune_samples"),
    seed: int | None = _opt("seed"),
    dtype: str | None = _opt("dtype"),
    device: str | None = _opt("device"),
    trust_remote_code: bool | None = _opt("trust_remote_code", "--trust-remote-code"),
    log_every: int | None = _opt("log_every"),
    checkpoint_every: int | None = _opt("checkpoint_every"),
    checkpoint_dir: str | None = _opt("checkpoint_dir"),
    resume: bool | None = _opt("resume", "--resume"),
    recipe: str | None = typer.Option(
        None, help="YAML recipe with these settings (flags given on the command line override it)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir"),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """Fine-tune a pruned model and keep its sparsity: SEFT drop/grow, masked fine-tuning, or LoRA + re-prune."""
    setup_logging(verbose)
    flags = {k: v for k, v in locals().items() if k in SeftConfig.model_fields}
    with user_errors():
        from sparsetune.errors import SparsetuneError
        from sparsetune.train.finetune import print_summary, run_seft

        base = recipe_settings(recipe, "seft")
        settings = merge_settings(base, flags)
        if settings.get("model") is None:
            raise SparsetuneError("missing MODEL; pass a pruned model dir (the output of `sparsetune prune`)")
        if settings.get("output") is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        cfg = validate_config(SeftConfig, settings, where=f"recipe {recipe}" if recipe else "seft")
        report = run_seft(cfg, overwrite=overwrite, show_progress=not json_out)
        if report.get("rank", 0) != 0:  # in multi-process runs only rank 0 reports
            return
        if json_out:
            typer.echo(json.dumps(report["summary"]))
        else:
            print_summary(report)


def register(app: typer.Typer) -> None:
    app.command("seft")(seft_command)
