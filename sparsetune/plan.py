"""`sparsetune plan`: the density to pretrain at, for a data and compute budget, from the data-constrained sparse
scaling law of Wu, Xiao, Okanovic et al. 2026, "When Data Is Scarce: Scaling Sparse Language Models with Repeated
Training" (code: github.com/boqian333/sparse-dc-scaling; the law and its coefficients are those of its
`figures/optimal_sparsity.ipynb`, fitted in `fitting/fitting.ipynb`).

The law, with S the density (1 = dense), n the active (non-zero) parameters, U the unique tokens and D the tokens
trained on (D / U epochs):

    L = E + A f(S) / N_eff + B / D_eff,            f(S) = S^eps + c (1 - S)^mu
    U_N   = min(n, n_opt(C_U, S))   with C_U the compute whose optimal token count is U
    N_eff = (U_N + U_N n* (1 - exp(-r_N / n*)))^alpha,   r_N = max(n / U_N - 1, 0)
    D_eff = (U   + U   d* (1 - exp(-r_D / d*)))^beta,    r_D = max(D / U - 1, 0)

so repeated data is worth less than fresh data (d* epochs-worth at most), and parameters beyond what the unique
data can use are worth less than the first U_N (Muennighoff et al. 2023's form), with n* and d* quadratic in the
sparsity. Compute is C = 6 n D (n active parameters: sparse training costs in proportion to its non-zeros).

Pure Python (`math` only): `sparsetune plan` answers without importing torch or numpy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError

PAPER = 'Wu, Xiao, Okanovic et al. 2026, "When Data Is Scarce: Scaling Sparse Language Models with Repeated Training"'
PAPER_SHORT = "Wu, Xiao, Okanovic et al. 2026"
SOURCE = "github.com/boqian333/sparse-dc-scaling, figures/optimal_sparsity.ipynb (scaling_law, optimal_N, optimal_D)"

# The fitted coefficients (optimal_sparsity.ipynb; beta = alpha in the fit).
LOG_A, LOG_B, LOG_E = 5.24073718, 6.10303089, 0.85355013
ALPHA = BETA = 0.32682177
EPS, MU, C_DENSITY = -0.00968044, 0.84661793, -0.27288932
A, B, E = math.exp(LOG_A), math.exp(LOG_B), math.exp(LOG_E)
# Repetition: n* = N_STAR (1 + N1 s - N2 s^2), d* = D_STAR (1 + D1 s - D2 s^2), s = 1 - density the sparsity.
N_STAR, N1, N2 = 11.08763712, 1.90420893, 2.79936732
D_STAR, D1, D2 = 4.40474882, 1.82159486, 1.36557887

# What the fit saw (the paper and fitting.ipynb's PARAMS_MAP / TOKENS_MAP / DENS_MAP): Llama models of 20M to 1.92B
# dense-equivalent parameters, densities 1 to 0.0625, 0.1B to 20.8B training tokens, up to 16 epochs, on C4, with
# SET-style dynamic sparse pretraining from scratch.
FIT_PARAMS = (2.0e7, 1.92e9)
FIT_DENSITY = (0.0625, 1.0)
FIT_TOKENS = (1.0e8, 2.08e10)
FIT_EPOCHS = 16.0

# The density grid `plan` searches: multiples of 1/512 from 0.0625 (the fit's sparsest) to 1.
GRID_STEP = 1 / 512
SEARCH_GRID = tuple(k * GRID_STEP for k in range(32, 513))
TABLE_GRID = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0625)

# The notebook's per-FLOP-budget search: densities linspace(0.05, 1, 120), and along each iso-FLOP line the
# compute-optimal (n, D) and 400 rescalings (n / r, D r) and (n r, D / r), r in linspace(1.0001, 10, 400).
NOTEBOOK_DENSITIES = tuple(0.05 + i * (1.0 - 0.05) / 119 for i in range(120))
NOTEBOOK_SCALES = tuple(1.0001 + i * (10.0 - 1.0001) / 399 for i in range(400))


# -- the law --------------------------------------------------------------------------------------------------------


def density_factor(density: float) -> float:
    """f(S) = S^eps + c (1 - S)^mu: how much a non-zero parameter at density S is worth against a dense one."""
    return density**EPS + C_DENSITY * (1.0 - density) ** MU


def _allocation_scale(density: float) -> float:
    """G of the compute-optimal split: n_opt = G (C/6)^(beta/(alpha+beta)), D_opt = (C/6)^(alpha/(alpha+beta)) / G
    (minimising A f(S) / n^alpha + B / D^beta subject to 6 n D = C)."""
    return (ALPHA * A * density_factor(density) / (BETA * B)) ** (1.0 / (ALPHA + BETA))


def optimal_active_params(flops: float, density: float) -> float:
    """The compute-optimal active parameter count at `flops` and `density` (one epoch, no repetition)."""
    return _allocation_scale(density) * (flops / 6.0) ** (BETA / (ALPHA + BETA))


def optimal_tokens(flops: float, density: float) -> float:
    """The compute-optimal token count at `flops` and `density`."""
    return (flops / 6.0) ** (ALPHA / (ALPHA + BETA)) / _allocation_scale(density)


def flops_for_optimal_tokens(tokens: float, density: float) -> float:
    """The compute whose optimal token count is `tokens` (the inverse of `optimal_tokens`)."""
    return 6.0 * (_allocation_scale(density) * tokens) ** ((ALPHA + BETA) / ALPHA)


class _AtDensity:
    """The law at one density, its density-dependent terms computed once (searches call `loss` many times)."""

    def __init__(self, density: float) -> None:
        sparsity = 1.0 - density
        self.density = density
        self.scale = _allocation_scale(density)
        self.a_term = A * density_factor(density)
        self.n_star = N_STAR * (1.0 + N1 * sparsity - N2 * sparsity**2)
        self.d_star = D_STAR * (1.0 + D1 * sparsity - D2 * sparsity**2)

    def useful_params(self, unique_tokens: float) -> float:
        """U_N: the compute-optimal active parameters for `unique_tokens` (n_opt at the compute whose optimal token
        count is U: G (G U)^(beta/alpha))."""
        return self.scale * (self.scale * unique_tokens) ** (BETA / ALPHA)

    def loss(self, active_params: float, unique_tokens: float, tokens: float) -> float:
        useful = min(active_params, self.useful_params(unique_tokens))
        excess_params = max(active_params / useful - 1.0, 0.0)
        repeats = max(tokens / unique_tokens - 1.0, 0.0)
        n_eff = (useful * (1.0 + self.n_star * (1.0 - math.exp(-excess_params / self.n_star)))) ** ALPHA
        d_eff = (unique_tokens * (1.0 + self.d_star * (1.0 - math.exp(-repeats / self.d_star)))) ** BETA
        return E + self.a_term / n_eff + B / d_eff


def predicted_loss(active_params: float, unique_tokens: float, tokens: float, density: float) -> float:
    """The law's validation loss (C4, nats per token) for `active_params` non-zero parameters trained on `tokens`
    tokens drawn from `unique_tokens` unique ones (tokens / unique_tokens epochs) at `density`."""
    return _AtDensity(density).loss(active_params, unique_tokens, tokens)


# -- choices ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    """One prediction: `params` dense-equivalent parameters at `density` (params x density of them active)."""

    density: float
    params: float
    tokens: float
    loss: float

    @property
    def active_params(self) -> float:
        return self.params * self.density

    @property
    def flops(self) -> float:
        return 6.0 * self.active_params * self.tokens

    def as_dict(self, unique_tokens: float) -> dict[str, float]:
        return {
            **asdict(self),
            "active_params": self.active_params,
            "flops": self.flops,
            "epochs": self.tokens / unique_tokens,
        }


def point(params: float, unique_tokens: float, tokens: float, density: float) -> Point:
    """The predicted loss of a model of `params` dense-equivalent parameters at `density` on `tokens` tokens (of
    which at most `unique_tokens` unique: fewer when the run reads less than all of its data)."""
    loss = predicted_loss(params * density, min(unique_tokens, tokens), tokens, density)
    return Point(density, params, tokens, loss)


def tokens_for_flops(params: float, flops: float, density: float) -> float:
    """The tokens a `flops` budget buys a `params` model at `density` (6 x active parameters per token)."""
    return flops / (6.0 * params * density)


def best(points: list[Point]) -> Point:
    """The lowest-loss point (the first of equals)."""
    return min(points, key=lambda p: p.loss)


def loss_optimal(params: float, unique_tokens: float, tokens: float, grid: tuple[float, ...] = SEARCH_GRID) -> Point:
    """The density of lowest predicted loss for a fixed model and token count."""
    return best([point(params, unique_tokens, tokens, s) for s in grid])


def compute_optimal(params: float, unique_tokens: float, flops: float, grid: tuple[float, ...] = SEARCH_GRID) -> Point:
    """For a fixed model and compute budget: the density (and with it the tokens the budget buys) of lowest loss."""
    return best([point(params, unique_tokens, tokens_for_flops(params, flops, s), s) for s in grid])


def best_at_flops(flops: float, unique_tokens: float, density: float) -> Point:
    """The notebook's best loss at one FLOP budget and density, the model size free: the compute-optimal (n, D) and
    its rescalings along the iso-FLOP line, with min(unique_tokens, D) unique tokens (its `best_loss_per_F_at_S`).
    Also returns where the best was found (`params` dense-equivalent)."""
    n0, d0 = optimal_active_params(flops, density), optimal_tokens(flops, density)
    candidates = [(n0, d0)]
    for r in NOTEBOOK_SCALES:
        candidates += [(n0 / r, d0 * r), (n0 * r, d0 / r)]
    law, found = _AtDensity(density), None
    for n, d in candidates:
        loss = law.loss(n, min(unique_tokens, d), d)
        if found is None or loss < found.loss:
            found = Point(density, n / density, d, loss)
    assert found is not None
    return found


def density_per_budget(
    flops: float, unique_tokens: float, grid: tuple[float, ...] = NOTEBOOK_DENSITIES
) -> tuple[Point, list[Point]]:
    """The notebook's density choice at one FLOP budget: the density whose best iso-FLOP loss is lowest, and the
    best point at every density of `grid`."""
    per_density = [best_at_flops(flops, unique_tokens, s) for s in grid]
    return best(per_density), per_density


# -- the whole plan ---------------------------------------------------------------------------------------------------


def parse_count(text: str | float, what: str) -> float:
    """A positive count: a number (1.2e9) with an optional K, M, B or T suffix (1.2B)."""
    raw = str(text).strip()
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(raw[-1:].upper(), 1.0)
    digits = raw[:-1] if scale != 1.0 else raw
    try:
        value = float(digits) * scale
    except ValueError:
        raise SparsetuneError(f"{what} {text!r} is not a number; e.g. 1.3e10 or 13B") from None
    if not value > 0 or not math.isfinite(value):
        raise SparsetuneError(f"{what} must be positive, got {text}")
    return value


def count_params(spec: str) -> tuple[float, str]:
    """Dense-equivalent parameter count from `--params`: a number, a model dir (its safetensors headers, else its
    config.json) or a Llama-style config.json. Returns (count, where it came from)."""
    path = Path(spec).expanduser()
    if not path.exists():
        return parse_count(spec, "--params"), "given"
    if path.is_dir():
        shards = sorted(path.glob("*.safetensors"))
        if shards:
            return float(
                sum(_safetensors_numel(s) for s in shards)
            ), f"counted from {len(shards)} safetensors in {path}"
        path = path / "config.json"
    if not path.is_file():
        raise SparsetuneError(f"--params {spec}: no *.safetensors or config.json there; pass a count such as 1.2e8")
    return float(_config_numel(path)), f"counted from {path}"


def _safetensors_numel(path: Path) -> int:
    """The element count of every tensor in a safetensors file, from its JSON header alone."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return sum(math.prod(meta["shape"]) for name, meta in header.items() if name != "__metadata__")


