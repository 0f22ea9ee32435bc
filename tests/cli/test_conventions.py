"""What users expect of a CLI: fast help that loads no ML stack, --version, shell completion, NO_COLOR, and
progress that becomes plain log lines when stderr is not a terminal."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparsetune.cli.app import app
from sparsetune.progress import Progress

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "datasets", "lm_eval", "accelerate", "peft", "safetensors", "huggingface_hub")
COMMANDS = ("prune", "eval", "sweep", "report", "export", "seft", "smet-pretrain", "run", "validate")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment, timeout=120
    )


def test_help_of_every_command_imports_no_ml_stack():
    """In a fresh interpreter: `--help`, every `COMMAND --help` and `--version` import no torch & co."""
    code = f"""
import json, sys
from typer.main import get_command
from typer.testing import CliRunner
from sparsetune.cli.app import app
names = sorted(get_command(app).commands)
runs = [["--help"], ["--version"]] + [[name, "--help"] for name in names]
codes = [CliRunner().invoke(app, args).exit_code for args in runs]
print(json.dumps({{"names": names, "codes": codes, "heavy": sorted(m for m in {HEAVY!r} if m in sys.modules)}}))
"""
    result = _python(code)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(COMMANDS) <= set(out["names"])
    assert out["codes"] == [0] * (len(out["names"]) + 2)
    assert out["heavy"] == []


def test_version_is_the_project_version():
    expected = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"sparsetune {expected}\n"


def test_shell_completion_script_and_completions(monkeypatch):
    # Typer detects the user's shell from the parent processes, which fails off a terminal (CI); with detection
    # off, `--show-completion` takes the shell as its value.
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    runner = CliRunner()
    script = runner.invoke(app, ["--show-completion", "bash"], prog_name="sparsetune")
    assert script.exit_code == 0
    assert "_SPARSETUNE_COMPLETE=complete_bash" in script.output
    assert "complete -o default -F _sparsetune_completion sparsetune" in script.output

    def complete(words: str) -> list[str]:
        env = {"_SPARSETUNE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(len(words.split()) - 1)}
        return runner.invoke(app, [], prog_name="sparsetune", env=env).output.split()

    assert complete("sparsetune pr") == ["prune"]
    assert complete("sparsetune prune --calib-sa") == ["--calib-samples", "--calib-sampling"]


# An SGR escape sequence; colour parameters are 30-38, 40-48, 90-97 and 100-107 (bold 1 and dim 2 are not colour).
_SGR = re.compile(r"\x1b\[([0-9;]*)m")


def _colour_codes(text: str) -> set[int]:
    codes = {int(p) for m in _SGR.findall(text) for p in m.split(";") if p}
    return {c for c in codes if 30 <= c <= 48 or 90 <= c <= 107}


def test_no_color_is_respected():
    code = "from sparsetune.cli.app import main; import sys; sys.argv = ['sparsetune', '--help']; main()"
    coloured = _python(code, FORCE_COLOR="1")
    plain = _python(code, FORCE_COLOR="1", NO_COLOR="1")
    assert coloured.returncode == plain.returncode == 0
    assert _colour_codes(coloured.stdout)  # forced to a terminal, the help is coloured...
    assert _colour_codes(plain.stdout) == set()  # ...and NO_COLOR takes the colours away
    assert "prune" in plain.stdout


def test_progress_off_a_terminal_is_plain_log_lines(caplog, monkeypatch):
    monkeypatch.setenv("SPARSETUNE_PROGRESS_INTERVAL", "0")  # a line per update
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    with caplog.at_level(logging.INFO, logger="sparsetune.progress"), Progress(4, "pruning block") as bar:
        for i in range(4):
            bar.update(completed=i + 1, info=f"block {i}")
    lines = [r.getMessage() for r in caplog.records if r.name == "sparsetune.progress"]
    assert len(lines) == 4
    assert re.fullmatch(r"pruning block 1/4 \(25%\), block 0, \d+s elapsed, ETA \d+s", lines[0])
    assert re.fullmatch(r"pruning block 4/4 \(100%\), block 3, \d+s elapsed", lines[-1])


def test_progress_lines_are_throttled_but_the_last_is_always_logged(caplog, monkeypatch):
    monkeypatch.setenv("SPARSETUNE_PROGRESS_INTERVAL", "3600")
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    with caplog.at_level(logging.INFO, logger="sparsetune.progress"):
        with Progress(1000, "ppl wikitext2", unit="tokens", rate=True) as bar:
            for _ in range(10):
                bar.update(advance=100)
        with Progress(5, "step", enabled=False) as quiet:
            quiet.update(completed=5)
    lines = [r.getMessage() for r in caplog.records if r.name == "sparsetune.progress"]
    assert len(lines) == 1
    assert re.fullmatch(r"ppl wikitext2 1,000/1,000 tokens \(100%\), [\d,]+ tokens/s, \d+s elapsed", lines[0])


def test_progress_on_a_terminal_is_a_rich_bar_on_stderr(caplog, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("SPARSETUNE_PROGRESS_INTERVAL", "0")
    with caplog.at_level(logging.INFO, logger="sparsetune.progress"), Progress(3, "step", completed=1) as bar:
        bar.update(completed=3, info="loss 1.2345")
    assert not [r for r in caplog.records if r.name == "sparsetune.progress"]
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "step 3/3" in captured.err and "loss 1.2345" in captured.err


@pytest.mark.parametrize("interval", ["x", "-1"])
def test_progress_interval_env_is_forgiving(interval, monkeypatch):
    from sparsetune import progress

    monkeypatch.setenv("SPARSETUNE_PROGRESS_INTERVAL", interval)
    assert progress._interval() == (10.0 if interval == "x" else 0.0)


def test_library_tqdm_bars_are_turned_off_only_off_a_terminal(monkeypatch):
    from sparsetune.progress import LIBRARY_BAR_SWITCHES, quiet_library_bars_off_terminal

    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    for name in LIBRARY_BAR_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    quiet_library_bars_off_terminal()
    assert [os.environ.get(n) for n in LIBRARY_BAR_SWITCHES] == [None, None, None]
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "0")  # the user's choice wins
    quiet_library_bars_off_terminal()
    assert [os.environ.get(n) for n in LIBRARY_BAR_SWITCHES] == ["1", "0", "1"]
