"""`sparsetune smet-pretrain`: memory-efficient dynamic sparse pretraining of a Llama model from scratch (SMET).

Every decoder Linear is sparse (embeddings, lm_head and norms stay dense). Sparse weights keep a compact index set,
compact gradients and compact Adam state (`compact_adamw.SparseAdamW`). Every `update_interval` steps each sparse
layer drops the `drop_fraction` (cosine-decayed) of its active weights with the smallest |w| and grows as many
inactive positions, at random (SET), by the largest dense-gradient magnitude (RigL) or, gradient-free, by the cosine
similarity of the activations of the two neurons a connection would join (CTRE; `ctre-sim` with its random
exploration). Regrown entries start at 0
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

import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsetune import data, loading, masks, structure
from sparsetune.distributed import mean_in_place, reduce_sum
from sparsetune.errors import SparsetuneError
from sparsetune.outputs import package_versions
from sparsetune.train import topology
from sparsetune.train.adamw import dense_adamw
from sparsetune.train.checkpoint import NOT_IDENTITY
from sparsetune.train.compact_adamw import SparseAdamW, SparseWeight, untrained_zeros
from sparsetune.train.examples import Examples, packed_windows, random_batch
from sparsetune.train.loop import Finished, MethodReport, Trainer, TrainingContext, TrainingMethod, mean_step_s
from sparsetune.train.loop import print_summary as print_table
from sparsetune.train.schedule import drop_fraction_at
from sparsetune.train.smet_config import PRESETS, SmetConfig

log = logging.getLogger(__name__)

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
    if spec == "bytes":
        from transformers import ByT5Tokenizer

        return ByT5Tokenizer(extra_ids=0)  # UTF-8 bytes plus pad/eos/unk; needs no vocabulary file
    location = str(loading.bundled_model_dir()) if spec in loading.BUNDLED_ALIASES else spec
    return loading.load_tokenizer(location, trust_remote_code)


def sparse_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every decoder Linear (the 2-D weights besides embeddings and lm_head), named as in `model.named_modules()`
    wherever the family keeps its blocks (`structure.find_decoder`)."""
    path, layers = structure.find_decoder(model)
    return {
        f"{path}.{i}.{local}": mod
        for i, layer in enumerate(layers)
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


def planned_density(cfg: SmetConfig, params: int, train_tokens: int) -> dict[str, Any]:
    """--density auto: the loss-optimal density of the data-constrained sparse scaling law (`sparsetune plan`) for
    `params` dense-equivalent parameters trained on cfg.tokens tokens drawn from --unique-tokens (default: the
    `train_tokens` of the training windows). Returns the choice and where it came from (logged and reported)."""
    from sparsetune import plan

    unique = cfg.unique_tokens or float(train_tokens)
    chosen = plan.loss_optimal(float(params), unique, float(cfg.tokens))
    source = {
        "density": chosen.density,
        "source": f"sparsetune plan: loss-optimal density of {plan.PAPER}",
        "params": params,
        "unique_tokens": unique,
        "unique_tokens_from": "--unique-tokens" if cfg.unique_tokens else "the training windows",
        "tokens": cfg.tokens,
        "predicted_loss": chosen.loss,
        "predicted_dense_loss": plan.point(float(params), unique, float(cfg.tokens), 1.0).loss,
    }
    log.info(
        "--density auto: %.6g, the loss-optimal density of the data-constrained sparse scaling law (%s) for %s "
        "parameters, %.4g unique tokens (%s) and %.4g tokens (%.2f epochs); predicted C4 loss %.4f (dense %.4f); "
        "`sparsetune plan` shows the curve",
        chosen.density,
        plan.PAPER_SHORT,
        f"{params:,}",
        unique,
        source["unique_tokens_from"],
        cfg.tokens,
        cfg.tokens / unique,
        chosen.loss,
        source["predicted_dense_loss"],
    )
    return source


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


def probe_spike_ratios(
    probe_at: dict[int, float], update_steps: list[int], window: int = UPDATE_WINDOW
) -> list[float | None]:
    """Per update at step u: the fixed-batch loss of the models after steps u..u+window-1 (the first has just been
    updated) over that of the models after steps u-window..u-1; `probe_at` maps a step to the loss after it. The
    same models the training-loss ratio sees (the loss of step s is that of the model after step s - 1)."""
    return update_spike_ratios({s + 1: x for s, x in probe_at.items()}, update_steps, window)


def spike_ratio(losses: list[float], update_steps: list[int], window: int = UPDATE_WINDOW) -> float | None:
    """The largest ratio of the mean loss in the `window` steps after an update to the mean of the `window` before
    (losses[i] is the loss of step i + 1)."""
    ratios = update_spike_ratios({i + 1: x for i, x in enumerate(losses)}, update_steps, window)
    complete = [r for r in ratios if r is not None]
    return max(complete) if complete else None


class PretrainMethod(TrainingMethod):
    """What the `smet-pretrain` methods share: every parameter of the model is trained and checkpointed."""

    def __init__(self, context: TrainingContext) -> None:
        self.context = context
        self.cfg: SmetConfig = context.cfg

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.context.model.named_parameters())


