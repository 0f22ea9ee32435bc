"""`prune` as a library: load -> calibration batches -> engine -> report -> save."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, devices, loading, masks, stream_inputs, structure
from sparsetune.distributed import DistContext, dist_context
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory
from sparsetune.patterns import parse_pattern
from sparsetune.progress import Progress
from sparsetune.prune import auto, dsnot, registry
from sparsetune.prune.activations import ActivationStore
from sparsetune.prune.checkpoint import Checkpointer
from sparsetune.prune.config import PruneConfig
from sparsetune.prune.engine import GROUP_OF, BlockTargets, EngineOptions, llama_layout, run_blocks
from sparsetune.prune.self_calibration import self_calibration_set
from sparsetune.prune.streamed import PruneStream
from sparsetune.recipes import dump_yaml
from sparsetune.reports import PruneSummary, write_report
from sparsetune.streaming import ShardWriter, human_bytes, save_config_files

log = logging.getLogger(__name__)

Item = tuple[str, structure.Target]


def plan_targets(model: nn.Module, cfg: PruneConfig) -> tuple[list[BlockTargets], Item | None]:
    """Resolve --targets/--ignore to the matrices to prune, per block (`structure.select_targets`, which refuses a
    block weight the engine does not know); then refuse what the pattern or --refine-targets cannot do.

    Targets are the decoder blocks' Linears, Conv1Ds and fused expert slices (`...experts.gate_up_proj[3]`).
    """
    chosen, head_target = structure.select_targets(model, cfg.targets, cfg.ignore, cfg.untie_embeddings)
    path, layers = structure.find_decoder(model)
    blocks = []
    for i, (layer, targets) in enumerate(zip(layers, chosen, strict=True)):
        prefix = f"{path}.{i}"
        block = BlockTargets(i, targets)
        block.prefix = prefix
        locals_ = [t.name.removeprefix(prefix + ".") for t in block.targets]
        if block.targets and llama_layout(model, layer) and all(local in GROUP_OF for local in locals_):
            block.groups = {}
            for local, target in zip(locals_, block.targets, strict=True):
                block.groups.setdefault(GROUP_OF[local], []).append((target.name, target))
        blocks.append(block)
    head = (head_target.name, head_target) if head_target is not None else None

    chosen_all = [item for b in blocks for item in b.modules()] + ([head] if head else [])
    nm = cfg.nm
    if nm is not None:
        for name, target in chosen_all:
            if target.in_features % nm.m:
                raise SparsetuneError(
                    f"{name} has {target.in_features} input features, not divisible by M={nm.m} of pattern {nm}; "
                    "--ignore it or choose another pattern"
                )
    if cfg.refine != "none":
        dsnot.refine_selection(chosen_all, cfg.refine_targets)  # refuse --refine-targets that match nothing
    return blocks, head


def engine_path(blocks: list[BlockTargets], cfg: PruneConfig) -> str:
    if not needs_calibration(cfg):
        return "no calibration: each matrix on its own"
    if not cfg.sequential:
        return "two-pass: statistics from the dense block"
    if all(b.fast for b in blocks if b.targets):
        return "llama-layout one-pass"
    return "derived order"


def architecture_report(model: nn.Module, blocks: list[BlockTargets], cfg: PruneConfig) -> dict[str, Any]:
    """What the engine found: the family (tested or tried generically), where the blocks are, target kinds."""
    kinds: dict[str, int] = {}
    for b in blocks:
        for t in b.targets:
            kinds[t.kind] = kinds.get(t.kind, 0) + 1
    known = structure.is_known_family(model)
    return {
        "model_type": structure.model_type(model),
        "family": "tested" if known else "untested: tried generically",
        "decoder_path": structure.find_decoder(model)[0],
        "blocks": len(blocks),
        "engine": engine_path(blocks, cfg),
        "target_kinds": kinds,
    }


def needs_calibration(cfg: PruneConfig) -> bool:
    return bool(registry.load(cfg.method).NEEDS_CALIBRATION or cfg.owl or cfg.refine != "none")


def make_calibration(
    model: nn.Module,
    tokenizer: Any,
    cfg: PruneConfig,
    ctx: DistContext | None = None,
    records: list[dict[str, Any]] | None = None,
) -> data.CalibrationSet | None:
    """The calibration set for cfg (all ranks get the full set), or None when the run needs none."""
    if not needs_calibration(cfg):
        return None
    seqlen = cfg.calib_seqlen
    limit = structure.max_positions(model)
    if seqlen > limit:
        log.info("seqlen %d is above the model's max positions; using %d", seqlen, limit)
        seqlen = limit
    if cfg.calib == "self":
        ctx = ctx or DistContext(0, 1, devices.resolve_device(cfg.device))
        args = (model, tokenizer, cfg.calib_samples, seqlen, cfg.seed, cfg.self_temperature)
        if not ctx.is_main:  # rank 0 generates and caches; the others read its cache
            ctx.barrier()
            return self_calibration_set(*args, batch_size=16)[0]
        calib, info = self_calibration_set(*args, batch_size=16)
        ctx.barrier()
        log.info("self-calibration: %s", info)
        return calib
    return data.calibration_set(
        tokenizer, cfg.calib, cfg.calib_samples, seqlen, cfg.seed, cfg.calib_sampling, cfg.data_dir, records
    )


def settings_hash(cfg: PruneConfig) -> str:
    """Hash of every setting that changes the result (not where it is written or which device runs it)."""
    skip = {"output", "device", "data_dir", "checkpoint_dir", "resume", "device_map", "trust_remote_code", "model"}
    skip.add("stream")  # where the weights live during the run, not what it computes
    if cfg.refine == "none":  # unused refine settings: checkpoints from before they existed stay valid
        skip |= {k for k in PruneConfig.model_fields if k.startswith("refine")}
    if cfg.moe_calibrate == "routed":  # the default: checkpoints from before the setting existed stay valid
        skip.add("moe_calibrate")
    relevant = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in skip}
    relevant["seqlen"] = relevant.pop("calib_seqlen")  # its name before the rename: checkpoints stay valid
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _checkpointer(
    model: nn.Module, cfg: PruneConfig, calib: data.CalibrationSet, ctx: DistContext, stream: PruneStream | None
):

    if cfg.checkpoint_dir is None:
        return None
    identity = {
        # a streamed model is identified by its files (its weights are not in memory)
        "model_fingerprint": stream.streamed.files.fingerprint() if stream else structure.model_fingerprint(model),
        "settings_hash": settings_hash(cfg),
        "calibration_hash": calib.token_hash,
    }
    ckpt = Checkpointer(Path(cfg.checkpoint_dir), identity, ctx.rank, ctx.world)
    if cfg.resume and not ckpt.exists():
        raise SparsetuneError(f"--resume: no checkpoint in {cfg.checkpoint_dir}; run once without --resume")
    if not cfg.resume and ckpt.exists():
        raise SparsetuneError(
            f"{cfg.checkpoint_dir} already holds a checkpoint; pass --resume to continue it or use an empty dir"
        )
    if cfg.resume:
        ckpt.load_state()  # refuse a mismatched or unreadable checkpoint before any work
    return ckpt


@dataclass
class PruneResult:
    """What a prune run produced, besides the pruned weights themselves (in the model, or written by `stream`)."""

    cfg: PruneConfig  # the settings that ran (`--method auto` resolved)
    blocks: list[BlockTargets]
    head: Item | None  # the output head, when it was pruned too
    calib: data.CalibrationSet | None
    method: Any  # the method module, or DSnoT wrapping it
    refined: list[Item]  # the matrices DSnoT refined (empty without --refine)
    sparsity_before: float  # of the targeted weights
    timings: dict[str, float]
    engine: dict[str, Any]  # what `run_blocks` returned: its timings, OWL's block targets, derived stages, resume
    module_info: dict[str, dict[str, Any]]  # per-module details from the method (solver iterations, fallbacks)
    block_targets: list[float | masks.NMPattern] | None  # explicit per-block targets (recipes' block_sparsity)
    exact_total: bool  # every matrix pruned to an exact count (OWL or per-block targets)
    method_choice: dict[str, Any] | None  # what `--method auto` chose, and why
    processes: int
    rank: int
    stream: PruneStream | None  # the streamed run's weights: it recorded each block's statistics as it went


def prune_model(
    model: nn.Module,
    tokenizer: Any,
    cfg: PruneConfig,
    calib: data.CalibrationSet | None = None,
    show_progress: bool = True,
    ctx: DistContext | None = None,
    method_choice: dict[str, Any] | None = None,
    stream: PruneStream | None = None,
    plan: tuple[list[BlockTargets], Item | None] | None = None,
) -> PruneResult:
    """Prune `model` in place as `cfg` says (nothing is saved); `build_report` turns the result into the report.

    `method_choice`: what `--method auto` chose, when the caller resolved it already. `plan`: `plan_targets`'s
    answer, when the caller has it. `calib`: the calibration set (made here when the run needs one and none is
    given). `stream`: the model is a skeleton whose blocks `stream` loads, writes and frees one at a time
    (`sparsetune.streaming`).

    In a multi-process run (`ctx.world > 1`) every rank passes the full calibration set; each accumulates
    statistics on its shard, the statistics are all-reduced, and every rank applies the identical masks.
    """
    ctx = ctx or DistContext(0, 1, devices.resolve_device(cfg.device))
    if cfg.method == "auto":
        cfg, method_choice = auto.resolve(cfg)
    if method_choice is not None and ctx.is_main:
        log.info("method auto -> %s", method_choice["why"])
    blocks, head = plan or plan_targets(model, cfg)
    if cfg.block_sparsity is not None and len(cfg.block_sparsity) != len(blocks):
        raise SparsetuneError(
            f"block_sparsity lists {len(cfg.block_sparsity)} values but the model has {len(blocks)} blocks; "
            "give one sparsity per decoder block"
        )
    method = registry.load(cfg.method)
    before = 0.0
    if stream is None:
        before = masks.sparsity_stats({n: t.weight() for b in blocks for n, t in b.modules()})["global_sparsity"]
    else:
        stream.targets = [b.modules() for b in blocks]
        if head is not None:
            stream.streamed.load_head(ctx.device if ctx.device.type == "cuda" else "cpu")
    if head is not None and structure.embeddings_tied(model):
        structure.untie_embeddings(model)
        head = ("lm_head", structure.Target("lm_head", model.get_output_embeddings(), "linear"))
    refined: list[Item] = []
    if cfg.refine == "dsnot":  # the base method wrapped: same pass, two more statistics, masks refined
        refined = dsnot.refine_selection(
            [item for b in blocks for item in b.modules()] + ([head] if head else []), cfg.refine_targets
        )
        method = dsnot.DSnoT(
            method,
            [t for _, t in refined] if cfg.refine_targets else None,
            cfg.refine_max_cycles,
            cfg.refine_threshold,
            cfg.refine_values,
        )
    timings: dict[str, Any] = {}
    if needs_calibration(cfg) and calib is None:
        t0 = time.perf_counter()
        calib = make_calibration(model, tokenizer, cfg, ctx)
        timings["calibration_data_s"] = time.perf_counter() - t0
    target: float | masks.NMPattern = cfg.nm or cfg.target_sparsity
    block_targets: list[float | masks.NMPattern] | None = list(cfg.block_sparsity) if cfg.block_sparsity else None
    method_options = {
        "blocksize": cfg.blocksize,
        "percdamp": cfg.percdamp,
        "exact_total": bool(cfg.owl or block_targets),
        "alps_rho": cfg.alps_rho,
        "alps_rho_growth": cfg.alps_rho_growth,
        "alps_max_iter": cfg.alps_max_iter,
        "alps_cg_iter": cfg.alps_cg_iter,
    }
    t0 = time.perf_counter()
    module_info: dict[str, dict[str, Any]] = {}  # per-module method details (e.g. solver iterations)
    calibrated = needs_calibration(cfg)
    checkpoint = store = None
    if calibrated:
        assert calib is not None
        checkpoint = _checkpointer(model, cfg, calib, ctx, stream)
        store = ActivationStore(
            cfg.offload_activations if cfg.offload_activations == "disk" else "memory",
            torch.device("cpu"),
            _scratch_dir(cfg),
        )
    opts = EngineOptions(
        method=method,
        target=target,
        method_options=method_options,
        sequential=cfg.sequential,
        dense_down_stats=cfg.dense_down_stats,
        batch_size=cfg.calib_batch_size,
        device=ctx.device,
        block_targets=block_targets,
        owl_m=cfg.owl_m if cfg.owl else None,
        owl_lambda=cfg.owl_lambda,
        store=store if cfg.offload_activations == "disk" or ctx.device.type == "cpu" else None,
        checkpoint=checkpoint,
        resume=cfg.resume,
        keep_placement=cfg.device_map is not None,
        module_info=module_info,
        moe_calibrate=cfg.moe_calibrate,
        weights=stream,
    )
    input_ids = ctx.shard(calib.input_ids) if calibrated and calib is not None else None
    with Progress(len(blocks), "pruning block", enabled=show_progress and ctx.is_main) as bar:
        on_block_done = lambda i, _seconds: bar.update(completed=i + 1)  # noqa: E731
        engine = run_blocks(model, input_ids, blocks, head, opts, on_block_done=on_block_done)
    timings.update({k: v for k, v in engine.items() if k.endswith("_s")})
    timings["prune_s"] = time.perf_counter() - t0
    if stream is not None:
        if stream.writer is not None and "resumed_from_block" in engine:
            stream.restore_finished(len(blocks))
        before = stream.sparsity_before()
    return PruneResult(
        cfg=cfg,
        blocks=blocks,
        head=head,
        calib=calib,
        method=method,
        refined=refined,
        sparsity_before=before,
        timings=timings,
        engine=engine,
        module_info=module_info,
        block_targets=block_targets,
        exact_total=bool(method_options["exact_total"]),
        method_choice=method_choice,
        processes=ctx.world,
        rank=ctx.rank,
        stream=stream,
    )


def prune_and_report(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """`prune_model(model, ...)` (the same arguments), then its report (`build_report`); the main process logs the
    report's warnings."""
    result = prune_model(model, *args, **kwargs)
    report = build_report(model, result)
    if result.rank == 0:
        for warning in report["warnings"]:
            log.warning(warning)
        for name, info in result.module_info.items():
            if "warning" in info:  # e.g. a method's documented fallback: never silent
                log.warning("%s: %s", name, info["warning"])
    return report


