"""The `bench` command line: thin; each command calls one function of bench.api.

Exit status 0 on success; 2 on bad input, with one line saying what was wrong and how
to mend it, and no traceback unless --debug.
"""

from __future__ import annotations

import os
import sys

from bench.cli import commands  # noqa: F401 (registers the commands on the app)
from bench.cli.app import app
from bench.cli.console import PipeClosed, err, write
from bench.errors import BenchError


def _usage_line(exc: BaseException) -> str:
    """One line for a usage error of the CLI library: what was wrong, then where help is.

    The library's own text (usage block, then "Error: ...") is several lines. Recent typer
    carries its own copy of click and older typer raises click's classes (click itself may
    not even be installed), so the exception is recognised by what both give it (an exit
    code and format_message), never by importing either module.
    """
    message = " ".join(str(exc.format_message()).split()).rstrip(".")
    if message[:1].isupper() and message[1:2].islower():
        message = message[0].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "bench"
    return f"error: {message or type(exc).__name__}; see `{command} --help`"


def _is_usage_error(exc: BaseException) -> bool:
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _class_names(exc: BaseException) -> set[str]:
    return {k.__name__ for k in type(exc).__mro__}


def _interrupted() -> None:
    err.print("interrupted: every cell committed so far is kept; run again to finish")
    sys.exit(130)


def _pipe_closed() -> None:
    """The reader of stdout has gone (`bench ls presets | head -2`): end quietly with status
    0, as `ls | head` does. Stdout is pointed at devnull first, so that the flush at exit
    cannot fail again (the Python docs' recipe, signal module, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):  # a stdout without a file (tests) keeps none
        pass
    sys.exit(0)


def _stdout_file() -> tuple[int, int] | None:
    try:
        st = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _closed_in_library(before: tuple[int, int] | None) -> bool:
    """Whether the CLI library met the closed pipe itself (printing --help, say) and exited 1:
    its rich console points stdout at devnull first, its click core wraps stdout."""
    if type(sys.stdout).__name__ == "PacifyFlushWrapper":
        return True
    try:
        st = os.stat(os.devnull)
    except OSError:
        return False
    return before != (st.st_dev, st.st_ino) == _stdout_file()


def main() -> None:
    before = _stdout_file()
    try:
        _main()
        sys.stdout.flush()
    except (PipeClosed, BrokenPipeError):
        _pipe_closed()
    except SystemExit as exc:
        if exc.code == 1 and _closed_in_library(before):
            _pipe_closed()
        raise


def _main() -> None:
    # --debug is taken out here, before the CLI library sees the arguments, so it works
    # anywhere on the line; app.py declares it only so that `bench --help` shows it.
    debug = "--debug" in sys.argv
    if debug:
        sys.argv.remove("--debug")
    try:
        # Not standalone, so that every error comes here and leaves as one line; the
        # library then returns what a command's `typer.Exit(code)` asked for (or 130 where
        # it caught a Ctrl-C itself, as recent typer does) instead of calling sys.exit.
        code = app(standalone_mode=False, prog_name="bench")
    except PipeClosed:
        raise
    except BenchError as exc:
        if debug:
            raise
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:  # the CLI library's own errors: usage (2), abort (Ctrl-C, EOF)
        if debug:
            raise
        names = _class_names(exc)
        if "NoArgsIsHelpError" in names:  # bare `bench`: its message is the help text
            write(f"{exc.format_message()}\n")
            sys.exit(0)
        if "Abort" in names:
            _interrupted()
        if not _is_usage_error(exc):
            raise
        err.print(_usage_line(exc), markup=False, highlight=False, soft_wrap=True)
        sys.exit(2)
    if code == 130:
        _interrupted()
    if isinstance(code, int) and code:
        sys.exit(code)
