"""How many (index, delta) entries each targeted Linear holds.

The total is that of a LoRA of rank R on the same modules (R * (in + out) each) or a fraction of the targeted
weights; each module's share is proportional to its size, rounded by largest remainder so the shares sum exactly
to the total.
"""

from __future__ import annotations

from sparsetune.errors import SparsetuneError


def lora_count(shapes: dict[str, tuple[int, int]], rank: int) -> int:
    """Trainable parameters of a rank-`rank` LoRA on Linears of these (out, in) shapes."""
    return sum(rank * (out_f + in_f) for out_f, in_f in shapes.values())


def density_count(shapes: dict[str, tuple[int, int]], density: float) -> int:
    """`density` of all targeted weights, rounded to the nearest entry."""
    return round(density * sum(out_f * in_f for out_f, in_f in shapes.values()))


def split_proportional(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Shares of `total` proportional to `sizes`, exact in integers: floors, then one more for the largest
    remainders (ties go to the earlier name), so the shares sum to `total`."""
    whole = sum(sizes.values())
    if whole == 0:
        return {name: 0 for name in sizes}
    floors = {name: total * size // whole for name, size in sizes.items()}
    remainders = {name: total * size % whole for name, size in sizes.items()}
    left = total - sum(floors.values())
    order = sorted(sizes, key=lambda name: -remainders[name])  # sorted is stable: ties keep name order
    for name in order[:left]:
        floors[name] += 1
    return floors


def module_budgets(
    shapes: dict[str, tuple[int, int]],
    delta_rank: int | None = None,
    delta_density: float | None = None,
    capacity: dict[str, int] | None = None,
) -> dict[str, int]:
    """Entries per module for a rank or density budget (density wins when both are given).

    `capacity` is how many entries a module can hold: its non-zero weights, since entries start on non-zeros and
    the re-prune must find a non-zero without an entry for every reactivation. A share above it is an error.
    """
    total, flag = budget_total(shapes, delta_rank, delta_density)
    shares = split_proportional(total, {name: out_f * in_f for name, (out_f, in_f) in shapes.items()})
    for name, k in shares.items():
        out_f, in_f = shapes[name]
        check_capacity(flag, name, k, shapes[name], out_f * in_f if capacity is None else capacity[name])
    return shares


def budget_total(
    shapes: dict[str, tuple[int, int]], delta_rank: int | None, delta_density: float | None
) -> tuple[int, str]:
    """The total entries of a rank or density budget, and the flag that set it (for errors)."""
    if delta_density is not None:
        return density_count(shapes, delta_density), f"--delta-density {delta_density}"
    if delta_rank is not None:
        return lora_count(shapes, delta_rank), f"--delta-rank {delta_rank}"
    raise SparsetuneError("no delta budget: pass --delta-rank R or --delta-density D")


def check_capacity(flag: str, name: str, k: int, shape: tuple[int, int], limit: int) -> None:
    """Refuse a share `k` above the `limit` entries the module can hold (its non-zero weights)."""
    if k > limit:
        out_f, in_f = shape
        raise SparsetuneError(
            f"{flag} gives {name} {k} entries but it has only {limit} non-zero weights of {out_f * in_f}; "
            "lower --delta-rank or --delta-density (or --ignore that module)"
        )
