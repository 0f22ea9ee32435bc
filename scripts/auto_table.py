"""Build sparsetune/prune/auto_choices.json (what `--method auto` picks) from the prune benchmark's table rows.

Rule (issue 18): at each target, the lowest-perplexity row whose prune time stays within 3x plain Wanda's prune time
at that target, measured on the testbed (bench/results/prune.jsonl, `--suite table`, full size). A target without
its plain Wanda row is left out, since the time limit cannot be checked there. Prints one JSON line per target.

    .venv/bin/python scripts/auto_table.py --since 2026-12-02   # rewrite the choices from that sitting's rows
    .venv/bin/python scripts/auto_table.py --check    # exit 1 if the file differs from what the rows give
    .venv/bin/python scripts/auto_table.py --markdown # the README's table: ppl (prune time / Wanda's) per cell
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_TIME_VS_WANDA = 3.0  # the limit: auto never picks a method slower than 3x Wanda at the same target

VARIANTS = {  # table variant -> (owl, refine)
    "plain": (False, "none"),
    "owl": (True, "none"),
    "dsnot": (False, "dsnot"),
    "owl+dsnot": (True, "dsnot"),
}


def table_rows(results: Path, since: str = "") -> dict[tuple[str, str, str], dict]:
    """(method, target, variant) -> the newest full-size table row dated `since` ("YYYY-MM-DD HH:MM") or later.

    `since` keeps the table to one machine: prune times only compare within it, and even perplexity moves a little
    between CPUs (see bench/results/prune.jsonl, suite table: the plain wanda-0.7 rows of 2026-12-01 and 2026-12-02).
    """
    rows = {}
    for line in results.read_text().splitlines():
        row = json.loads(line)
        if row.get("suite") != "table" or row.get("quick") or "ppl" not in row or row["variant"] not in VARIANTS:
            continue
        if row.get("date", "") >= since:
            method, target = row["run"].split("-", 1)
            rows[method, target, row["variant"]] = row
    return rows


def build_choices(rows: dict[tuple[str, str, str], dict]) -> dict[str, dict]:
    choices = {}
    for target in sorted({t for _, t, _ in rows}):
        wanda = rows.get(("wanda", target, "plain"))
        if wanda is None:
            continue
        candidates = []
        for (method, t, variant), row in rows.items():
            ratio = row["prune_s"] / wanda["prune_s"]
            if t == target and ratio <= MAX_TIME_VS_WANDA:
                candidates.append((row["ppl"], method, variant, ratio, row))
        ppl, method, variant, ratio, row = min(candidates, key=lambda c: c[0])
        owl, refine = VARIANTS[variant]
        choices[target] = {
            "method": method,
            "owl": owl,
            "refine": refine,
            "ppl": round(ppl, 4),
            "prune_s": round(row["prune_s"], 2),
            "time_vs_wanda": round(ratio, 3),
            "wanda_ppl": round(wanda["ppl"], 4),
            "rows_compared": len(candidates),
            "measured": row.get("date"),
        }
    return choices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "prune.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "sparsetune" / "prune" / "auto_choices.json")
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown instead")
    p.add_argument("--since", default="", help="only rows dated this or later ('YYYY-MM-DD HH:MM'): one machine")
    args = p.parse_args()
    rows = table_rows(args.results, args.since)
    choices = build_choices(rows)
    if args.markdown:
        print(markdown(rows, choices))
        return
    for target, choice in choices.items():
        print(json.dumps({"target": target, **choice}))
    text = json.dumps(
        {
            "rule": f"lowest ppl with prune time <= {MAX_TIME_VS_WANDA}x Wanda's",
            "since": args.since,
            "choices": choices,
        },
        indent=2,
    )
    if args.check:
        sys.exit(0 if args.out.exists() and args.out.read_text() == text + "\n" else 1)
    args.out.write_text(text + "\n")


def markdown(rows: dict[tuple[str, str, str], dict], choices: dict[str, dict]) -> str:
    """One line per target and method, one column per variant: ppl (prune time / plain Wanda's at that target);
    auto's choice in bold, a time over the limit marked with a dagger, an unmeasured cell as a dash."""
    targets = sorted({t for _, t, _ in rows}, key=lambda t: (":" in t, t))
    lines = ["| target | method | plain | OWL | DSnoT | OWL + DSnoT |", "|---|---|---|---|---|---|"]
    for target in targets:
        wanda = rows.get(("wanda", target, "plain"))
        for method in ("magnitude", "wanda", "sparsegpt", "alps"):
            cells = []
            for variant, (owl, refine) in VARIANTS.items():
                row = rows.get((method, target, variant))
                if row is None:
                    cells.append("-")
                    continue
                cell = f"{row['ppl']:.1f}"
                if wanda is not None:
                    ratio = row["prune_s"] / wanda["prune_s"]
                    cell += f" ({ratio:.2f}x{' †' if ratio > MAX_TIME_VS_WANDA else ''})"
                pick = choices.get(target, {})
                if (pick.get("method"), pick.get("owl"), pick.get("refine")) == (method, owl, refine):
                    cell = f"**{cell}**"
                cells.append(cell)
            if any(c != "-" for c in cells):
                label = target if ":" in target else f"{round(100 * float(target))}%"
                lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
