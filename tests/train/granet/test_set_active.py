"""Changing a sparse weight's active set inside SparseAdamW: kept entries keep their value and Adam state, removed
ones become 0, grown ones start at 0 with zero moments and a fresh step counter."""

from __future__ import annotations

import torch
from torch import nn

from sparsetune.train.compact_adamw import SparseAdamW, SparseWeight
from sparsetune.train.granet.method import set_active


def test_set_active_keeps_moves_and_grows():
    param = nn.Parameter(torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]))
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])  # active 0, 2, 4, 5
    weight = SparseWeight.from_mask("w", param, mask)
    opt = SparseAdamW([weight], [])
    for group in opt.param_groups:
        group["lr"] = 0.1
    state = opt.sparse_state["w"]
    state.grad = torch.tensor([1.0, 2.0, 3.0, 4.0])  # compact, in slot order 0, 2, 4, 5
    opt.step()
    before = param.detach().clone()
    m, v = (t.clone() for t in state.moments.load())

    # keep 0 and 5, remove 2 and 4, grow 3 and 7
    new = torch.tensor([True, False, False, True, False, True, False, True])
    set_active(opt, "w", new)

    assert weight.active.tolist() == [0, 5, 3, 7]  # kept in slot order, then the grown ones ascending
    flat = param.detach().view(-1)
    assert flat[0] == before.view(-1)[0] and flat[5] == before.view(-1)[5]
    assert flat[[2, 4, 3, 7]].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert flat[[1, 6]].tolist() == [0.0, 0.0]
    m2, v2 = state.moments.load()
    assert torch.equal(m2, torch.stack([m[0], m[3], torch.tensor(0.0), torch.tensor(0.0)]))
    assert torch.equal(v2, torch.stack([v[0], v[3], torch.tensor(0.0), torch.tensor(0.0)]))
    assert state.cohort_sizes == [2, 2] and state.cohort_births == [0, 1]
    assert state.local_steps(2, param.device).tolist() == [2.0, 2.0, 1.0, 1.0]  # bias correction starts afresh

    # the next step moves the grown entries from 0 and leaves the inactive ones at 0
    state.grad = torch.tensor([0.5, 0.5, 0.5, 0.5])
    opt.step()
    flat = param.detach().view(-1)
    assert flat[3] != 0 and flat[7] != 0
    assert flat[[1, 2, 4, 6]].tolist() == [0.0, 0.0, 0.0, 0.0]
