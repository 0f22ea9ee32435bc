"""scripts/auto_table.py: building `--method auto`'s table (sparsetune/prune/auto_choices.json) from the prune
benchmark's rows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from sparsetune.prune import auto

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("auto_table", ROOT / "scripts" / "auto_table.py")
assert _spec is not None and _spec.loader is not None
auto_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(auto_table)


def row(method: str, target: str, variant: str, ppl: float, prune_s: float) -> dict:
    return {"suite": "table", "quick": False, "run": f"{method}-{target}", "variant": variant, "ppl": ppl,
            "prune_s": prune_s}  # fmt: skip


def test_build_picks_the_lowest_ppl_within_3x_wanda_time(tmp_path):
    rows = [
        row("wanda", "0.7", "plain", 1000.0, 10.0),
        row("sparsegpt", "0.7", "plain", 270.0, 12.0),
        row("sparsegpt", "0.7", "owl", 260.0, 30.0),  # exactly 3x: allowed
        row("alps", "0.7", "plain", 160.0, 30.1),  # best ppl but 3.01x: too slow
        row("wanda", "0.5", "dsnot", 50.0, 1.0),  # no plain wanda row at 0.5: the target is left out
        {**row("wanda", "0.6", "plain", 80.0, 5.0), "quick": True},  # quick rows never count
    ]
    results = tmp_path / "prune.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    choices = auto_table.build_choices(auto_table.table_rows(results))
    assert list(choices) == ["0.7"]
    c = choices["0.7"]
    assert (c["method"], c["owl"], c["refine"], c["ppl"], c["time_vs_wanda"]) == ("sparsegpt", True, "none", 260.0, 3.0)
    assert c["rows_compared"] == 3


def test_since_keeps_one_sitting_and_the_newest_row_wins(tmp_path):
    rows = [
        {**row("wanda", "0.7", "plain", 1025.6, 56.4), "date": "2026-12-01 22:21"},  # another machine
        {**row("alps", "0.7", "plain", 160.9, 175.4), "date": "2026-12-01 22:32"},
        {**row("wanda", "0.7", "plain", 1034.1, 27.6), "date": "2026-12-02 10:30"},
        {**row("wanda", "0.7", "plain", 1034.1, 27.0), "date": "2026-12-02 11:30"},  # re-measured: this one counts
        {**row("sparsegpt", "0.7", "plain", 270.0, 28.0), "date": "2026-12-02 10:40"},
    ]
    results = tmp_path / "prune.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kept = auto_table.table_rows(results, since="2026-12-02")
    assert sorted(kept) == [("sparsegpt", "0.7", "plain"), ("wanda", "0.7", "plain")]
    assert kept["wanda", "0.7", "plain"]["prune_s"] == 27.0
    assert len(auto_table.table_rows(results)) == 3  # without since: every sitting, newest per row
    c = auto_table.build_choices(kept)["0.7"]
    assert (c["method"], c["time_vs_wanda"], c["rows_compared"]) == ("sparsegpt", round(28.0 / 27.0, 3), 2)


def test_the_shipped_choices_are_what_the_committed_bench_rows_give():
    shipped = json.loads(auto.CHOICES_FILE.read_text())
    rows = auto_table.table_rows(ROOT / "bench" / "results" / "prune.jsonl", shipped.get("since", ""))
    assert shipped["choices"] == json.loads(json.dumps(auto_table.build_choices(rows)))