def moe_report(cfg: PruneConfig, blocks: list[BlockTargets], module_info: dict[str, Any]) -> dict[str, Any] | None:
    """Tokens each expert was calibrated on, per fused expert parameter (None for a model without experts)."""
    tokens: dict[str, list[int | None]] = {}
    for b in blocks:
        for t in b.targets:
            if t.kind == "expert":
                base = t.name.rpartition("[")[0]
                counts = tokens.setdefault(base, [None] * int(t.param.shape[0]))
                counts[int(t.expert or 0)] = module_info.get(t.name, {}).get("calibration_tokens")
    if not tokens:
        return None
    fallback = sorted(n for n, info in module_info.items() if "[" in n and info.get("fallback") == "magnitude")
    return {"calibrate": cfg.moe_calibrate, "tokens_per_expert": tokens, "magnitude_fallback": fallback}


def owl_no_op(cfg: PruneConfig, block_targets: list[str] | None) -> str | None:
    """The warning for OWL under N:M that left every block at the target pattern (None otherwise). A block's N moves
    in whole weights of M, and densities spread by only +-lambda, so e.g. 2:4 with lambda 0.08 (N = 2 +- 0.32)
    rounds back to 2:4 everywhere: the OWL pre-pass then cost time and changed nothing."""
    nm = parse_pattern(cfg.pattern)
    if not cfg.owl or nm is None or not block_targets:
        return None
    if any(t != f"{nm.n}:{nm.m}" for t in block_targets):
        return None
    return (
        f"OWL left every block at {nm.n}:{nm.m}: a block's N moves in whole steps of 1/{nm.m} of the weights, and "
        f"--owl-lambda {cfg.owl_lambda:g} moves it by at most {cfg.owl_lambda * nm.m:.2f}; use --owl-lambda "
        f"{0.5 / nm.m:g} or more, a longer pattern ({2 * nm.n}:{2 * nm.m}), or drop --owl"
    )


