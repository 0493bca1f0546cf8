"""The cascade (`schedule = "cascade"`, the built-in `fast`): each cell on what the
earlier ones left standing, and the escalation to a fuller matrix when a model's
gradients say nothing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from cheats import Quantized

import bench
from bench.core.cells import make_cell
from bench.core.data import get_spec, load_dataset
from bench.core.gate import Gate
from bench.core.matrix import load_matrix
from bench.engine.selection import probe_cell
from bench.errors import BenchError
from bench.registry import ATTACKS
from bench.store.db import Store

THREAT = get_spec("digits").threat

CASCADE = """
schedule = "cascade"
{escalate}

[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 10
"""

QUICK = """
[[cell]]
attack = "pgd"
steps = 5
"""


def _rows(tmp_path, model, name, escalate=""):
    matrix = tmp_path / "cascade.toml"
    matrix.write_text(CASCADE.format(escalate=escalate))
    rows = bench.evaluate(model, name=name, matrix=str(matrix), results=tmp_path / "r", device="cpu")
    store = Store.for_results(tmp_path / "r")
    return rows, store


def test_each_cell_runs_on_what_the_earlier_left_standing(natural_model, tmp_path):
    rows, store = _rows(tmp_path, natural_model, "mlp")
    (ck,) = store.checkpoints()
    cells = {r.attack: r for r in store.evaluations([ck.id])}
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert fgsm.cell_key.endswith(",cascade=cascade") and pgd.cell_key.endswith(",cascade=cascade")
    assert fgsm.indices == list(range(360))  # the first cell: every image
    assert pgd.indices == np.flatnonzero(fgsm.correct()).tolist()  # exactly what FGSM left standing
    assert pgd.n == int(fgsm.correct().sum()) < 360
    worst = next(r for r in rows if r["attack"] == "worst_case")
    standing = fgsm.correct().copy()
    standing[pgd.indices] &= pgd.correct()
    assert worst["robust_acc"] == pytest.approx(standing.mean()) and worst["complete"]
    # Its cost: FGSM on every image, PGD-10 on the few left (per test image).
    assert worst["forward_passes"] == pytest.approx(fgsm.forward_passes + pgd.forward_passes * pgd.n / 360)
    assert store.checkpoints()[0].meta.get("escalated") is None  # an honest model: no escalation


NEAREST = """
schedule = "cascade"

[[cell]]
attack = "fgsm"
eps = 0.02

[[cell]]
attack = "pgd"
steps = 5
early_stop = false
nearest = 0.25
"""


def _cascade_cells(model, tmp_path, name: str, text: str) -> dict:
    """The stored rows, by attack, of the cascade `text` run on `model` from a matrix file
    `name`.toml (its cells' keys end `,cascade=<name>`)."""
    matrix = tmp_path / f"{name}.toml"
    matrix.write_text(text)
    bench.evaluate(model, name="mlp", matrix=str(matrix), results=tmp_path / "r", device="cpu")
    store = Store.for_results(tmp_path / "r")
    (ck,) = store.checkpoints()
    return {r.attack: r for r in store.evaluations([ck.id])}


def _margins(model, x, y) -> np.ndarray:
    """Per image, taken from the model itself: the label's logit less the largest other."""
    with torch.no_grad():
        z = model(x).double()
    return (z.gather(1, y[:, None]).squeeze(1) - z.scatter(1, y[:, None], float("-inf")).amax(1)).numpy()


def test_a_nearest_cell_attacks_the_standing_images_of_smallest_margin(natural_model, tmp_path):
    cells = _cascade_cells(natural_model, tmp_path, "near", NEAREST)
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert ",nearest=0.25," in pgd.cell_key and pgd.cell_key.endswith(",cascade=near")
    standing = np.flatnonzero(fgsm.correct())
    x, y = load_dataset("digits", "test")
    k = -(-len(standing) // 4)
    margins = _margins(natural_model, x[standing], y[standing])
    nearest = np.sort(standing[np.argsort(margins, kind="stable")[:k]])
    assert 40 < len(standing) and pgd.indices == nearest.tolist() and pgd.n == k
    # Its cost: one forward pass over every standing image to choose, then PGD-5 without
    # early stop on the k chosen: 5 forward and 5 backward passes each, and one more forward
    # to judge the last iterate of those still standing (tests/test_passes.py); per image attacked.
    left = int(pgd.correct().sum())
    assert pgd.forward_passes == pytest.approx((len(standing) + 5 * k + left) / k)
    assert pgd.backward_passes == pytest.approx(5)


def test_a_probed_cell_attacks_the_images_nearest_after_its_probe(natural_model, tmp_path):
    """With `probe = K` the margins that choose are taken at the end of a K-step PGD probe
    on the CW margin, whose passes count toward the cell's cost."""
    text = NEAREST.replace("nearest = 0.25", "nearest = 0.25\nprobe = 3").replace("eps = 0.02", "eps = 0.01")
    cells = _cascade_cells(natural_model, tmp_path, "probed", text)
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert ",nearest=0.25," in pgd.cell_key and ",probe=3," in pgd.cell_key
    standing = np.flatnonzero(fgsm.correct())
    # The probe, run here as its own PGD (CW margin, cosine step of eps / 4, 3 steps) from
    # its key's seed, and its final margins ranked in the test.
    x, y = load_dataset("digits", "test")
    xs, ys = x[standing], y[standing]
    probe = make_cell("pgd", {"steps": 3, "loss": "cw", "schedule": "cosine", "step_size": 0.05}, THREAT)
    assert probe.key == probe_cell(make_cell("pgd", {"steps": 5, "nearest": 0.25, "probe": 3}, THREAT)).key
    adv = ATTACKS.get("pgd").fn(
        natural_model, xs, ys, probe.config, generator=torch.Generator().manual_seed(probe.seed)
    )
    k = -(-len(standing) // 4)
    chosen = np.sort(standing[np.argsort(_margins(natural_model, adv.x_adv, ys), kind="stable")[:k]])
    assert 40 < len(standing) and pgd.indices == chosen.tolist() and pgd.n == k
    clean = _margins(natural_model, xs, ys)
    assert chosen.tolist() != np.sort(standing[np.argsort(clean, kind="stable")[:k]]).tolist()
    # The probe's backward passes (at most 3 a standing image) come on top of PGD-5's 5.
    assert 5 < pgd.backward_passes <= 5 + 3 * len(standing) / k


def test_an_apgd_probe_ranks_by_each_images_highest_loss_iterate(natural_model, tmp_path):
    """With `probe_attack = "apgd"` the margins that choose are taken at APGD-CE's
    highest-loss iterate of each standing image: here the package's own run, seeded from
    the probe's key as the cell seeds it."""
    from pyautoattack.autopgd_base import APGDAttack

    from bench.plugin import seed_from

    text = NEAREST.replace("nearest = 0.25", 'nearest = 0.25\nprobe = 3\nprobe_attack = "apgd"').replace(
        "eps = 0.02", "eps = 0.01"
    )
    cells = _cascade_cells(natural_model, tmp_path, "probed", text)
    fgsm, pgd = cells["fgsm"], cells["pgd"]
    assert ",probe=3,probe_attack=apgd," in pgd.cell_key
    probe = make_cell("apgd", {"steps": 3, "best_loss": True}, THREAT)
    assert probe.key == probe_cell(make_cell("pgd", {"nearest": 0.25, "probe": 3, "probe_attack": "apgd"}, THREAT)).key
    standing = np.flatnonzero(fgsm.correct())
    x, y = load_dataset("digits", "test")
    xs, ys = x[standing], y[standing]
    seed = seed_from(torch.Generator().manual_seed(probe.seed))
    with torch.random.fork_rng():
        torch.random.manual_seed(seed)
        at = APGDAttack(natural_model, n_iter=3, eps=THREAT.eps, seed=seed, loss="ce", device="cpu").perturb(
            xs, ys, best_loss=True
        )
    k = -(-len(standing) // 4)
    chosen = np.sort(standing[np.argsort(_margins(natural_model, at, ys), kind="stable")[:k]])
    assert 40 < len(standing) and pgd.indices == chosen.tolist() and pgd.n == k
    # A PGD probe of as many steps would have chosen other images.
    other = make_cell("pgd", {"steps": 3, "loss": "cw", "schedule": "cosine", "step_size": 0.05}, THREAT)
    adv = ATTACKS.get("pgd").fn(natural_model, xs, ys, other.config, generator=torch.Generator().manual_seed(0))
    by_pgd = _margins(natural_model, adv.x_adv, ys)
    assert chosen.tolist() != np.sort(standing[np.argsort(by_pgd, kind="stable")[:k]]).tolist()


def test_a_probe_attack_is_named_in_the_key_only_where_it_is_not_pgd():
    plain = make_cell("square", {"nearest": 0.1, "probe": 20}, THREAT)
    apgd = make_cell("square", {"nearest": 0.1, "probe": 20, "probe_attack": "apgd"}, THREAT)
    assert (
        "probe_attack" not in plain.key
        and plain.key == make_cell("square", {"nearest": 0.1, "probe": 20, "probe_attack": "pgd"}, THREAT).key
    )
    assert apgd.key == plain.key.replace(",probe=20,", ",probe=20,probe_attack=apgd,")
    with pytest.raises(BenchError, match="probe_attack names the attack of a probe; set probe = 10"):
        make_cell("square", {"nearest": 0.1, "probe_attack": "apgd"}, THREAT)


GATED = """
schedule = "cascade"

[[cell]]
attack = "square"
eps = {eps}
queries = {queries}

[[cell]]
attack = "pgd"
steps = 3
when = "black_box_won"
"""


@pytest.mark.parametrize("eps, queries, opens", [(0.1, 20, True), (0.0001, 5, False)], ids=["broke", "broke_none"])
def test_a_gated_cell_runs_only_where_a_black_box_cell_broke_an_image(natural_model, tmp_path, eps, queries, opens):
    """`when = "black_box_won"`: the cell runs on what stands where the Square cell before it
    broke an image, and on no image, for no pass, where it broke none."""
    cells = _cascade_cells(natural_model, tmp_path, "gated", GATED.format(eps=eps, queries=queries))
    square, pgd = cells["square"], cells["pgd"]
    assert ",when=black_box_won," in pgd.cell_key
    x, y = load_dataset("digits", "test")
    with torch.no_grad():
        clean = (natural_model(x).argmax(1) == y).numpy()
    broke = int((clean & ~square.correct()).sum())
    standing = np.flatnonzero(square.correct())
    if opens:
        assert broke > 0 and 0 < len(standing) < 360
        assert pgd.indices == standing.tolist() and pgd.n == len(standing) and pgd.forward_passes > 0
    else:
        assert broke == 0 and len(standing) > 300
        assert pgd.indices == [] and pgd.n == 0 and pgd.forward_passes == 0 and pgd.backward_passes == 0


def test_a_gate_outside_a_cascade_or_without_a_black_box_cell_before_it_is_refused(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text('[[cell]]\nattack = "square"\n\n[[cell]]\nattack = "pgd"\nwhen = "black_box_won"\n')
    with pytest.raises(BenchError, match='when= reads what a cascade\'s earlier cells broke; set schedule = "cascade"'):
        load_matrix(str(plain)).cells(THREAT)
    first = tmp_path / "first.toml"
    first.write_text(
        'schedule = "cascade"\n[[cell]]\nattack = "pgd"\nwhen = "black_box_won"\n\n[[cell]]\nattack = "square"\n'
    )
    with pytest.raises(BenchError, match="pgd runs when a black-box cell before it broke an image, and none comes"):
        load_matrix(str(first)).cells(THREAT)
    with pytest.raises(BenchError, match="when must be one of black_box_won, got 'always'"):
        make_cell("pgd", {"when": "always"}, THREAT)


def test_nearest_outside_a_cascade_or_outside_0_1_is_refused(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text('[[cell]]\nattack = "fgsm"\nnearest = 0.5\n')
    with pytest.raises(
        BenchError, match='nearest= picks among the images a cascade left standing; set schedule = "cascade"'
    ):
        load_matrix(str(plain)).cells(THREAT)
    wide = tmp_path / "wide.toml"
    wide.write_text('schedule = "cascade"\n[[cell]]\nattack = "fgsm"\nnearest = 1.5\n')
    with pytest.raises(BenchError, match=r"nearest must be a share in \(0, 1\).*got 1\.5"):
        load_matrix(str(wide)).cells(THREAT)


def test_the_fast_matrix_is_a_cascade_that_escalates_to_full():
    fast = load_matrix("fast")
    assert fast.cascade and fast.escalate == "full"
    keys = [c.key for c in fast.cells(THREAT)]
    assert [k.split(":")[0] for k in keys] == ["fgsm", "pgd", "apgd", "apgd_t", "apgd_t", "square", "apgd_t"]
    assert [c.when for c in fast.cells(THREAT)] == [None] * 6 + [Gate.BLACK_BOX_WON]
    assert all(k.endswith(",cascade=fast") for k in keys)
    assert "after=" not in keys[0] and all(",after=" in k for k in keys[1:])


def test_a_changed_cell_rekeys_every_later_cell_of_its_cascade(tmp_path):
    """A cascade cell runs on what the cells before it left standing, so its key names them:
    a store holding the old cascade's rows must not hand them to the new one."""
    first = tmp_path / "one" / "c.toml"
    second = tmp_path / "two" / "c.toml"
    for path, steps in ((first, 10), (second, 11)):
        path.parent.mkdir()
        cascade = CASCADE.format(escalate="").replace("steps = 10", f"steps = {steps}")
        path.write_text(cascade + '\n[[cell]]\nattack = "square"\nqueries = 20\n')
    a, b = (load_matrix(str(p)).cells(THREAT) for p in (first, second))
    assert a[0].key == b[0].key and "after=" not in a[0].key  # FGSM: nothing before it
    assert a[1].key != b[1].key  # the changed cell itself
    assert a[2].key != b[2].key and a[2].config == b[2].config  # Square: same config, other images
    assert all(c.key.endswith(",cascade=c") for c in a + b)
    assert load_matrix(str(first)).cells(THREAT)[2].key == a[2].key  # the same cascade, the same keys


def test_a_step_fraction_resolves_to_the_step_it_names():
    """The fast cascade's PGD takes its step as a share of eps on every dataset: on digits
    the dataset's own step (a quarter of 0.2), on mnist5k 0.075 where Madry et al.'s 0.01
    would leave twenty steps short of the ball's corners."""
    (pgd,) = [c for c in load_matrix("fast").cells(THREAT) if c.attack == "pgd"]
    assert pgd.config.step_size == THREAT.step_size == 0.05 and pgd.config.step_fraction is None
    mnist = get_spec("mnist5k").threat
    (pgd,) = [c for c in load_matrix("fast").cells(mnist) if c.attack == "pgd"]
    assert pgd.config.step_size == pytest.approx(0.075) and mnist.step_size == 0.01
    plain = ATTACKS.get("pgd")
    assert make_cell("pgd", {"step_fraction": 0.25}, THREAT).key == make_cell("pgd", {"step_size": 0.05}, THREAT).key
    with pytest.raises(BenchError, match=r"step_size 0\.05 and step_fraction 0\.25 both given: keep one"):
        plain.make_config({"step_size": 0.05, "step_fraction": 0.25})
    with pytest.raises(BenchError, match="step_fraction must be a finite number above zero, got -1"):
        plain.make_config({"step_fraction": -1})


def test_a_zero_gradient_model_escalates(natural_model, tmp_path):
    quick = tmp_path / "small.toml"
    quick.write_text(QUICK)
    rows, store = _rows(tmp_path, Quantized(natural_model).eval(), "quantized", f'escalate = "{quick}"')
    (ck,) = store.checkpoints()
    assert "zero_gradients" in ck.meta["escalated"]
    keys = {r.cell_key for r in store.evaluations([ck.id])}
    assert any(k.startswith("pgd:") and "cascade" not in k and "steps=5" in k for k in keys)  # the fuller matrix
    assert any(k.startswith("distill:") for k in keys)  # and the witness
    # The witness, which does not follow the gradients, breaks what the cascade could not.
    _, y = load_dataset("digits", "test")
    worst = next(r for r in rows if r["attack"] == "worst_case" and r["threat"] == THREAT.name)
    cascade = [r for r in store.evaluations([ck.id]) if r.cell_key.endswith(",cascade=cascade")]
    standing = np.ones(len(y), dtype=bool)
    for r in cascade:
        standing[np.asarray(r.indices)] &= r.correct()
    assert worst["robust_acc"] < standing.mean() - 0.1


def test_the_cheating_zoo_benchmark_refuses_a_model_it_does_not_have(capsys, monkeypatch):
    """A misspelt name exits 2 with one line naming the models, before any training; it
    used to run nothing and report no miss."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    monkeypatch.setattr("sys.argv", ["fast_zoo.py", "natural", "quantised"])
    from fast_zoo import main

    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fast_zoo.py: no model named quantised; choose from quantized, ")
