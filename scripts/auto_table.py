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

from sparsetune.prune.auto import MAX_TIME_VS_WANDA, VARIANTS, build_choices, table_rows

ROOT = Path(__file__).resolve().parents[1]


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
