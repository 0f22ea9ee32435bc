"""The `sparsetune` Typer app. Each subcommand lives in its own thin module with a `register(app)`."""

from __future__ import annotations

import importlib
import os

import typer

app = typer.Typer(
    name="sparsetune",
    help="Sparse fine-tuning and compression of LLMs: prune, repair (seft), pretrain (smet-pretrain), eval, export.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Keeps `sparsetune` a command group even while only one subcommand is registered."""


# One module per subcommand, in the order `--help` lists them.
COMMAND_MODULES = ("prune", "evaluate", "export", "seft", "smet", "run")

for _name in COMMAND_MODULES:
    importlib.import_module(f"sparsetune.cli.{_name}").register(app)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
