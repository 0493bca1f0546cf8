"""The bracket: the certified floor and the exact figure beside every worst case, the
`attacks_missed` and `unsound` flags, the verifier cells' verdicts held to the model, the
`truth` matrix, and IBP training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import binomtest

from bench.core.contract import CertifiedVerdicts, CompleteVerdicts
from bench.core.data import get_spec
from bench.core.kinds import CellKind
from bench.core.matrix import matrix_cells, matrix_transfer
from bench.engine.verified import verified
from bench.errors import BenchError
from bench.reporting.results import result_rows
from bench.science.flags import compute_flags, recompute_flags
from bench.store.bits import pack_bits
from bench.store.bracket import bracket
from bench.store.db import Store
from bench.verify import ibp_bounds
from defenses.ibp import IBP, schedule, worst_logits

THREAT = get_spec("digits").threat
N = 10


def _store(tmp_path) -> tuple[Store, object]:
    store = Store.for_results(tmp_path)
    ck = store.add_checkpoint(
        key="k" * 64,
        dataset="digits",
        defense="natural",
        preset=None,
        arch="digits_mlp",
        seed=0,
        threat=THREAT.name,
        config={},
        train_config={},
        path=str(tmp_path),
        sha256="0" * 64,
        epochs=1,
        train_seconds=0.0,
        device="cpu",
        meta={"clean_acc": 0.9},
    )
    return store, ck


def _add(store, ck, key, attack, correct, threat=THREAT.name, extra=None, proven=None):
    """One stored cell; a verifier's (`verify`, `certify`) with the images it proved."""
    params = {"steps": 20, "loss": "xent", "norm": "linf"} if attack == "pgd" else {}
    store.add_evaluation(
        ck.id,
        cell_key=key,
        attack=attack,
        params=params,
        threat=threat,
        clean_acc=0.9,
        robust_acc=float(np.mean(correct)),
        n=N,
        seconds=0.0,
        correct_bits=pack_bits(correct),
        indices=None,
        extra=extra or {},
        test_size=N,
        kind=attack if attack in ("verify", "certify") else "attack",
        proven_bits=None if proven is None else pack_bits(proven),
    )


# Image 9 is misclassified. The attacks leave 0-4 standing; the verifier proves 0-2
# robust, breaks 4 and 5 (4 with a counterexample no attack found), and runs out of time
# on 3; the certified bound proves 0 and 1.
ATTACKS = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
V_ROBUST = np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0], dtype=bool)
V_UNKNOWN = np.array([0, 0, 0, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
V_STANDING = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], dtype=bool)
CERTIFIED = np.array([1, 1, 0, 0, 0, 0, 0, 0, 0, 0], dtype=bool)


def _bracketed(tmp_path, certified=CERTIFIED, verify=True):
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", ATTACKS)
    if verify:
        _add(store, ck, "verify:eps=0.2,method=milp,time_limit=10", "verify", V_STANDING, proven=V_ROBUST)
    _add(store, ck, "certify:eps=0.2,method=crown", "certify", certified, proven=certified)
    return store, store.checkpoint("k" * 64)


def test_bracket_counts_the_floor_the_doubt_and_what_the_attacks_missed(tmp_path):
    store, ck = _bracketed(tmp_path)
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    assert b.certified == pytest.approx(0.3)  # verified 0-2 (the certified 0-1 among them)
    assert b.exact is None and b.unknown == 1
    assert b.attacks_missed == 1 and b.missed_indices == (4,)
    # The worst case, the verifier's counterexamples included, leaves images 0-3: 0.4,
    # one image (the unknown one) above the floor.
    assert b.gap == pytest.approx(10.0)
    assert b.unsound == 0
    (row,) = [r for r in result_rows(store) if r["attack"] == "worst_case"]
    assert row["robust_acc"] == pytest.approx(0.4)  # the verifier's counterexamples count
    assert (row["certified"], row["unknown"], row["attacks_missed"]) == (pytest.approx(0.3), 1, 1)
    assert row["exact"] is None
    flags = {f["name"]: f["numbers"] for f in compute_flags(ck, store.evaluations([ck.id]), [])}
    assert flags["attacks_missed"] == {"count": 1, "n": N, "indices": [4]}
    assert "unsound" not in flags


