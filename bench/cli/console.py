"""The two consoles: results on stdout, progress and messages on stderr; and plain writes
to stdout (CSV, JSON) that end as quietly as the consoles when the reader closes the pipe."""

from __future__ import annotations

import sys

from rich.console import Console


class PipeClosed(Exception):
    """Whoever read stdout closed it (`bench ls | head`); bench.cli.main ends quietly, status 0.

    Not an OSError: the CLI library turns a broken-pipe OSError into exit status 1
    on its own, so this must pass it by to reach main."""


class _Console(Console):
    def on_broken_pipe(self) -> None:  # rich's own exits with status 1
        self.quiet = True
        raise PipeClosed


# Piped output (CI logs, `| less`) gets a wide console so cell keys are not folded.
out = _Console(width=None if sys.stdout.isatty() else 160)
err = _Console(stderr=True)


def write(text: str) -> None:
    """Text on stdout as it is (CSV, JSON, a usage text)."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError as exc:
        raise PipeClosed from exc