def _config_numel(path: Path) -> int:
    """The parameter count of a Llama-style decoder config (embeddings, attention, gated MLP, norms, head)."""
    try:
        cfg = json.loads(path.read_text())
        h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
        heads, vocab = cfg["num_attention_heads"], cfg["vocab_size"]
    except (OSError, ValueError, KeyError) as err:
        raise SparsetuneError(f"--params {path}: not a readable Llama-style config.json ({err})") from None
    kv = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    block = attention + 3 * h * inter + 2 * h
    head = 0 if cfg.get("tie_word_embeddings", False) else vocab * h
    return vocab * h + layers * block + h + head


@dataclass
class Plan:
    """What `sparsetune plan` answers (its --json is `as_dict()`)."""

    params: float
    params_source: str
    unique_tokens: float
    tokens: float | None
    flops: float | None
    grid: list[Point]
    loss_optimal: Point | None = None
    compute_optimal: Point | None = None
    budget_choice: Point | None = None  # the notebook's density at this FLOP budget, model size free
    requested: Point | None = None
    curve: list[Point] = field(default_factory=list)  # the search grid, for the plot
    notes: list[str] = field(default_factory=list)

    @property
    def recommended(self) -> Point:
        chosen = self.compute_optimal or self.loss_optimal
        assert chosen is not None
        return chosen

    def as_dict(self) -> dict[str, Any]:
        u = self.unique_tokens
        one = lambda p: p.as_dict(u) if p is not None else None  # noqa: E731
        return {
            "params": self.params,
            "params_source": self.params_source,
            "unique_tokens": u,
            "tokens": self.tokens,
            "flops": self.flops,
            "grid": [p.as_dict(u) for p in self.grid],
            "loss_optimal": one(self.loss_optimal),
            "compute_optimal": one(self.compute_optimal),
            "budget_choice": one(self.budget_choice),
            "requested": one(self.requested),
            "recommended_density": self.recommended.density,
            "notes": self.notes,
            "paper": PAPER,
            "coefficients": SOURCE,
        }


