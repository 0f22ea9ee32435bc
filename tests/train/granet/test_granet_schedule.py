"""GraNet's schedules against hand-computed values: the cubic sparsity at each update, the update steps, the
cosine-decayed regeneration fraction (also against torch's CosineAnnealingLR, which GraNet's CosineDecay wraps)."""

from __future__ import annotations

import pytest
import torch

from sparsetune.train.granet.schedule import GranetSchedule, keep_count, regrow_count


def schedule(**overrides) -> GranetSchedule:
    base = {"initial_sparsity": 0.5, "final_sparsity": 0.75, "start": 10, "end": 40, "interval": 10, "steps": 100}
    return GranetSchedule(**{**base, **overrides})


def test_cubic_sparsity_at_each_pruning_update():
    s = schedule()
    # n = (40 - 10) / 10 = 3 pruning updates after the first; s_k = 0.75 - 0.25 * (1 - k/3)^3:
    # k=0: 0.5; k=1: 0.75 - 0.25 * 8/27 = 0.675925...; k=2: 0.75 - 0.25 * 1/27 = 0.740740...; k=3: 0.75
    assert s.pruning_updates == 3 and s.last_prune_step == 40
    assert s.sparsity_at(10) == pytest.approx(0.5, abs=1e-12)
    assert s.sparsity_at(20) == pytest.approx(0.6759259259, abs=1e-9)
    assert s.sparsity_at(30) == pytest.approx(0.7407407407, abs=1e-9)
    assert s.sparsity_at(40) == 0.75
    # constant between updates, s_i before the start, s_f after the end
    assert s.sparsity_at(25) == s.sparsity_at(20)
    assert s.sparsity_at(3) == 0.5 and s.sparsity_at(99) == 0.75


def test_update_steps_prune_until_the_end_and_regenerate_after():
    s = schedule()
    assert [t for t in range(100) if s.update_due(t)] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert [t for t in range(100) if s.prunes_at(t)] == [10, 20, 30, 40]
    assert [t for t in range(100) if s.is_final(t)] == [40]


def test_an_end_between_updates_is_reached_at_the_last_update_before_it():
    s = schedule(start=0, end=25)  # updates at 0, 10, 20: n = 2, s_1 = 0.75 - 0.25 / 8 = 0.71875
    assert s.last_prune_step == 20
    assert s.sparsity_at(10) == pytest.approx(0.71875, abs=1e-12)
    assert s.sparsity_at(20) == 0.75
    one = schedule(start=5, end=5)  # a single pruning update goes straight to s_f
    assert one.sparsity_at(5) == 0.75 and one.is_final(5)


def test_regeneration_fraction_decays_by_cosine():
    s = schedule()  # 0.005 + 0.495 * (1 + cos(pi t / 100)) / 2
    assert s.regrow_fraction_at(0) == pytest.approx(0.5)
    assert s.regrow_fraction_at(25) == pytest.approx(0.005 + 0.495 * 0.8535533906, abs=1e-9)  # cos(pi/4) = 0.7071
    assert s.regrow_fraction_at(50) == pytest.approx(0.2525)
    assert s.regrow_fraction_at(100) == pytest.approx(0.005)


def test_regeneration_fraction_matches_torch_cosine_annealing():
    """GraNet's CosineDecay is CosineAnnealingLR(T_max = the run's steps, eta_min = 0.005) over an lr of 0.5."""
    s = schedule()
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(sgd, 100, eta_min=0.005)
    for t in range(1, 100):
        sgd.step()
        cosine.step()
        assert s.regrow_fraction_at(t) == pytest.approx(sgd.param_groups[0]["lr"], abs=1e-9), t


def test_counts():
    assert regrow_count(10, 0.5) == 5
    assert regrow_count(7, 0.3) == 3  # ceil(2.1)
    assert regrow_count(100, 0.005) == 1  # ceil(0.5)
    assert regrow_count(4, 0.0) == 0
    assert keep_count(4096, 0.7) == 4096 - 2867  # int(2867.2) pruned
    assert keep_count(10, 0.7) == 3
