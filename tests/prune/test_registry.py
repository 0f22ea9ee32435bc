"""The pruning methods are registered once (`sparsetune.prune.registry`); the schemas' choices, the engine's
lookup and the README's list of methods derive from that table."""

from __future__ import annotations

import re
from pathlib import Path
from typing import get_args

from sparsetune.evaluate.config import SweepConfig
from sparsetune.prune import registry
from sparsetune.prune.config import PruneConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_methods_bullet() -> str:
    """The `- **Methods**: ...` bullet of the README's prune section, its wrapped lines joined."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("- **Methods**:"))
    bullet = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        bullet.append(line.strip())
    return " ".join(bullet)


def test_the_readme_lists_exactly_the_registered_methods_with_their_summaries():
    bullet = readme_methods_bullet()
    listed = ", ".join(f"`{name}` ({entry.summary})" for name, entry in registry.METHODS.items())
    assert bullet.startswith(f"- **Methods**: {listed}."), f"write: {listed}."
    assert re.findall(r"`(\w+)` \(", bullet) == list(registry.METHODS)


def test_the_schemas_choices_and_help_come_from_the_registry():
    assert get_args(PruneConfig.model_fields["method"].annotation) == ("auto", *registry.METHOD_NAMES)
    (choice,) = get_args(SweepConfig.model_fields["methods"].annotation)
    assert get_args(choice) == registry.METHOD_NAMES
    help_text = PruneConfig.model_fields["method"].description
    assert help_text.startswith("Pruning method: magnitude, wanda, sparsegpt or alps; auto = ")
    assert registry.spoken_list(("a",)) == "a" and registry.spoken_list(("a", "b", "c")) == "a, b or c"


def test_every_registered_module_is_a_pruning_method():
    for name in registry.METHOD_NAMES:
        module = registry.load(name)
        assert module.__name__ == registry.METHODS[name].module
        assert isinstance(module.NEEDS_CALIBRATION, bool) and callable(module.prune_group), name
        assert callable(module.init_stats) and callable(module.accumulate), name
    assert not registry.load("magnitude").NEEDS_CALIBRATION and registry.load("wanda").NEEDS_CALIBRATION


def test_calibrates_is_each_method_module_s_needs_calibration():
    for name, entry in registry.METHODS.items():
        assert entry.calibrates == registry.load(name).NEEDS_CALIBRATION, name
