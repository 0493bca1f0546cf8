"""The attack matrix: invariants over the whole attack registry, agreement with
independent implementations (torchattacks, pyautoattack), the sanity checks the flags
rest on, and the flags and worst case themselves on real and hand-made cells."""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from conftest import train_digits

from bench.core.cells import make_cell
from bench.core.data import get_spec
from bench.core.matrix import matrix_cells
from bench.core.presets import default_preset
from bench.engine.cell import craft, run_cell
from bench.engine.device import frozen
from bench.engine.outcome import CellOutcome
from bench.engine.selection import subset_indices
from bench.errors import BenchError
from bench.plugin import seed_from
from bench.registry import ATTACKS, DEFENSES
from bench.reporting.results import result_rows
from bench.science.flags import compute_flags
from bench.store.bits import pack_bits
from bench.store.db import Checkpoint, Store
from bench.store.evidence import worst_case
from bench.store.rows import CellRow

DIGITS = get_spec("digits")
THREAT = DIGITS.threat

# Small settings per attack so every registered attack runs in a second or two here; an
# attack missing from this table runs with its defaults (and is tested all the same).
FAST: dict[str, list[dict]] = {
    "fgsm": [{}, {"loss": "cw"}],
    "pgd": [{"steps": 5, "restarts": 2}, {"steps": 5, "norm": "l2"}, {"steps": 5, "loss": "cw"}],
    "unbounded": [{"multiple": 2, "steps": 10}, {"multiple": 32, "steps": 10}],
    "spsa": [{"samples": 32, "iterations": 5}],
    "autoattack": [{}, {"norm": "l2"}],
    "apgd": [{"steps": 10}, {"steps": 10, "norm": "l2", "loss": "dlr"}],
    "apgd_t": [{"steps": 10, "n_target_classes": 3}, {"steps": 10, "norm": "l2", "n_target_classes": 3}],
    "multitargeted": [{"steps": 10, "targets": 3}],
    "square": [{"queries": 100}, {"queries": 100, "norm": "l2"}],
    # A small radius: the bounds and the MILP decide every image well inside the limit, so
    # the verdicts (and the counterexamples) are the same run after run.
    "verify": [{"eps": 0.005, "time_limit": 5.0}],
    "certify": [{}, {"method": "ibp"}],
    "distill": [
        {"copies": 2, "epochs": 2, "steps": 5, "restarts": 1},
        {"copies": 2, "epochs": 2, "steps": 5, "restarts": 1, "norm": "l2"},
    ],
}
CASES = [(name, params) for name in ATTACKS.names() for params in FAST.get(name, [{}])]
IDS = [f"{name}-{i}" for name in ATTACKS.names() for i in range(len(FAST.get(name, [{}])))]


@pytest.fixture(scope="module")
def robust_model():
    """Adversarially trained digits model: PGD-AT with its digits preset (fewer epochs),
    or logit squeezing with Gaussian noise where pgd_at is not registered."""
    if "pgd_at" in DEFENSES:
        return train_digits("pgd_at", epochs=8, **default_preset("pgd_at", "digits").config)
    return train_digits("logit_squeeze", epochs=15, beta=0.5, sigma=0.5)


@pytest.fixture(scope="module")
def sample(digits_test):
    """48 test images, the first of the seeded permutation subsets use."""
    x, y = digits_test
    idx = torch.as_tensor(subset_indices(len(x), 48))
    return x[idx], y[idx]


def run(model, cell, x, y, **kw):
    return run_cell(model, cell, x, y, device="cpu", batch_size=1024, **kw)


def correct_of(result) -> np.ndarray:
    return np.unpackbits(np.frombuffer(result.correct_bits, dtype=np.uint8), count=result.n).astype(bool)


def robust_acc(model, x_adv, x, y) -> float:
    with torch.no_grad():
        ok = (model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)
    return float(ok.float().mean())


# --- invariants over the registry ---------------------------------------------------------
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_adversary_stays_in_the_ball_and_the_box(natural_model, sample, name, params):
    x, y = sample
    cell = make_cell(name, params, THREAT)
    rng = torch.get_rng_state()
    x_adv = craft(natural_model, cell, x, y, device="cpu", batch_size=1024, seed=1)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    delta = (x_adv - x).flatten(1)
    if getattr(cell.config, "norm", "linf") == "l2":
        assert float(delta.norm(dim=1).max()) <= cell.config.eps * (1 + 1e-5)
    else:
        assert float(delta.abs().max()) <= cell.config.eps + 1e-6
    # Seeds are explicit: the same seed gives the same adversary, and the attack draws
    # nothing from torch's global generator (pyautoattack reseeds it; we restore it).
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(craft(natural_model, cell, x, y, device="cpu", batch_size=1024, seed=1), x_adv)


