"""Benchmark the perplexity loop of `sparsetune eval` against a bare HF forward loop on the same windows.

Target (issue 4): the sparsetune loop (`perplexity_on_ids`, which also computes the loss) reaches at least
0.95x the tokens/s of a bare `model(input_ids).logits` loop that computes nothing else. Both run in this
process on the same WikiText-2 windows, interleaved A/B/A/B so a busy machine slows both alike; the ratio
of the best rep of each is the headline. One JSON line per measurement.

    .venv/bin/python scripts/bench_eval.py            # bundled SmolLM2-135M, 8 windows of 2048, 3 reps
    .venv/bin/python scripts/bench_eval.py --quick    # 2 windows of 256, 1 rep (checks the script runs)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


@torch.inference_mode()
def bare_loop(model, windows: torch.Tensor, batch_size: int) -> float:
    """Seconds for a plain HF forward over every window (logits only, no loss)."""
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False).logits  # noqa: B018 - the work is the point
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting: check the script runs")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("SPARSETUNE_DATA_DIR"))
    args = parser.parse_args()
    if args.quick:
        args.seqlen, args.windows, args.reps = 256, 2, 1

    from sparsetune.evaluate.ppl import eval_token_ids, perplexity_on_ids
    from sparsetune.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype="float32", device="cpu")
    ids = eval_token_ids(tokenizer, "wikitext2", args.data_dir)
    n = args.windows * args.seqlen
    windows = ids[:n].view(args.windows, args.seqlen)
    common = {"model": args.model, "seqlen": args.seqlen, "windows": args.windows, "batch_size": args.batch_size}
    perplexity_on_ids(model, ids[: 2 * args.seqlen], args.seqlen, limit_windows=1)  # warm-up
    best = {"bare": float("inf"), "sparsetune": float("inf")}
    for rep in range(args.reps):
        bare_s = bare_loop(model, windows, args.batch_size)
        t0 = time.perf_counter()
        result = perplexity_on_ids(model, ids, args.seqlen, limit_windows=args.windows, batch_size=args.batch_size)
        ours_s = time.perf_counter() - t0
        best["bare"] = min(best["bare"], bare_s)
        best["sparsetune"] = min(best["sparsetune"], ours_s)
        for name, secs in (("bare_hf_forward", bare_s), ("sparsetune_ppl", ours_s)):
            print(
                json.dumps(
                    {**common, "loop": name, "rep": rep, "seconds": round(secs, 3), "tokens_per_s": round(n / secs, 1)}
                )
            )
    ratio = best["bare"] / best["sparsetune"]
    print(
        json.dumps(
            {
                **common,
                "measurement": "ppl_loop_vs_bare_forward",
                "bare_tokens_per_s": round(n / best["bare"], 1),
                "sparsetune_tokens_per_s": round(n / best["sparsetune"], 1),
                "ratio": round(ratio, 3),
                "target": 0.95,
                "meets_target": ratio >= 0.95,
                "ppl": round(result["ppl"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
