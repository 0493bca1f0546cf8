"""Executors: the only part that knows where jobs run.

An executor's `map(jobs)` yields `(job, result)` pairs as jobs complete (not in
submission order); the driver commits each result as it arrives. A job that raised
yields `bench.run.jobs.Failed` as its result. Executors are context managers: `close`
stops what they started.
"""

from __future__ import annotations

from bench.errors import BenchError
from bench.run.executors.local import LocalExecutor
from bench.run.executors.ray import RayExecutor

EXECUTORS = ("local", "ray")

__all__ = ["EXECUTORS", "LocalExecutor", "make_executor"]


def make_executor(kind: str = "local", *, ray_address: str | None = None, threads: int = 1, gpus_per_task: float = 1.0):
    """`local` (this process, one job at a time) or `ray` (Ray tasks; `ray_address` None
    starts a local cluster, `auto` or host:port joins one)."""
    if kind == "local":
        if ray_address:
            raise BenchError("--ray-address is for --executor ray; drop it or add --executor ray")
        return LocalExecutor()
    if kind == "ray":
        return RayExecutor(ray_address, cpus_per_task=threads, gpus_per_task=gpus_per_task)
    raise BenchError(f"--executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
