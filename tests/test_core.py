"""The harness core: data, registry, checkpoints, store, matrices, scheduler, CLI."""

from __future__ import annotations

import json
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_run import run_cli as _cli

import bench
from bench.core.cells import cell_key, make_cell
from bench.core.data import get_spec, load_dataset
from bench.core.matrix import load_matrix, matrix_cells
from bench.engine.selection import subset_indices
from bench.errors import BenchError
from bench.registry import ATTACKS, DEFENSES, Registry
from bench.run.driver import run_defense
from bench.run.recipe import TrainRequest, resolve
from bench.run.workspace import Workspace
from bench.store.bits import pack_bits, unpack_bits
from bench.store.checkpoints import checkpoint_key, load_checkpoint
from bench.store.evidence import worst_case
from bench.store.rows import CellRow

DIGITS = get_spec("digits")


# --- data ------------------------------------------------------------------------------
def test_digits_split_is_fixed_and_in_unit_range():
    x, _ = load_dataset("digits", "train")
    xt, yt = load_dataset("digits", "test")
    assert x.shape == (1437, 1, 8, 8) and xt.shape == (360, 1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert sorted(torch.bincount(yt).tolist())[0] >= 35  # stratified: every class ~36 times
    assert bench.load_dataset("digits", split="test")[1].tolist() == yt.tolist()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    magic = 0x0803 if arr.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in arr.shape))
        f.write(arr.astype(np.uint8).tobytes())


