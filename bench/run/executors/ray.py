"""The Ray executor: jobs run as Ray tasks, on this machine or across a cluster.

Each job is one task that asks for `cpus_per_task` CPUs (and, on CUDA, `gpus_per_task`
of a GPU, a fraction letting several tasks share one) and sets torch's thread count to
its CPUs, so a task computes exactly what the local executor computes with the same
thread count. What many jobs share (a model, the test set; a job's `SHARED` fields) is
put into Ray's object store once and handed to every task by reference; each worker
fetches it once and keeps it for the next tasks. Results come
back to the driver in the order tasks finish (`ray.wait`); the driver alone writes the
store. A task whose worker dies (killed, out of memory, a lost node) is retried by Ray
(`max_retries`); a job that raises is not retried, and comes back as `Failed`.
"""

from __future__ import annotations

import dataclasses
import socket
import sys
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from bench.core.provenance import source_digest
from bench.errors import BenchError
from bench.run.jobs import Failed


def _ray():
    """The ray module, imported on first use: Ray is an optional extra (`[ray]`), so the
    bench imports, and runs locally, without it."""
    try:
        import ray
    except ImportError as exc:
        raise BenchError("--executor ray needs Ray: pip install 'robustness-bench[ray]'") from exc
    return ray


_WORKER_CACHE: OrderedDict[str, Any] = OrderedDict()
"""In each worker process: the shared values it fetched last, by object id. A model is
then deserialized once per worker rather than once per cell, and the fast path's per-model
preparation (bench.engine.fastmodel.fast_model) is reused across its cells."""
_WORKER_CACHE_SIZE = 8


def _fetch(ref: Any) -> Any:
    ray = _ray()
    key = ref.hex()
    if key in _WORKER_CACHE:
        _WORKER_CACHE.move_to_end(key)
    else:
        _WORKER_CACHE[key] = ray.get(ref)
        while len(_WORKER_CACHE) > _WORKER_CACHE_SIZE:
            _WORKER_CACHE.popitem(last=False)
    return _WORKER_CACHE[key]


def _run_job(job: Any, names: tuple[str, ...], threads: int, refs: list, digest: str) -> Any:
    """The task body: check the worker runs the driver's code, put the shared values back
    into the job, fix the thread count, run. `refs` come in a list so that Ray hands over
    the references, not copies of the values."""
    if source_digest() != digest:
        raise BenchError(
            "this Ray worker runs other bench code than the driver (the source changed "
            "after the run started, or the cluster's machines have other versions); "
            "restart the run with one version everywhere"
        )
    torch.set_num_threads(threads)
    return dataclasses.replace(job, **{n: _fetch(r) for n, r in zip(names, refs, strict=True)}).run()


def _by_value(ray: Any, value: Any) -> None:
    """Send the code of a model's classes along with it where workers cannot import their
    module by name: a model factory the bench loaded from a .py path (bench.run.outside marks
    such modules), which Ray would otherwise pickle as a reference no worker resolves."""
    if not isinstance(value, torch.nn.Module):
        return
    for name in {type(m).__module__ for m in value.modules()}:
        module = sys.modules.get(name)
        if getattr(module, "__pickle_by_value__", False):
            ray.cloudpickle.register_pickle_by_value(module)


def _check_reachable(address: str | None) -> None:
    """Fail at once on a host:port nobody listens on (Ray itself retries for minutes)."""
    if not address or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        raise BenchError(f"--ray-address {address!r} is not auto or host:port (e.g. 10.0.0.1:6379)")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except OSError as exc:
        raise BenchError(
            f"cannot reach a Ray cluster at {address!r} ({exc.strerror or exc}); start one "
            "with `ray start --head` there, or leave --ray-address unset for a local "
            "cluster"
        ) from exc


