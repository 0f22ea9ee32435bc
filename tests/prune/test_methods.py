"""Every method x {50%, 2:4} x {llama, mistral, qwen2} x {sequential, two-pass}: exact sparsity and pattern."""

from __future__ import annotations

import pytest
import torch
from helpers import block_linears as _block_linears
from helpers import make_tiny_model
from helpers import random_calibration as _calib

from sparsetune.masks import NMPattern, nm_violations
from sparsetune.prune import sparsegpt, wanda
from sparsetune.prune.api import prune_and_report
from sparsetune.prune.config import PruneConfig


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [{"sparsity": 0.5}, {"pattern": "2:4"}])
@pytest.mark.parametrize("sequential", [True, False])
def test_exact_sparsity_and_pattern(family, method, target, sequential, tiny_tokenizer):
    model = make_tiny_model(family)
    embed_before = model.get_input_embeddings().weight.clone()
    cfg = PruneConfig(model="x", method=method, sequential=sequential, **target)
    report = prune_and_report(model, tiny_tokenizer, cfg, _calib(), show_progress=False)
    linears = _block_linears(model)
    assert report["modules_pruned"] == len(linears) == 14
    for name, mod in linears.items():
        w = mod.weight
        if "pattern" in target:
            assert nm_violations(w, NMPattern(2, 4)) == 0, name
            assert int((w == 0).sum()) == w.numel() // 2, name
        elif method == "magnitude":  # one threshold per matrix
            assert int((w == 0).sum()) == w.numel() // 2, name
        else:  # Wanda compares within rows; SparseGPT within 128-column blocks of the whole matrix
            zeros_per_row = (w == 0).sum(dim=1)
            if method == "wanda":
                assert torch.all(zeros_per_row == w.shape[1] // 2), name
            else:
                assert int(zeros_per_row.sum()) == w.numel() // 2, name
        # pruned weights are +0.0: sparse formats store no sign, so a -0.0 would not survive an export round trip
        assert int(((w == 0) & torch.signbit(w)).sum()) == 0, name
    assert report["global_sparsity"] == pytest.approx(0.5)
    assert torch.equal(model.get_input_embeddings().weight, embed_before)


def test_wanda_hand_computed_example():
    # Two output rows, four inputs. Column norms^2 = [4, 1, 0.25, 9] -> norms [2, 1, 0.5, 3].
    weight = torch.tensor([[1.0, -4.0, 8.0, 0.5], [-2.0, 1.0, 1.0, 1.0]])
    x = torch.tensor([[2.0, 1.0, 0.5, 3.0]])  # one token
    stats = wanda.init_stats(4, torch.device("cpu"))
    wanda.accumulate(stats, x)
    assert torch.allclose(stats, torch.tensor([4.0, 1.0, 0.25, 9.0]))
    # scores row0 = [2, 4, 4, 1.5] -> prune cols 3, 0; row1 = [4, 1, 0.5, 3] -> prune cols 2, 1.
    (pruned,) = wanda.prune_group([weight], stats, 0.5)
    assert torch.equal(pruned, torch.tensor([[0.0, -4.0, 8.0, 0.0], [-2.0, 0.0, 0.0, 1.0]]))
    # 2:4 on one group of 4 gives the same answer here.
    (pruned_nm,) = wanda.prune_group([weight], stats, NMPattern(2, 4))
    assert torch.equal(pruned_nm, pruned)


def _reconstruction_error(method, weight, x, target):
    stats = method.init_stats(weight.shape[1], torch.device("cpu"))
    method.accumulate(stats, x)
    (pruned,) = method.prune_group([weight], stats, target)
    return float(torch.linalg.norm(x @ weight.T - x @ pruned.T))


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude(target):
    from sparsetune.prune import magnitude

    g = torch.Generator().manual_seed(0)
    # Correlated inputs with uneven column scales, as in real activations.
    mix = torch.randn(64, 64, generator=g) * torch.linspace(0.1, 3.0, 64)
    x = torch.randn(512, 64, generator=g) @ mix
    weight = torch.randn(48, 64, generator=g)
    err = {m.__name__: _reconstruction_error(m, weight, x, target) for m in (magnitude, wanda, sparsegpt)}
    assert err["sparsetune.prune.sparsegpt"] < err["sparsetune.prune.wanda"]
    assert err["sparsetune.prune.sparsegpt"] < err["sparsetune.prune.magnitude"]


def test_sparsegpt_stacked_group_keeps_per_matrix_sparsity():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 32, generator=g)
    h = sparsegpt.init_stats(32, torch.device("cpu"))
    sparsegpt.accumulate(h, x)
    ws = [torch.randn(16, 32, generator=g) * 10, torch.randn(8, 32, generator=g) * 0.01]
    out = sparsegpt.prune_group(ws, h, 0.5)
    for w in out:
        assert int((w == 0).sum()) == w.numel() // 2  # the small-valued matrix is not pruned away entirely


def test_sparsegpt_raises_dampening_when_cholesky_fails(caplog):
    h = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # indefinite: needs several x10 dampening steps
    with caplog.at_level("WARNING"):
        factor = sparsegpt.inverse_hessian_factor(h, 0.01)
    assert torch.isfinite(factor).all()
    assert "retrying" in caplog.text
    assert not torch.equal(factor, torch.eye(2))


def test_sparsegpt_refuses_hopeless_hessian():
    from sparsetune.errors import SparsetuneError

    h = -torch.eye(3) * 1e6 + torch.ones(3, 3)
    h.fill_diagonal_(1e-9)
    with pytest.raises(SparsetuneError, match="percdamp"):
        sparsegpt.inverse_hessian_factor(h, 0.01)
