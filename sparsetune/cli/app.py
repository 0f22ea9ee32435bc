"""The `sparsetune` Typer app. Each subcommand lives in its own thin module with a `register(app)`.

Importing this module (and so `sparsetune --help`, `sparsetune COMMAND --help`, `--version`) must not import
torch, transformers or datasets: the command modules import only the pydantic settings schemas and the stage
table (sparsetune/pipeline.py) at module level, and a stage imports its library after its checks passed, so bad
input is refused without it too (tests/cli/test_conventions.py and tests/cli/test_refusals.py check both).
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import PackageNotFoundError, version

import typer

from sparsetune import __version__

app = typer.Typer(
    name="sparsetune",
    help="Sparse fine-tuning and compression of LLMs: prune, repair (seft), pretrain (smet-pretrain), eval, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def package_version() -> str:
    """The installed distribution's version (importlib.metadata), else the source tree's."""
    try:
        return version("sparsetune")
    except PackageNotFoundError:
        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"sparsetune {package_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit"
    ),
) -> None:
    """Keeps `sparsetune` a command group even while only one subcommand is registered."""


# One module per subcommand, in the order `--help` lists them.
COMMAND_MODULES = ("prune", "evaluate", "export", "seft", "smet", "plan", "run")

for _name in COMMAND_MODULES:
    importlib.import_module(f"sparsetune.cli.{_name}").register(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
