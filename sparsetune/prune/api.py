"""`prune` as a library: load -> calibration batches -> engine -> report -> save."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, masks, models
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory, write_json
from sparsetune.prune import magnitude, sparsegpt, wanda
from sparsetune.prune.config import PruneConfig
from sparsetune.prune.engine import GROUP_OF, BlockTargets, EngineOptions, run_blocks
from sparsetune.recipes import dump_yaml

log = logging.getLogger(__name__)

METHODS = {"magnitude": magnitude, "wanda": wanda, "sparsegpt": sparsegpt}
REPORT_FILE = "sparsity_report.json"


def plan_targets(model: nn.Module, cfg: PruneConfig) -> tuple[list[BlockTargets], tuple[str, nn.Linear] | None]:
    """Resolve --targets/--ignore to the Linears to prune, per block; refuse anything unsafe or impossible."""
    layers = models.decoder_layers(model)
    include = [re.compile(p) for p in cfg.targets]
    exclude = [re.compile(p) for p in cfg.ignore]

    def chosen(name: str, in_block: bool) -> bool:
        if any(p.search(name) for p in exclude):
            return False
        return any(p.search(name) for p in include) if include else in_block

    blocks = []
    for i, layer in enumerate(layers):
        block = BlockTargets(i, {})
        for local, module in layer.named_modules():
            if not isinstance(module, nn.Linear):
                continue
            name = f"model.layers.{i}.{local}"
            if not chosen(name, in_block=True):
                continue
            if local not in GROUP_OF:
                raise SparsetuneError(f"target {name} is not a Linear the engine knows; narrow --targets")
            block.groups.setdefault(GROUP_OF[local], []).append((name, module))
        blocks.append(block)

    head = None
    lm_head = model.get_output_embeddings()
    if include and isinstance(lm_head, nn.Linear) and chosen("lm_head", in_block=False):
        if models.embeddings_tied(model) and not cfg.untie_embeddings:
            raise SparsetuneError(
                "lm_head shares its weight with the embedding table, so pruning it would prune the embeddings; "
                "pass --untie-embeddings to prune a separate copy, or --ignore lm_head"
            )
        head = ("lm_head", lm_head)

    chosen_all = [item for b in blocks for item in b.modules()] + ([head] if head else [])
    if not chosen_all:
        raise SparsetuneError(
            f"--targets {','.join(cfg.targets) or '(default)'} matched no Linear modules; "
            "use regexes such as 'q_proj|k_proj' or drop --targets"
        )
    nm = cfg.nm
    if nm is not None:
        for name, module in chosen_all:
            if module.in_features % nm.m:
                raise SparsetuneError(
                    f"{name} has {module.in_features} input features, not divisible by M={nm.m} of pattern {nm}; "
                    "--ignore it or choose another pattern"
                )
    return blocks, head


def make_calibration(model: nn.Module, tokenizer: Any, cfg: PruneConfig) -> data.CalibrationSet | None:
    """The calibration set for cfg, or None for methods that need none."""
    if not METHODS[cfg.method].NEEDS_CALIBRATION:
        return None
    seqlen = cfg.seqlen
    limit = models.max_positions(model)
    if seqlen > limit:
        log.info("seqlen %d is above the model's max positions; using %d", seqlen, limit)
        seqlen = limit
    return data.calibration_set(
        tokenizer, cfg.calib, cfg.calib_samples, seqlen, cfg.seed, cfg.calib_sampling, cfg.data_dir
    )


def prune_model(
    model: nn.Module,
    tokenizer: Any,
    cfg: PruneConfig,
    calib: data.CalibrationSet | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune `model` in place as `cfg` says; returns the sparsity report (without saving anything)."""
    blocks, head = plan_targets(model, cfg)
    method = METHODS[cfg.method]
    before = masks.sparsity_stats(dict(item for b in blocks for item in b.modules()))["global_sparsity"]
    if head is not None and models.embeddings_tied(model):
        models.untie_embeddings(model)
        head = ("lm_head", model.get_output_embeddings())
    timings: dict[str, float] = {}
    if method.NEEDS_CALIBRATION and calib is None:
        t0 = time.perf_counter()
        calib = make_calibration(model, tokenizer, cfg)
        timings["calibration_data_s"] = time.perf_counter() - t0
    target: float | masks.NMPattern = cfg.nm or cfg.target_sparsity
    device = models.resolve_device(cfg.device)
    t0 = time.perf_counter()
    if method.NEEDS_CALIBRATION:
        assert calib is not None
        opts = EngineOptions(
            method=method,
            target=target,
            method_options={"blocksize": cfg.blocksize, "percdamp": cfg.percdamp},
            sequential=cfg.sequential,
            batch_size=cfg.calib_batch_size,
            device=device,
        )
        with _block_progress(len(blocks), show_progress) as advance:
            timings.update(run_blocks(model, calib.input_ids, blocks, head, opts, on_block_done=advance))
    else:
        items = [item for b in blocks for item in b.modules()] + ([head] if head else [])
        for _, module in items:
            module.weight.data.copy_(method.prune_group([module.weight.data], None, target)[0])
    timings["prune_s"] = time.perf_counter() - t0
    return build_report(model, cfg, blocks, head, calib, timings, before)