class SparsePretraining(PretrainMethod):
    """Density < 1: SMET, naive DST (--regrow-warmup 0), static sparse (--update-interval 0); SET or RigL growth."""

    def __init__(self, context: TrainingContext) -> None:
        super().__init__(context)
        cfg, model = context.cfg, context.model
        self.itop: dict[str, torch.Tensor] = {}
        self._itop_rate: float | None = None
        linears = sparse_linears(model)
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
        dense = [p for p in model.parameters() if id(p) not in sparse_ids]
        self.optimizer = SparseAdamW(
            weights,
            dense_params=dense,
            regrow_warmup=cfg.regrow_warmup,
            eight_bit=cfg.optim == "adamw8bit",
            measure_steps=UPDATE_WINDOW,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
        )

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The parameters and the ITOP bitmaps (restored in place on resume)."""
        return {**super().checkpoint_tensors(), **{ITOP_PREFIX + n: b for n, b in self.itop.items()}}

    # -- topology ---------------------------------------------------------------------------------------------

    def topology_due(self, step: int) -> bool:
        return topology_due(self.cfg, step)

    def growth_grads(self, step: int) -> dict[str, torch.Tensor]:
        """RigL scores: the dense gradient of every sparse weight on one seeded batch, averaged over ranks."""
        context, cfg = self.context, self.cfg
        idx = random_batch(len(context.data), cfg.batch_size, cfg.seed, step, 0)
        total = sum(len(context.data.inputs[i]) - 1 for i in idx)
        with self.optimizer.dense_grads():
            (context.nll(idx) / total).backward()
            grads = {name: reduce_sum(w.param.grad.detach()) for name, w in self.sparse.items()}
        for p in context.model.parameters():
            p.grad = None
        return grads

    @torch.no_grad()
    def growth_activations(self, step: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """CTRE's inputs: every sparse Linear's input and output activations, (tokens, in) and (tokens, out), on
        this rank's share of one seeded micro-batch, from one forward pass without gradients."""
        context, cfg = self.context, self.cfg
        idx = random_batch(len(context.data), cfg.batch_size // cfg.grad_accum, cfg.seed, step, 0)
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
                x = inputs[0].detach()
                captured[name] = (x.reshape(-1, x.shape[-1]), output.detach().reshape(-1, output.shape[-1]))

            return hook

        linears = sparse_linears(context.model)
        hooks = [linears[name].register_forward_hook(keep(name)) for name in self.sparse]
        try:
            context.nll(idx)
        finally:
            for h in hooks:
                h.remove()
        return captured

    def cosine_growth(
        self, w: SparseWeight, drop_slots: torch.Tensor, k: int, acts: tuple[torch.Tensor, torch.Tensor], seed: int
    ) -> tuple[torch.Tensor, int]:
        """CTRE growth of one layer: the k inactive positions of largest |cosine| between the activations of their
        input and output neurons. `ctre-sim` adds CTRE's simultaneous random exploration: the ranking also sees the
        positions just dropped, and as many of its picks as land on them are grown at random instead (among the
        inactive positions the cosine did not pick). Returns the positions and how many were random."""
        blocked = torch.zeros(w.param.numel(), dtype=torch.bool, device=w.param.device)
        blocked[w.active] = True
        explore = self.cfg.growth == "ctre-sim"
        dropped = w.active[drop_slots.to(w.active.device)]
        if explore:
            blocked[dropped] = False
        picks = topology.grow_cosine(*acts, k, blocked)
        del blocked
        if not explore:
            return picks, 0
        readded = torch.isin(picks, dropped.to(picks.device).long())
        chosen, n_random = picks[~readded], int(readded.sum())
        if n_random:
            exclude = torch.cat([w.active.long(), chosen.to(w.active.device)])
            rand = topology.grow_random(w.param.numel(), n_random, exclude, torch.Generator().manual_seed(seed))
            chosen = torch.cat([chosen, rand.to(chosen.device)])
        return chosen, n_random

    @torch.no_grad()
    def _swap(
        self,
        step: int,
        fraction: float,
        grads: dict[str, torch.Tensor] | None,
        acts: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> dict[str, Any]:
        stats: dict[str, Any] = {"step": step, "drop_fraction": fraction, "dropped": 0, "grown": 0}
        if self.cfg.growth == "ctre-sim":
            stats["grown_at_random"] = 0
        for i, (name, w) in enumerate(self.sparse.items()):
            active = w.active
            k = min(int(fraction * active.numel()), w.param.numel() - active.numel())
            if k <= 0:
                continue
            drop_slots = topology.drop(w.param.view(-1)[active].abs(), k)
            seed = (self.cfg.seed * 1_000_003 + step * 7_919 + i) % 2**63
            if grads is not None:
                grow_pos = topology.grow(grads[name].abs(), k, exclude=active)
            elif acts is not None:
                grow_pos, n_random = self.cosine_growth(w, drop_slots, k, acts.pop(name), seed)
                if "grown_at_random" in stats:
                    stats["grown_at_random"] += n_random
            else:
                grow_pos = topology.grow_random(w.param.numel(), k, active, torch.Generator().manual_seed(seed))
            self.optimizer.swap_entries(name, drop_slots, grow_pos)
            topology.mark_bits(self.itop[name], grow_pos)
            self._itop_rate = None
            stats["dropped"] += int(drop_slots.numel())
            stats["grown"] += int(grow_pos.numel())
        return stats

    def update_topology(self, step: int) -> dict[str, Any] | None:
        if not self.topology_due(step):
            return None
        fraction = drop_fraction_at(step, self.cfg)
        growth = self.cfg.growth
        grads = self.growth_grads(step) if growth == "gradient" else None
        acts = self.growth_activations(step) if growth in ("ctre", "ctre-sim") else None
        stats = self._swap(step, fraction, grads, acts)
        topology.verify_same_across_ranks({n: w.index for n, w in self.sparse.items()})
        return stats

    # -- invariants and logging -------------------------------------------------------------------------------

    def log_fields(self, step: int) -> dict[str, Any]:
        """The log fields about topology updates: steps since the last one, the regrown/established update
        magnitudes the optimizer measured in this step, and the ITOP rate."""
        fields: dict[str, Any] = {}
        topology_rows = self.context.state.topology
        if topology_rows:
            since = step - topology_rows[-1]["step"]
            fields["steps_since_update"] = since
            measured = self.optimizer.update_magnitudes
            if measured is not None and measured["steps_since_update"] == since:
                fields.update({k: v for k, v in measured.items() if k != "steps_since_update"})
        fields["itop_rate"] = self.itop_rate()
        return fields

    def itop_rate(self) -> float | None:
        """In-time over-parameterization: the fraction of sparse-weight positions ever active."""
        if self._itop_rate is None:
            ever = sum(topology.count_bits(b) for b in self.itop.values())
            self._itop_rate = ever / sum(w.param.numel() for w in self.sparse.values())
        return self._itop_rate

    def sparsity(self) -> float:
        """Sparsity of the sparse layers; verifies that no weight is non-zero outside its active set."""
        zeros = numel = 0
        for name, w in self.sparse.items():
            nonzero = int((w.param.detach() != 0).sum())
            if nonzero > w.nnz:
                raise RuntimeError(f"internal error: {name} has {nonzero} non-zeros but {w.nnz} active entries")
            zeros += w.param.numel() - w.nnz
            numel += w.param.numel()
        return zeros / numel

    def report(self) -> MethodReport:
        mem = dict(self.optimizer.memory_report())
        mem["itop_bitmap_bytes"] = sum(b.numel() * b.element_size() for b in self.itop.values())
        return MethodReport(mem)

    def finish(self) -> Finished:
        return Finished(untrained_zeros={name: untrained_zeros(self.optimizer, w) for name, w in self.sparse.items()})


class DensePretraining(PretrainMethod):
    """Density 1.0: the dense baseline, on torch's AdamW (or bitsandbytes' AdamW8bit)."""

    def __init__(self, context: TrainingContext) -> None:
        super().__init__(context)
        decay = [p for p in context.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in context.model.parameters() if p.dim() < 2]
        self.optimizer = dense_adamw([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], context.cfg)

    def reduce_grads(self) -> None:
        mean_in_place([p.grad for p in self.context.model.parameters() if p.grad is not None])

    def report(self) -> MethodReport:
        linears = sparse_linears(self.context.model)
        numel = sum(m.weight.numel() for m in linears.values())
        per_entry = 2 if self.cfg.optim == "adamw8bit" else 8
        element = next(iter(linears.values())).weight.element_size()
        memory = {
            "optimizer_state_bytes": numel * per_entry,
            "gradient_bytes": numel * element,
            "dense_adamw_state_and_grad_bytes": numel * (per_entry + element),
            "state_and_grad_vs_dense": 1.0,
            "itop_bitmap_bytes": 0,
        }
        return MethodReport(memory)


def topology_due(cfg: SmetConfig, step: int) -> bool:
    """Whether a sparse run's topology update follows step `step` (every --update-interval, before the last)."""
    interval = cfg.update_interval
    return interval > 0 and step % interval == 0 and step < cfg.steps


# density < 1 or = 1 -> the method that trains it, built as METHOD(context) once the model and data exist.
METHODS: dict[str, Callable[[TrainingContext], TrainingMethod]] = {
    "sparse": SparsePretraining,
    "dense": DensePretraining,
}


class PretrainRun(Trainer):
    """The `smet-pretrain` task: a Llama model from scratch on packed text, sparse or dense."""

    def load(self) -> None:
        cfg = self.cfg
        self.tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        config = llama_config(cfg.model_config_name, self.tokenizer, cfg.seqlen)
        self.train_data, self.val_data = train_val_split(self.tokenizer, cfg)

        from transformers import LlamaForCausalLM

        torch.manual_seed(cfg.seed)
        self.model = LlamaForCausalLM(config).to(device=self.ctx.device, dtype=self.dtype())
        self.model.train()
        self.density_plan: dict[str, Any] | None = None
        if cfg.density == "auto":  # the model and data exist now: count them and take the planned density
            params = sum(p.numel() for p in self.model.parameters())
            self.density_plan = planned_density(cfg, params, sum(len(x) for x in self.train_data.inputs))
            self.cfg = cfg.model_copy(update={"density": self.density_plan["density"]})

    def build_method(self, context: TrainingContext) -> TrainingMethod:
        return METHODS["sparse" if self.cfg.sparse else "dense"](context)

    def update_steps(self) -> list[int]:
        """The steps a topology update follows (every --update-interval, before the last step); a dense run
        probes at the same steps, so its ratios are what the batches alone give."""
        interval, steps = self.cfg.update_interval, self.cfg.steps
        return list(range(interval, steps, interval)) if interval > 0 else []

    @property
    def sparse(self) -> dict[str, SparseWeight]:
        """The sparse weights by name (empty when dense)."""
        return self.method.sparse if isinstance(self.method, SparsePretraining) else {}

    def log_due(self, step: int) -> bool:
        """A sparse run logs every step within UPDATE_WINDOW steps before (up to and including) or after a topology
        update."""
        interval = self.cfg.update_interval
        if not isinstance(self.method, SparsePretraining) or interval <= 0:
            return False
        previous, upcoming = step // interval * interval, -(-step // interval) * interval
        return (topology_due(self.cfg, upcoming) and upcoming - step < UPDATE_WINDOW) or (
            previous > 0 and topology_due(self.cfg, previous) and step - previous <= UPDATE_WINDOW
        )

    def logged_fields(self) -> dict[str, Any]:
        """Every logged row carries the memory report, less its per-layer part."""
        return {"memory": {k: v for k, v in self.memory_report().items() if k != "layers"}}

    def probe_due(self, step: int) -> bool:
        """--spike-probe: the models after steps u-10..u+9 of every update step u."""
        interval = self.cfg.update_interval
        if not self.cfg.spike_probe or interval <= 0 or self.val_data is None:
            return False
        nearby = (step // interval * interval, -(-step // interval) * interval)
        return any(0 < u < self.cfg.steps and u - UPDATE_WINDOW <= step < u + UPDATE_WINDOW for u in nearby)

    def dtype(self) -> torch.dtype:
        if self.cfg.dtype == "auto":
            return torch.bfloat16 if self.ctx.device.type == "cuda" else torch.float32
        return getattr(torch, self.cfg.dtype)

    def identity(self) -> dict[str, Any]:
        # the warmup as it runs (the default is 5% of the steps): a checkpoint's old `warmup_ratio` maps onto it
        settings = {k: v for k, v in self.cfg.model_dump(mode="json").items() if k not in NOT_IDENTITY}
        return {**settings, "warmup_steps": self.cfg.warmup}

    @property
    def itop(self) -> dict[str, torch.Tensor]:
        """The ITOP bitmaps by sparse weight (empty when dense)."""
        return self.method.itop if isinstance(self.method, SparsePretraining) else {}

    def itop_rate(self) -> float | None:
        """The fraction of sparse-weight positions ever active (None when dense)."""
        return self.method.itop_rate() if isinstance(self.method, SparsePretraining) and self.itop else None

    def finish(self) -> dict[str, Any]:
        # Each sparse layer ends with exactly its active count of non-zeros (its zeros are what it started with).
        finished = self.finish_method()
        weights = {name: w.param for name, w in self.sparse.items()}
        self.check_final_sparsity(weights, {n: w.param.numel() - w.nnz for n, w in self.sparse.items()}, finished)
        val_loss = self.validation_loss() if self.val_data is not None else None
        report = self.build_report(self.memory_report(), val_loss)
        if self.ctx.is_main and isinstance(self.optimizer, SparseAdamW):
            self.optimizer.remove_hooks()
        self.write_output(report, "smet-pretrain", finished)
        return report

    def build_report(self, memory: dict[str, Any], val_loss: float | None) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        linears = sparse_linears(self.model)
        stats = masks.sparsity_stats(linears) if self.sparse else None
        losses = [r["loss"] for r in state.log]
        updates = [t["step"] for t in state.topology]
        spikes = update_spike_ratios({r["step"]: r["loss"] for r in state.log}, updates)
        probes = {r["step"]: r["probe_loss"] for r in state.log if "probe_loss" in r}
        probe_spikes = probe_spike_ratios(probes, self.update_steps()) if probes else []
        first = {r["step"]: r.get("regrown_update_ratio") for r in state.log if r.get("steps_since_update") == 1}
        first_ratios = [first.get(u + 1) for u in updates]
        measured = [r for r in first_ratios if r is not None]
        summary = {
            "method": "smet" if self.sparse else "dense",
            "model_config": cfg.model_config_name,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "density": cfg.density,
            "density_plan": self.density_plan,
            "steps": state.step,
            "tokens": state.tokens,
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "final_val_loss": val_loss,
            "spike_ratio": max((r for r in spikes if r is not None), default=None),
            "spike_ratios": spikes,
            "probe_spike_ratio": max((r for r in probe_spikes if r is not None), default=None),
            "probe_spike_ratios": probe_spikes,
            "first_step_update_ratios": first_ratios,
            "mean_first_step_update_ratio": sum(measured) / len(measured) if measured else None,
            "itop_rate": self.itop_rate(),
            "itop_bitmap_bytes": memory.get("itop_bitmap_bytes"),
            "topology_updates": len(updates),
            "optimizer_state_bytes": memory.get("optimizer_state_bytes"),
            "gradient_bytes": memory.get("gradient_bytes"),
            "state_and_grad_vs_dense": memory.get("state_and_grad_vs_dense"),
            "peak_rss_bytes": memory.get("peak_rss_bytes"),
            "mean_step_s": mean_step_s(state),
            "median_step_s": statistics.median(r["step_s"] for r in state.log) if state.log else None,
            **self.method.report().fields,
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
    """The whole `sparsetune smet-pretrain` flow: setup, train (checkpointing), finish (save), cleanup."""
    return PretrainRun(cfg, overwrite, show_progress).run()


def print_summary(report: dict[str, Any]) -> None:
    s = report["summary"]
    rows = []
    if s["spike_ratio"] is not None:
        rows.append(("largest loss spike after an update", f"{s['spike_ratio']:.3f}"))
    if s.get("probe_spike_ratio") is not None:
        rows.append(("largest spike on the fixed probe batch", f"{s['probe_spike_ratio']:.3f}"))
    if s["mean_first_step_update_ratio"] is not None:
        rows.append(("regrown / established |update|, 1st step", f"{s['mean_first_step_update_ratio']:.3f}"))
    if s.get("density_plan"):
        plan = s["density_plan"]
        rows.append(("density (--density auto)", f"{s['density']:.6g}, predicted loss {plan['predicted_loss']:.3f}"))
    rows.append(("topology updates", str(s["topology_updates"])))
    if s["itop_rate"] is not None:
        rows.append(
            ("ITOP rate (positions ever active)", f"{s['itop_rate']:.4f} ({s['itop_bitmap_bytes']:,} B bitmap)")
        )
    state_and_grad = (s["optimizer_state_bytes"] + s["gradient_bytes"]) / 2**20
    rows.append(
        (
            "sparse-weight optimizer + grad",
            f"{state_and_grad:.1f} MiB ({s['state_and_grad_vs_dense']:.3f}x dense AdamW)",
        )
    )
    if s.get("peak_rss_bytes") is not None:
        rows.append(("peak RSS", f"{s['peak_rss_bytes'] / 2**20:.0f} MiB"))
    title = f"sparsetune smet-pretrain: {s['method']} {s['model_config']} density {s['density']}"
    print_table(title, s, rows, lead=[("parameters", f"{s['parameters']:,}")])