def model_state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        model.training,
        [p.requires_grad for p in model.parameters()],
    )


def assert_same_model(model, state):
    weights, training, flags = state
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model.training == training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture
def training_model(natural_model):
    """A copy in train mode with a mixed set of requires_grad flags, each to be restored."""
    model = copy.deepcopy(natural_model).train()
    next(model.parameters()).requires_grad_(False)
    return model


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_attack_leaves_the_model_as_it_found_it(training_model, sample, name, params):
    x, y = sample
    x_copy = x.clone()
    cell = make_cell(name, params, THREAT)
    model = training_model
    state = model_state(model)
    craft(model, cell, x, y, device="cpu", batch_size=1024)
    assert_same_model(model, state)
    result = run(model, cell, x, y)
    assert_same_model(model, state)  # evaluate restores train mode too (the test below)
    assert result.n == len(y)

    # perturb on its own, as the contract hands it the model: weights and x untouched.
    with frozen(model):
        ATTACKS.get(name).fn(model, x, y, cell.config, generator=torch.Generator().manual_seed(0))
    assert_same_model(model, state)
    assert torch.equal(x, x_copy)


def test_evaluate_restores_train_mode(training_model, sample):
    x, y = sample
    run(training_model, make_cell("fgsm", {}, THREAT), x, y)
    assert training_model.training


