"""`sparsetune smet-pretrain`: memory-efficient dynamic sparse pretraining of a Llama model from scratch (SMET).

Every decoder Linear is sparse (embeddings, lm_head and norms stay dense). Sparse weights keep a compact index set,
compact gradients and compact Adam state (`sparse_optim.SparseAdamW`). Every `update_interval` steps each sparse
layer drops the `drop_fraction` (cosine-decayed) of its active weights with the smallest |w| and grows as many
inactive positions, at random (SET) or by the largest dense-gradient magnitude (RigL). Regrown entries start at 0
with fresh moments and step counter, and their update is ramped over `regrow_warmup` steps. Sparse layers train
with lr / density^e.

What the logs measure about topology updates (train_log.jsonl rows):
- `steps_since_update`: steps since the last topology update (0 on the update's own row, whose loss precedes it).
- `regrown_update_ratio`: for the first UPDATE_WINDOW steps after an update, the mean |weight change| of the entries
  that update regrew over that of the entries active before it, from the optimizer's real step, pooled over all
  sparse weights (also `regrown_abs_update`, `established_abs_update`). Naive DST jumps at first (fresh Adam moments
  make a regrown entry's first steps about lr in size); SMET's warm-up ramps it.
- The loss of every step within UPDATE_WINDOW before and after an update is logged whatever --log-every says, so
  the spike ratio (mean loss of the UPDATE_WINDOW steps after an update over the UPDATE_WINDOW steps up to it)
  follows from the log alone.
- `itop_rate`: in-time over-parameterization, the fraction of all sparse-weight positions that have been active at
  any time so far, from one packed bit per position (`itop_bitmap_bytes`), checkpointed with the weights.

Multi-process runs: compact and dense gradients are averaged by the optimizer; topology choices are functions of
seeded generators and all-reduced scores, so every rank makes the same one, verified by a digest after each update.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, masks, models
from sparsetune.distributed import dist_context
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import atomic_output_dir, check_output_dir, package_versions, peak_memory, write_json
from sparsetune.recipes import dump_yaml
from sparsetune.train import topology
from sparsetune.train.common import (
    LOG_FILE,
    CheckpointedTraining,
    DataOrder,
    Examples,
    TrainingState,
    all_reduce_sum,
    check_checkpoint_dir,
    collate,
    drop_fraction_at,
    lr_at,
    packed_windows,
    progress_bar,
    random_batch,
    rank_share,
    token_nll_sum,
    untrained_zeros,
)
from sparsetune.train.smet_config import PRESETS, SmetConfig
from sparsetune.train.sparse_optim import SparseAdamW, SparseWeight

log = logging.getLogger(__name__)

REPORT_FILE = "sparsity_report.json"
UPDATE_WINDOW = 10  # steps before and after a topology update whose loss and update magnitudes are logged
ITOP_PREFIX = "itop_bitmap."  # checkpoint tensor names of the ITOP bitmaps

# Llama shapes. tiny, mini and small are for CPU tests and benchmarks (mini: the long SMET bench, where the 49152-token
# lm_head dominates a step, so four decoder layers cost about what two do); llama-* follow the sizes used in the sparse
# pretraining literature (GaLore/SMET-style 60M-1B configs).
PRESET_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4},
    "mini": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
    "small": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4},
    "llama-60m": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    "llama-130m": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12},
    "llama-350m": {"hidden_size": 1024, "intermediate_size": 2736, "num_hidden_layers": 24, "num_attention_heads": 16},
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 5461, "num_hidden_layers": 24, "num_attention_heads": 32},
}
assert set(PRESET_SHAPES) == set(PRESETS)


def llama_config(spec: str, tokenizer: Any, seqlen: int) -> Any:
    """A LlamaConfig from a preset name or a config.json path, with the tokenizer's vocabulary and special ids."""
    from transformers import AutoConfig, LlamaConfig

    if spec in PRESET_SHAPES:
        shape = PRESET_SHAPES[spec]
        config = LlamaConfig(
            **shape,
            num_key_value_heads=shape["num_attention_heads"],
            max_position_embeddings=max(1024, seqlen),
            tie_word_embeddings=False,
            rms_norm_eps=1e-6,
        )
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise SparsetuneError(
                f"--model-config {spec} is neither a preset ({', '.join(PRESETS)}) nor an existing config.json"
            )
        config = AutoConfig.from_pretrained(str(path))
        if config.model_type != "llama":
            raise SparsetuneError(f"{path} describes a {config.model_type} model; smet-pretrain builds Llama models")
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    if seqlen > config.max_position_embeddings:
        raise SparsetuneError(
            f"--seqlen {seqlen} exceeds the config's max_position_embeddings {config.max_position_embeddings}"
        )
    return config


