"""Model dirs that ship their own Python code (config.json `auto_map`), issue 20 item 12: the refusal names
--trust-remote-code, the code never runs without it, and outputs keep no `auto_map` pointing at files they lack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.loading import drop_dangling_auto_map

runner = CliRunner(env={"COLUMNS": "250"})
AUTO_MAP = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}


def _with_custom_code(model_dir: Path, model_type: str) -> Path:
    """Add custom code files (which leave a marker if they are ever imported) and an auto_map to a model dir."""
    marker = model_dir.parent / "custom-code-ran"
    for name in ("configuration_custom.py", "modeling_custom.py"):
        (model_dir / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type=model_type, auto_map=AUTO_MAP)
    (model_dir / "config.json").write_text(json.dumps(config))
    return marker


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def test_a_model_that_needs_its_code_names_the_flag_and_what_it_does(tiny_model_dir, text_file, tmp_path):
    marker = _with_custom_code(tiny_model_dir, "custom-llama")
    result = runner.invoke(app, ["prune", str(tiny_model_dir), "--calib", str(text_file), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    errors = _errors(result)
    assert len(errors) == 1 and "pass --trust-remote-code only if you trust it" in errors[0], result.output
    assert "runs the code shipped in the model dir" in errors[0] and "files are complete" not in errors[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["prune", "export"])
def test_outputs_drop_an_auto_map_whose_code_they_do_not_hold(command, tiny_model_dir, text_file, tmp_path):
    """A llama with an auto_map loads as the built-in class without --trust-remote-code; its code files are not
    copied, so the output's config must not point at them."""
    marker = _with_custom_code(tiny_model_dir, "llama")
    out = tmp_path / "out"
    args = {
        "prune": ["prune", str(tiny_model_dir), "--calib", str(text_file), "--calib-samples", "2", "--seqlen", "16"],
        "export": ["export", str(tiny_model_dir), "--format", "sparse-bitmask", "--max-density", "1"],
    }[command]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == "llama"
    assert not list(out.glob("*custom*.py")) and not marker.exists()
    assert json.loads((tiny_model_dir / "config.json").read_text())["auto_map"] == AUTO_MAP  # input untouched
    from transformers import AutoConfig

    assert type(AutoConfig.from_pretrained(out, trust_remote_code=True)).__name__ == "LlamaConfig"
    assert not marker.exists()


def test_auto_map_entries_are_kept_when_their_code_is_there(tmp_path):
    (tmp_path / "modeling_custom.py").write_text("")
    config = {
        "model_type": "llama",
        "auto_map": {**AUTO_MAP, "AutoModel": "other-org/repo--modeling_x.X"},  # code in another hub repo
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    tokenizer = {"auto_map": {"AutoTokenizer": ["tokenization_custom.Slow", None]}, "model_max_length": 8}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    drop_dangling_auto_map(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoModelForCausalLM": "modeling_custom.CustomLM",
        "AutoModel": "other-org/repo--modeling_x.X",
    }
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"model_max_length": 8}
