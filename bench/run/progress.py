"""Progress bars of a run's stages, on the Workspace's rich Progress (none in logs and pipes)."""

from __future__ import annotations

from collections.abc import Callable

from bench.run.workspace import Workspace


def progress_bar(ws: Workspace, label: str, total: int) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """(on_step, done) callbacks driving one progress bar, or no-ops without a display."""
    if ws.progress is None:
        return None, lambda: None
    task = ws.progress.add_task(label, total=total)

    def on_step(step, *_):
        ws.progress.update(task, completed=step)

    return on_step, lambda: ws.progress.remove_task(task)
