"""A radius of one's own: `--eps` (or a matrix's `eps`) sets the run's L-inf radius, each
cell's default step follows its own eps, lists may be paired, and the worst case, the
bracket and the flags of that radius stand beside the dataset's, every label naming its
radius."""

from __future__ import annotations

import json

import pytest
from cli_run import run_bench

from bench.core.data import get_spec
from bench.core.matrix import expand, load_matrix
from bench.errors import BenchError

THREAT = get_spec("digits").threat  # linf-0.2, step 0.05


def test_a_cells_default_step_follows_its_own_eps():
    (pgd,) = expand([{"attack": "pgd", "eps": 0.1}], THREAT)
    assert pgd.config.step_size == pytest.approx(0.025)  # a quarter of eps, as 0.05 is of 0.2
    (mt,) = expand([{"attack": "multitargeted", "eps": 0.1}], THREAT)
    assert mt.config.step_size == pytest.approx(0.025)
    (own,) = expand([{"attack": "pgd", "eps": 0.1, "step_size": 0.01}], THREAT)
    assert own.config.step_size == 0.01  # a step given is kept
    (default,) = expand([{"attack": "pgd"}], THREAT)
    assert (default.config.eps, default.config.step_size) == (0.2, 0.05)


def test_paired_lists_go_together_and_the_rest_multiply():
    cells = expand(
        [
            {
                "attack": "pgd",
                "eps": [0.1, 0.3],
                "step_size": [0.01, 0.03],
                "steps": [10, 20],
                "paired": ["eps", "step_size"],
            }
        ],
        THREAT,
    )
    got = sorted((c.config.eps, c.config.step_size, c.config.steps) for c in cells)
    assert got == [(0.1, 0.01, 10), (0.1, 0.01, 20), (0.3, 0.03, 10), (0.3, 0.03, 20)]
    assert {c.threat for c in cells} == {"linf-0.1", "linf-0.3"}
    unpaired = expand([{"attack": "pgd", "eps": [0.1, 0.3], "step_size": [0.01, 0.03]}], THREAT)
    assert len(unpaired) == 4  # without `paired`, a product as before
    with pytest.raises(BenchError, match=r"paired names 'steps', which is not a list in the cell"):
        expand([{"attack": "pgd", "eps": [0.1], "steps": 10, "paired": ["eps", "steps"]}], THREAT)
    with pytest.raises(BenchError, match=r"paired takes the names of list values"):
        expand([{"attack": "pgd", "eps": [0.1], "paired": "eps"}], THREAT)


def test_the_runs_radius_fills_every_cell_that_sets_none(tmp_path):
    quick = load_matrix("quick", eps=0.1)
    assert {c.threat for c in quick.cells(THREAT)} == {"linf-0.1"}
    assert [c.config.step_size for c in quick.cells(THREAT) if c.attack == "pgd"] == pytest.approx([0.025, 0.025])
    path = tmp_path / "m.toml"
    path.write_text('eps = 0.05\n\n[[cell]]\nattack = "fgsm"\n\n[[cell]]\nattack = "fgsm"\neps = 0.2\n')
    assert sorted(c.threat for c in load_matrix(str(path)).cells(THREAT)) == ["linf-0.05", "linf-0.2"]
    assert {c.threat for c in load_matrix(str(path), eps=0.3).cells(THREAT)} == {"linf-0.3", "linf-0.2"}
    # `fast` escalates to `full` at its own radius.
    full = load_matrix("fast", eps=0.1).escalation()
    assert full is not None and full.eps == 0.1


MATRIX = """
[[cell]]
attack = "fgsm"

[[cell]]
attack = "pgd"
steps = 10

[[cell]]
attack = "verify"
time_limit = 2.0

[[cell]]
attack = "certify"
"""


def test_a_run_at_its_own_radius_has_its_worst_case_bracket_and_flags(tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text(MATRIX)
    results = tmp_path / "res"
    common = ["--defense", "natural", "--arch", "digits_mlp", "--set", "epochs=5", "--results", str(results)]
    run = run_bench("run", *common, "--matrix", str(matrix), "--eps", "0.05")
    assert run.returncode == 0, run.stderr
    assert "worst case linf-0.05" in run.stdout and " unknown)" in run.stdout  # the verifier's counts
    again = run_bench("run", *common, "--matrix", "quick")  # the dataset's own radius beside it
    assert again.returncode == 0, again.stderr
    # Two radii: every label names its own, the two worst cases theirs.
    table = run_bench("results", "--results", str(results)).stdout
    for label in ("worst case linf-0.2", "worst case linf-0.05", "fgsm (linf-0.2)", "fgsm (linf-0.05)"):
        assert label in table, table
    for label in ("pgd10 (linf-0.05)", "verify (linf-0.05)", "certify (linf-0.05)", "pgd20 (linf-0.2)"):
        assert label in table, table
    rows = json.loads(run_bench("results", "--results", str(results), "--format", "json").stdout)
    worst = {r["threat"]: r for r in rows if r["attack"] == "worst_case"}
    assert list(worst) == ["linf-0.05", "linf-0.2"]  # the checkpoint's own radius last
    small, own = worst["linf-0.05"], worst["linf-0.2"]
    cells = {r["attack"].split(":")[0]: r for r in rows if r["threat"] == "linf-0.05" and r["attack"] != "worst_case"}
    assert set(cells) == {"fgsm", "pgd", "verify", "certify"}
    assert cells["pgd"]["params"]["step_size"] == pytest.approx(0.0125)  # follows eps 0.05
    # The bracket speaks of 0.05: a floor at or below the worst case, the verifier's
    # figure its proven share and its counts adding up.
    verdicts = cells["verify"]["verdicts"]
    assert verdicts["robust"] + verdicts["not_robust"] + verdicts["unknown"] == cells["verify"]["n"]
    assert cells["verify"]["robust_acc"] == pytest.approx(verdicts["robust"] / cells["verify"]["n"])
    assert small["certified"] is not None and small["certified"] <= small["robust_acc"]
    assert small["unknown"] == len(small["unknown_images"])
    # The flags of each radius sit on its own row (attacks_missed, where the verifier
    # broke what FGSM and PGD-10 left, is about 0.05, not the checkpoint's own radius).
    missed = small["attacks_missed"]
    assert ("attacks_missed" in small["flags"]) == bool(missed)
    assert "attacks_missed" not in own["flags"] and own["certified"] is None
    assert small["robust_acc"] > own["robust_acc"]  # a smaller ball breaks fewer images
