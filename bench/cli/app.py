"""The typer application every command registers on (bench.cli.commands)."""

from __future__ import annotations

from typing import Annotated

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train defended classifiers, attack them with a standard matrix, keep every number.",
)


@app.callback()
def _options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            metavar="",
            help="Show the traceback of an error instead of one line (anywhere on the line: "
            "bench run --defense x --debug).",
        ),
    ] = False,
) -> None:
    # bench.cli.main takes --debug out of the arguments before typer parses them, so this
    # option is never set here; it is declared so that `bench --help` documents it.
    pass
