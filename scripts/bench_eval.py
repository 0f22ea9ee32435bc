"""Benchmark the perplexity loop of `sparsetune eval` against a bare HF forward loop on the same windows.

Target (issue 4): the sparsetune loop (`perplexity_on_ids`, which also computes the loss) reaches at least
0.95x the tokens/s of a bare `model(input_ids).logits` loop that computes nothing else. Both run in this
process on the same WikiText-2 windows, interleaved A/B/A/B so a busy machine slows both alike; the ratio
of the best rep of each is the headline. One JSON line per measurement.

    .venv/bin/python scripts/bench_eval.py            # bundled SmolLM2-135M, 8 windows of 2048, 3 reps
    .venv/bin/python scripts/bench_eval.py --quick    # 2 windows of 256, 1 rep (checks the script runs)

`--ppl-dir DIR` instead measures the memory of perplexity on a model dir: N windows of T tokens with the weights
streamed block by block (`--in-memory`: the whole model loaded, for comparison), one JSON line with the whole
process's peak RSS and the wall time. Tokens come from WikiText-2 with the dir's tokenizer, or are random ids
(seed 0) when the dir has none (random benchmark checkpoints).

    .venv/bin/python scripts/bench_eval.py --ppl-dir /data/llama-13b-random --windows 4 --seqlen 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_T0 = time.perf_counter()

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import peak_rss_gb  # noqa: E402


@torch.inference_mode()
def bare_loop(model, windows: torch.Tensor, batch_size: int) -> float:
    """Seconds for a plain HF forward over every window (logits only, no loss)."""
    t0 = time.perf_counter()
    for i in range(0, windows.shape[0], batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False).logits  # noqa: B018 - the work is the point
    return time.perf_counter() - t0


def ppl_memory(args: argparse.Namespace) -> None:
    """One JSON line: peak RSS of this whole process and wall time of one perplexity run on `args.ppl_dir`."""
    from sparsetune import devices, loading
    from sparsetune.evaluate.ppl import eval_token_ids, perplexity_on_ids, streamed_perplexity_on_ids
    from sparsetune.streaming import StreamedModel

    device = devices.resolve_device(args.device)
    n = args.windows * args.seqlen
    if any(os.path.exists(os.path.join(args.ppl_dir, f)) for f in loading.TOKENIZER_FILES):
        ids, tokens = eval_token_ids(loading.load_tokenizer(args.ppl_dir), "wikitext2", args.data_dir)[:n], "wikitext2"
    else:
        vocab = int(loading.read_config(args.ppl_dir).get("vocab_size") or 32000)
        ids, tokens = torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)), "random"
    t0 = time.perf_counter()
    if args.in_memory:
        model, _ = loading.load_model(args.ppl_dir, dtype=args.dtype, device=str(device), need_tokenizer=False)
        load_s = time.perf_counter() - t0
        result = perplexity_on_ids(model, ids, args.seqlen, limit_windows=args.windows, batch_size=args.batch_size)
    else:
        streamed = StreamedModel(args.ppl_dir, devices.resolve_dtype(args.dtype, device))
        load_s = time.perf_counter() - t0
        result = streamed_perplexity_on_ids(
            streamed, ids, args.seqlen, limit_windows=args.windows, batch_size=args.batch_size, device=device
        )
    wall = time.perf_counter() - t0
    from sparsetune.streaming import CheckpointFiles

    print(
        json.dumps(
            {
                "measurement": "ppl_memory",
                "model": args.ppl_dir,
                "checkpoint_gb": round(CheckpointFiles(args.ppl_dir).nbytes() / 1e9, 3),
                "weights": "in-memory" if args.in_memory else "streamed",
                "dtype": args.dtype,
                "device": str(device),
                "windows": result["windows"],
                "seqlen": args.seqlen,
                "batch_size": args.batch_size,
                "tokens": tokens,
                "ppl": round(result["ppl"], 4),
                "nll": result["nll"],
                "peak_rss_gb": round(peak_rss_gb(), 3),
                "setup_s": round(load_s, 2),
                "wall_s": round(wall, 2),
                "process_s": round(time.perf_counter() - _T0, 2),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting: check the script runs")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--data-dir", default=os.environ.get("SPARSETUNE_DATA_DIR"))
    parser.add_argument("--ppl-dir", help="measure peak RSS and wall time of perplexity on this HF model dir")
    parser.add_argument("--in-memory", action="store_true", help="with --ppl-dir: load the whole model instead")
    parser.add_argument("--dtype", default="auto", help="with --ppl-dir: auto (float32 on CPU), bfloat16, ...")
    parser.add_argument("--device", default="cpu", help="with --ppl-dir: cpu, cuda, auto")
    args = parser.parse_args()
    if args.ppl_dir:
        ppl_memory(args)
        return
    if args.quick:
        args.seqlen, args.windows, args.reps = 256, 2, 1

    from sparsetune.evaluate.ppl import eval_token_ids, perplexity_on_ids
    from sparsetune.loading import load_model

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