def test_real_loaders_read_small_files_in_their_formats(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    x, y = load_dataset("mnist", "test", root=str(tmp_path))
    assert x.shape == (4, 1, 28, 28) and y.tolist() == [0, 1, 2, 3] and float(x.max()) <= 1.0

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    pixels = rng.integers(0, 256, (3, 3072)).astype(np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": [7, 8, 9]}, f)
    x, y = load_dataset("cifar10", "train", root=str(tmp_path))
    assert x.shape == (15, 3, 32, 32) and y[:3].tolist() == [7, 8, 9]
    # The first pixel of the red plane is the first byte of the row.
    assert x[0, 0, 0, 0].item() == pytest.approx(pixels[0, 0] / 255.0)

    from scipy.io import savemat

    savemat(
        tmp_path / "test_32x32.mat",
        {"X": rng.integers(0, 256, (32, 32, 3, 2)).astype(np.uint8), "y": np.array([[10], [3]])},
    )
    x, y = load_dataset("svhn", "test", root=str(tmp_path))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [0, 3]


def test_missing_dataset_folder_says_which_files_go_where(tmp_path):
    with pytest.raises(BenchError, match="cifar-10-batches-py"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    with pytest.raises(BenchError, match="--data-root"):
        load_dataset("svhn", "test", root="")


# --- registry ------------------------------------------------------------------------
def test_registry_rejects_duplicates_and_names_close_matches():
    from dataclasses import dataclass

    reg = Registry("gadget", "defenses", "bench.none")

    @dataclass(frozen=True)
    class Cfg:
        beta: float = 1.0

    reg.register("squeezer", config=Cfg)(lambda: None)
    with pytest.raises(ValueError, match="duplicate"):
        reg.register("squeezer", config=Cfg)(lambda: None)
    reg._loaded = True
    with pytest.raises(BenchError, match="did you mean squeezer"):
        reg.get("squeezr")
    with pytest.raises(BenchError, match="beta must be float"):
        reg.get("squeezer").make_config({"beta": "high"})
    assert reg.get("squeezer").make_config({"beta": 2}).beta == 2.0


def test_builtin_plugins_are_registered():
    assert {"natural", "logit_squeeze"} <= set(DEFENSES.names())
    assert {"fgsm", "pgd"} <= set(ATTACKS.names())


def _dist_info(root: Path, name: str, group: str, module: str, source: str) -> None:
    (root / f"{module}.py").write_text(source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n{name} = {module}\n")


PLUGIN = '''
from dataclasses import dataclass
import torch.nn.functional as F
from bench.plugin import register_defense

@dataclass(frozen=True)
class Plain:
    """No settings."""

@register_defense("third_party_plain", config=Plain)
def loss(model, x, y, cfg, ctx):
    """Cross-entropy, from a plugin outside the package."""
    return F.cross_entropy(model(x), y)
'''


def test_entry_point_plugin_registers_and_runs(tmp_path, monkeypatch):
    _dist_info(tmp_path, "bench_plugin_demo", "bench.defenses", "bench_plugin_demo_mod", PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(DEFENSES, "_loaded", False)
    try:
        assert "third_party_plain" in DEFENSES.names()
        b = Workspace.open(tmp_path / "res")
        report = run_defense(b, TrainRequest("third_party_plain", overrides=("epochs=2",)), load_matrix("quick"))
        assert report.trained and len(report.cells_run) == 3
        assert report.checkpoint.meta["clean_acc"] > 0.5
    finally:
        DEFENSES.unregister("third_party_plain")


def test_broken_entry_point_is_an_error_not_a_gap(tmp_path, monkeypatch):
    _dist_info(
        tmp_path, "bench_plugin_broken", "bench.attacks", "bench_plugin_broken_mod", "raise ImportError('boom')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(ATTACKS, "_loaded", False)
    with pytest.raises(BenchError, match=r"bench_plugin_broken.*boom"):
        ATTACKS.load()
    monkeypatch.setattr(ATTACKS, "_loaded", True)


# --- recipes, keys, checkpoints ----------------------------------------------------------
def test_recipe_key_is_stable_and_sensitive_to_every_ingredient():
    a = resolve(TrainRequest("logit_squeeze", overrides=("beta=0.5",)))
    assert a.key == resolve(TrainRequest("logit_squeeze", overrides=("beta=0.5",))).key
    assert a.key != resolve(TrainRequest("logit_squeeze", overrides=("beta=0.6",))).key
    assert a.key != resolve(TrainRequest("logit_squeeze", overrides=("beta=0.5",), seed=1)).key
    assert a.key != resolve(TrainRequest("logit_squeeze", overrides=("beta=0.5", "epochs=3"))).key
    assert a.key == checkpoint_key("logit_squeeze", a.config, a.train_config, "digits", "digits_cnn", 0)


def test_bad_overrides_are_one_line_errors():
    with pytest.raises(BenchError, match="did you mean beta"):
        resolve(TrainRequest("logit_squeeze", overrides=("bta=1",)))
    with pytest.raises(BenchError, match="form must be"):
        resolve(TrainRequest("logit_squeeze", overrides=('form="sideways"',)))
    with pytest.raises(BenchError, match="not key=value"):
        resolve(TrainRequest("natural", overrides=("epochs",)))


# --- matrices --------------------------------------------------------------------------
def test_cell_keys_are_canonical():
    cell = make_cell("pgd", {"steps": 20, "loss": "cw"}, DIGITS.threat)
    assert cell.key == "pgd:eps=0.2,loss=cw,norm=linf,random_start=true,restarts=1,step_size=0.05,steps=20"
    assert cell.threat == "linf-0.2"
    # early_stop changes speed, never results, so it is not part of the key.
    assert make_cell("pgd", {"steps": 20, "loss": "cw", "early_stop": False}, DIGITS.threat).key == cell.key
    assert cell_key("pgd", cell.config, subset=100).endswith(",subset=100")


def test_matrix_expansion_and_errors(tmp_path):
    keys = [c.key for c in matrix_cells("quick", DIGITS.threat)]
    assert len(keys) == len(set(keys)) == 3
    bad = tmp_path / "bad.toml"
    bad.write_text("[[cell]]\nattack = 'pgd'\nsteps = [10,\n")
    with pytest.raises(BenchError, match="not valid TOML"):
        matrix_cells(str(bad), DIGITS.threat)
    bad.write_text("[[cell]]\nattack = 'pgdd'\n")
    with pytest.raises(BenchError, match="unknown attack 'pgdd'; did you mean pgd"):
        matrix_cells(str(bad), DIGITS.threat)
    bad.write_text("[[cell]]\nattack = 'pgd'\nsteps = 'many'\n")
    with pytest.raises(BenchError, match="steps must be int"):
        matrix_cells(str(bad), DIGITS.threat)
    with pytest.raises(BenchError, match="unknown matrix"):
        matrix_cells("fulll", DIGITS.threat)


# --- store -----------------------------------------------------------------------------
def test_bits_round_trip():
    v = np.random.default_rng(1).random(37) > 0.5
    assert (unpack_bits(pack_bits(v), 37) == v).all()


def _Cell(key, threat, bits, indices=None):
    bits = np.asarray(bits, dtype=bool)
    return CellRow.build(
        cell_key=key, attack=key, threat=threat, n=len(bits), correct_bits=pack_bits(bits), indices=indices
    )


def test_worst_case_is_the_per_sample_and_over_its_threat_model():
    cells = [
        _Cell("a", "linf-0.2", [1, 1, 0, 1]),
        _Cell("b", "linf-0.2", [1, 0, 1, 1]),
        _Cell("other-threat", "l2-1", [0, 0, 0, 0]),
        _Cell("subset", "linf-0.2", [0], indices=[3]),
    ]
    wc = worst_case("linf-0.2", cells, 4)
    assert wc.robust_acc == 0.25 and len(wc.cells) == 3  # only sample 0 survives a, b and subset


def test_subset_is_fixed_and_seeded():
    a = subset_indices(360, 100)
    assert len(a) == 100 and (a == subset_indices(360, 100)).all() and subset_indices(360, 0) is None


# --- the driver ------------------------------------------------------------------------
def test_run_stores_every_cell_and_reruns_nothing(tmp_path):
    b = Workspace.open(tmp_path)
    spec = TrainRequest("natural", overrides=("epochs=5",))
    first = run_defense(b, spec, load_matrix("quick"))
    assert first.trained and len(first.cells_run) == 3
    rows = {e.cell_key: e for e in b.store.evaluations()}
    fgsm = rows["fgsm:eps=0.2,loss=xent"]
    pgd20 = rows["pgd:eps=0.2,loss=xent,norm=linf,random_start=true,restarts=1,step_size=0.05,steps=20"]
    assert fgsm.n == 360 and 0.8 < fgsm.clean_acc <= 1.0
    # Natural training is not robust at eps 0.2, and PGD beats FGSM.
    assert pgd20.robust_acc < 0.1 and pgd20.robust_acc <= fgsm.robust_acc
    assert unpack_bits(pgd20.correct_bits, 360).mean() == pytest.approx(pgd20.robust_acc)
    second = run_defense(b, spec, load_matrix("quick"))
    assert not second.trained and second.cells_run == []
    assert len(b.store.evaluations()) == 3

    model = load_checkpoint(first.checkpoint.path)
    x, y = load_dataset("digits", "test")
    assert not model.training
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(first.checkpoint.meta["clean_acc"])
    assert isinstance(load_checkpoint(first.checkpoint.key[:10], results=tmp_path), torch.nn.Module)


def test_checkpoint_on_disk_is_adopted_not_retrained(tmp_path):
    spec = TrainRequest("natural", overrides=("epochs=2",))
    run_defense(Workspace.open(tmp_path), spec, load_matrix("quick"))
    os.remove(tmp_path / "bench.db")  # as if killed after writing the weights, before recording
    report = run_defense(Workspace.open(tmp_path), spec, load_matrix("quick"))
    assert not report.trained and len(report.cells_run) == 3


def test_altered_weights_are_refused(tmp_path):
    report = run_defense(
        Workspace.open(tmp_path), TrainRequest("natural", overrides=("epochs=1",)), load_matrix("quick")
    )
    weights = Path(report.checkpoint.path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BenchError, match="not an intact checkpoint"):
        load_checkpoint(report.checkpoint.path)


# --- the command line ------------------------------------------------------------------
def test_results_json_has_the_promised_fields(tmp_path, monkeypatch, capsys):
    run_defense(Workspace.open(tmp_path), TrainRequest("natural", overrides=("epochs=2",)), load_matrix("quick"))
    code, out, _ = _cli(monkeypatch, capsys, "results", "--format", "json", "--results", str(tmp_path))
    rows = json.loads(out)
    assert code == 0 and len(rows) == 4
    for r in rows:
        assert {"defense", "dataset", "checkpoint", "attack", "clean_acc", "robust_acc", "n"} <= set(r)
    worst = [r for r in rows if r["attack"] == "worst_case"]
    assert len(worst) == 1 and worst[0]["robust_acc"] <= min(r["robust_acc"] for r in rows)


def _snapshot(db: Path):
    with sqlite3.connect(db) as con:
        return [
            con.execute(f"select count(*) from {t}").fetchone()[0]
            for t in ("checkpoints", "evaluations", "transfers", "flags")
        ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--defense", "logit_sqeeze"], "unknown defense 'logit_sqeeze'; did you mean logit_squeeze"),
        (["run", "--defense", "natural", "--matrix", "fulll"], "unknown matrix 'fulll'"),
        (["run", "--defense", "natural", "--matrix", "{bad}"], "not valid TOML"),
        (["run", "--defense", "natural", "--matrix", "{unknown_attack}"], "unknown attack 'fgsmm'"),
        (["run", "--defense", "natural", "--dataset", "cifar10", "--data-root", "{missing}"], "is not a folder"),
        (["transfer", "--source", "nothing_here"], "no stored checkpoint on digits matches --source"),
        (["run", "--defense", "natural", "--set", "epochs=-1"], "epochs must be an integer of at least 1, got -1"),
        (["results", "--format", "xml"], "--format must be table, wide, csv or json"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_leaves_the_store(tmp_path, monkeypatch, capsys, args, message):
    results = tmp_path / "res"
    run_defense(Workspace.open(results), TrainRequest("natural", overrides=("epochs=1",)), load_matrix("quick"))
    before = _snapshot(results / "bench.db")
    (tmp_path / "bad.toml").write_text("[[cell]\n")
    (tmp_path / "unknown.toml").write_text("[[cell]]\nattack = 'fgsmm'\n")
    subst = {
        "{bad}": str(tmp_path / "bad.toml"),
        "{unknown_attack}": str(tmp_path / "unknown.toml"),
        "{missing}": str(tmp_path / "nowhere"),
    }
    argv = [subst.get(a, a) for a in args] + ["--results", str(results)]
    code, _, err = _cli(monkeypatch, capsys, *argv)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert _snapshot(results / "bench.db") == before


def test_unwritable_results_folder_exits_2(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = _cli(monkeypatch, capsys, "run", "--defense", "natural", "--results", str(blocker / "res"))
    assert code == 2 and "is not writable" in err and err.count("\n") == 1


KILL_MATRIX = """
[[cell]]
attack = "pgd"
early_stop = false
steps = [150, 151, 152, 153, 154, 155, 156, 157]
"""


def test_sigkill_mid_run_loses_nothing_committed(tmp_path):
    matrix = tmp_path / "slow.toml"
    matrix.write_text(KILL_MATRIX)
    res = tmp_path / "res"
    argv = [
        sys.executable,
        "-m",
        "bench.cli",
        "run",
        "--defense",
        "natural",
        "--set",
        "epochs=2",
        "--matrix",
        str(matrix),
        "--results",
        str(res),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    db = res / "bench.db"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if db.exists():
                try:
                    with sqlite3.connect(db) as con:
                        if con.execute("select count(*) from evaluations").fetchone()[0] >= 2:
                            break
                except sqlite3.OperationalError:
                    pass
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with sqlite3.connect(db) as con:
        kept = dict(con.execute("select cell_key, robust_acc from evaluations").fetchall())
    assert 2 <= len(kept) < 8
    assert subprocess.run(argv, capture_output=True).returncode == 0
    with sqlite3.connect(db) as con:
        rows = con.execute("select cell_key, robust_acc from evaluations").fetchall()
        assert con.execute("select count(*) from checkpoints").fetchone()[0] == 1
    assert len(rows) == 8 and len({k for k, _ in rows}) == 8
    assert all(dict(rows)[k] == v for k, v in kept.items())
