"""Reading recipes safely (issue 20): alias bombs, recursive aliases, undecodable bytes, a big legitimate
recipe, and recipe.yaml files that reproduce a run from any working directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_weights, random_text
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.recipes import MAX_ALIAS_NODES, alias_growth, read_recipe, reproducible_settings

runner = CliRunner(env={"COLUMNS": "250"})


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def alias_bomb(levels: int) -> str:
    """a0 is a list of nine strings; each next level is a list of nine aliases of the one before."""
    lines = ["a0: &a0 [" + ",".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def bomb_counts(levels: int) -> tuple[int, int, int, int]:
    """(expanded nodes, expanded chars, written nodes, written chars) of alias_bomb(levels), by hand:
    a0 is 1 list + 9 scalars of 3 chars; level i is 1 list + 9 copies of level i-1; the root is one mapping
    whose keys a0..aN have 2 chars each."""
    nodes, chars = [10], [27]
    for _ in range(levels):
        nodes.append(1 + 9 * nodes[-1])
        chars.append(9 * chars[-1])
    keys = levels + 1
    return 1 + keys + sum(nodes), 2 * keys + sum(chars), 1 + keys + 10 + levels, 2 * keys + 27


def _expanded_nodes(value) -> int:
    """Brute force: the size of the fully expanded Python structure (keys count as nodes)."""
    if isinstance(value, dict):
        return 1 + sum(_expanded_nodes(k) + _expanded_nodes(v) for k, v in value.items())
    if isinstance(value, list):
        return 1 + sum(_expanded_nodes(v) for v in value)
    return 1


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_the_hand_count_matches_a_real_expansion(levels):
    assert _expanded_nodes(yaml.safe_load(alias_bomb(levels))) == bomb_counts(levels)[0]


@pytest.mark.parametrize("levels", [1, 3, 5])  # 9 is checked through the CLI below
def test_alias_growth_counts_the_expansion_without_doing_it(levels):
    expanded_nodes, expanded_chars, written_nodes, written_chars = bomb_counts(levels)
    node = yaml.compose(alias_bomb(levels), Loader=yaml.SafeLoader)
    assert alias_growth(node) == (expanded_nodes - written_nodes, expanded_chars - written_chars)


def test_the_nine_level_alias_bomb_is_refused_in_one_line(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(alias_bomb(9))
    assert len(bomb.read_bytes()) < 500  # the bomb is 440 bytes
    growth = bomb_counts(9)[0] - bomb_counts(9)[2]
    assert growth > 3_000_000_000 > MAX_ALIAS_NODES  # what a walk of the expansion would have to visit
    for args in (["validate", bomb], ["run", bomb, "-o", tmp_path / "out"], ["prune", "--recipe", bomb]):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 2, result.output
        errors = _errors(result)
        assert len(errors) == 1 and "aliases (*name) expand to" in errors[0] and f"{growth:,} nodes" in errors[0]
    assert not (tmp_path / "out").exists()


def test_a_long_string_referenced_many_times_is_refused(tmp_path):
    path = tmp_path / "strings.yaml"
    path.write_text("long: &s " + "x" * 200_000 + "\nmany: [" + ", ".join(["*s"] * 60) + "]\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and "12,000,000 characters" in _errors(result)[0], result.output


def test_a_recursive_alias_is_refused_in_one_line(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("stages: &s\n  - prune: {model: m}\n  - *s\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2 and len(_errors(result)) == 1 and "contains it" in _errors(result)[0]


def test_modest_aliases_still_work(tmp_path):
    path = tmp_path / "shared.yaml"
    path.write_text(
        "stages:\n"
        "  - prune: {model: m, calib: c4}\n"
        "  - eval: &eval {models: [m, '@prev'], ppl: [wikitext2]}\n"
        "  - export: {format: sparse-bitmask}\n"
        "  - eval: *eval\n"
    )
    loc = read_recipe(path)
    assert (
        loc.data["stages"][1]["eval"]
        == loc.data["stages"][3]["eval"]
        == {"models": ["m", "@prev"], "ppl": ["wikitext2"]}
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "prune -> eval -> export -> eval" in result.output, result.output


def test_a_5_mb_legitimate_recipe_is_read(tmp_path):
    """No size cap: a recipe written out in full costs time in proportion to its size (libyaml parses it)."""
    notes = "".join(
        f"  run {i}: wanda 50%, ppl {20 + i % 7}.{i % 10} after {i % 300} seft steps\n" for i in range(50_000)
    )
    variables = "".join(f"  v{i}: {i}\n" for i in range(20_000))
    text = f"name: big\ndescription: |\n{notes}vars:\n{variables}stages:\n  - prune: {{model: m, sparsity: 0.5}}\n"
    text += "# padding to 5 MB\n" * ((5_000_000 - len(text)) // 18 + 1)
    path = tmp_path / "big.yaml"
    path.write_text(text)
    assert len(path.read_bytes()) >= 5_000_000
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "ok" in result.output, result.output
    loc = read_recipe(path)
    assert loc.data["vars"]["v19999"] == 19999 and loc.where(("stages", 0, "prune")).endswith(
        f"line {text.count(chr(10), 0, text.index('stages:')) + 2}"
    )


@pytest.mark.parametrize("command", ["validate", "prune"])
def test_a_recipe_that_is_not_utf8_is_one_error_line(tmp_path, command):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: café\nstages:\n  - prune: {model: m}\n".encode("latin-1"))
    args = ["validate", str(path)] if command == "validate" else ["prune", "--recipe", str(path), "-o", "x"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert _errors(result) == [
        f"error: recipe {path} is not UTF-8 text (byte 0xe9 at offset 9); pass a YAML file saved as UTF-8"
    ]


# --------------------------------------------------------------------------------------------- recipe.yaml


def test_reproducible_settings_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "calib.txt").write_text("text")
    (tmp_path / "model").mkdir()
    monkeypatch.setenv("SPARSETUNE_DATA_DIR", "mirror")
    settings = {
        "model": "model",
        "models": ["model", "smollm2", "org/hub-model"],
        "calib": "calib.txt",
        "data": "alpaca",
        "ppl": ["wikitext2", "calib.txt"],
        "data_dir": None,
        "output": "out",
        "checkpoint_dir": None,
        "sparsity": 0.5,
    }
    assert reproducible_settings(settings) == {
        "model": str(tmp_path / "model"),
        "models": [str(tmp_path / "model"), "smollm2", "org/hub-model"],
        "calib": str(tmp_path / "calib.txt"),
        "data": "alpaca",
        "ppl": ["wikitext2", str(tmp_path / "calib.txt")],
        "data_dir": str(tmp_path / "mirror"),  # from SPARSETUNE_DATA_DIR, made absolute
        "output": str(tmp_path / "out"),
        "checkpoint_dir": None,
        "sparsity": 0.5,
    }


def test_recipe_yaml_reproduces_the_run_from_another_directory(tiny_model_dir, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "c4").mkdir(parents=True)
    records = [json.dumps({"text": random_text(300, seed=i)}) + "\n" for i in range(6)]
    (mirror / "c4" / "c4_sample.jsonl").write_text("".join(records))
    monkeypatch.setenv("SPARSETUNE_DATA_DIR", str(mirror))
    monkeypatch.chdir(tmp_path)
    args = ["--calib", "c4", "--calib-samples", "2", "--seqlen", "16", "--sparsity", "0.6", "--method", "wanda"]
    result = runner.invoke(app, ["prune", tiny_model_dir.name, *args, "-o", "out"])
    assert result.exit_code == 0, result.output
    recipe = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert recipe["model"] == str(tiny_model_dir) and recipe["data_dir"] == str(mirror)
    assert recipe["output"] == str(tmp_path / "out")

    monkeypatch.delenv("SPARSETUNE_DATA_DIR")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = runner.invoke(app, ["prune", "--recipe", str(tmp_path / "out" / "recipe.yaml"), "-o", "again"])
    assert again.exit_code == 0, again.output
    first, second = (
        load_weights(tmp_path / "out"),
        load_weights(elsewhere / "again"),
    )
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert float((second["model.layers.0.mlp.up_proj.weight"] == 0).float().mean()) == 38 / 64  # 60% of 64 per row
    assert Path(yaml.safe_load((elsewhere / "again" / "recipe.yaml").read_text())["data_dir"]) == mirror


def test_a_recipe_key_under_a_renamed_settings_old_name_is_read_as_the_new_one(tmp_path):
    """`seqlen` in a prune recipe is `calib_seqlen` for one release; a flag under either name replaces it."""
    from sparsetune.prune.config import PruneConfig
    from sparsetune.recipes import recipe_settings, validate_config

    recipe = tmp_path / "old.yaml"
    recipe.write_text("prune:\n  method: wanda\n  seqlen: 64\n")
    cfg = validate_config(PruneConfig, {"model": "m", **recipe_settings(recipe, "prune")})
    assert cfg.calib_seqlen == 64 and "seqlen" not in cfg.model_dump()
    out = tmp_path / "out"
    # the flag's value is the one validated (and refused), not the recipe's, and no "give only" conflict
    result = runner.invoke(app, ["prune", "m", "--recipe", str(recipe), "--calib-seqlen", "0", "-o", str(out)])
    assert result.exit_code == 2 and _errors(result) == [
        f"error: recipe {recipe}: calib_seqlen: Input should be greater than or equal to 1"
    ]
    recipe.write_text("prune:\n  calib_seqlen: 64\n")
    result = runner.invoke(app, ["prune", "m", "--recipe", str(recipe), "--seqlen", "0", "-o", str(out)])
    assert result.exit_code == 2 and _errors(result) == [
        f"error: recipe {recipe}: calib_seqlen: Input should be greater than or equal to 1"
    ]
    assert not out.exists()