def test_the_exact_figure_where_every_image_was_decided(tmp_path):
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", ATTACKS)
    _add(store, ck, "verify:eps=0.2,method=milp,time_limit=10", "verify", V_ROBUST, proven=V_ROBUST)
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    assert b.exact == pytest.approx(0.3) and b.unknown == 0 and b.gap == 0


def test_a_verify_cell_reads_as_its_verdicts_and_never_counts_unknown_as_robust(tmp_path):
    store, _ck = _bracketed(tmp_path)
    (row,) = [r for r in result_rows(store) if r["attack"].startswith("verify:")]
    # Images 0-2 proven, 3 unknown, 4-9 not robust: 30%, not the 40% it left standing.
    assert row["robust_acc"] == pytest.approx(0.3)
    assert (row["ci_low"], row["ci_high"]) == pytest.approx(binomtest(3, N).proportion_ci(method="exact"))
    assert row["verdicts"] == {
        "robust": 3,
        "not_robust": 6,
        "unknown": 1,
        "images": {"robust": [0, 1, 2], "not_robust": [4, 5, 6, 7, 8, 9], "unknown": [3]},
    }
    (worst,) = [r for r in result_rows(store) if r["attack"] == "worst_case"]
    assert worst["robust_acc"] == pytest.approx(0.4)  # its counterexamples break; an unknown image stands
    assert worst["unknown_images"] == [3]


def test_an_image_an_attack_broke_is_not_unknown_in_the_bracket(tmp_path):
    store, ck = _bracketed(tmp_path)
    broke_3 = ATTACKS.copy()
    broke_3[3] = False
    _add(store, ck, "fgsm:eps=0.2", "fgsm", broke_3)
    b = bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N)
    # The verifier ran out of time on image 3, FGSM broke it: every image is decided.
    assert b.unknown == 0 and b.unknown_indices == ()
    assert b.exact == pytest.approx(0.3) and b.gap == 0


def test_no_verifier_cell_no_bracket(tmp_path):
    store, ck = _store(tmp_path)
    _add(store, ck, "pgd:steps=20", "pgd", ATTACKS)
    assert bracket(THREAT.name, tuple(store.evaluations([ck.id])), (), N) is None
    (row,) = [r for r in result_rows(store) if r["attack"] == "worst_case"]
    assert row["certified"] is None and row["exact"] is None


def test_unsound_fires_and_fails_loudly_once_stored(tmp_path):
    # Image 6 "certified" although PGD broke it: a bug in the verifier or the attack.
    certified = CERTIFIED.copy()
    certified[6] = True
    store, ck = _bracketed(tmp_path, certified=certified, verify=False)
    flags = {f["name"]: f["numbers"] for f in compute_flags(ck, store.evaluations([ck.id]), [])}
    assert flags["unsound"] == {"count": 1, "n": N, "indices": [6]}
    with pytest.raises(RuntimeError, match=r"unsound: 1 image\(s\) .* proven robust were broken"):
        recompute_flags(store, ck)
    assert "unsound" in {f.name for f in store.flags([ck.id])}  # stored before it raised


