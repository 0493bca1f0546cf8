"""The local executor: jobs run one after another in this process."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from bench.run.jobs import Failed


class LocalExecutor:
    """Runs jobs one after another in this process."""

    def map(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """(job, result) per job, in order; a job that raised yields Failed instead, and the
        next goes on. None in `jobs` (nothing ready yet) is skipped."""
        for job in jobs:
            if job is None:
                continue
            try:
                result = job.run()
            # Any exception of a job (a plugin attack's bug included) fails that job alone;
            # the driver reports it. KeyboardInterrupt is not an Exception and still stops.
            except Exception as exc:
                result = Failed.of(exc)
            yield job, result

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
