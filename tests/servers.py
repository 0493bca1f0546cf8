"""Real servers for the store and scale-out tests, started by the tests themselves.

- `postgres_server`: a PostgreSQL cluster made by `initdb` in a temporary folder, listening
  only on a Unix socket there (no TCP port), stopped and deleted at the end.
- `ray_cluster`: one local Ray cluster of 2 CPUs for the whole session (Ray takes seconds
  to start), shut down at the end so no Ray process outlives pytest.
- `bench_plugins`: a third-party plugin package (entry points, as a user's would be) whose
  defense and attacks log every training and every cell they compute to the file named
  by $BENCH_TEST_LOG, which is how the tests prove that nothing was computed twice; one
  attack kills its own worker process the first time it runs, another always raises.

Outside CI the PostgreSQL tests skip when PostgreSQL is not installed; under CI=true
they fail instead.
"""

from __future__ import annotations

import glob
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

PLUGIN = '''
"""Test plugins: a logging defense and logging, self-killing and failing attacks."""
import os
import signal
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from bench.plugin import Crafted, register_attack, register_defense


def _log(line):
    path = os.environ.get("BENCH_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {line}\\n")


@dataclass(frozen=True)
class Plain:
    """No settings."""


@register_defense("logged_natural", config=Plain)
def loss(model, x, y, cfg, ctx):
    """Cross-entropy; logs the start of each training."""
    if ctx.step == 0:
        _log("train")
    return F.cross_entropy(model(x), y)


@dataclass(frozen=True)
class Iterative:
    eps: float | None = None
    """L-inf radius; unset means the threat model's."""
    steps: int = 5
    """Signed-gradient steps of eps / steps each, no random start."""
    marker: str = ""
    """killer_bim: a file; absent means kill this process (and create it)."""

    def with_threat(self, threat):
        return self if self.eps is not None else replace(self, eps=threat.eps)

    def threat_key(self):
        return f"linf-{self.eps:g}"


def _bim(model, x, y, cfg):
    x_adv = x.clone()
    for _ in range(cfg.steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x_adv.detach() + cfg.eps / cfg.steps * grad.sign())
        x_adv = torch.min(torch.max(x_adv, x - cfg.eps), x + cfg.eps).clamp(0, 1)
    return x_adv.detach()


@register_attack("logged_bim", config=Iterative)
def logged_bim(model, x, y, cfg, *, generator=None):
    """Basic iterative method; logs each call (one per cell on digits)."""
    _log(f"cell logged_bim steps={cfg.steps}")
    return Crafted(_bim(model, x, y, cfg))


@register_attack("killer_bim", config=Iterative)
def killer_bim(model, x, y, cfg, *, generator=None):
    """The basic iterative method, but the first call kills its own process."""
    _log(f"cell killer_bim steps={cfg.steps}")
    if cfg.marker and not os.path.exists(cfg.marker):
        open(cfg.marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return Crafted(_bim(model, x, y, cfg))


@register_attack("failing", config=Iterative)
def failing(model, x, y, cfg, *, generator=None):
    """Always raises, as a buggy attack would."""
    raise RuntimeError("this attack always fails\\nsecond line")
'''

PLUGIN_NAMES = {"defenses": ["logged_natural"], "attacks": ["logged_bim", "killer_bim", "failing"]}


@pytest.fixture(scope="session")
def bench_plugins(tmp_path_factory):
    """The folder holding the plugin package: put it on PYTHONPATH for subprocesses and
    Ray workers. Nothing is registered in this process (see `registered_plugins`)."""
    root = tmp_path_factory.mktemp("plugins")
    (root / "bench_test_plugins.py").write_text(PLUGIN)
    info = root / "bench_test_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: bench_test_plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[bench.defenses]\nlogged = bench_test_plugins\n[bench.attacks]\nlogged = bench_test_plugins\n"
    )
    return root


@pytest.fixture
def registered_plugins(bench_plugins):
    """The test plugins registered in this process for one test, then removed again, so
    that tests parametrized over the whole registry never see them."""
    from bench.registry import ATTACKS, DEFENSES

    DEFENSES.load()  # the built-ins first, while the plugin folder is not on sys.path
    ATTACKS.load()
    sys.path.insert(0, str(bench_plugins))
    try:
        module = sys.modules.get("bench_test_plugins")
        importlib.reload(module) if module else importlib.import_module("bench_test_plugins")
        yield bench_plugins
    finally:
        sys.path.remove(str(bench_plugins))
        for name in PLUGIN_NAMES["defenses"]:
            DEFENSES.unregister(name)
        for name in PLUGIN_NAMES["attacks"]:
            ATTACKS.unregister(name)


def plugin_env(plugins: Path, log: Path) -> dict:
    """Environment for a subprocess that sees the plugins and logs to `log`."""
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])),
        BENCH_TEST_LOG=str(log),
    )


def read_log(log: Path) -> list[str]:
    """The logged computations, without the pid: e.g. ['train', 'cell logged_bim steps=2']."""
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


# --- PostgreSQL -------------------------------------------------------------------------
def _pg_bin(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, or where Debian installs it (not on PATH)."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root; the Debian package adds a postgres user.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresServer:
    def __init__(self, socket_dir: str):
        self.socket_dir = socket_dir
        self._count = 0

    def new_database(self) -> str:
        """A fresh, empty database; its SQLAlchemy URL (psycopg 3, over the Unix socket)."""
        import psycopg

        self._count += 1
        name = f"bench_{self._count}"
        with psycopg.connect(host=self.socket_dir, dbname="postgres", user="postgres", autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@/{name}?host={self.socket_dir}"


@pytest.fixture(scope="session")
def postgres_server():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        reason = "PostgreSQL's initdb/pg_ctl not found (apt-get install postgresql)"
        if os.environ.get("CI"):
            pytest.fail(reason + "; CI must run the PostgreSQL tests")
        pytest.skip(reason)
    # Not under pytest's tmp folder: that is private to root, and the server runs as postgres.
    root = tempfile.mkdtemp(prefix="bench-pg-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    run = dict(check=True, capture_output=True, text=True)
    try:
        subprocess.run(_as_postgres([initdb, "-D", data, "-A", "trust", "-U", "postgres", "--no-sync"]), **run)
        options = f"-c listen_addresses='' -k {root} -c fsync=off -c full_page_writes=off"
        subprocess.run(
            _as_postgres(
                [pg_ctl, "-D", data, "-o", options, "-l", os.path.join(root, "log"), "-w", "-t", "60", "start"]
            ),
            **run,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"could not start PostgreSQL: {exc.stderr.strip().splitlines()[-1:]}")
    try:
        yield PostgresServer(root)
    finally:
        subprocess.run(_as_postgres([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty store on each backend: SQLite in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'bench.db'}"
    return request.getfixturevalue("postgres_server").new_database()


# --- Ray --------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ray_cluster(bench_plugins, tmp_path_factory):
    """One local Ray cluster (2 CPUs) for the session; its workers see the test plugins.
    Returns the log file the plugins write to."""
    ray = pytest.importorskip("ray")
    log = tmp_path_factory.mktemp("ray") / "computed.log"
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "BENCH_TEST_LOG")}
    os.environ.update(plugin_env(bench_plugins, log))  # workers inherit the raylet's environment
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield log
    finally:
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
