"""`smet-pretrain --growth ctre / ctre-sim`: CTRE's gradient-free growth by the cosine similarity of neuron
activations (Atashgahi et al., Machine Learning 2022; github.com/zahraatashgahi/CTRE, `compute_cosine_distances` in
code/main.py and `SparseCTREsimOptimizer._get_update_op` in code/sparse_optimizers.py).

Expected values come from an independent numpy float64 computation of |cos| between activation columns."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import run_one_and_two_processes
from helpers import smet_settings as settings
from safetensors.torch import load_file

from sparsetune.train import topology
from sparsetune.train.compact_adamw import SparseAdamW
from sparsetune.train.smet import PretrainRun, run_smet
from sparsetune.train.smet_config import SmetConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def cosine_np(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|cos| between every output column y[:, o] and input column x[:, i] -> (out, in); a zero column scores 0."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xn = np.sqrt(np.maximum((x**2).sum(0), 1e-12))
    yn = np.sqrt(np.maximum((y**2).sum(0), 1e-12))
    return np.abs(y.T @ x) / yn[:, None] / xn[None, :]


def top_open(score: np.ndarray, blocked: np.ndarray, k: int) -> set[int]:
    """The k largest scores outside `blocked` (flat positions), checking that the k-th is clear of the next."""
    s = np.where(blocked, -np.inf, score.reshape(-1))
    order = np.argsort(-s, kind="stable")
    assert s[order[k - 1]] - s[order[k]] > 1e-6, "a near-tie at the boundary would make this test meaningless"
    return set(order[:k].tolist())


def test_grow_cosine_on_a_hand_made_batch():
    # 5 tokens; inputs x0..x3 (x3 never fires); outputs y0 = x2, y1 = -x0 (|cos| = 1), y2 mixes x0 and x1.
    x = torch.tensor(
        [[1.0, 0.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    )
    y = torch.stack([x[:, 2], -x[:, 0], torch.tensor([1.0, 2.0, 0.0, 1.0, 1.0])], dim=1)
    # By hand, |cos(y_o, x_i)| as an (out, in) table, position o * 4 + i:
    #   y0 = x2:  x0 1/sqrt(6) = 0.408, x1 1/sqrt(6) = 0.408, x2 1, x3 0
    #   y1 = -x0: x0 1, x1 0, x2 1/sqrt(6) = 0.408, x3 0
    #   y2:       x0 2/sqrt(14) = 0.535, x1 3/sqrt(14) = 0.802, x2 3/sqrt(21) = 0.655, x3 0
    blocked = torch.zeros(12, dtype=torch.bool)
    blocked[2] = True  # (y0, x2) is active already: never grown again
    picks = topology.grow_cosine(x, y, 3, blocked)
    assert set(picks.tolist()) == {4, 9, 10}  # (y1, x0) = 1, (y2, x1) = 0.802, (y2, x2) = 0.655
    one_row_at_a_time = topology.grow_cosine(x, y, 3, blocked, chunk_elements=4)
    assert set(one_row_at_a_time.tolist()) == {4, 9, 10}
    assert set(topology.grow_cosine(x, y, 3, blocked).tolist()) == top_open(
        cosine_np(x.numpy(), y.numpy()), blocked.numpy(), 3
    )


def test_grow_cosine_matches_numpy_on_a_random_batch():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(40, 24, generator=g).relu(), torch.randn(40, 16, generator=g)
    blocked = torch.rand(16 * 24, generator=g) < 0.4
    expected = top_open(cosine_np(x.numpy(), y.numpy()), blocked.numpy(), 50)
    for chunk in (1 << 22, 24 * 3, 1):  # whole, three rows, one row per chunk
        assert set(topology.grow_cosine(x, y, 50, blocked, chunk_elements=chunk).tolist()) == expected


def _hand_made_activations(run: PretrainRun, tokens: int = 24, seed: int = 11) -> dict:
    rng = np.random.default_rng(seed)
    acts = {}
    for name, w in run.sparse.items():
        out_f, in_f = w.param.shape
        acts[name] = (
            torch.from_numpy(rng.standard_normal((tokens, in_f)).astype(np.float32)),
            torch.from_numpy(rng.standard_normal((tokens, out_f)).astype(np.float32)),
        )
    return acts


@pytest.mark.parametrize("growth", ["ctre", "ctre-sim"])
def test_a_ctre_update_grows_exactly_the_expected_connections(corpus, tmp_path, growth):
    tok_dir, text = corpus
    run = PretrainRun(SmetConfig(**settings(tok_dir, text, tmp_path / "o", growth=growth)), show_progress=False)
    run.setup()
    try:
        acts = _hand_made_activations(run)
        expected_acts = {n: (x.numpy(), y.numpy()) for n, (x, y) in acts.items()}
        before = {}
        for name, w in run.sparse.items():
            active = w.active.long().numpy()
            before[name] = (active, w.param.detach().reshape(-1).numpy()[active].copy(), w.param.numel())
        fraction = 0.3
        stats = run.method._swap(3, fraction, None, acts)
        random_total = 0
        for name, w in run.sparse.items():
            active, values, numel = before[name]
            k = min(int(fraction * active.size), numel - active.size)
            dropped = set(active[np.argsort(np.abs(values), kind="stable")[:k]].tolist())
            kept = set(active.tolist()) - dropped
            score = cosine_np(*expected_acts[name])
            now = set(w.active.long().tolist())
            assert len(now) == active.size and kept <= now
            grown = now - kept
            if growth == "ctre":  # the k best among the positions inactive before the update
                blocked = np.zeros(numel, dtype=bool)
                blocked[active] = True
                assert grown == top_open(score, blocked, k)
            else:  # the k best among all but the kept; picks on just-dropped positions go to random ones instead
                blocked = np.zeros(numel, dtype=bool)
                blocked[list(kept)] = True
                picks = top_open(score, blocked, k)
                readded = picks & dropped
                assert picks - dropped <= grown
                explored = grown - (picks - dropped)
                assert len(explored) == len(readded) and not explored & set(active.tolist())
                random_total += len(readded)
        if growth == "ctre-sim":
            assert stats["grown_at_random"] == random_total > 0
    finally:
        run.cleanup()


def test_ctre_trains_without_dense_gradients(corpus, tmp_path, monkeypatch):
    def refuse(self):
        raise AssertionError("CTRE growth must not fill dense gradients")

    monkeypatch.setattr(SparseAdamW, "dense_grads", refuse)
    tok_dir, text = corpus
    report = run_smet(SmetConfig(**settings(tok_dir, text, tmp_path / "out", growth="ctre-sim")), show_progress=False)
    s = report["summary"]
    assert s["topology_updates"] == 3 and s["itop_rate"] > 0.5
    assert all(t["grown"] == t["dropped"] > 0 for t in report["topology_history"])
    assert sum(t["grown_at_random"] for t in report["topology_history"]) > 0


@pytest.mark.dist
def test_ctre_two_processes_match_one(corpus, tmp_path):
    tok_dir, text = corpus
    s = settings(tok_dir, text, tmp_path / "unused", steps=8, growth="ctre-sim")
    del s["output"]
    common = ["smet-pretrain", "--json"] + [a for k, v in s.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    outputs = run_one_and_two_processes(common, tmp_path)  # each update's index digest matched across the ranks
    reports = [json.loads((d / "sparsity_report.json").read_text()) for d in outputs]
    assert [t["grown_at_random"] for t in reports[0]["topology_history"]] == [
        t["grown_at_random"] for t in reports[1]["topology_history"]
    ]
    a, b = (load_file(str(d / "model.safetensors")) for d in outputs)
    for name in a:  # the halves of a batch on two ranks, all-reduced, choose what the whole batch does on one
        assert torch.equal(a[name] != 0, b[name] != 0), f"{name}: masks differ"
