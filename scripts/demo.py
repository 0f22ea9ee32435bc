"""`make demo`: prune the bundled SmolLM2-135M to 50% with Wanda and show what changed, timing every step."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo-out"


def step(name: str, t0: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name}: {now - t0:.1f} s", flush=True)
    return now


def main() -> None:
    from sparsetune import models
    from sparsetune.errors import SparsetuneError
    from sparsetune.prune.api import make_calibration, print_summary, prune_model, save_pruned
    from sparsetune.prune.config import PruneConfig

    t0 = time.perf_counter()
    model, tok = models.load_model("smollm2")
    t0 = step("load the bundled SmolLM2-135M (the first run converts its GGUF once)", t0)

    cfg = PruneConfig(
        model="smollm2", output=str(OUT), method="wanda", sparsity=0.5, calib="c4", calib_samples=32, seqlen=512
    )
    try:
        calib = make_calibration(model, tok, cfg)
    except SparsetuneError as err:  # no hub and no mirror: calibrate on the model's own samples
        print(f"[demo] c4 unavailable ({err}); falling back to self-generated calibration")
        cfg = cfg.model_copy(update={"calib": "self", "calib_samples": 16, "seqlen": 256})
        calib = make_calibration(model, tok, cfg)
    t0 = step(f"calibration data ({cfg.calib}, {cfg.calib_samples} x {cfg.seqlen} tokens)", t0)

    ppl = _perplexity_or_none(model, tok)
    t0 = step("WikiText-2 perplexity before pruning", t0) if ppl is not None else t0

    report = prune_model(model, tok, cfg, calib)
    t0 = step("prune (Wanda, 50%)", t0)
    ppl_after = _perplexity_or_none(model, tok)
    t0 = step("WikiText-2 perplexity after pruning", t0) if ppl_after is not None else t0

    if OUT.exists():
        shutil.rmtree(OUT)
    save_pruned(model, tok, cfg, report, OUT, overwrite=False)
    t0 = step(f"save to {OUT}", t0)
    print_summary(report)
    if ppl is not None and ppl_after is not None:
        print(f"[demo] WikiText-2 perplexity (first windows): dense {ppl:.2f} -> pruned {ppl_after:.2f}")
    _export_demo(t0)


def _perplexity_or_none(model, tok) -> float | None:
    try:
        from sparsetune.evaluate.ppl import perplexity
    except ImportError:
        return None
    try:
        return float(perplexity(model, tok, source="wikitext2", seqlen=512, limit_windows=8)["ppl"])
    except Exception as err:  # noqa: BLE001 - the demo goes on without perplexity when no data is reachable
        print(f"[demo] skipping perplexity: {err}")
        return None


def _export_demo(t0: float) -> None:
    try:
        from sparsetune.export import demo_export
    except ImportError:
        return
    demo_export(OUT, ROOT / "demo-out-sparse-bitmask")
    step("export sparse-bitmask and load it back", t0)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