def sparsity_shortfall(
    cfg: PruneConfig,
    blocks: list[BlockTargets],
    head: Item | None,
    report: dict[str, Any],
    exact_total: bool,
) -> str | None:
    """One line when the reached global sparsity misses the requested one by more than one weight per module.

    Magnitude (one threshold per matrix) and SparseGPT (cumulative counts over its column blocks) prune
    int / round(numel * S) per matrix, and OWL or per-block targets prune exact counts per matrix, so they land
    within that. Wanda compares within each output row, as its reference does, and prunes int(in_features * S)
    per row: with S = 0.999 and 64 inputs that is 63 of 64, a sparsity of 0.984. N:M patterns are exact.
    """
    if cfg.nm is not None:
        return None
    requested, reached = cfg.target_sparsity, float(report["global_sparsity"])
    modules = [m for b in blocks for _, m in b.modules()] + ([head[1]] if head else [])
    numel = int(report["weights_targeted"])
    if abs(reached - requested) * numel <= len(modules):
        return None
    what = f"reached sparsity {reached:.4f}, not the requested {requested}"
    if reached < requested and cfg.method == "wanda" and not exact_total and cfg.block_sparsity is None:
        per_row = sorted({m.in_features for m in modules})
        counts = ", ".join(f"{masks.prune_count(n, requested)} of {n}" for n in per_row)
        return (
            f"wanda {what}: it prunes within each output row, int(in_features x {requested}) weights per row "
            f"({counts}); ask for a multiple of 1/in_features, or use --method sparsegpt or magnitude, which count "
            "per matrix"
        )
    if reached > requested:
        why = f"weights that were zero before pruning (sparsity {report['sparsity_before']:.4f})"
        if cfg.method == "sparsegpt":
            why += " or that SparseGPT zeroed because the calibration data never activates their input"
        return f"{cfg.method} {what}: {why} count as pruned"
    return f"{cfg.method} {what}"


