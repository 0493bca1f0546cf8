"""Shared fixtures: the digits data and small trained models, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

from bench.core.data import get_spec, load_dataset
from bench.engine.train import TrainConfig, train_model
from bench.registry import DEFENSES

# One intra-op thread: the digits models are too small to gain from more, and when the
# cores are shared (a parallel build, a busy CI host) OpenMP threads spin-waiting for
# each other slow a run down twenty-fold (measured: PGD-50 on digits 1.2 s vs 22.6 s).
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"  # for the subprocesses the tests start


def train_digits(defense: str, epochs: int = 15, seed: int = 0, **values) -> torch.nn.Module:
    """A digits_cnn trained with one defense's loss (quick settings, seeded)."""
    spec = get_spec("digits")
    entry = DEFENSES.get(defense)
    x, y = load_dataset("digits", "train")
    model, _ = train_model(
        "digits_cnn", spec, entry.fn, entry.make_config(values), TrainConfig(epochs=epochs), x, y, seed=seed
    )
    return model


@pytest.fixture(scope="session")
def digits_test():
    return load_dataset("digits", "test")


@pytest.fixture(scope="session")
def natural_model():
    return train_digits("natural")


# Real PostgreSQL and Ray servers and the test plugins (tests/servers.py).
from servers import bench_plugins, postgres_server, ray_cluster, registered_plugins, store_url  # noqa: E402,F401