def perturb_under_autocast(model, cell, x, y, bf16: bool) -> torch.Tensor:
    with frozen(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return ATTACKS.get(cell.attack).fn(model, x, y, cell.config, generator=torch.Generator().manual_seed(0)).x_adv


@pytest.mark.parametrize("name,params", [("spsa", {"samples": 32, "iterations": 5}), ("autoattack", {})])
def test_fp32_attacks_ignore_a_callers_bf16_autocast(natural_model, sample, name, params):
    """SPSA's finite differences over delta = 0.01 and the packaged AutoAttack run in fp32
    even where the fast path crafts under bf16 autocast (CUDA by default)."""
    x, y = sample
    cell = make_cell(name, params, THREAT)
    plain = perturb_under_autocast(natural_model, cell, x, y, bf16=False)
    under = perturb_under_autocast(natural_model, cell, x, y, bf16=True)
    assert under.dtype == torch.float32 and torch.equal(under, plain)
    # The control: PGD does follow the caller's autocast, so the context above is live.
    pgd_cell = make_cell("pgd", {"steps": 5}, THREAT)
    assert not torch.equal(
        perturb_under_autocast(natural_model, pgd_cell, x, y, bf16=True),
        perturb_under_autocast(natural_model, pgd_cell, x, y, bf16=False),
    )


@pytest.mark.parametrize(
    "name,values",
    [
        ("spsa", {"samples": 3}),
        ("spsa", {"iterations": 0}),
        ("spsa", {"lr": 0.0}),
        ("unbounded", {"eps": 1.5}),
        ("unbounded", {"multiple": -1.0}),
        ("unbounded", {"loss": "dlr"}),
        ("autoattack", {"norm": "l1"}),
        ("autoattack", {"version": "custom"}),
    ],
)
def test_bad_settings_are_refused(name, values):
    with pytest.raises(BenchError, match=next(iter(values))):
        ATTACKS.get(name).make_config(values)


# --- independent implementations ----------------------------------------------------------
@pytest.mark.parametrize("which", ["natural", "robust"])
def test_fgsm_equals_torchattacks(natural_model, robust_model, digits_test, which):
    import torchattacks

    model = natural_model if which == "natural" else robust_model
    x, y = digits_test
    ours = craft(model, make_cell("fgsm", {}, THREAT), x, y, device="cpu", batch_size=1024)
    with frozen(model):
        theirs = torchattacks.FGSM(model, eps=THREAT.eps)(x, y)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("which", ["natural", "robust"])
@pytest.mark.parametrize("steps", [10, 20])
def test_pgd_is_never_weaker_than_torchattacks(natural_model, robust_model, digits_test, which, steps):
    """From the same random start, image by image: torchattacks' PGD draws its start from
    torch's global generator seeded s, the bench's from a generator seeded s, which is the
    same uniform stream. The bench stops each image at its first break where torchattacks
    returns the last iterate, so nothing torchattacks breaks may stand under the bench's.
    (Compared as totals at unpaired starts instead, one start of PGD-10 on the PGD-AT model
    moves by up to 19 samples of 360 from seed to seed, and the models differ from one
    processor to another.) One image is allowed for the last bits of the start, which the
    two round differently."""
    import torchattacks

    model = natural_model if which == "natural" else robust_model
    x, y = digits_test
    cell = make_cell("pgd", {"steps": steps}, THREAT)
    for seed in (0, 1):
        ours = correct_of(run(model, cell, x, y, seed=seed))
        torch.manual_seed(seed)
        with frozen(model):
            x_adv = torchattacks.PGD(model, eps=THREAT.eps, alpha=THREAT.step_size, steps=steps, random_start=True)(
                x, y
            )
        with torch.no_grad():
            theirs = ((model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)).numpy()
        assert int((ours & ~theirs).sum()) <= 1, (seed, int(ours.sum()), int(theirs.sum()))
        assert ours.sum() <= theirs.sum() + 1
        if which == "robust":
            assert theirs.mean() > 0.2  # the comparison means something only on a model PGD does not break


def test_autoattack_cell_equals_pyautoattack(robust_model, digits_test):
    from pyautoattack import AutoAttack

    x, y = digits_test
    cell = make_cell("autoattack", {"subset": 16}, THREAT)
    result = run(robust_model, cell, x, y, seed=5)
    idx = torch.as_tensor(result.indices)
    seed = seed_from(torch.Generator().manual_seed(5))
    with frozen(robust_model):
        attack = AutoAttack(robust_model, norm="Linf", eps=THREAT.eps, version="standard", seed=seed)
        _, y_adv = attack.run_standard_evaluation(x[idx], y[idx], batch_size=len(idx))
    direct = (y_adv == y[idx]).numpy()
    assert direct.any() and not direct.all()  # some survive, some break: a real comparison
    np.testing.assert_array_equal(correct_of(result), direct)


def test_autoattack_checks_reach_the_warnings_and_the_flags(natural_model, sample, capfd):
    """A model that outputs probabilities trips pyautoattack's logits check. With every
    label wrong, nothing is left to attack, so only the checks run."""
    x, _ = sample
    probabilities = torch.nn.Sequential(copy.deepcopy(natural_model), torch.nn.Softmax(dim=1))
    cell = make_cell("autoattack", {}, THREAT)
    with torch.no_grad():
        wrong = (probabilities(x).argmax(1) + 1) % 10
    result = run(probabilities, cell, x, wrong)
    assert any("probability distribution" in w for w in result.extra["warnings"])
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # quiet: nothing printed, nothing logged to stderr
    flags = compute_flags(Checkpoint(id=1, threat=THREAT.name), [as_row(result)], [])
    assert [f["name"] for f in flags] == ["autoattack_warning"]
    assert logging.getLogger("auto-attack").handlers == []  # our handler is gone again


# --- the matrix on a natural model: SPSA breaks it, the sweep ends at zero, no flag -------
@pytest.fixture(scope="module")
def natural_full(natural_model, digits_test):
    x, y = digits_test
    return [run(natural_model, cell, x, y) for cell in matrix_cells("full", THREAT)]


def as_row(result: CellOutcome, **extra) -> CellRow:
    return CellRow.build(**result.row_fields(), **extra)


def test_spsa_breaks_a_natural_model(natural_full):
    (spsa,) = [r for r in natural_full if r.attack == "spsa"]
    assert spsa.n == 100 and spsa.clean_acc > 0.9
    assert spsa.robust_acc <= 0.03


def test_natural_model_raises_no_flag(natural_full):
    by_attack = {r.attack for r in natural_full}
    assert {"fgsm", "pgd", "unbounded", "spsa", "autoattack"} <= by_attack
    top = max((r for r in natural_full if r.attack == "unbounded"), key=lambda r: r.params["eps"])
    assert top.params["eps"] == 1.0 and top.robust_acc == 0.0
    assert top.threat == "unbounded-1" != THREAT.name
    flags = compute_flags(Checkpoint(id=1, threat=THREAT.name), [as_row(r) for r in natural_full], [])
    assert flags == []


# Two epochs of each digits preset's own settings train most defenses past 50% clean
# accuracy; adversarial-only PGD-AT needs five. LRM needs ten: VH-mixup, smoothing and
# pairing keep it nearly constant for its first epochs (18% clean after 5), and there the
# unbounded xent sweep stalls too (6% left at eps 1, a flag the bench rightly raises).
ZOO_EPOCHS = {"lrm": 10, "pgd_at": 5, "ibp": 30}  # ibp: shorter, its ramp to eps 0.22 collapses it to one class


@pytest.mark.parametrize("defense", DEFENSES.names())
def test_unbounded_sweep_reaches_zero_on_every_defense(digits_test, defense):
    preset = default_preset(defense, "digits")
    model = train_digits(defense, epochs=ZOO_EPOCHS.get(defense, 2), **(preset.config if preset else {}))
    x, y = digits_test
    top = make_cell("unbounded", {"multiple": 32}, THREAT)
    assert top.config.eps == 1.0
    result = run(model, top, x, y)
    assert result.clean_acc > 0.5
    assert result.robust_acc == 0.0, f"{defense}: {result.robust_acc:.3f} at eps 1"


# --- flags and the worst case on hand-made cells ------------------------------------------
def cell(attack, acc_bits, threat=THREAT.name, indices=None, extra=None, **params) -> CellRow:
    bits = np.asarray(acc_bits, dtype=bool)
    return CellRow.build(
        cell_key=f"{attack}:"
        + ",".join(f"{k}={v}" for k, v in sorted(params.items()))
        + (f",subset={len(bits)}" if indices is not None else ""),
        attack=attack,
        params=params,
        threat=threat,
        clean_acc=1.0,
        robust_acc=float(bits.mean()),
        n=len(bits),
        seconds=0.0,
        correct_bits=pack_bits(bits),
        indices=indices,
        extra=extra or {},
    )


def ones(n_true, n=100):
    return [True] * n_true + [False] * (n - n_true)


def pgd(n_true, steps=20, loss="xent", restarts=1, **kw):
    return cell(
        "pgd",
        ones(n_true),
        steps=steps,
        loss=loss,
        restarts=restarts,
        norm="linf",
        step_size=0.05,
        random_start=True,
        **kw,
    )


CK = Checkpoint(id=1, threat=THREAT.name)


def names(cells, transfers=()):
    return [f["name"] for f in compute_flags(CK, cells, list(transfers))]


def test_quiet_cells_raise_no_flag():
    cells = [
        cell("fgsm", ones(50)),
        pgd(40),
        pgd(40, steps=1000),
        pgd(40, restarts=10),
        cell("unbounded", ones(0), threat="unbounded-1", eps=1.0),
        cell("spsa", ones(20, 20), indices=list(range(20))),
    ]
    assert names(cells) == []


def test_pgd_still_falling_compares_like_with_like():
    hit = compute_flags(
        CK, [pgd(40), pgd(38, steps=200), pgd(30, steps=1000), pgd(45, loss="cw"), pgd(44, steps=1000, loss="cw")], []
    )
    assert [f["name"] for f in hit] == ["pgd_still_falling"]
    numbers = hit[0]["numbers"]
    assert (numbers["loss"], numbers["steps"], numbers["pgd20"], numbers["longest"]) == ("xent", 1000, 0.4, 0.3)
    # One point is not "still falling"; nor is a longer run of another step size.
    assert names([pgd(40), pgd(39, steps=1000)]) == []
    other = cell("pgd", ones(10), steps=1000, loss="xent", restarts=1, norm="linf", step_size=0.01, random_start=True)
    assert names([pgd(40), other]) == []


def test_restarts_matter_reports_the_largest_drop():
    hit = compute_flags(CK, [pgd(40), pgd(39, restarts=2), pgd(35, restarts=5), pgd(36, restarts=10)], [])
    assert [f["name"] for f in hit] == ["restarts_matter"]
    assert hit[0]["numbers"]["restarts"] == 5 and hit[0]["numbers"]["drop"] == pytest.approx(0.05)
    assert names([pgd(40), pgd(39, restarts=10)]) == []


def test_fgsm_stronger_than_pgd():
    # Against the strongest PGD cell (here CW), not the first.
    assert names([cell("fgsm", ones(20)), pgd(40), pgd(35, loss="cw")]) == ["fgsm_stronger_than_pgd"]
    assert names([cell("fgsm", ones(35)), pgd(40), pgd(35, loss="cw")]) == []
    # FGSM at another eps (the paper matrix's absolute .03) is not the threat model's.
    assert names([cell("fgsm", ones(0), threat="linf-0.03", eps=0.03), pgd(40)]) == []


def test_spsa_is_compared_on_its_own_images():
    # PGD leaves samples 0-39 standing; SPSA ran on 50-69, where PGD already broke all.
    assert names([pgd(40), cell("spsa", ones(0, 20), indices=list(range(50, 70)))]) == []
    # On 0-19 PGD is at 100%; SPSA breaks 5 of 20 there.
    hit = compute_flags(CK, [pgd(40), pgd(45, steps=50), cell("spsa", ones(15, 20), indices=list(range(20)))], [])
    assert [f["name"] for f in hit] == ["spsa_stronger_than_pgd"]
    assert hit[0]["numbers"]["spsa"] == 0.75 and hit[0]["numbers"]["pgd_same_images"] == 1.0


def test_transfer_stronger_than_pgd():
    t = CellRow.build(
        source_id=2,
        target_id=1,
        cell_key="pgd:steps=10",
        attack="pgd",
        params={},
        threat=THREAT.name,
        clean_acc=1.0,
        robust_acc=0.2,
        n=100,
        seconds=0.0,
        correct_bits=pack_bits(ones(20)),
        indices=None,
        extra={},
    )
    assert names([pgd(40)], [t]) == ["transfer_stronger_than_pgd"]
    assert names([pgd(20)], [t]) == []


def test_unbounded_sweep_must_end_at_zero():
    sweep = [
        cell("unbounded", ones(30), threat="unbounded-0.4", eps=0.4),
        cell("unbounded", ones(2), threat="unbounded-1", eps=1.0),
    ]
    hit = compute_flags(CK, sweep, [])
    assert [f["name"] for f in hit] == ["unbounded_not_zero"]
    assert hit[0]["numbers"]["accuracy"] == 0.02 and hit[0]["numbers"]["sweep"] == {"0.4": 0.3, "1": 0.02}


def test_worst_case_ands_every_cell_of_the_threat_model(tmp_path):
    """Full-set cells, a subset cell and an incoming transfer are ANDed per sample;
    unbounded and L2 cells count toward their own threat models; a stored subset cell
    keeps its indices through the database."""
    store = Store.for_results(tmp_path)
    ck = store.add_checkpoint(
        key="k" * 64,
        dataset="digits",
        defense="natural",
        preset=None,
        arch="digits_cnn",
        seed=0,
        threat=THREAT.name,
        config={},
        train_config={},
        path=str(tmp_path),
        sha256="0" * 64,
        epochs=1,
        train_seconds=0.0,
        device="cpu",
        meta={"clean_acc": 1.0},
    )
    src = store.add_checkpoint(
        key="s" * 64,
        dataset="digits",
        defense="pgd_at",
        preset=None,
        arch="digits_cnn",
        seed=0,
        threat=THREAT.name,
        config={},
        train_config={},
        path=str(tmp_path),
        sha256="0" * 64,
        epochs=1,
        train_seconds=0.0,
        device="cpu",
        meta={},
    )
    full = [1, 1, 1, 1, 1, 1, 0, 1, 1, 1]
    other = [1, 1, 1, 1, 0, 1, 1, 1, 1, 1]
    sub_idx, sub = [1, 5, 8], [0, 1, 0]  # breaks samples 1 and 8
    rows = [
        cell("pgd", full, steps=20),
        cell("fgsm", other),
        cell("spsa", sub, indices=sub_idx),
        cell("unbounded", [0] * 10, threat="unbounded-1", eps=1.0),
        cell("pgd", [0] * 10, threat="l2-1", norm="l2", steps=20),
    ]
    for r in rows:
        store.add_evaluation(
            ck.id,
            cell_key=r.cell_key,
            attack=r.attack,
            params=r.params,
            threat=r.threat,
            clean_acc=r.clean_acc,
            robust_acc=r.robust_acc,
            n=r.n,
            seconds=0.0,
            correct_bits=r.correct_bits,
            indices=r.indices,
            extra={},
        )
    store.add_transfer(
        src.id,
        ck.id,
        cell_key="pgd:steps=10",
        attack="pgd",
        params={},
        threat=THREAT.name,
        clean_acc=1.0,
        robust_acc=0.9,
        n=10,
        seconds=0.0,
        correct_bits=pack_bits([1, 1, 1, 1, 1, 1, 1, 1, 1, 0]),
        indices=None,
        extra={},
    )
    expected = np.array([1, 0, 1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)
    wc = worst_case(ck.threat, [*store.evaluations([ck.id]), *store.transfers([ck.id])], 10)
    np.testing.assert_array_equal(wc.bits, expected)
    assert len(wc.cells) == 4  # pgd, fgsm, spsa, transfer
    worst = {r["threat"]: r for r in result_rows(store, defense="natural") if r["attack"] == "worst_case"}
    assert set(worst) == {THREAT.name, "l2-1"}  # the L2 cell makes a worst case of its own
    row = worst[THREAT.name]
    assert row["robust_acc"] == pytest.approx(0.5) and row["n"] == 10
    assert worst["l2-1"]["robust_acc"] == 0.0 and worst["l2-1"]["cells"] == 1
