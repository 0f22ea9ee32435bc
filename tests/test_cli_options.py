"""The CLI options are generated from the pydantic schemas (sparsetune/cli/options.py): one flag per field, its
help the field's description, a new field a new flag with no CLI code, and every CLI function small."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Literal

import pytest
import typer
from pydantic import BaseModel, ConfigDict, Field
from typer.main import get_command
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.cli.options import (
    field_help,
    renamed_settings,
    schema_command,
    schema_parameters,
    settings_from_flags,
    shared_parameters,
)
from sparsetune.errors import SparsetuneError
from sparsetune.evaluate.config import EvalConfig, SweepConfig
from sparsetune.export.config import ExportConfig
from sparsetune.prune.config import PruneConfig
from sparsetune.train.seft_config import SeftConfig
from sparsetune.train.smet_config import SmetConfig

CLI = Path(__file__).resolve().parents[1] / "sparsetune" / "cli"
runner = CliRunner(env={"COLUMNS": "400"})

# command -> (schema, its positional argument, the fields that are recipe-only)
STAGE_COMMANDS = {
    "prune": (PruneConfig, "model", {"block_sparsity"}),
    "seft": (SeftConfig, "model", set()),
    "smet-pretrain": (SmetConfig, None, set()),
    "eval": (EvalConfig, "models", set()),
    "sweep": (SweepConfig, "model", {"trust_remote_code"}),
    "export": (ExportConfig, "model", set()),
}


def command_params(name: str) -> dict[str, object]:
    """The click parameters of `sparsetune NAME`, by parameter name."""
    return {p.name: p for p in get_command(app).commands[name].params}


def test_a_fields_help_is_its_description_plus_default_and_appears_once():
    description = PruneConfig.model_fields["owl_lambda"].description
    assert description == "OWL spread: block densities span 2 x lambda"
    assert command_params("prune")["owl_lambda"].help == "OWL spread: block densities span 2 x lambda (default: 0.08)"
    help_text = runner.invoke(app, ["prune", "--help"]).output
    assert help_text.count(description) == 1
    # a description that names its own default gets no second one; a list gets its separator
    targets = PruneConfig.model_fields["targets"].description
    assert command_params("prune")["targets"].help == targets + " (comma-separated)"


@pytest.mark.parametrize("command", list(STAGE_COMMANDS))
def test_every_schema_field_is_one_flag_with_the_schema_help(command):
    schema, argument, recipe_only = STAGE_COMMANDS[command]
    params = command_params(command)
    for name, info in schema.model_fields.items():
        key = info.alias or name
        if name in recipe_only:
            assert key not in params
            continue
        is_list_option = name != argument and "list" in str(info.annotation)
        expected = field_help(schema, name) + (" (comma-separated)" if is_list_option else "")
        assert params[key].help == expected, key
    shared = {"recipe", "overwrite", "json_out", "verbose"}
    renamed = set(getattr(schema, "RENAMED", {}))  # old names: hidden flags, tested below
    fields = {info.alias or n for n, info in schema.model_fields.items() if n not in recipe_only}
    assert set(params) == fields | shared | renamed


def test_existing_flag_names_and_short_aliases_are_kept():
    prune, export, smet = command_params("prune"), command_params("export"), command_params("smet-pretrain")
    assert prune["output"].opts == ["--output", "-o"] and export["format"].opts == ["--format", "-f"]
    assert prune["sequential"].opts == ["--sequential"] and prune["sequential"].secondary_opts == ["--no-sequential"]
    assert prune["owl"].opts == ["--owl"] and prune["owl"].secondary_opts == []
    assert prune["trust_remote_code"].opts == ["--trust-remote-code"]
    assert prune["json_out"].opts == ["--json"] and prune["verbose"].opts == ["--verbose", "-v"]
    assert smet["model_config"].opts == ["--model-config"]
    assert command_params("eval")["models"].nargs == -1  # MODEL...


def test_a_bad_literal_value_exits_2_with_one_error_line(tmp_path):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", "some-model", "--method", "bogus", "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines == ["error: prune: method: Input should be 'auto', 'magnitude', 'wanda', 'sparsegpt' or 'alps'"]
    assert not out.exists()
    assert "[auto|magnitude|wanda|sparsegpt|alps]" in runner.invoke(app, ["prune", "--help"]).output


class Toy(BaseModel):
    """A throwaway schema standing in for a real one."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="The model to change")
    output: str | None = Field(None, description="Where the result goes")
    rank: int = Field(4, ge=1, description="Rank of the delta")
    schedule: Literal["cosine", "linear"] = Field("cosine", description="How the fraction decays")
    keep_base: bool = Field(True, description="Keep the base weights")
    fractions: list[float] = Field(default_factory=list, description="Fractions per block")


class ToyWithNewField(Toy):
    merge: bool = Field(False, description="Merge the delta into the base weights at the end")


def toy_app(schema: type[BaseModel], seen: list[dict]) -> typer.Typer:
    toy = typer.Typer()
    parameters = schema_parameters(schema, "model") + shared_parameters(["json_out"])
    toy.command("toy")(schema_command(schema, seen.append, "A toy command.", parameters))
    toy.command("other")(lambda: None)  # two commands, so `toy` is a subcommand as in the real app
    return toy