class RayExecutor:
    """Runs jobs as Ray tasks; yields (job, result) as tasks finish.

    `address` None starts a local Ray cluster for this executor (stopped by `close`);
    `auto` or `host:port` joins a running one. A process that already called `ray.init`
    (a test session, a notebook) is used as it is.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        cpus_per_task: int = 1,
        gpus_per_task: float = 1.0,
        max_retries: int = 3,
        num_cpus: int | None = None,
    ):
        if cpus_per_task < 1:
            raise BenchError(f"CPUs per Ray task must be at least 1, got {cpus_per_task}")
        if gpus_per_task <= 0 or (gpus_per_task > 1 and not float(gpus_per_task).is_integer()):
            raise BenchError(f"--ray-gpus must be a fraction in (0, 1] or a whole number, got {gpus_per_task}")
        ray = _ray()
        self.ray = ray
        self.cpus_per_task = cpus_per_task
        self.gpus_per_task = gpus_per_task
        self.max_retries = max_retries
        _check_reachable(address)
        self.started = not ray.is_initialized()
        if self.started:
            try:
                # "local" forces a fresh cluster of this machine's cores rather than
                # attaching to one `ray start` left running here.
                ray.init(
                    address=address or "local",
                    num_cpus=num_cpus if not address else None,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                )
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise BenchError(
                    f"cannot reach a Ray cluster at {address!r}: {str(exc).splitlines()[0]}; "
                    "check --ray-address (auto, host:port) or leave it unset for a local "
                    "cluster"
                ) from exc
        self._task = ray.remote(_run_job)

    def slots(self) -> int:
        """Tasks the cluster can run at once: how many jobs to keep in flight."""
        cpus = int(self.ray.cluster_resources().get("CPU", 1))
        return max(1, cpus // self.cpus_per_task)

    def map(self, jobs: Iterable[Any]) -> Iterator[tuple[Any, Any]]:
        """(job, result) as tasks finish. Jobs are pulled lazily, keeping about two per
        slot in flight, so a driver that claims work as it hands it out (bench.store.claims)
        claims little more than it is computing. None in `jobs` means nothing is ready
        yet: finished results are collected and `jobs` is asked again."""
        ray = self.ray
        shared: dict[int, tuple[Any, Any]] = {}  # id(value) -> (value, ObjectRef), values kept alive
        inflight: dict[Any, Any] = {}  # ObjectRef -> job
        window = 2 * self.slots()
        source = iter(jobs)
        exhausted = False

        def put(value: Any):
            if id(value) not in shared:
                _by_value(ray, value)
                shared[id(value)] = (value, ray.put(value))
            return shared[id(value)][1]

        def submit(job: Any) -> None:
            names = tuple(job.SHARED)
            stub = dataclasses.replace(job, **{n: None for n in (*names, *job.LOCAL)})
            gpus = self.gpus_per_task if str(getattr(job, "device", "cpu")).startswith("cuda") else 0
            task = self._task.options(
                num_cpus=self.cpus_per_task, num_gpus=gpus, max_retries=self.max_retries, retry_exceptions=False
            )
            inflight[
                task.remote(stub, names, self.cpus_per_task, [put(getattr(job, n)) for n in names], source_digest())
            ] = job

        while inflight or not exhausted:
            idle = False
            while not exhausted and len(inflight) < window and not idle:
                try:
                    job = next(source)
                except StopIteration:
                    exhausted = True
                    break
                if job is None:
                    idle = True
                else:
                    submit(job)
            if not inflight:
                continue
            # Wait for one task, or only look when the job source is waiting on others.
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0 if idle else None)
            for ref in ready:
                yield inflight.pop(ref), self._result(ref)

    def _result(self, ref: Any) -> Any:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as exc:  # the job raised: report its own exception
            return Failed.of(exc.cause if exc.cause is not None else exc)
        except self.ray.exceptions.RayError as exc:  # the worker died more often than max_retries, or was cancelled
            return Failed.of(exc)

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()
            self.started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
