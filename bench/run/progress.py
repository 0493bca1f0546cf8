"""Progress bars of a run's stages, on the Bench's rich Progress (none in logs and pipes)."""
from __future__ import annotations

from typing import Callable

from bench.run.workspace import Bench


def progress_bar(bench: Bench, label: str, total: int) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """(on_step, done) callbacks driving one progress bar, or no-ops without a display."""
    if bench.progress is None:
        return None, lambda: None
    task = bench.progress.add_task(label, total=total)

    def on_step(step, *_):
        bench.progress.update(task, completed=step)

    return on_step, lambda: bench.progress.remove_task(task)
