"""Sparse-delta budget and settings: exact totals, proportional shares, one-line errors."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from sparsetune.errors import SparsetuneError
from sparsetune.train.sparse_delta.budget import lora_count, module_budgets, split_proportional
from sparsetune.train.sparse_delta.config import DeltaSettings

SHAPES = {"a": (8, 16), "b": (16, 8), "c": (4, 4)}  # numel 128, 128, 16


def test_lora_count_is_rank_times_in_plus_out():
    assert lora_count(SHAPES, 2) == 2 * (24 + 24 + 8)


def test_rank_budget_split_proportional_with_largest_remainder():
    # total 112 over sizes 128, 128, 16 (sum 272): quotas 52.71, 52.71, 6.59 -> floors 52, 52, 6 (110);
    # remainders 112*128 % 272 = 192 (a, b) beat 112*16 % 272 = 160 (c): the 2 left go to a and b
    shares = module_budgets(SHAPES, delta_rank=2)
    assert shares == {"a": 53, "b": 53, "c": 6}
    assert sum(shares.values()) == 112


def test_split_is_exact_for_awkward_totals():
    sizes = {"x": 3, "y": 3, "z": 3}
    assert split_proportional(10, sizes) == {"x": 4, "y": 3, "z": 3}  # ties go to the earlier name
    for total in range(0, 50):
        assert sum(split_proportional(total, {"p": 7, "q": 11, "r": 13}).values()) == total


def test_density_budget():
    shares = module_budgets(SHAPES, delta_density=0.25)
    assert sum(shares.values()) == 68  # 0.25 * 272
    assert shares == {"a": 32, "b": 32, "c": 4}


def test_share_above_capacity_names_module_and_fix():
    with pytest.raises(SparsetuneError) as err:
        module_budgets(SHAPES, delta_rank=2, capacity={"a": 128, "b": 40, "c": 16})
    msg = str(err.value)
    assert "b 53 entries" in msg and "only 40 non-zero" in msg and "lower --delta-rank" in msg
    assert "\n" not in msg


def test_settings_defaults_and_validation():
    s = DeltaSettings()
    assert (s.delta_rank, s.delta_density, s.reselect_every, s.select_window, s.replace_fraction) == (
        16,
        None,
        20,
        5,
        0.2,
    )
    assert DeltaSettings(delta_density=0.01).delta_density == 0.01
    with pytest.raises(ValidationError, match="not both"):
        DeltaSettings(delta_rank=8, delta_density=0.01)
    dumped = DeltaSettings(delta_density=0.01).model_dump()  # what a run's recipe.yaml holds: every setting
    assert DeltaSettings(**dumped).delta_density == 0.01
    with pytest.raises(ValidationError, match="window must fit"):
        DeltaSettings(reselect_every=4, select_window=5)
    with pytest.raises(ValidationError, match="not a valid regex"):
        DeltaSettings(targets=["("])
    for name, field in DeltaSettings.model_fields.items():
        assert field.description, name
