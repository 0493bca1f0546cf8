"""The typer application every command registers on (bench.cli.commands)."""
from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train defended classifiers, attack them with a standard matrix, keep every number.")
