"""The one exception type the command line turns into exit status 2.

Anything a user can get wrong (a name, a file, a folder, a value) raises BenchError
with a single line that says what was wrong and how to mend it. Everything else is a
bug and keeps its traceback.
"""

import difflib


class BenchError(Exception):
    """Bad input: printed as one line, exit status 2."""


def did_you_mean(name: str, choices, n: int = 3) -> str:
    """'; did you mean a, b?' naming the choices closest to a misspelt name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""
