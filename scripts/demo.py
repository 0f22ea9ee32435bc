"""`make demo`: prune the bundled SmolLM2-135M to 50% with Wanda and show what changed, timing every step.

Works with no network: C4 calibration and WikiText-2 perplexity come from the hub, a mirror (SPARSETUNE_DATA_DIR),
or else the samples embedded in the package (one line says so, and the figures are labelled as the sample's).
Sizes are chosen to finish in about a minute on 2 CPU cores: 16 x 256 calibration tokens, perplexity on the
first 8 windows of 512 tokens of the WikiText-2 test split.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"
CALIB_SAMPLES, CALIB_SEQLEN = 16, 256
PPL_SEQLEN, PPL_WINDOWS = 512, 8


def step(name: str, t0: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name}: {now - t0:.1f} s", flush=True)
    return now


def main() -> None:
    start = time.perf_counter()
    from sparsetune.cli.common import setup_logging

    setup_logging()  # the one-line notices (hub offline, embedded sample) and progress lines go to stderr
    from sparsetune import loading
    from sparsetune.prune.api import make_calibration, print_summary, prune_and_report, save_pruned
    from sparsetune.prune.config import PruneConfig

    t0 = step("import torch, transformers and sparsetune", start)
    model, tok = loading.load_model("smollm2")
    t0 = step("load the bundled SmolLM2-135M (the first run converts its GGUF once)", t0)

    cfg = PruneConfig(
        model="smollm2",
        output=str(OUT),
        method="wanda",
        sparsity=0.5,
        calib="c4",
        calib_samples=CALIB_SAMPLES,
        seqlen=CALIB_SEQLEN,
    )
    calib = make_calibration(model, tok, cfg)
    t0 = step(f"calibration data ({calib.source}, {calib.n_samples} x {calib.seqlen} tokens)", t0)

    dense = _perplexity_or_none(model, tok)
    t0 = step("WikiText-2 perplexity before pruning", t0) if dense is not None else t0

    report = prune_and_report(model, tok, cfg, calib)
    t0 = step("prune (Wanda, 50%)", t0)
    pruned = _perplexity_or_none(model, tok)
    t0 = step("WikiText-2 perplexity after pruning", t0) if pruned is not None else t0

    if OUT.exists():
        shutil.rmtree(OUT)
    save_pruned(model, tok, cfg, report, OUT, overwrite=False)
    t0 = step(f"save to {OUT}", t0)
    print_summary(report)
    if dense is not None and pruned is not None:
        print(
            f"[demo] perplexity on {dense['dataset']}, first {dense['windows']} windows of {dense['seqlen']} "
            f"tokens: dense {dense['ppl']:.2f} -> pruned {pruned['ppl']:.2f}",
            flush=True,
        )
    _export_demo(t0)
    step("total", start)


def _perplexity_or_none(model, tok) -> dict | None:
    from sparsetune.evaluate.ppl import perplexity

    try:
        return perplexity(model, tok, source="wikitext2", seqlen=PPL_SEQLEN, limit_windows=PPL_WINDOWS)
    except Exception as err:  # noqa: BLE001 - the demo goes on without perplexity rather than stop
        print(f"[demo] skipping perplexity: {err}")
        return None


def _export_demo(t0: float) -> None:
    demo_export(OUT, ROOT / "demo-out-sparse-bitmask")
    step("export sparse-bitmask and load it back", t0)


def demo_export(pruned_dir: Path, out_dir: Path, fmt: str = "sparse-bitmask") -> dict[str, Any]:
    """Export a pruned dir, load it back, check the weights match, and print the sizes on disk."""
    import torch

    from sparsetune.export import print_size_comparison
    from sparsetune.export.config import ExportConfig
    from sparsetune.export.writer import run_export
    from sparsetune.loading import load_model

    run_export(ExportConfig(model=str(pruned_dir), output=str(out_dir), format=fmt), overwrite=True)
    sparse, _ = load_model(str(out_dir), dtype="float32", device="cpu", need_tokenizer=False)
    dense, _ = load_model(str(pruned_dir), dtype="float32", device="cpu", need_tokenizer=False)
    ref = dense.state_dict()
    same = all(torch.equal(t, ref[k]) for k, t in sparse.state_dict().items())
    print(f"[export] {fmt} loaded back from {out_dir}: weights {'identical' if same else 'DIFFER'}", flush=True)
    return {**print_size_comparison(pruned_dir, out_dir), "identical": same}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
