"""Writing the site folder atomically: built beside --out, then swapped into place.

A failed build leaves the previous site as it was, and only a folder this package wrote
(it holds MARKER) or an empty one is ever replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from bench.errors import BenchError

MARKER = ".bench-site"
"""A file in every site this package writes; only such a folder (or an empty one) is replaced."""


def write(path: Path, text: str) -> None:
    """One page of the site, as UTF-8."""
    path.write_text(text, encoding="utf-8")


def check_target(out: Path) -> None:
    """Refuse an --out that is a file, or a non-empty folder that is not a site."""
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {str(out)!r} is a file, not a folder; pass --out DIR")
    if out.is_dir() and not (out / MARKER).exists() and any(out.iterdir()):
        raise BenchError(
            f"refusing to replace {str(out)!r}: it is not empty and was not written by "
            f"`bench site` (no {MARKER} file); pass --out with a new or empty folder"
        )


def staging(out: Path) -> Path:
    """A new temporary folder beside `out` (same file system, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        raise BenchError(
            f"cannot write the site to {str(out)!r} ({exc.strerror}{where}); pass --out DIR with a folder you can write"
        ) from exc


def publish(tmp: Path, out: Path) -> None:
    """Move the finished site into place; the old one is removed only after the swap."""
    try:
        if out.exists():
            check_target(out)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "site")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        os.chmod(out, 0o755)  # mkdtemp makes 0700 folders; a static server needs to read it
    except OSError as exc:
        raise BenchError(
            f"cannot move the site into {str(out)!r} ({exc.strerror}); pass --out DIR with a folder you can write"
        ) from exc