def load_tokenizer(spec: str, trust_remote_code: bool) -> Any:
    location = str(models.bundled_model_dir()) if spec in models.BUNDLED_ALIASES else spec
    return models.load_tokenizer(location, trust_remote_code)


def sparse_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder Linear (the 2-D weights besides embeddings and lm_head)."""
    return {
        f"model.layers.{i}.{local}": mod
        for i, layer in enumerate(models.decoder_layers(model))
        for local, mod in layer.named_modules()
        if isinstance(mod, nn.Linear)
    }


def layer_densities(shapes: dict[str, tuple[int, int]], density: float, init: str) -> dict[str, float]:
    if init == "erk":
        return topology.erk_densities(shapes, density)
    return dict.fromkeys(shapes, density)


def train_val_split(tokenizer: Any, cfg: SmetConfig) -> tuple[Examples, Examples | None]:
    records = data.load_records(cfg.data, "train", cfg.data_dir)
    windows = packed_windows(tokenizer, records, cfg.seqlen, 0, cfg.data)
    n_val = int(len(windows) * cfg.val_fraction)
    if len(windows) - n_val < cfg.batch_size:
        raise SparsetuneError(
            f"{cfg.data} gives {len(windows)} windows of {cfg.seqlen} tokens, {n_val} held out for validation, "
            f"fewer than one batch of {cfg.batch_size}; lower --batch-size or --seqlen, or use more data"
        )
    train = Examples("text", windows.inputs[: len(windows) - n_val], None)
    val = Examples("text", windows.inputs[len(windows) - n_val :], None) if n_val else None
    return train, val


def update_spike_ratios(
    loss_at: dict[int, float], update_steps: list[int], window: int = UPDATE_WINDOW
) -> list[float | None]:
    """Per update at step u: mean loss of steps u+1..u+window over the mean of steps u-window+1..u (`loss_at` maps a
    1-based step to its training loss); None where a window is incomplete."""
    ratios: list[float | None] = []
    for u in update_steps:
        before = [loss_at.get(s) for s in range(u - window + 1, u + 1)]
        after = [loss_at.get(s) for s in range(u + 1, u + window + 1)]
        if None in before or None in after:
            ratios.append(None)
        else:
            ratios.append((sum(after) / window) / (sum(before) / window))  # type: ignore[arg-type]
    return ratios


def spike_ratio(losses: list[float], update_steps: list[int], window: int = UPDATE_WINDOW) -> float | None:
    """The largest ratio of the mean loss in the `window` steps after an update to the mean of the `window` before
    (losses[i] is the loss of step i + 1)."""
    ratios = update_spike_ratios({i + 1: x for i, x in enumerate(losses)}, update_steps, window)
    complete = [r for r in ratios if r is not None]
    return max(complete) if complete else None


class SmetRecipe(CheckpointedTraining):
    """setup -> train -> finish, with save_checkpoint every `checkpoint_every` steps."""

    def __init__(self, cfg: SmetConfig, overwrite: bool = False, show_progress: bool = True) -> None:
        self.cfg, self.overwrite, self.show_progress = cfg, overwrite, show_progress
        self.state = TrainingState()
        self.itop: dict[str, torch.Tensor] = {}
        self._itop_rate: float | None = None

    # -- setup ------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.output is None:
            raise SparsetuneError("missing --output; pass -o OUT_DIR")
        self.out = check_output_dir(cfg.output, self.overwrite)
        ckpt = cfg.checkpoint_path()
        self.ckpt_dir = Path(ckpt).expanduser().resolve() if ckpt else None
        if self.ckpt_dir is not None:
            check_checkpoint_dir(self.ckpt_dir, cfg.resume)
        self.ctx = dist_context(cfg.device)
        micro = cfg.batch_size // cfg.grad_accum
        if micro < self.ctx.world:
            raise SparsetuneError(
                f"each micro-batch holds {micro} sequences but {self.ctx.world} processes share it; "
                "raise --batch-size or lower --grad-accum"
            )
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        config = llama_config(cfg.model_config_name, self.tokenizer, cfg.seqlen)
        self.train_data, self.val_data = train_val_split(self.tokenizer, cfg)
        self.order = DataOrder(len(self.train_data), cfg.batch_size, cfg.seed)

        from transformers import LlamaForCausalLM

        torch.manual_seed(cfg.seed)
        dtype = self.dtype()
        model = LlamaForCausalLM(config).to(device=self.ctx.device, dtype=dtype)
        model.train()
        self.model = model
        self.sparse: dict[str, SparseWeight] = {}
        self.densities: dict[str, float] = {}
        if cfg.sparse:
            self._setup_sparse()
        else:
            self._setup_dense()
        self.init_guard()
        if cfg.resume:
            self.load_checkpoint()

    def dtype(self) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.bfloat16 if self.ctx.device.type == "cuda" else torch.float32
        return getattr(torch, self.cfg.dtype)

    def _optimizer_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps, "weight_decay": cfg.weight_decay}

    def _setup_sparse(self) -> None:
        cfg = self.cfg
        linears = sparse_linears(self.model)
        shapes = {n: (m.weight.shape[0], m.weight.shape[1]) for n, m in linears.items()}
        self.densities = layer_densities(shapes, cfg.density, cfg.init)
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        weights = []
        for name, module in linears.items():
            count = topology.active_count(module.weight.numel(), self.densities[name])
            mask = topology.random_layout(tuple(module.weight.shape), count, generator)
            scale = 1.0 / self.densities[name] ** cfg.lr_density_exponent
            weights.append(SparseWeight.from_mask(name, module.weight, mask, lr_scale=scale))
        self.sparse = {w.name: w for w in weights}
        for w in weights:
            self.itop[w.name] = topology.empty_bitmap(w.param.numel(), w.param.device)
            topology.mark_bits(self.itop[w.name], w.active)
        sparse_ids = {id(m.weight) for m in linears.values()}
        dense = [p for p in self.model.parameters() if id(p) not in sparse_ids]
        kwargs = self._optimizer_kwargs()
        self.optimizer = SparseAdamW(
            weights,
            dense_params=dense,
            regrow_warmup=cfg.regrow_warmup,
            eight_bit=cfg.optim == "adamw8bit",
            measure_steps=UPDATE_WINDOW,
            **kwargs,
        )

    def _setup_dense(self) -> None:
        """Density 1.0: the dense baseline, on torch's AdamW (or bitsandbytes' AdamW8bit)."""
        cfg = self.cfg
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        kwargs = self._optimizer_kwargs()
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        if cfg.optim == "adamw8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(groups, **kwargs)

    # -- train ------------------------------------------------------------------------------------------------

    def train(self) -> None:
        cfg = self.cfg
        with progress_bar(cfg.steps, self.state.step, self.show_progress and self.ctx.is_main) as advance:
            while self.state.step < cfg.steps:
                step = self.state.step
                t0 = time.perf_counter()
                loss, tokens = self.train_step(step)
                self.state.step = step + 1
                self.state.tokens += tokens
                row: dict[str, Any] = {"step": step + 1, "loss": loss, "lr": lr_at(step, cfg)}
                if self.topology_due(self.state.step):
                    row["topology"] = self.topology_update(self.state.step)
                step_s = time.perf_counter() - t0  # topology updates count towards the step they follow
                row.update(
                    sparsity=self.sparsity(), tokens=self.state.tokens, step_s=step_s, tokens_per_s=tokens / step_s
                )
                row.update(self.update_fields(self.state.step))
                if cfg.eval_every and self.state.step % cfg.eval_every == 0 and self.val_data is not None:
                    row["val_loss"] = self.validation_loss()
                if (
                    self.state.step % cfg.log_every == 0
                    or "topology" in row
                    or self.near_update(self.state.step)
                    or self.state.step == cfg.steps
                ):
                    row["memory"] = {k: v for k, v in self.memory_report().items() if k != "layers"}
                    self.log_row(row)
                advance(self.state.step, row)
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0:
                    self.request_checkpoint()

    def topology_due(self, step: int) -> bool:
        interval = self.cfg.update_interval
        return bool(self.sparse) and interval > 0 and step % interval == 0 and step < self.cfg.steps

    def near_update(self, step: int) -> bool:
        """Whether `step` lies within UPDATE_WINDOW steps before (up to and including) or after a topology update."""
        interval = self.cfg.update_interval
        if not self.sparse or interval <= 0:
            return False
        previous, upcoming = step // interval * interval, -(-step // interval) * interval
        return (self.topology_due(upcoming) and upcoming - step < UPDATE_WINDOW) or (
            previous > 0 and self.topology_due(previous) and step - previous <= UPDATE_WINDOW
        )

    def update_fields(self, step: int) -> dict[str, Any]:
        """The log fields about topology updates: steps since the last one, the regrown/established update
        magnitudes the optimizer measured in this step, and the ITOP rate."""
        if not self.sparse:
            return {}
        fields: dict[str, Any] = {}
        if self.state.topology:
            since = step - self.state.topology[-1]["step"]
            fields["steps_since_update"] = since
            measured = self.optimizer.update_magnitudes
            if measured is not None and measured["steps_since_update"] == since:
                fields.update({k: v for k, v in measured.items() if k != "steps_since_update"})
        fields["itop_rate"] = self.itop_rate()
        return fields

    def train_step(self, step: int) -> tuple[float, int]:
        cfg, ctx = self.cfg, self.ctx
        idx = self.order.batch(step)
        total = sum(len(self.train_data.inputs[i]) - 1 for i in idx)
        micro = cfg.batch_size // cfg.grad_accum
        nll = torch.zeros((), dtype=torch.float64)
        for start in range(0, cfg.batch_size, micro):
            local = rank_share(idx[start : start + micro], ctx)
            batch = {k: v.to(ctx.device) for k, v in collate(self.train_data, local, self.pad_id).items()}
            loss_sum = self.nll(batch)
            # The optimizer (or reduce_grads) averages gradients over ranks: scale so the average is the global mean.
            (loss_sum * ctx.world / total).backward()
            nll += loss_sum.detach().double().cpu()
        loss = float(all_reduce_sum(nll, ctx)) / total
        self.check_loss(step, loss)
        lr = lr_at(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.sparse:
            self.reduce_grads([p for p in self.model.parameters() if p.grad is not None])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.check_weights(step)
        return loss, sum(len(self.train_data.inputs[i]) for i in idx)

    def reduce_grads(self, params: list[torch.Tensor]) -> None:
        if self.ctx.world == 1 or not params:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
        flat.div_(self.ctx.world)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    # -- topology ---------------------------------------------------------------------------------------------

    def growth_grads(self, step: int) -> dict[str, torch.Tensor]:
        """RigL scores: the dense gradient of every sparse weight on one seeded batch, averaged over ranks."""
        cfg, ctx = self.cfg, self.ctx
        idx = random_batch(len(self.train_data), cfg.batch_size, cfg.seed, step, 0)
        total = sum(len(self.train_data.inputs[i]) - 1 for i in idx)
        with self.optimizer.dense_grads():
            batch = {
                k: v.to(ctx.device) for k, v in collate(self.train_data, rank_share(idx, ctx), self.pad_id).items()
            }
            (token_nll_sum(self.model, batch) / total).backward()
            grads = {name: all_reduce_sum(w.param.grad.detach().clone(), ctx) for name, w in self.sparse.items()}
        for p in self.model.parameters():
            p.grad = None
        return grads

    @torch.no_grad()
    def _swap(self, step: int, fraction: float, grads: dict[str, torch.Tensor] | None) -> dict[str, Any]:
        stats: dict[str, Any] = {"step": step, "drop_fraction": fraction, "dropped": 0, "grown": 0}
        for i, (name, w) in enumerate(self.sparse.items()):
            active = w.active
            k = min(int(fraction * active.numel()), w.param.numel() - active.numel())
            if k <= 0:
                continue
            drop_slots = topology.drop(w.param.view(-1)[active].abs(), k)
            if grads is not None:
                grow_pos = topology.grow(grads[name].abs(), k, exclude=active)
            else:
                generator = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step * 7_919 + i) % 2**63)
                grow_pos = topology.grow_random(w.param.numel(), k, active, generator)
            self.optimizer.swap_entries(name, drop_slots, grow_pos)
            topology.mark_bits(self.itop[name], grow_pos)
            self._itop_rate = None
            stats["dropped"] += int(drop_slots.numel())
            stats["grown"] += int(grow_pos.numel())
        return stats

    def topology_update(self, step: int) -> dict[str, Any]:
        fraction = drop_fraction_at(step, self.cfg)
        grads = self.growth_grads(step) if self.cfg.growth == "gradient" else None
        stats = self._swap(step, fraction, grads)
        topology.verify_same_across_ranks({n: w.index for n, w in self.sparse.items()})
        self.state.topology.append(stats)
        return stats

    # -- invariants, validation, logging ----------------------------------------------------------------------

    def itop_rate(self) -> float | None:
        """In-time over-parameterization: the fraction of sparse-weight positions ever active (None when dense)."""
        if not self.itop:
            return None
        if self._itop_rate is None:
            ever = sum(topology.count_bits(b) for b in self.itop.values())
            self._itop_rate = ever / sum(w.param.numel() for w in self.sparse.values())
        return self._itop_rate

    def sparsity(self) -> float:
        """Sparsity of the sparse layers; verifies that no weight is non-zero outside its active set."""
        if not self.sparse:
            return 0.0
        zeros = numel = 0
        for name, w in self.sparse.items():
            nonzero = int((w.param.detach() != 0).sum())
            if nonzero > w.nnz:
                raise RuntimeError(f"internal error: {name} has {nonzero} non-zeros but {w.nnz} active entries")
            zeros += w.param.numel() - w.nnz
            numel += w.param.numel()
        return zeros / numel

    # -- checkpoints (the mechanics live in CheckpointedTraining) ---------------------------------------------

    def identity(self) -> dict[str, Any]:
        skip = {"output", "device", "checkpoint_dir", "checkpoint_every", "resume", "log_every", "data_dir"}
        return {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in skip}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters and the ITOP bitmaps (restored in place on resume)."""
        return {**dict(self.model.named_parameters()), **{ITOP_PREFIX + n: b for n, b in self.itop.items()}}

    def load_checkpoint(self) -> None:
        super().load_checkpoint()
        self._itop_rate = None  # the bitmaps were overwritten

    # -- output -----------------------------------------------------------------------------------------------

    def memory_report(self) -> dict[str, Any]:
        if self.sparse:
            mem = dict(self.optimizer.memory_report())
        else:
            linears = sparse_linears(self.model)
            numel = sum(m.weight.numel() for m in linears.values())
            per_entry = 2 if self.cfg.optim == "adamw8bit" else 8
            element = next(iter(linears.values())).weight.element_size()
            mem = {
                "optimizer_state_bytes": numel * per_entry,
                "gradient_bytes": numel * element,
                "dense_adamw_state_and_grad_bytes": numel * (per_entry + element),
                "state_and_grad_vs_dense": 1.0,
            }
        mem["itop_bitmap_bytes"] = sum(b.numel() * b.element_size() for b in self.itop.values())
        mem.update(peak_memory())
        return mem

    def finish(self) -> dict[str, Any]:
        cfg = self.cfg
        # Each sparse layer ends with exactly its active count of non-zeros (its zeros are what it started with).
        counts = {}
        for name, w in self.sparse.items():
            zeros = w.param.numel() - int(w.param.detach().count_nonzero()) - untrained_zeros(self.optimizer, w)
            counts[name] = (w.param.numel(), w.param.numel() - w.nnz, zeros)
        self.check_sparsity_kept(counts)
        val_loss = self.validation_loss() if self.val_data is not None else None
        memory = self.memory_report()
        report = self.build_report(memory, val_loss)
        if self.ctx.is_main:
            if isinstance(self.optimizer, SparseAdamW):
                self.optimizer.remove_hooks()
            with atomic_output_dir(self.out, overwrite=self.overwrite) as tmp:
                models.save_model(self.model, self.tokenizer, tmp)
                (tmp / LOG_FILE).write_text("".join(json.dumps(r) + "\n" for r in self.state.log))
                write_json(tmp / REPORT_FILE, report)
                dump_yaml(
                    cfg, tmp / "recipe.yaml", header="sparsetune smet-pretrain --recipe recipe.yaml reproduces this"
                )
        self.ctx.barrier()
        report["rank"] = self.ctx.rank
        return report

    def build_report(self, memory: dict[str, Any], val_loss: float | None) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        linears = sparse_linears(self.model)
        stats = masks.sparsity_stats(linears) if self.sparse else None
        losses = [r["loss"] for r in state.log]
        updates = [t["step"] for t in state.topology]
        spikes = update_spike_ratios({r["step"]: r["loss"] for r in state.log}, updates)
        first = {r["step"]: r.get("regrown_update_ratio") for r in state.log if r.get("steps_since_update") == 1}
        first_ratios = [first.get(u + 1) for u in updates]
        measured = [r for r in first_ratios if r is not None]
        summary = {
            "method": "smet" if self.sparse else "dense",
            "model_config": cfg.model_config_name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "density": cfg.density,
            "steps": state.step,
            "tokens": state.tokens,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": val_loss,
            "spike_ratio": max((r for r in spikes if r is not None), default=None),
            "spike_ratios": spikes,
            "first_step_update_ratios": first_ratios,
            "mean_first_step_update_ratio": sum(measured) / len(measured) if measured else None,
            "itop_rate": self.itop_rate(),
            "itop_bitmap_bytes": memory.get("itop_bitmap_bytes"),
            "topology_updates": len(updates),
            "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
            "gradient_bytes": memory.get("gradient_bytes"),
            "state_and_grad_vs_dense": memory.get("state_and_grad_vs_dense"),
            "peak_rss_bytes": memory.get("peak_rss_bytes"),
            "mean_step_s": sum(r["step_s"] for r in state.log) / max(1, len(state.log)),
            "median_step_s": statistics.median(r["step_s"] for r in state.log) if state.log else None,
            "output": str(self.out),
        }
        layers = {
            name: {"density": w.density, "active": w.nnz, "numel": w.param.numel(), "lr_scale": w.lr_scale}
            for name, w in self.sparse.items()
        }
        return {
            "summary": summary,
            "method": summary["method"],
            "pattern": "unstructured",
            "target_sparsity": 1.0 - cfg.density,
            "global_sparsity": stats["global_sparsity"] if stats else 0.0,
            "modules": stats["modules"] if stats else {},
            "layers": layers,
            "topology_history": state.topology,
            "memory": memory,
            "settings": cfg.model_dump(mode="json", by_alias=True),
            "versions": package_versions(),
        }


