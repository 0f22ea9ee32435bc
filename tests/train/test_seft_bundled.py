"""SEFT on the real bundled SmolLM2 (slow): one reselection on a magnitude-pruned 2:4 copy keeps 2:4 exact."""

from __future__ import annotations

import json

import pytest
from helpers import load_weights, write_text

from sparsetune.masks import NMPattern, nm_violations

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_seft_on_smollm2_keeps_the_pattern(tmp_path, bundled_model_dir):
    from sparsetune.prune.api import run_prune
    from sparsetune.prune.config import PruneConfig
    from sparsetune.train.seft import run_seft
    from sparsetune.train.seft_config import SeftConfig

    pruned = tmp_path / "pruned"
    run_prune(
        PruneConfig(model=str(bundled_model_dir), output=str(pruned), method="magnitude", pattern="2:4"),
        show_progress=False,
    )
    cfg = SeftConfig(
        model=str(pruned),
        output=str(tmp_path / "out"),
        data=str(write_text(tmp_path / "t.txt", n_docs=4)),
        seqlen=64,
        batch_size=2,
        steps=2,
        reselect_every=1,
        select_window=1,
        reactivate=True,
        lr=1e-4,
    )
    report = run_seft(cfg, show_progress=False)
    history = report["finetune_history"][-1]
    # rank 16 on the 7 Linears of 30 blocks (576 hidden, 192 kv, 1536 MLP): 16 * 30 * (2 * 1152 + 2 * 768 + 3 * 2112)
    assert history["trainable_params"] == 4_884_480
    totals = history["topology_totals"]
    # the first reselection replaces every entry that has a place to go: under 2:4 a few groups are full
    assert totals["dropped"] == totals["grown"] and 0.99 * 4_884_480 <= totals["grown"] <= 4_884_480
    assert totals["reactivated"] > 0 and totals["repruned"] > 0
    # the input's exact sparsity: 2:4, less a few weights that were already 0 in the dense model
    assert history["sparsity_after"] == history["sparsity_before"] == pytest.approx(0.5, abs=1e-5)
    weights = load_weights(tmp_path / "out")
    layers = {k: v for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight")}
    assert len(layers) == 30 * 7
    assert all(nm_violations(w, NMPattern(2, 4)) == 0 for w in layers.values())
    assert json.loads((tmp_path / "out" / "sparsity_report.json").read_text())["pattern"] == "2:4"
