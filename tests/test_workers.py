"""One checkpoint trained data-parallel on Ray Train (`--workers N`), on the session's
local Ray cluster (2 CPUs): two workers follow one process at the global batch, the
checkpoint is attacked like any other, a worker killed mid-training is replaced and the
training goes on from its last epoch, and bad worker counts are one-line errors."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench import api
from bench.engine.train import SINGLE, Shard, steps_per_epoch, worker_seed
from bench.errors import BenchError
from bench.registry import DEFENSES
from bench.run.recipe import TrainRequest, resolve
from bench.store import checkpoints as ckpt

BENCH = Path(sys.executable).parent / "bench"
EPOCHS = 3
BATCH = 32
"""Per worker: two workers step on 64 images, as one process at batch 64."""


def _request(
    defense: str = "natural", workers: int = 2, batch: int = BATCH, marker: Path | None = None
) -> TrainRequest:
    marked = (f"marker={marker!s}",) if marker else ()
    return TrainRequest(defense, overrides=(f"epochs={EPOCHS}", f"batch_size={batch}", *marked), workers=workers)


# --- without Ray -----------------------------------------------------------------------------
def test_one_worker_keeps_the_keys_and_records_it_always_had():
    one = resolve(_request(workers=1))
    assert one.key == ckpt.checkpoint_key(
        "natural", one.config, one.train_config, "digits", one.arch, one.seed
    )  # the key every checkpoint before --workers has
    assert one.train_record() == dataclasses.asdict(one.train_config)
    two = resolve(_request(workers=2))
    assert two.key not in (one.key, resolve(_request(workers=3)).key)
    assert two.train_record() == {**dataclasses.asdict(one.train_config), "workers": 2}


def test_the_sharding_arithmetic():
    # 1437 digits at 32 per worker: 22 global batches of 64, then 29 images split 15/14.
    assert steps_per_epoch(1437, 32, 2) == 23 == steps_per_epoch(1437, 64, 1)
    assert steps_per_epoch(1437, 64) == 23  # one process drops nothing
    assert steps_per_epoch(130, 32, 4) == 1  # a last batch of 2 images cannot feed 4 workers
    assert steps_per_epoch(3, 64, 4) == 0  # refused by the workers: nothing to train on
    assert len({worker_seed(0, r) for r in range(4)} | {0}) == 5  # the workers' own seeds differ
    assert worker_seed(0, 1) == worker_seed(0, 1) < 2**63
    assert SINGLE == Shard(0, 1)
    with pytest.raises(ValueError, match="rank"):
        Shard(2, 2)


@pytest.mark.parametrize("workers", [0, -1, 1025, 2.5, "2", True])
def test_bad_worker_counts_are_refused_before_anything_runs(workers):
    with pytest.raises(BenchError, match=r"^--workers must be an integer between 1 and 1024, got "):
        resolve(TrainRequest("natural", workers=workers))


@pytest.mark.parametrize(
    "value, message",
    [("0", "--workers must be an integer between 1 and 1024, got 0"), ("two", "invalid value for '--workers'")],
)
def test_bad_workers_on_the_command_line_exit_2_with_one_line(tmp_path, value, message):
    proc = subprocess.run(
        [str(BENCH), "train", "--defense", "natural", "--workers", value, "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr, proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


# --- on Ray Train ----------------------------------------------------------------------------
# Under pytest-xdist these share one worker with tests/test_ray.py, and so its one cluster.
on_ray = pytest.mark.xdist_group("ray")


@dataclass(frozen=True)
class Killer:
    """Cross-entropy, but rank 1 kills its own process in epoch 2 while `marker` is absent."""

    marker: str = ""


def _killing_loss(model, x, y, cfg: Killer, ctx):
    if ctx.epoch == 1 and torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
        if cfg.marker and not os.path.exists(cfg.marker):
            open(cfg.marker, "w").close()
            os._exit(1)
    return F.cross_entropy(model(x), y)


@pytest.fixture(scope="module")
def killer():
    """The killing defense registered here, its code shipped to the workers by value (they
    cannot import this test module)."""
    import ray

    DEFENSES.load()
    DEFENSES.register("killer_natural", config=Killer)(_killing_loss)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        DEFENSES.unregister("killer_natural")


@pytest.fixture(scope="module")
def parallel(ray_cluster, killer, tmp_path_factory):
    """digits trained once on two workers (the session's cluster: 2 CPUs, one each), with
    rank 1 killing itself in epoch 2 of the first attempt. One training serves all three
    tests below: a Ray Train start costs 25 to 40 s on this machine, and a resume that lost
    or repeated anything would show in the parity with one process (one step of another
    batch moves the first epoch's loss by about 1e-2, a thousand times the tolerance)."""
    pytest.importorskip("ray.train", exc_type=ImportError)  # it needs pyarrow (the `ray` extra)
    root = tmp_path_factory.mktemp("workers")
    marker = root / "killed-once"
    request = _request("killer_natural", marker=marker)
    row, trained = api.train(request, api.Where(results=root / "results"))
    assert trained
    return root / "results", row, marker


@on_ray
def test_a_worker_killed_mid_training_is_replaced_and_the_training_goes_on(parallel):
    _, row, marker = parallel
    assert marker.exists()  # rank 1 died in epoch 2 of its first attempt
    assert len(row.meta["train_losses"]) == EPOCHS
    assert not list(Path(row.path).parent.glob(".train-*"))  # Ray Train's epoch checkpoints are gone


@on_ray
def test_two_workers_follow_one_process_at_the_global_batch(parallel, tmp_path):
    """Every worker went on from the end of epoch 1 with the weights, optimizer and
    generators it had there, so the killed training still follows one process."""
    _, row, _ = parallel
    one, _ = api.train(_request("killer_natural", workers=1, batch=2 * BATCH), api.Where(results=tmp_path))
    two_losses, one_losses = row.meta["train_losses"], one.meta["train_losses"]
    assert len(two_losses) == len(one_losses) == EPOCHS
    # The same steps up to the order of float sums (the gradients are summed over the two
    # halves, then averaged): measured 1e-7 relative; 1e-5 leaves room.
    assert two_losses == pytest.approx(one_losses, rel=1e-5)
    two_model = api.load_checkpoint(row.path)
    one_model = api.load_checkpoint(one.path)
    for (name, a), b in zip(two_model.state_dict().items(), one_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # The worker count is in the stored recipe; the one-process recipe has none.
    assert row.train_config["workers"] == 2 == row.meta["workers"]
    assert row.train_config["batch_size"] == BATCH
    assert "workers" not in one.train_config and "workers" not in one.meta
    assert row.key != one.key


@on_ray
def test_a_data_parallel_checkpoint_is_attacked_like_any_other(parallel):
    results, row, marker = parallel
    reports, rows = api.run(
        "killer_natural", "quick", _request("killer_natural", marker=marker), api.Where(results=results)
    )
    (report,) = reports
    assert not report.trained and report.checkpoint.key == row.key  # found, not trained again
    assert report.cells_run and len(report.cells_run) == report.cells_total and not report.failures
    assert rows and {r["checkpoint"] for r in rows} == {row.key}
