"""The two consoles: results on stdout, progress and messages on stderr."""
from __future__ import annotations

import sys

from rich.console import Console

# Piped output (CI logs, `| less`) gets a wide console so cell keys are not folded.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)
