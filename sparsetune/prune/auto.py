"""`--method auto`: the method, OWL and refinement that measured best at the requested sparsity.

The choices come from the prune benchmark's table (`scripts/bench_prune.py --suite table`, rows in
bench/results/prune.jsonl), turned into `auto_choices.json` by `scripts/auto_table.py`: at each measured target, the
lowest-perplexity row whose prune time stays within 3x plain Wanda's at that target. Torch-free, so the schema and
`--help` can import it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from sparsetune.patterns import parse_pattern

CHOICES_FILE = Path(__file__).with_name("auto_choices.json")
NEAREST_MEASURED = 0.1  # how far (in sparsity) a measured choice is carried to an unmeasured target
FALLBACK = {"method": "wanda", "owl": False, "refine": "none"}  # before any table row exists for a target


@cache
def choices() -> dict[str, dict[str, Any]]:
    """target ("0.5", "0.7", "2:4", ...) -> {"method", "owl", "refine", "ppl", "prune_s", "time_vs_wanda", ...}."""
    return json.loads(CHOICES_FILE.read_text())["choices"] if CHOICES_FILE.exists() else {}


def table_key(sparsity: float | None, pattern: str | None) -> str | None:
    """The table row that answers a request, or None when nothing measured is close enough.

    An N:M pattern uses the measured pattern of the same N/M ratio (4:8 -> 2:4). A sparsity uses the nearest
    measured sparsity at or above it (the more conservative choice), or the highest measured one below it, either
    only within NEAREST_MEASURED of the request: a choice is never carried further than that from its measurement.
    """
    table = choices()
    if pattern is not None:
        nm = parse_pattern(pattern)
        same_ratio = [k for k in table if ":" in k and _ratio(k) == nm.n / nm.m]
        return pattern if pattern in table else (same_ratio[0] if same_ratio else None)
    target = 0.5 if sparsity is None else sparsity
    measured = sorted(float(k) for k in table if ":" not in k)
    above = [s for s in measured if target - 1e-9 <= s <= target + NEAREST_MEASURED + 1e-9]
    below = [s for s in measured if target - NEAREST_MEASURED - 1e-9 <= s < target]
    if above:
        return _key(above[0])
    return _key(below[-1]) if below else None


def choose(sparsity: float | None, pattern: str | None) -> dict[str, Any]:
    """The settings `auto` stands for at this target, with the one-line reason printed and reported."""
    key = table_key(sparsity, pattern)
    what = pattern if pattern is not None else f"{round(100 * (0.5 if sparsity is None else sparsity))}%"
    if key is None:
        why = f"no benchmark row at {what} yet; wanda is the default until one is measured"
        return {**FALLBACK, "table_key": None, "why": why}
    row = choices()[key]
    picked = row["method"] + (" + OWL" if row["owl"] else "") + (" + DSnoT" if row["refine"] != "none" else "")
    why = (
        f"{picked}: lowest testbed ppl ({row['ppl']:.1f}) at {_label(key)} among methods whose prune time is "
        f"within 3x Wanda's ({row['time_vs_wanda']:.2f}x)"
    )
    return {"method": row["method"], "owl": row["owl"], "refine": row["refine"], "table_key": key, "why": why}


def _ratio(key: str) -> float:
    n, m = key.split(":")
    return int(n) / int(m)


def _key(sparsity: float) -> str:
    return f"{sparsity:g}"


def _label(key: str) -> str:
    return key if ":" in key else f"{round(100 * float(key))}%"


def resolve(cfg: Any) -> tuple[Any, dict[str, Any] | None]:
    """A PruneConfig with `method: auto` replaced by the table's choice (OWL and refine too, unless the user set
    them), and the choice to report; any other config comes back as it is, with None."""
    if cfg.method != "auto":
        return cfg, None
    choice = choose(cfg.sparsity, cfg.pattern)
    update = {"method": choice["method"]}
    for setting in ("owl", "refine"):
        if setting not in cfg.model_fields_set:  # an explicit --owl / --refine still means exactly that
            update[setting] = choice[setting]
    resolved = cfg.model_copy(update=update)
    return resolved, {"requested": "auto", **choice, "owl": resolved.owl, "refine": resolved.refine}