def _scratch_dir(cfg: PruneConfig) -> str | None:
    """Disk offload files go next to the checkpoint (or the output) so they land on the same big disk."""
    if cfg.offload_activations != "disk":
        return None
    base = cfg.checkpoint_dir or (str(Path(cfg.output).expanduser().resolve().parent) if cfg.output else None)
    return str(Path(base) / ".sparsetune-activations") if base else None


def build_report(model: nn.Module, result: PruneResult) -> dict[str, Any]:
    """The report of a finished run (`sparsetune.reports`: its summary, then each section). A streamed run's
    blocks are gone from memory: their statistics are the ones its stream recorded as each block was committed."""
    cfg, blocks, head, stream = result.cfg, result.blocks, result.head, result.stream
    block_stats = [
        stream.after[b.index] if stream is not None else masks.sparsity_stats({n: t.weight() for n, t in b.modules()})
        for b in blocks
    ]
    modules = {name: info for s in block_stats for name, info in s["modules"].items()}
    if head is not None:
        modules.update(masks.sparsity_stats({head[0]: head[1].weight()})["modules"])
    zeros = sum(m["zeros"] for m in modules.values())
    numel = sum(m["numel"] for m in modules.values())
    per_block = [
        {"block": b.index, "sparsity": s["global_sparsity"], "numel": s["numel"]}
        for b, s in zip(blocks, block_stats, strict=True)
    ]
    nm = cfg.nm
    emb = model.get_input_embeddings().weight
    summary = PruneSummary(
        method=cfg.method,
        pattern=str(nm) if nm else "unstructured",
        target_sparsity=cfg.target_sparsity,
        sparsity_before=result.sparsity_before,
        global_sparsity=zeros / max(1, numel),
        modules_pruned=len(modules),
        weights_pruned=zeros,
        weights_targeted=numel,
        embedding_sparsity=(
            stream.embedding_sparsity
            if stream is not None and stream.embedding_sparsity is not None
            else masks.tensor_sparsity(emb.detach())
        ),
        prune_s=round(result.timings.get("prune_s", 0.0), 3),
    ).model_dump()
    report: dict[str, Any] = {
        "summary": summary,
        **summary,
        "sequential": cfg.sequential,
        "down_stats": _down_stats_used(cfg),
        "settings": cfg.model_dump(mode="json"),
        "calibration": result.calib.describe() if result.calib is not None else None,
        "blocks": per_block,
        "modules": modules,
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
        "memory": peak_memory(),
        "versions": package_versions(),
    }
    shortfall = sparsity_shortfall(cfg, blocks, head, report, result.exact_total)
    summary["warnings"] = report["warnings"] = [shortfall] if shortfall else []
    no_op = owl_no_op(cfg, result.engine.get("block_targets"))
    if no_op is not None:
        report["warnings"].append(no_op)
    for name, info in result.module_info.items():
        report["modules"][name].update(info)
    summary["refine"] = cfg.refine
    if result.method_choice is not None:
        report["method_choice"] = summary["method_choice"] = result.method_choice
    report["architecture"] = architecture_report(model, blocks, cfg)
    if result.engine.get("plans"):
        report["architecture"]["derived_stages"] = result.engine["plans"]
    moe = moe_report(cfg, blocks, result.module_info)
    if moe is not None:
        report["moe"] = moe
    if cfg.refine == "dsnot":
        refined = [name for name, _ in result.refined]
        report["refine"] = dsnot.report_section(cfg, result.method, refined, result.module_info)
    report["processes"] = result.processes
    report["rank"] = result.rank
    if "resumed_from_block" in result.engine:
        report["resumed_from_block"] = result.engine["resumed_from_block"]
    if cfg.owl or result.block_targets:
        report["layerwise"] = {
            "source": "owl" if cfg.owl else "explicit",
            "block_targets": result.engine.get("block_targets", [str(t) for t in (result.block_targets or [])]),
            "owl_outlier_ratios": result.engine.get("owl_outlier_ratios"),
            "owl_m": cfg.owl_m if cfg.owl else None,
            "owl_lambda": cfg.owl_lambda if cfg.owl else None,
        }
    return report


