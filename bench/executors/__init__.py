"""Executors: the only part that knows where jobs run.

An executor's `map(jobs)` yields `(job, result)` pairs as jobs complete (not in
submission order); the driver commits each result as it arrives.
"""
from bench.executors.local import LocalExecutor

__all__ = ["LocalExecutor"]
