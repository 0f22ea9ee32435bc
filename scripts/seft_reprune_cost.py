"""What SEFT's reactivation and re-prune cost in one trained run: WikiText-2 ppl of variants of its adapter.

Takes a run made with `sparsetune seft --reactivate ... -o OUT` and the pruned model it started from, and applies
the adapter's entries to that base in several ways (one JSON line each):

    as_trained        base, re-pruned weights zeroed, plus every delta (the merged model of the run)
    no_reprune        every delta, re-pruned weights kept at their input values (more non-zeros than the input)
    no_reactivated    only the deltas on the input's non-zeros, nothing re-pruned (the input's zeros exactly)
    score=NAME        every delta, the same number of weights per module re-pruned as in the run, chosen by NAME
                      among the base non-zeros without an entry (lowest first): fisher_exact (theta^2 * the
                      per-token sum of g^2), fisher_rank1 (its row x column estimate), wanda (theta^2 * E[x^2]),
                      magnitude (|theta|). Statistics from --stat-batches batches of 8 x 256 tokens taken from the
                      end of the C4 sample, on the trained model without re-prune.

    .venv/bin/python scripts/seft_reprune_cost.py bench/cache/seft/full/smollm2-wanda50-calib32x512 \\
        bench/cache/seft/full/quality-wanda50-seft/seft_adapter.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_common import perplexity, wikitext_eval_ids  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def token_statistics(model, modules: list[str], batches: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Per module: sum over tokens of x^2 (per input), of g_out^2 (per output) and of g_out^2 x^2 (per weight)."""
    stats: dict[str, dict[str, torch.Tensor]] = {}
    named = dict(model.named_modules())

    def hook(name: str):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, module.in_features)
            s = stats.setdefault(name, {"x2": 0, "d2": 0, "fisher": 0})  # type: ignore[dict-item]
            s["x2"] = s["x2"] + x.square().sum(0)

            def grad_hook(grad):
                d = grad.detach().reshape(-1, module.out_features)
                s["d2"] = s["d2"] + d.square().sum(0)
                s["fisher"] = s["fisher"] + d.square().t() @ x.square()

            output.register_hook(grad_hook)

        return forward_hook

    handles = [named[m].register_forward_hook(hook(m)) for m in modules]
    for p in model.parameters():
        p.requires_grad_(False)
    for m in modules:
        named[m].weight.requires_grad_(True)  # so each output has a gradient; the weights' own .grad is dropped
    for batch in batches:
        model(input_ids=batch, labels=batch).loss.backward()
        model.zero_grad(set_to_none=True)
    for h in handles:
        h.remove()
    for m in modules:
        named[m].weight.requires_grad_(False)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="the pruned model dir the run started from")
    parser.add_argument("adapter", help="the run's seft_adapter.safetensors")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--stat-batches", type=int, default=4)
    args = parser.parse_args()
    data = Path(os.environ.get("SPARSETUNE_DATA_DIR", SHARED))

    from safetensors.torch import load_file

    from sparsetune import loading

    adapter = load_file(args.adapter)
    model, tok = loading.load_model(args.base, dtype="float32", device="cpu")
    eval_ids = wikitext_eval_ids(tok, str(data / "wikitext-2-raw" / "wiki.test.raw"), args.eval_windows)
    docs = [json.loads(line)["text"] for line in (data / "c4" / "c4_sample.jsonl").read_text().splitlines() if line]
    c4 = tok("\n\n".join(docs[-400:]), verbose=False)["input_ids"][: args.stat_batches * 8 * 256]
    stat_batches = torch.tensor(c4).view(args.stat_batches, 8, 256)

    modules = sorted({key.rsplit(".", 1)[0] for key in adapter})
    weights = {m: model.get_submodule(m).weight for m in modules}
    inputs = {m: w.detach().clone() for m, w in weights.items()}
    entries = {m: adapter[f"{m}.indices"].long() for m in modules}
    deltas = {m: adapter[f"{m}.deltas"].float() for m in modules}
    reactivated = {m: inputs[m].view(-1)[entries[m]] == 0 for m in modules}

    @torch.no_grad()
    def build(repruned: dict[str, torch.Tensor] | None, keep_reactivated: bool = True) -> None:
        for m in modules:
            flat = weights[m].view(-1)
            flat.copy_(inputs[m].view(-1))
            if repruned is not None:
                flat[repruned[m]] = 0
            keep = slice(None) if keep_reactivated else ~reactivated[m]
            flat[entries[m][keep]] += deltas[m][keep]

    def emit(variant: str) -> None:
        row = {"variant": variant, "wikitext2_ppl": round(perplexity(model, eval_ids), 4)}
        print(json.dumps(row), flush=True)

    share = sum(int(r.sum()) for r in reactivated.values()) / sum(r.numel() for r in reactivated.values())
    counts = {m: adapter[f"{m}.repruned"].numel() for m in modules}
    print(json.dumps({"reactivated_share": round(share, 4), "repruned": sum(counts.values())}), flush=True)
    build({m: adapter[f"{m}.repruned"].long() for m in modules})
    emit("as_trained")
    build(None)
    emit("no_reprune")
    build(None, keep_reactivated=False)
    emit("no_reactivated")

    build(None)
    stats = token_statistics(model, modules, stat_batches)
    scores = {
        "fisher_exact": lambda m, w2: w2 * stats[m]["fisher"],
        "fisher_rank1": lambda m, w2: w2 * torch.outer(stats[m]["d2"], stats[m]["x2"]),
        "wanda": lambda m, w2: w2 * stats[m]["x2"][None, :],
        "magnitude": lambda m, w2: w2,
    }
    for name, score in scores.items():
        chosen = {}
        for m in modules:
            keys = score(m, inputs[m].square()).reshape(-1).clone()
            keys[inputs[m].reshape(-1) == 0] = torch.inf  # only base non-zeros ...
            keys[entries[m]] = torch.inf  # ... without an entry can be re-pruned
            chosen[m] = torch.topk(keys, counts[m], largest=False).indices
        build(chosen)
        emit(f"score={name}")


if __name__ == "__main__":
    main()