def test_a_counterexample_that_does_not_reproduce_fails_the_cell():
    clean = torch.tensor([True, True, True])
    parts = [
        CompleteVerdicts(
            status=("robust", "not_robust"),
            decided_by=("bound", "milp"),
            seconds=torch.zeros(2, dtype=torch.float64),
            unstable=torch.zeros(2, dtype=torch.int64),
            binaries=torch.zeros(2, dtype=torch.int64),
            tolerance=torch.zeros(2, dtype=torch.float64),
        ),
        CompleteVerdicts(
            status=("unknown",),
            decided_by=("timeout",),
            seconds=torch.zeros(1, dtype=torch.float64),
            unstable=torch.zeros(1, dtype=torch.int64),
            binaries=torch.zeros(1, dtype=torch.int64),
            tolerance=torch.zeros(1, dtype=torch.float64),
        ),
    ]
    robust, proven, extra = verified(CellKind.VERIFY, parts, clean, torch.tensor([True, False, True]))
    assert robust.tolist() == [True, False, True] and proven.tolist() == [True, False, False]
    assert extra["verify"]["robust"] == 1 and extra["verify"]["unknown"] == 1
    assert extra["verify"]["decided_by"] == {"bound": 1, "milp": 1, "timeout": 1}
    with pytest.raises(RuntimeError, match="counterexample of image 1 does not reproduce"):
        verified(CellKind.VERIFY, parts, clean, torch.tensor([True, True, True]))
    with pytest.raises(RuntimeError, match="image 0 was verified robust"):
        verified(CellKind.VERIFY, parts, clean, torch.tensor([False, False, True]))
    with pytest.raises(RuntimeError, match="misclassifies was certified"):
        verified(
            CellKind.CERTIFY,
            [CertifiedVerdicts(torch.tensor([True, False, False]), torch.zeros(3, dtype=torch.float64))],
            torch.tensor([False, True, True]),
            torch.tensor([False, True, True]),
        )


def test_truth_is_full_plus_the_verifier_cells():
    full, truth = matrix_cells("full", THREAT), matrix_cells("truth", THREAT)
    assert [c.key for c in truth[: len(full)]] == [c.key for c in full]
    extra = {c.key: c.threat for c in truth[len(full) :]}
    assert extra == {
        "verify:eps=0.2,method=milp,time_limit=10": THREAT.name,
        "certify:eps=0.2,method=crown": THREAT.name,
    }
    assert matrix_transfer("truth") == matrix_transfer("full")


def test_include_names_only_builtin_matrices(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('include = ["nope"]\n')
    with pytest.raises(BenchError, match=r"include takes a list of built-in matrices"):
        matrix_cells(str(path), THREAT)
    path.write_text('include = ["quick"]\n\n[[cell]]\nattack = "certify"\n')
    keys = [c.key for c in matrix_cells(str(path), THREAT)]
    assert keys == [c.key for c in matrix_cells("quick", THREAT)] + ["certify:eps=0.2,method=crown"]


def test_ibp_schedule_and_worst_logits():
    cfg = IBP(warmup=0.1, rampup=0.5)
    assert [schedule(cfg, p) for p in (0.0, 0.05, 0.1, 0.35, 0.6, 0.9)] == pytest.approx([0, 0, 0, 0.5, 1, 1])
    lo = torch.tensor([[0.0, 1.0, 2.0]])
    hi = torch.tensor([[5.0, 6.0, 7.0]])
    assert worst_logits(lo, hi, torch.tensor([1])).tolist() == [[5.0, 1.0, 7.0]]
    with pytest.raises(ValueError, match="warmup \\+ rampup"):
        IBP(warmup=0.6, rampup=0.5)


def test_interval_bounds_hold_on_the_bench_cnn_and_carry_gradients(natural_model, digits_test):
    x = digits_test[0][:16].clone().requires_grad_(True)
    lo, hi = ibp_bounds(natural_model, x, 0.05)  # F.relu and F.max_pool2d, as functions
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(20):
            xp = (x + (2 * torch.rand(x.shape, generator=g) - 1) * 0.05).clamp(0, 1)
            z = natural_model(xp)
            assert bool((z >= lo - 1e-5).all() and (z <= hi + 1e-5).all())
    (hi - lo).sum().backward()
    assert float(x.grad.abs().sum()) > 0
    with pytest.raises(BenchError, match=r"^verify: layer '1' \(Dropout\) is not supported; [^\n]*$"):
        ibp_bounds(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5)), x, 0.05)