def make_plan(
    params: float,
    unique_tokens: float,
    tokens: float | None = None,
    flops: float | None = None,
    density: float | None = None,
    params_source: str = "given",
) -> Plan:
    """Predicted loss over the density grid and the chosen densities, for `tokens` (loss-optimal) or `flops`
    (compute-optimal for this model, and the notebook's choice with the model size free)."""
    check_inputs(params, unique_tokens, tokens, flops, density)
    if flops is not None:
        at = lambda s: point(params, unique_tokens, tokens_for_flops(params, flops, s), s)  # noqa: E731
    else:
        at = lambda s: point(params, unique_tokens, tokens, s)  # noqa: E731
    curve = [at(s) for s in SEARCH_GRID]
    plan = Plan(params, params_source, unique_tokens, tokens, flops, [at(s) for s in TABLE_GRID], curve=curve)
    if flops is not None:
        plan.compute_optimal = best(curve)
        plan.budget_choice = density_per_budget(flops, unique_tokens)[0]
    else:
        plan.loss_optimal = best(curve)
    if density is not None:
        plan.requested = at(density)
    plan.notes = range_notes(plan, density)
    return plan


def check_inputs(
    params: float, unique_tokens: float, tokens: float | None, flops: float | None, density: float | None
) -> None:
    """Bad input is a SparsetuneError (one `error:` line): non-positive sizes, more unique tokens than tokens, a
    density outside (0, 1], both or neither of tokens and flops."""
    for name, value in (("--params", params), ("--unique-tokens", unique_tokens), ("--tokens", tokens)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise SparsetuneError(f"{name} must be positive, got {value:g}")
    if flops is not None and not (flops > 0 and math.isfinite(flops)):
        raise SparsetuneError(f"--flops must be positive, got {flops:g}")
    if tokens is not None and flops is not None:
        raise SparsetuneError("give --tokens or --flops, not both (a FLOP budget sets the tokens at each density)")
    if tokens is None and flops is None:
        raise SparsetuneError("missing --tokens D (tokens to train on) or --flops C (a compute budget)")
    if tokens is not None and unique_tokens > tokens:
        raise SparsetuneError(
            f"--unique-tokens {unique_tokens:g} exceeds --tokens {tokens:g}; a run cannot see more unique tokens "
            "than it trains on (lower --unique-tokens to what it will read)"
        )
    if density is not None and not 0 < density <= 1:
        raise SparsetuneError(f"--density must be in (0, 1] (1 = dense), got {density:g}")


def range_notes(plan: Plan, density: float | None) -> list[str]:
    """Plain statements of where the inputs leave what the law was fitted on (and what it always assumes)."""
    notes = []
    lo, hi = FIT_PARAMS
    if not lo <= plan.params <= hi:
        notes.append(
            f"{plan.params:.3g} dense-equivalent parameters is outside the fit's models ({lo:.3g}-{hi:.3g}): "
            "an extrapolation"
        )
    if density is not None and density < FIT_DENSITY[0]:
        notes.append(f"density {density:g} is below the fit's sparsest ({FIT_DENSITY[0]}): an extrapolation")
    chosen = plan.recommended
    points = [("the chosen density", chosen)]
    if plan.requested is not None and plan.requested.tokens != chosen.tokens:
        points.append((f"density {plan.requested.density:g}", plan.requested))
    for label, p in points:
        if not FIT_TOKENS[0] <= p.tokens <= FIT_TOKENS[1]:
            notes.append(
                f"{p.tokens:.3g} tokens at {label} is beyond the training-token budgets the fit names "
                f"({FIT_TOKENS[0]:.3g}-{FIT_TOKENS[1]:.3g}, fitting.ipynb's TOKENS_MAP): an extrapolation"
            )
        epochs = p.tokens / plan.unique_tokens
        if epochs > FIT_EPOCHS:
            notes.append(f"{epochs:.1f} epochs at {label} is beyond the paper's {FIT_EPOCHS:g}: an extrapolation")
        notes.append(
            f"{label}: {p.tokens / p.active_params:.1f} tokens per active parameter "
            f"({p.tokens / p.params:.1f} per dense-equivalent one)"
        )
    if plan.budget_choice is not None and not lo <= plan.budget_choice.params <= hi:
        notes.append(f"the free-size choice's {plan.budget_choice.params:.3g} parameters is outside the fit's models")
    notes.append(
        "fitted on C4 with SET-style dynamic sparse pretraining from scratch (Llama, 20M-1.92B, densities 1-0.0625); "
        "it does not describe fine-tuning or one-shot pruning, and other data shifts E, A and B"
    )
    return notes


def smet_command(plan: Plan, batch_size: int, seqlen: int, model_config: str | None = None) -> str:
    """The `smet-pretrain` command line that trains at the recommended density on the planned token count
    (`--steps` = tokens / (batch_size x seqlen), rounded up)."""
    p = plan.recommended
    steps = math.ceil(p.tokens / (batch_size * seqlen))
    model = f"--model-config {model_config} " if model_config else ""
    return (
        f"sparsetune smet-pretrain {model}--density {p.density:.6g} --batch-size {batch_size} --seqlen {seqlen} "
        f"--steps {steps} -o OUT"
    )


def iter_table(plan: Plan) -> Iterator[tuple[str, ...]]:
    """Rows of the grid table: density, sparsity, active params, tokens, epochs, predicted loss."""
    for p in plan.grid:
        yield (
            f"{p.density:g}",
            f"{1 - p.density:.0%}",
            f"{p.active_params:.3g}",
            f"{p.tokens:.3g}",
            f"{p.tokens / plan.unique_tokens:.2f}",
            f"{p.loss:.4f}",
        )