def run_smet(cfg: SmetConfig, overwrite: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """The whole `sparsetune smet-pretrain` flow: setup, train (checkpointing), finish (save)."""
    recipe = SmetRecipe(cfg, overwrite, show_progress)
    try:
        recipe.setup()
        recipe.train()
        return recipe.finish()
    finally:
        if hasattr(recipe, "ctx"):
            recipe.cleanup()


def print_summary(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    s = report["summary"]
    table = Table(title=f"sparsetune smet-pretrain: {s['method']} {s['model_config']} density {s['density']}")
    table.add_column("")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{s['parameters']:,}")
    table.add_row("steps / tokens", f"{s['steps']} / {s['tokens']:,}")
    table.add_row("loss first -> last", f"{s['first_loss']:.4f} -> {s['final_loss']:.4f}")
    if s["final_val_loss"] is not None:
        table.add_row("validation loss", f"{s['final_val_loss']:.4f}")
    if s["spike_ratio"] is not None:
        table.add_row("largest loss spike after an update", f"{s['spike_ratio']:.3f}")
    if s["mean_first_step_update_ratio"] is not None:
        table.add_row("regrown / established |update|, 1st step", f"{s['mean_first_step_update_ratio']:.3f}")
    table.add_row("topology updates", str(s["topology_updates"]))
    if s["itop_rate"] is not None:
        itop = f"{s['itop_rate']:.4f} ({s['itop_bitmap_bytes']:,} B bitmap)"
        table.add_row("ITOP rate (positions ever active)", itop)
    table.add_row(
        "sparse-weight optimizer + grad",
        f"{(s['optimizer_state_bytes'] + s['gradient_bytes']) / 2**20:.1f} MiB "
        f"({s['state_and_grad_vs_dense']:.3f}x dense AdamW)",
    )
    if s.get("peak_rss_bytes") is not None:
        table.add_row("peak RSS", f"{s['peak_rss_bytes'] / 2**20:.0f} MiB")
    table.add_row("mean step", f"{s['mean_step_s']:.3f} s")
    Console().print(table)
    Console().print(f"wrote {s['output']}")