def test_the_terminal_shows_the_bracket_beside_the_worst_case(tmp_path):
    from bench.cli.output import bracket_note

    store, _ = _bracketed(tmp_path)
    (row,) = [r for r in result_rows(store) if r["attack"] == "worst_case"]
    assert bracket_note(row) == "certified 30.0%, 1 unknown, gap 10.0 pts, attacks missed 1"
    assert (
        bracket_note({**row, "exact": 0.3, "unknown": 0, "gap": 0.0, "attacks_missed": 0})
        == "certified 30.0%, exact 30.0%, gap 0.0 pts"
    )
    assert (
        bracket_note({"certified": None, "not_verifiable": "verify: layer 'x' (Tanh) is not supported"})
        == "not verifiable: verify: layer 'x' (Tanh) is not supported"
    )


def test_the_site_shows_the_floor_beside_the_worst_case(tmp_path):
    from bench.reporting.site import build_site

    store, ck = _bracketed(tmp_path)
    out = build_site(store, tmp_path / "site")
    index = out.read_text()
    assert 'data-col="certified"' in index and ">Certified<" in index
    assert "gap 10.0 pts · attacks missed 1" in index
    page = next(p for p in out.parent.rglob("*.html") if ck.key[:8] in p.name).read_text()
    assert "Certified floor <strong>30.00%</strong>, 1 image unknown" in page
    assert '<span class="unknown-images">3</span>' in page
    assert "The verifier broke 1 image that every attack left standing (images 4)" in page


VERIFIER_MATRIX = """
[[cell]]
attack = "pgd"
steps = 10

[[cell]]
attack = "verify"
time_limit = 5.0

[[cell]]
attack = "certify"
"""


def test_a_model_the_verifier_does_not_take_skips_its_cells_with_the_reason(tmp_path):
    import bench

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 10)
    ).eval()
    matrix = tmp_path / "m.toml"
    matrix.write_text(VERIFIER_MATRIX)
    rows = bench.evaluate(model, name="tanh", matrix=str(matrix), results=tmp_path / "r", device="cpu")
    assert [r["attack"].split(":")[0] for r in rows] == ["pgd", "worst_case"]
    worst = rows[-1]
    assert worst["complete"] is True and worst["certified"] is None
    assert worst["not_verifiable"].startswith("verify: layer '2' (Tanh) is not supported")


def test_evaluate_brackets_a_verifiable_model(tmp_path, digits_test):
    import bench
    from bench.core.data import load_dataset
    from bench.engine.train import TrainConfig, train_model
    from bench.registry import DEFENSES

    entry = DEFENSES.get("natural")
    x, y = load_dataset("digits", "train")
    model, _ = train_model(
        "digits_mlp", get_spec("digits"), entry.fn, entry.make_config({}), TrainConfig(epochs=5), x, y, seed=0
    )
    matrix = tmp_path / "m.toml"
    matrix.write_text(VERIFIER_MATRIX)
    rows = bench.evaluate(model.eval(), name="mlp", matrix=str(matrix), results=tmp_path / "r", device="cpu")
    by = {r["attack"].split(":")[0]: r for r in rows}
    worst = by["worst_case"]
    # A natural model at eps 0.2: every image decided; the floor is the exact figure, and
    # no attack broke an image the verifier proved robust (unsound would have raised).
    assert worst["exact"] is not None and worst["unknown"] == 0 and worst["gap"] == 0
    assert worst["certified"] <= worst["robust_acc"] <= by["pgd"]["robust_acc"]
    assert worst["robust_acc"] == pytest.approx(worst["exact"])
    assert by["verify"]["robust_acc"] == pytest.approx(worst["exact"])
    assert by["certify"]["threat"] == THREAT.name


def test_a_row_whose_extra_comes_back_parsed_keeps_its_warnings():
    # PostgreSQL's driver hands the JSON column back parsed; SQLite as text. Both read the same.
    import dataclasses

    from bench.store.rows import CellRow

    row = CellRow.build(cell_key="k", attack="pgd", threat="linf-0.2", n=1, correct_bits=pack_bits(np.ones(1, bool)))
    extra = {"warnings": ["zero gradients"], "logit_hist": {}}
    for raw in (extra, json.dumps(extra)):
        assert dataclasses.replace(row, raw_extra=raw).warnings == ["zero gradients"]
