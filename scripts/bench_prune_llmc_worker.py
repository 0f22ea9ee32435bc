"""llm-compressor side of bench_prune.py. Runs in .venv-bench (llm-compressor pins its own transformers)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import torch  # noqa: E402
from bench_common import Timer, peak_rss_gb, perplexity  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ids", required=True)
    p.add_argument("--method", choices=["wanda", "sparsegpt"], required=True)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    args = p.parse_args()
    wall0 = time.perf_counter()
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from transformers import AutoModelForCausalLM

    ids = load_file(args.ids)
    calib, eval_ids = ids["calib"], ids["eval"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    embed_before = model.get_input_embeddings().weight.detach().clone()
    ds = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    structure = "0:0" if args.pattern == "unstructured" else args.pattern
    sparsity = args.sparsity if args.pattern == "unstructured" else 0.5
    modifier_cls = WandaPruningModifier if args.method == "wanda" else SparseGPTModifier
    modifier = modifier_cls(sparsity=sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])
    with Timer() as t:
        oneshot(
            model=model,
            dataset=ds,
            recipe=[modifier],
            num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1],
            shuffle_calibration_samples=False,
        )
    rss = peak_rss_gb()
    embed_untouched = bool(torch.equal(model.get_input_embeddings().weight.detach(), embed_before))
    ppl = perplexity(model.eval(), eval_ids)
    print(
        json.dumps(
            {
                "prune_s": t.seconds,
                "peak_rss_gb": rss,
                "ppl": ppl,
                "embed_untouched": embed_untouched,
                "wall_s": time.perf_counter() - wall0,
            }
        )
    )


if __name__ == "__main__":
    main()