def test_a_field_added_to_a_schema_is_a_flag_with_no_cli_code():
    seen: list[dict] = []
    before = runner.invoke(toy_app(Toy, seen), ["toy", "--help"]).output
    after = runner.invoke(toy_app(ToyWithNewField, seen), ["toy", "--help"]).output
    assert "--merge" not in before
    assert after.count("--merge") == 1 and after.count("Merge the delta into the base weights at the end") == 1
    assert "[cosine|linear]" in after and "--no-keep-base" in after
    args = ["toy", "m", "--rank", "8", "--schedule", "linear", "--no-keep-base", "--fractions", "0.5, 0.25", "--merge"]
    result = runner.invoke(toy_app(ToyWithNewField, seen), [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert settings_from_flags(ToyWithNewField, seen[-1]) == {
        "model": "m",
        "output": None,
        "rank": 8,
        "schedule": "linear",
        "keep_base": False,
        "fractions": [0.5, 0.25],
        "merge": True,
    }
    assert seen[-1]["json_out"] is True
    with pytest.raises(SparsetuneError, match=r"--fractions '0.5,x' is not a comma-separated list of numbers"):
        settings_from_flags(Toy, {"fractions": "0.5,x"})


def function_sizes(root: Path = CLI) -> dict[str, int]:
    """Parameters of every function and lambda written in the CLI modules (nested ones too), by file:line name.
    Read from the source, since a generated command's `__signature__` lists its options, not its parameters."""
    sizes = {}
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                a = node.args
                count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                sizes[f"{path.name}:{node.lineno} {getattr(node, 'name', 'lambda')}"] = count
    return sizes


def test_no_cli_function_takes_more_than_10_parameters(tmp_path):
    (tmp_path / "wide.py").write_text("def wide(a, b, c, d, e, f, g, h, i, j, k):\n    pass\n")
    assert function_sizes(tmp_path) == {"wide.py:1 wide": 11}  # the counter sees a wide function
    sizes = function_sizes()
    assert any(name.endswith(" run_stage") for name in sizes)
    assert {name: n for name, n in sizes.items() if n > 10} == {}


def test_literal_choices_complete_in_the_shell():
    def complete(words: str) -> list[str]:
        env = {"_SPARSETUNE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return runner.invoke(app, [], prog_name="sparsetune", env=env).output.split()

    assert complete("sparsetune prune --method s") == ["sparsegpt"]
    assert complete("sparsetune export -f s") == ["sparse-bitmask", "sparse-24-bitmask", "semi-structured-2:4"]


# command -> (old flag, the new flag it stands for, a valid value, the setting the schema reads)
RENAMED_FLAGS = {
    "prune": ("--seqlen", "--calib-seqlen", "64", ("calib_seqlen", 64)),
    "smet-pretrain": ("--warmup-ratio", "--warmup-steps", "0.1", ("warmup_steps", 100)),  # 0.1 x 1000 steps
}


@pytest.mark.parametrize("command", list(RENAMED_FLAGS))
def test_an_old_flag_name_is_a_hidden_alias_of_the_new_one(command):
    old, new, value, (setting, expected) = RENAMED_FLAGS[command]
    schema = STAGE_COMMANDS[command][0]
    param = command_params(command)[old.removeprefix("--").replace("-", "_")]
    assert param.hidden and param.opts == [old]
    help_text = runner.invoke(app, [command, "--help"]).output
    assert new in help_text and f"{old} " not in help_text and f"{old}\n" not in help_text
    flags = {key: None for key in schema.model_fields} | {old.removeprefix("--").replace("-", "_"): value}
    settings = {k: v for k, v in settings_from_flags(schema, flags).items() if v is not None}  # as merged
    required = {"model": "m"} if command == "prune" else {}
    assert getattr(schema.model_validate({**required, **settings}), setting) == expected


def test_an_old_flag_reaches_the_schema_through_the_command(tmp_path):
    """The alias is parsed, passed on, read as the new setting and validated as it: a bad value is one error line."""
    out = tmp_path / "out"
    result = runner.invoke(app, ["prune", "some-model", "--seqlen", "0", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert [line for line in result.output.splitlines() if line.startswith("error:")] == [
        "error: prune: calib_seqlen: Input should be greater than or equal to 1"
    ]
    both = runner.invoke(app, ["prune", "some-model", "--seqlen", "32", "--calib-seqlen", "64", "-o", str(out)])
    assert both.exit_code == 2 and "seqlen is the old name of calib_seqlen; give only calib_seqlen" in both.output
    smet = runner.invoke(app, ["smet-pretrain", "--warmup-ratio", "1.5", "-o", str(out)])
    assert smet.exit_code == 2 and "warmup_ratio '1.5' must be a fraction in [0, 1)" in smet.output
    assert not out.exists()
    assert renamed_settings(SeftConfig) == {} and renamed_settings(PruneConfig) == {"seqlen": "calib_seqlen"}
