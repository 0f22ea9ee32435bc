"""Gates of a `sparsetune run` recipe: checks like `wikitext2_ppl_max: 90` or `sparsity_min: 0.5` on the result.

A gate is a metric name plus `_min` or `_max`. The metrics are the sparsity of the last model stage and the
numbers of the last eval stage (`<source>_ppl`, `<task>_<metric>`, and `<metric>_vs_baseline` when it compares
models). `check_gate_names` runs when the recipe is planned, `check_gates` when it has run.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig


def metric_key(text: str) -> str:
    """A metric name safe for gate keys: 'exact_match[strict]' -> 'exact_match_strict'."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def ppl_metric(source: str) -> str:
    return f"{metric_key(Path(source).stem)}_ppl"


def gate_metric(key: str) -> tuple[str, str]:
    for bound in ("_min", "_max"):
        if key.endswith(bound) and len(key) > len(bound):
            return key[: -len(bound)], bound[1:]
    raise SparsetuneError(f"gate {key!r} must end in _min or _max, e.g. wikitext2_ppl_max or sparsity_min")


def check_gate_names(
    gates: dict[str, Any], last: EvalConfig | None, has_model: bool, where: Callable[[str], str]
) -> None:
    """Every gate must name a metric the plan will measure: the sparsity of a model stage (`has_model`), or one
    of the last eval stage's (`last`). `where(key)` is the recipe line of a gate, for errors."""
    ppl_names = [ppl_metric(s) for s in last.ppl] if isinstance(last, EvalConfig) else []
    task_names = list(last.tasks) if isinstance(last, EvalConfig) else []
    compares = isinstance(last, EvalConfig) and len(last.models) > 1
    for key, bound in gates.items():
        at = where(key)
        try:
            metric, _ = gate_metric(key)
            float(bound)
        except (SparsetuneError, TypeError, ValueError) as err:
            problem = err if isinstance(err, SparsetuneError) else f"gate {key!r}: the bound must be a number"
            raise SparsetuneError(f"{at}: {problem}") from err
        base = metric.removesuffix("_vs_baseline")
        if base != metric and not compares:
            raise SparsetuneError(
                f"{at}: gate {key!r} compares against a baseline, but the last eval stage evaluates one model; "
                "list the baseline first in its models"
            )
        known = ["sparsity"] if has_model else []
        ok = (base == "sparsity" and has_model and base == metric) or base in ppl_names
        ok = ok or any(base.startswith(f"{metric_key(t)}_") for t in task_names)
        if not ok:
            known += ppl_names + [f"{metric_key(t)}_<metric>" for t in task_names]
            raise SparsetuneError(
                f"{at}: gate {key!r} names a metric the recipe does not measure; "
                f"measured: {', '.join(known) or 'none (add an eval stage)'}"
            )


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """Metrics of the last model of an eval report, plus `<metric>_vs_baseline` against the first model."""
    from sparsetune.evaluate.harness import metric_names  # torch: after a run; planning a recipe checks gates first

    def flat(result: dict[str, Any]) -> dict[str, float]:
        values = {ppl_metric(source): float(v["ppl"]) for source, v in result["ppl"].items()}
        for task, row in result["tasks"].items():
            for metric in metric_names(row):
                values[f"{metric_key(task)}_{metric_key(metric)}"] = float(row[metric])
        if result.get("sparsity") and result["sparsity"].get("global_sparsity") is not None:
            values["sparsity"] = float(result["sparsity"]["global_sparsity"])
        return values

    models = report["models"]
    final = flat(models[-1])
    if len(models) > 1:
        base = flat(models[0])
        for name, value in list(final.items()):
            if name in base and name != "sparsity" and base[name]:
                final[f"{name}_vs_baseline"] = value / base[name]
    return final


def check_gates(gates: dict[str, float], metrics: dict[str, float]) -> list[dict[str, Any]]:
    """Each gate against the run's metrics: passed, or failed (a metric that was not measured fails)."""
    results = []
    for key, bound in gates.items():
        metric, side = gate_metric(key)
        value = metrics.get(metric)
        passed = value is not None and (value >= bound if side == "min" else value <= bound)
        results.append({"gate": key, "metric": metric, "bound": bound, "value": value, "passed": passed})
    return results