def _down_stats_used(cfg: PruneConfig) -> str | None:
    """Where down_proj's statistic came from: dense or pruned gate/up (None for magnitude: no statistic)."""
    if not needs_calibration(cfg):
        return None
    return "dense" if cfg.dense_down_stats or not cfg.sequential else "pruned"


def run_prune(cfg: PruneConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune prune` flow. Validates everything it can before loading or writing anything.

    The weights stream block by block from the input's safetensors to the output's shards (`_run_streamed`)
    unless the input or the settings need the whole model in memory (`whole_model_reason`)."""
    if cfg.output is None:
        raise SparsetuneError("missing --output; pass -o OUT_DIR")
    out = check_output_dir(cfg.output, overwrite, inputs=(cfg.model,))
    cfg, method_choice = auto.resolve(cfg)  # the output's recipe.yaml records the method that ran
    ctx = dist_context(cfg.device)
    records = None
    if needs_calibration(cfg) and cfg.calib != "self" and cfg.calib not in data.NAMED_DATASETS:
        records = data.load_records(cfg.calib, "train", cfg.data_dir)  # a bad file fails before the model loads
    location, reason = streamable_location(cfg)
    if location is not None:
        return _run_streamed(cfg, location, out, overwrite, show_progress, ctx, records, method_choice)
    if ctx.is_main:
        log.info("loading the whole model: %s", reason)
    t0 = time.perf_counter()
    device_map = plan_device_map(cfg) if cfg.device_map else None
    model, tokenizer = loading.load_model(
        cfg.model,
        dtype=cfg.dtype,
        device="cpu" if ctx.device.type == "cuda" else cfg.device,  # blocks visit the GPU one at a time
        trust_remote_code=cfg.trust_remote_code,
        device_map=device_map,
        need_tokenizer=needs_calibration(cfg),
    )
    if tokenizer is None:
        tokenizer = optional_tokenizer(cfg.model, cfg.trust_remote_code)
    load_s = time.perf_counter() - t0
    plan = plan_targets(model, cfg)  # fail on bad targets before spending time on calibration data
    t0 = time.perf_counter()
    calib = make_calibration(model, tokenizer, cfg, ctx, records)
    calib_s = time.perf_counter() - t0
    report = prune_and_report(model, tokenizer, cfg, calib, show_progress, ctx, method_choice, plan=plan)
    report["timings"].update({"load_s": round(load_s, 3), "calibration_data_s": round(calib_s, 3)})
    report["weights"] = {"streamed": False, "why": reason}
    if ctx.is_main:  # every rank holds identical weights; one writes them
        save_pruned(model, tokenizer, cfg, report, out, overwrite)
    ctx.barrier()
    return report


def streamable_location(cfg: PruneConfig) -> tuple[Path | None, str]:
    """(the local HF dir to stream from, "") or (None, why this run loads the whole model)."""
    if not cfg.stream:
        return None, "--no-stream"
    if cfg.device_map is not None:
        return None, "--device-map places the whole model"
    if needs_calibration(cfg) and cfg.calib == "self":
        return None, "--calib self generates its calibration text with the whole model"
    kind, location = loading.resolve_model_path(cfg.model)
    if kind == "bundled":
        kind, location = "dir", str(loading.bundled_model_dir())
    if kind == "hub":
        snapshot = loading.hub_snapshot(location)
        if snapshot is None:
            return None, "the hub id has no complete local snapshot of safetensors files"
        kind, location = "dir", str(snapshot)
    if kind == "gguf":  # converted once, tensor by tensor, into a cached HF dir
        kind, location = "dir", str(loading.gguf_dir(Path(location)))
    path = Path(location)
    source, why = stream_inputs.stream_input(path)  # a plain dir, an exported dir, a seft adapter dir
    return (path, "") if source is not None else (None, why)


def _run_streamed(
    cfg: PruneConfig,
    location: Path,
    out: Path,
    overwrite: bool,
    show_progress: bool,
    ctx: DistContext,
    records: list[dict[str, Any]] | None,
    method_choice: dict[str, Any] | None,
) -> dict[str, Any]:
    """Prune with one block in memory at a time: read it from `location`, prune it, write its output shard."""
    t0 = time.perf_counter()
    source, _ = stream_inputs.stream_input(location)
    assert source is not None
    streamed = stream_inputs.open_streamed(source, devices.resolve_dtype(cfg.dtype, ctx.device), cfg.trust_remote_code)
    model = streamed.model
    if needs_calibration(cfg):
        tokenizer = loading.load_tokenizer(str(source.model_dir), cfg.trust_remote_code)
    else:
        tokenizer = optional_tokenizer(str(source.model_dir), cfg.trust_remote_code)
    plan = blocks, head = plan_targets(model, cfg)  # fail on bad targets before any work
    if ctx.is_main:
        check_free_space(out, streamed.output_nbytes(), cfg.checkpoint_dir)
    streamed.load_rest("cpu")  # the embeddings (and norm): capture moves them to the device for its pass
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    calib = make_calibration(model, tokenizer, cfg, ctx, records)
    calib_s = time.perf_counter() - t0
    # One shard per block, then everything else (written, and the embedding table freed, before the first block),
    # then a separate output head (read and written at the end, or pruned after the blocks).
    separate_head = bool(streamed.head_keys) or head is not None
    n_shards = len(blocks) + 1 + int(separate_head)
    with atomic_output_dir(out, overwrite=overwrite) if ctx.is_main else contextlib.nullcontext() as tmp:
        shard_dir = Path(cfg.checkpoint_dir) / "shards" if cfg.checkpoint_dir else tmp
        writer = ShardWriter(shard_dir, n_shards) if ctx.is_main else None
        stream = PruneStream(streamed, [], writer, body_shard=len(blocks) + 1)
        report = prune_and_report(model, tokenizer, cfg, calib, show_progress, ctx, method_choice, stream, plan)
        report["timings"].update({"load_s": round(load_s, 3), "calibration_data_s": round(calib_s, 3)})
        report["weights"] = {"streamed": True, "source": str(location), "peak_block_bytes": stream.peak_block_bytes}
        if ctx.is_main:
            assert writer is not None and tmp is not None
            t0 = time.perf_counter()
            if separate_head:
                streamed.load_head("cpu")  # read once, at the end (or already, when it was pruned)
                writer.write(n_shards, streamed.rest_state("head"))
            for path in stream.stats_files():
                path.unlink()
            if shard_dir != tmp:
                for k in range(1, n_shards + 1):
                    shutil.move(str(writer.path(k)), str(Path(tmp) / writer.path(k).name))
            ShardWriter(tmp, n_shards).write_index()
            save_config_files(model, tokenizer, source.model_dir, Path(tmp))
            report["timings"]["save_s"] = round(time.perf_counter() - t0, 3)
            report["memory"] = peak_memory()
            report["output"] = str(out)
            write_report(tmp, report)
            header = "sparsetune prune --recipe recipe.yaml reproduces this run"
            dump_yaml(cfg, Path(tmp) / "recipe.yaml", header=header)
    if ctx.is_main:
        report["summary"]["output"] = str(out)
    ctx.barrier()
    return report


def check_free_space(out: Path, need: int, checkpoint_dir: str | None) -> None:
    """Refuse before any work when the output's disk cannot hold the pruned model (its size in the run's dtype)."""
    for folder, what in ((out.parent, "-o"), (Path(checkpoint_dir) if checkpoint_dir else None, "--checkpoint-dir")):
        if folder is None:
            continue
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < need:
            raise SparsetuneError(
                f"not enough disk space for the output: {human_bytes(free)} free under {probe}, the pruned model "
                f"needs about {human_bytes(need)}; free space or choose another {what}"
            )


def optional_tokenizer(spec: str, trust_remote_code: bool) -> Any:
    """The model's tokenizer for a run that needs none (magnitude), carried into the output. A model dir without
    any tokenizer file gets one warning and an output without one; a tokenizer that fails to load is an error."""
    kind, location = loading.resolve_model_path(spec)
    if kind == "bundled":
        location = str(loading.bundled_model_dir())
    if not loading.has_tokenizer_files(location):
        log.warning(
            "%s holds no tokenizer; magnitude pruning needs none, so the output is written without one "
            "(save one into it with tokenizer.save_pretrained before eval or seft)",
            spec,
        )
        return None
    return loading.load_tokenizer(location, trust_remote_code)


def plan_device_map(cfg: PruneConfig, max_memory: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Accelerate's big-model placement: whole decoder blocks spread over the GPUs, then the CPU."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import get_balanced_memory
    from transformers import AutoConfig, AutoModelForCausalLM

    if cfg.device_map != "auto":
        raise SparsetuneError(f"--device-map {cfg.device_map!r} is not supported; use --device-map auto")
    kind, location = loading.resolve_model_path(cfg.model)
    if kind == "bundled":
        location = str(loading.bundled_model_dir())
    if kind == "gguf":
        raise SparsetuneError("--device-map auto needs a HF model dir or hub id, not a .gguf file; convert it first")
    config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    dtype = devices.resolve_dtype(cfg.dtype, devices.resolve_device(cfg.device)) or torch.float16
    empty.to(dtype)
    no_split = getattr(empty, "_no_split_modules", None) or []
    if max_memory is None:
        max_memory = get_balanced_memory(empty, dtype=dtype, no_split_module_classes=no_split)
    return dict(infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))


def save_pruned(
    model: nn.Module, tokenizer: Any, cfg: PruneConfig, report: dict[str, Any], out: Path, overwrite: bool
) -> None:
    """Write the HF dir, the report and recipe.yaml into a temp dir, then rename it into place."""
    t0 = time.perf_counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        loading.save_model(model, tokenizer, tmp)
        report["timings"]["save_s"] = round(time.perf_counter() - t0, 3)
        report["memory"] = peak_memory()
        report["output"] = str(out)
        write_report(tmp, report)
        dump_yaml(cfg, Path(tmp) / "recipe.yaml", header="sparsetune prune --recipe recipe.yaml reproduces this run")
    report["summary"]["output"] = str(out)


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
    if "refine" in report:
        table.add_row(
            "dsnot swaps", "", f"{report['refine']['swaps']:,} in {report['refine']['modules_refined']} modules"
        )
    for key, value in report["timings"].items():
        table.add_row(f"time {key.removesuffix('_s')}", "", f"{value:.1f} s")
    Console().print(table)
    if "output" in s:
        Console().print(f"wrote {s['output']}")
