"""Two gloo processes (torchrun) running GraNet, distilling from the dense model, give the masks and weights of one
process with the same global batch: every mask update reads all-reduced gradients and input norms and breaks ties by
position, and each rank's teacher sees that rank's share of the batch."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import load_weights, make_pruned, run_one_and_two_processes, write_text

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.dist
def test_two_processes_match_one(tmp_path):
    pruned = make_pruned(tmp_path)
    data = write_text(tmp_path / "t.txt")
    common = ["seft", str(pruned), "--data", str(data), "--seqlen", "32", "--batch-size", "4", "--steps", "7",
              "--lr", "1e-3", "--method", "granet", "--target-sparsity", "0.7", "--granet-interval", "3",
              "--granet-end", "6", "--granet-score", "wanda", "--distill-loss", "kl"]  # fmt: skip
    outputs = run_one_and_two_processes(common, tmp_path)
    a, b = (load_weights(d) for d in outputs)
    decoder = [n for n in a if ".layers." in n and n.endswith("proj.weight")]
    for weights in (a, b):
        for n in decoder:
            assert int((weights[n] == 0).sum()) == int(weights[n].numel() * 0.7), n
    for name in a:
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=0), name
    logs = [(d / "train_log.jsonl").read_text().splitlines() for d in outputs]
    topology = [[json.loads(r).get("topology") for r in log] for log in logs]
    assert topology[0] == topology[1] and sum(t is not None for t in topology[0]) == 2
