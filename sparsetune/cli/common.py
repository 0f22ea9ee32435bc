"""Helpers shared by the thin CLI modules."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import typer

from sparsetune.errors import SparsetuneError
from sparsetune.progress import quiet_library_bars_off_terminal


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Bad input becomes one line on stderr and exit code 2."""
    try:
        yield
    except SparsetuneError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    libraries = ("transformers", "datasets", "accelerate", "huggingface_hub", "filelock")
    for noisy in (*libraries, "urllib3", "httpx", "httpx2"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_library_bars_off_terminal()


def split_list(value: str | None) -> list[str] | None:
    """ "a,b , c" -> ["a", "b", "c"]; None stays None."""
    if value is None:
        return None
    return [item.strip() for item in value.split(",") if item.strip()]
