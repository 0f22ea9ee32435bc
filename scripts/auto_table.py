"""Build sparsetune/prune/auto_choices.json (what `--method auto` picks) from the prune benchmark's table rows.

Rule (issue 18): at each target, the lowest-perplexity row whose prune time stays within 3x plain Wanda's prune time
at that target, measured on the testbed (bench/results/prune.jsonl, `--suite table`, full size). A target without
its plain Wanda row is left out, since the time limit cannot be checked there. Prints one JSON line per target.

    .venv/bin/python scripts/auto_table.py            # rewrite the choices file from bench/results/prune.jsonl
    .venv/bin/python scripts/auto_table.py --check    # exit 1 if the file differs from what the rows give
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsetune.prune.auto import MAX_TIME_VS_WANDA, build_choices, table_rows

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "prune.jsonl")
    p.add_argument("--out", type=Path, default=ROOT / "sparsetune" / "prune" / "auto_choices.json")
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args()
    choices = build_choices(table_rows(args.results))
    for target, choice in choices.items():
        print(json.dumps({"target": target, **choice}))
    text = json.dumps(
        {"rule": f"lowest ppl with prune time <= {MAX_TIME_VS_WANDA}x Wanda's", "choices": choices}, indent=2
    )
    if args.check:
        sys.exit(0 if args.out.exists() and args.out.read_text() == text + "\n" else 1)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