def build_report(
    model: nn.Module,
    cfg: PruneConfig,
    blocks: list[BlockTargets],
    head: tuple[str, nn.Linear] | None,
    calib: data.CalibrationSet | None,
    timings: dict[str, float],
    sparsity_before: float = 0.0,
) -> dict[str, Any]:
    pruned = {name: module for b in blocks for name, module in b.modules()}
    if head is not None:
        pruned[head[0]] = head[1]
    stats = masks.sparsity_stats(pruned)
    per_block = []
    for b in blocks:
        s = masks.sparsity_stats(dict(b.modules()))
        per_block.append({"block": b.index, "sparsity": s["global_sparsity"], "numel": s["numel"]})
    nm = cfg.nm
    emb = model.get_input_embeddings().weight
    summary = {
        "method": cfg.method,
        "pattern": str(nm) if nm else "unstructured",
        "target_sparsity": cfg.target_sparsity,
        "sparsity_before": sparsity_before,
        "global_sparsity": stats["global_sparsity"],
        "modules_pruned": len(pruned),
        "weights_pruned": stats["zeros"],
        "weights_targeted": stats["numel"],
        "embedding_sparsity": masks.tensor_sparsity(emb.detach()),
        "prune_s": round(timings.get("prune_s", 0.0), 3),
    }
    return {
        "summary": summary,
        **summary,
        "sequential": cfg.sequential,
        "settings": cfg.model_dump(mode="json"),
        "calibration": calib.describe() if calib is not None else None,
        "blocks": per_block,
        "modules": stats["modules"],
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "memory": peak_memory(),
        "versions": package_versions(),
    }


class _block_progress:  # noqa: N801 - used as a context manager function
    """A rich progress bar over blocks (block i/N, ETA); yields the per-block callback."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled = total, enabled

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda i, s: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("pruning block {task.completed}/{task.total}"),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self.progress.__enter__()
        task = self.progress.add_task("prune", total=self.total)
        return lambda i, s: self.progress.update(task, completed=i + 1)

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)


def run_prune(cfg: PruneConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune prune` flow. Validates everything it can before loading or writing anything."""
    if cfg.output is None:
        raise SparsetuneError("missing --output; pass -o OUT_DIR")
    out = check_output_dir(cfg.output, overwrite, inputs=(cfg.model,))
    t0 = time.perf_counter()
    model, tokenizer = models.load_model(
        cfg.model, dtype=cfg.dtype, device=_load_device(cfg), trust_remote_code=cfg.trust_remote_code
    )
    load_s = time.perf_counter() - t0
    plan_targets(model, cfg)  # fail on bad targets before spending time on calibration data
    t0 = time.perf_counter()
    calib = make_calibration(model, tokenizer, cfg)
    calib_s = time.perf_counter() - t0
    report = prune_model(model, tokenizer, cfg, calib, show_progress=show_progress)
    report["timings"].update({"load_s": round(load_s, 3), "calibration_data_s": round(calib_s, 3)})
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        models.save_model(model, tokenizer, tmp)
        report["timings"]["save_s"] = round(time.perf_counter() - t0, 3)
        report["memory"] = peak_memory()
        report["output"] = str(out)
        write_json(Path(tmp) / REPORT_FILE, report)
        dump_yaml(cfg, Path(tmp) / "recipe.yaml", header="sparsetune prune --recipe recipe.yaml reproduces this run")
    report["summary"]["output"] = str(out)
    return report


def _load_device(cfg: PruneConfig) -> str:
    """Big models stay on CPU and move to the GPU one block at a time; small ones load onto the device."""
    return "cpu" if models.resolve_device(cfg.device).type == "cuda" else cfg.device


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["summary"]
    table = Table(title=f"sparsetune prune: {s['method']} {s['pattern']}")
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("targeted weights", f"{s['weights_targeted']:,}", f"{s['weights_targeted']:,}")
    zeros_before = round(s["sparsity_before"] * s["weights_targeted"])
    table.add_row("zeros", f"{zeros_before:,}", f"{s['weights_pruned']:,}")
    table.add_row("sparsity", f"{s['sparsity_before']:.4f}", f"{s['global_sparsity']:.4f}")
    table.add_row("modules pruned", "", str(s["modules_pruned"]))
    table.add_row("embedding sparsity", "", f"{s['embedding_sparsity']:.4f}")
    for key, value in report["timings"].items():
        table.add_row(f"time {key.removesuffix('_s')}", "", f"{value:.1f} s")
    Console().print(table)
    if "output" in s:
        Console().print(f"wrote {s['output']}")


def restore_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a saved state back into a model (e.g. to prune the same base model again)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(state[name])
