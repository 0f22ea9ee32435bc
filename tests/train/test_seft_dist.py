"""Two gloo processes (torchrun) give the same final weights, entries and reselections as one process with the same
global batch (the window statistics are all-reduced, so both choose the same entries and re-prune)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights, make_pruned, run_one_and_two_processes, write_text
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.dist
@pytest.mark.parametrize("method", ["seft", "masked-ft"])
def test_two_processes_match_one(tmp_path, method):
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    common = ["seft", str(pruned), "--data", str(data), "--seqlen", "32", "--batch-size", "4", "--steps", "7",
              "--lr", "5e-3", "--delta-rank", "4", "--reselect-every", "3", "--select-window", "2",
              *(["--reactivate"] if method == "seft" else []),
              "--method", method]  # fmt: skip
    one, two = run_one_and_two_processes(common, tmp_path)
    a, b = load_weights(one), load_weights(two)
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), (
            f"{name}: max diff {(a[name] - b[name]).abs().max()}"
        )
    pruned_w = load_weights(pruned)
    assert any(not torch.equal(pruned_w[n], a[n]) for n in a)  # training moved the weights
    if method == "seft":
        adapter_a = load_file(str(one / "seft_adapter.safetensors"))
        adapter_b = load_file(str(two / "seft_adapter.safetensors"))
        for key in adapter_a:  # the same entry positions (slot order may differ on near-ties) and re-pruned positions
            if key.endswith((".indices", ".repruned")):
                assert torch.equal(adapter_a[key].sort().values, adapter_b[key].sort().values), key
        log_a = (one / "train_log.jsonl").read_text().splitlines()
        log_b = (two / "train_log.jsonl").read_text().splitlines()
        topology = [[json.loads(r).get("topology") for r in log] for log in (log_a, log_b)]
        assert topology[0] == topology[1] and sum(t is not None for t in topology[0]) == 2
