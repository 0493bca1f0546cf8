"""The local executor: jobs run one after another in this process."""
from __future__ import annotations

from typing import Any, Iterable, Iterator


class LocalExecutor:
    """Runs jobs one after another in this process."""

    def map(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        for job in jobs:
            yield job, job.run()
