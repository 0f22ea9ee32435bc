"""`sparsetune prune`: parse flags (or a recipe) into a PruneConfig and call the library."""

from __future__ import annotations

import json

import typer

from sparsetune.cli.common import setup_logging, split_list, user_errors
from sparsetune.prune.config import PruneConfig
from sparsetune.recipes import field_help, merge_settings, recipe_settings, validate_config


def _h(name: str) -> str:
    return field_help(PruneConfig, name)


def prune_command(
    model: str | None = typer.Argument(None, help=_h("model"), show_default=False),
    output: str | None = typer.Option(None, "--output", "-o", help=_h("output"), show_default=False),
    method: str | None = typer.Option(None, help=_h("method"), show_default=False),
    sparsity: float | None = typer.Option(None, help=_h("sparsity"), show_default=False),
    pattern: str | None = typer.Option(None, help=_h("pattern"), show_default=False),
    calib: str | None = typer.Option(None, help=_h("calib"), show_default=False),
    calib_samples: int | None = typer.Option(None, help=_h("calib_samples"), show_default=False),
    seqlen: int | None = typer.Option(None, help=_h("seqlen"), show_default=False),
    seed: int | None = typer.Option(None, help=_h("seed"), show_default=False),
    calib_sampling: str | None = typer.Option(None, help=_h("calib_sampling"), show_default=False),
    calib_batch_size: int | None = typer.Option(None, help=_h("calib_batch_size"), show_default=False),
    data_dir: str | None = typer.Option(None, help=_h("data_dir"), show_default=False),
    dtype: str | None = typer.Option(None, help=_h("dtype"), show_default=False),
    device: str | None = typer.Option(None, help=_h("device"), show_default=False),
    trust_remote_code: bool | None = typer.Option(
        None, "--trust-remote-code", help=_h("trust_remote_code"), show_default=False
    ),
    targets: str | None = typer.Option(None, help=_h("targets") + " (comma-separated)", show_default=False),
    ignore: str | None = typer.Option(None, help=_h("ignore") + " (comma-separated)", show_default=False),
    sequential: bool | None = typer.Option(None, "--sequential/--no-sequential", help=_h("sequential")),
    down_stats: str | None = typer.Option(None, help=_h("down_stats"), show_default=False),
    untie_embeddings: bool | None = typer.Option(
        None, "--untie-embeddings", help=_h("untie_embeddings"), show_default=False
    ),
    owl: bool | None = typer.Option(None, "--owl", help=_h("owl"), show_default=False),
    owl_m: float | None = typer.Option(None, help=_h("owl_m"), show_default=False),
    owl_lambda: float | None = typer.Option(None, help=_h("owl_lambda"), show_default=False),
    self_temperature: float | None = typer.Option(None, help=_h("self_temperature"), show_default=False),
    offload_activations: str | None = typer.Option(None, help=_h("offload_activations"), show_default=False),
    checkpoint_dir: str | None = typer.Option(None, help=_h("checkpoint_dir"), show_default=False),
    resume: bool | None = typer.Option(None, "--resume", help=_h("resume"), show_default=False),
    device_map: str | None = typer.Option(None, help=_h("device_map"), show_default=False),
    percdamp: float | None = typer.Option(None, help=_h("percdamp"), show_default=False),
    blocksize: int | None = typer.Option(None, help=_h("blocksize"), show_default=False),
    alps_rho: float | None = typer.Option(None, help=_h("alps_rho"), show_default=False),
    alps_rho_growth: float | None = typer.Option(None, help=_h("alps_rho_growth"), show_default=False),
    alps_max_iter: int | None = typer.Option(None, help=_h("alps_max_iter"), show_default=False),
    alps_cg_iter: int | None = typer.Option(None, help=_h("alps_cg_iter"), show_default=False),
    moe_calibrate: str | None = typer.Option(None, help=_h("moe_calibrate"), show_default=False),
    refine: str | None = typer.Option(None, help=_h("refine"), show_default=False),
    refine_targets: str | None = typer.Option(
        None, help=_h("refine_targets") + " (comma-separated)", show_default=False
    ),
    refine_max_cycles: int | None = typer.Option(None, help=_h("refine_max_cycles"), show_default=False),
    refine_threshold: float | None = typer.Option(None, help=_h("refine_threshold"), show_default=False),
    refine_values: str | None = typer.Option(None, help=_h("refine_values"), show_default=False),
    recipe: str | None = typer.Option(
        None, help="YAML recipe with these settings (flags given on the command line override it)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output dir"),
    json_out: bool = typer.Option(False, "--json", help="Print a machine-readable JSON summary on stdout"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging"),
) -> None:
    """Prune a model in one shot (magnitude, Wanda, SparseGPT or ALPS; unstructured or N:M) and save it."""
    setup_logging(verbose)
    with user_errors():
        from sparsetune.prune.api import print_summary, run_prune

        flags = {
            "model": model,
            "output": output,
            "method": method,
            "sparsity": sparsity,
            "pattern": pattern,
            "calib": calib,
            "calib_samples": calib_samples,
            "seqlen": seqlen,
            "seed": seed,
            "calib_sampling": calib_sampling,
            "calib_batch_size": calib_batch_size,
            "data_dir": data_dir,
            "dtype": dtype,
            "device": device,
            "trust_remote_code": trust_remote_code,
            "targets": split_list(targets),
            "ignore": split_list(ignore),
            "sequential": sequential,
            "down_stats": down_stats,
            "untie_embeddings": untie_embeddings,
            "owl": owl,
            "owl_m": owl_m,
            "owl_lambda": owl_lambda,
            "self_temperature": self_temperature,
            "offload_activations": offload_activations,
            "checkpoint_dir": checkpoint_dir,
            "resume": resume,
            "device_map": device_map,
            "percdamp": percdamp,
            "blocksize": blocksize,
            "alps_rho": alps_rho,
            "alps_rho_growth": alps_rho_growth,
            "alps_max_iter": alps_max_iter,
            "alps_cg_iter": alps_cg_iter,
            "moe_calibrate": moe_calibrate,
            "refine": refine,
            "refine_targets": split_list(refine_targets),
            "refine_max_cycles": refine_max_cycles,
            "refine_threshold": refine_threshold,
            "refine_values": refine_values,
        }
        base = recipe_settings(recipe, "prune")
        if pattern is not None and "sparsity" in base:
            base.pop("sparsity")  # a pattern on the command line replaces the recipe's unstructured target
        if sparsity is not None and "pattern" in base:
            base.pop("pattern")
        settings = merge_settings(base, flags)
        if settings.get("model") is None:
            raise_missing("MODEL", "pass a model dir, hub id, .gguf file or the alias smollm2")
        if settings.get("output") is None:
            raise_missing("--output", "pass -o OUT_DIR")
        cfg = validate_config(PruneConfig, settings, where=f"recipe {recipe}" if recipe else "prune")
        report = run_prune(cfg, overwrite=overwrite, show_progress=not json_out)
        if report.get("rank", 0) != 0:  # in multi-process runs only rank 0 reports
            return
        if json_out:
            typer.echo(json.dumps(report["summary"]))
        else:
            print_summary(report)


def raise_missing(what: str, fix: str) -> None:
    from sparsetune.errors import SparsetuneError

    raise SparsetuneError(f"missing {what}; {fix}")


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_command)
