"""Placeholder until this subcommand lands."""

import typer


def register(app: typer.Typer) -> None:
    return None
