"""The harness, not the plugin, holds every attack to its threat model; a failed cell
leaves the worst case marked incomplete everywhere it is shown; the fast model is used
only where it is the model; verdicts and confirmations are true fp32."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest
import torch
from cli_run import run_cli
from custom_backward import StraightThrough, Wrapped, Zero
from torch import nn

from attacks.pgd import BAND, _confirmed, _near_boundary
from bench import api
from bench.core.cells import make_cell
from bench.core.data import get_spec, load_dataset
from bench.engine.budget import LINF_TOLERANCE, BudgetError, check_budget
from bench.engine.cell import craft
from bench.engine.device import full_fp32
from bench.engine.fast import FastPath
from bench.engine.fastmodel import faithful
from bench.engine.rewrite import exact_view, fold_bn
from bench.engine.verdicts import majority_correct
from bench.plugin import Crafted, radius, register_attack
from bench.registry import ATTACKS
from bench.run.training import load_model

THREAT = get_spec("digits").threat


@dataclass(frozen=True)
class Outside:
    eps: float | None = None
    """Radius of the ball the cell claims."""
    factor: float = 2.0
    """How far outside the ball the cheat steps, as a multiple of eps."""

    def __post_init__(self):
        radius("eps", self.eps, "linf")

    def with_threat(self, threat):
        return replace(self, eps=self.eps if self.eps is not None else threat.eps)

    def threat_key(self):
        return f"linf-{self.eps:g}"


@pytest.fixture
def cheat():
    """A plugin that claims the L-inf threat model and steps `factor * eps` away."""

    @register_attack("outside_the_ball", config=Outside)
    def perturb(model, x, y, cfg, *, generator=None):
        """Steps outside the ball it claims."""
        return Crafted((x + cfg.factor * cfg.eps * torch.sign(x - 0.5)).clamp(0, 1))

    yield "outside_the_ball"
    ATTACKS.unregister("outside_the_ball")


def test_check_budget_admits_rounding_and_nothing_more():
    x = torch.rand(4, 1, 8, 8)
    cell = make_cell("fgsm", {}, THREAT)
    eps = cell.config.eps
    edge = (x + eps).clamp(0, 1)
    check_budget(cell, x, edge)  # at the radius
    check_budget(cell, x, (x + eps + LINF_TOLERANCE / 2).clamp(0, 1))  # rounding
    away = torch.where(x < 0.5, x + 0.21, x - 0.21)  # 0.01 beyond the radius, inside [0, 1]
    with pytest.raises(BudgetError, match=r"left the L-inf ball of radius 0.2: largest \|x_adv - x\| is 0.21"):
        check_budget(cell, x, away)
    with pytest.raises(BudgetError, match=r"outside \[0, 1\]"):
        check_budget(cell, x, x + 1.5)
    l2 = make_cell("pgd", {"norm": "l2"}, THREAT)
    assert l2.config.eps == 1.0
    mid, unit = torch.full_like(x, 0.5), torch.full_like(x, 1 / 8)  # 64 pixels: a unit vector
    check_budget(l2, mid, mid + unit * (1 + 1e-6))  # rounding
    with pytest.raises(BudgetError, match=r"left the L2 ball of radius 1: largest \|\|x_adv - x\|\|_2 is 1.2"):
        check_budget(l2, mid, mid + 1.2 * unit)


def test_a_cheating_plugin_fails_its_cell_and_the_worst_case_says_incomplete(cheat, tmp_path, monkeypatch, capsys):
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[[cell]]\nattack = "{cheat}"\n\n[[cell]]\nattack = "fgsm"\n')
    res = tmp_path / "results"
    code, out, err = run_cli(
        monkeypatch,
        capsys,
        "run",
        "--defense",
        "natural",
        "--set",
        "epochs=2",
        "--matrix",
        str(matrix),
        "--results",
        str(res),
    )
    assert code == 1
    line = next(x for x in err.splitlines() if x.strip().startswith(f"failed {cheat}:"))
    assert (
        "BudgetError: attack 'outside_the_ball' left the L-inf ball of radius 0.2: largest |x_adv - x| is 0.4" in line
    )
    assert "Traceback" not in err
    assert "natural [" in err and "worst case (incomplete: 1 cell missing)" in err  # the summary line

    # bench results: the worst case says which cell it lacks.
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--format", "json", "--results", str(res))
    worst = next(r for r in json.loads(out) if r["attack"] == "worst_case")
    key = f"{cheat}:eps=0.2,factor=2"
    assert worst["complete"] is False and worst["missing"] == [key] and worst["cells"] == 1

    # The board and the checkpoint page say so too.
    code, _, _ = run_cli(monkeypatch, capsys, "site", "--results", str(res), "--out", str(tmp_path / "site"))
    index = (tmp_path / "site" / "index.html").read_text()
    assert "incomplete: 1 missing" in index and f'title="incomplete: {key}"' in index
    page = next((tmp_path / "site" / "ck").glob("*.html")).read_text()
    assert "incomplete" in page and f"<code>{key}</code>" in page

    # A complete run says complete.
    matrix.write_text('[[cell]]\nattack = "fgsm"\n')
    other = tmp_path / "other"
    code, out, _ = run_cli(
        monkeypatch,
        capsys,
        "run",
        "--defense",
        "natural",
        "--set",
        "epochs=2",
        "--matrix",
        str(matrix),
        "--results",
        str(other),
    )
    code, out, _ = run_cli(monkeypatch, capsys, "results", "--format", "json", "--results", str(other))
    worst = next(r for r in json.loads(out) if r["attack"] == "worst_case")
    assert worst["complete"] is True and worst["missing"] == []


def test_evaluate_raises_with_the_rows_and_the_failures(cheat, natural_model, tmp_path):
    matrix = tmp_path / "m.toml"
    matrix.write_text(f'[[cell]]\nattack = "{cheat}"\n\n[[cell]]\nattack = "fgsm"\n')
    with pytest.raises(api.IncompleteEvaluation, match=r"1 cell\(s\) failed, so the worst case is incomplete") as exc:
        api.evaluate(natural_model, name="mine", matrix=str(matrix), results=tmp_path / "results", device="cpu")
    assert list(exc.value.failures) == [f"{cheat}:eps=0.2,factor=2"]
    worst = exc.value.rows[-1]
    assert worst["attack"] == "worst_case" and worst["complete"] is False


def test_a_custom_backward_survives_the_fast_path(natural_model, digits_test):
    x, y = digits_test
    model = Wrapped(natural_model, StraightThrough).eval()
    xs, ys = x[:16], y[:16]
    xg = xs.clone().requires_grad_(True)
    nn.functional.cross_entropy(model(xg), ys).backward()
    assert float(xg.grad.abs().sum()) > 0  # the model's own gradient says something
    view = exact_view(model)
    # The digits CNN's pools are rewritten around the function, which stays whole: the
    # view's gradient is the model's straight-through one, bit for bit, not the zero
    # gradient of its traced forward (rounding).
    assert view is not model
    assert any(n.op == "call_function" and n.target.__name__ == "apply_StraightThrough" for n in view.graph.nodes)
    vg = xs.clone().requires_grad_(True)
    nn.functional.cross_entropy(view(vg), ys).backward()
    assert torch.equal(vg.grad, xg.grad)
    assert faithful(model, view, xs, ys)
    # Folding batch norm keeps it whole too.
    assert faithful(model, fold_bn(model), xs, ys)
    cell = make_cell("pgd", {"steps": 10}, THREAT)
    fast = craft(model, cell, x[:64], y[:64], device="cpu", batch_size=64, fast=FastPath(exact_rewrites=True))
    plain = craft(model, cell, x[:64], y[:64], device="cpu", batch_size=64, fast=FastPath(exact_rewrites=False))
    assert torch.equal(fast, plain)


def test_faithful_refuses_a_net_whose_gradients_differ(natural_model, digits_test):
    x, y = digits_test

    assert faithful(natural_model, natural_model, x[:8], y[:8])
    assert faithful(natural_model, exact_view(natural_model), x[:8], y[:8])
    assert not faithful(natural_model, Wrapped(natural_model, Zero), x[:8], y[:8])


def test_fold_bn_keeps_the_logits_within_1e5(digits_test):
    x, _ = digits_test
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 10)
    )
    with torch.no_grad():  # non-trivial statistics, as after training
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    model.eval()
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        assert (folded(x) - model(x)).abs().max() <= 1e-5


def test_near_boundary_and_confirmed_decide_in_full_precision():
    y = torch.tensor([0, 0, 0, 0])
    logits = torch.tensor([[10.0, 0.0], [1.0, 0.96], [0.0, 1.0], [5.0, 5.0 - 0.04 * 5]])
    near = _near_boundary(logits, y)
    # A wide margin is not near; within BAND of the largest logit is; a miss always is.
    assert near.tolist() == [False, True, True, True]
    assert BAND == 0.05

    class Fixed(nn.Module):  # classifies by the first input feature, in fp32
        def forward(self, x):
            return torch.stack([x[:, 0], 1 - x[:, 0]], 1)

    x_adv = torch.tensor([[0.9], [0.4], [0.6], [0.2]])
    hit = torch.tensor([True, True, False, False])  # what a low-precision pass claimed
    candidates = torch.tensor([False, True, True, True])
    confirmed = _confirmed(Fixed(), x_adv, y, candidates, hit)
    # Sample 0 is not a candidate and keeps its claim; the others are decided in fp32.
    assert confirmed.tolist() == [True, True, False, True]


def test_full_fp32_turns_tf32_off_and_restores_it():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    with full_fp32():
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


NOISY = """
import torch
from bench.core.data import get_spec, load_dataset
from bench.core.models import build_model


class Noisy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = build_model("digits_cnn", get_spec("digits"))

    def forward(self, x):
        return self.net(x + 0.3 * torch.randn_like(x))


def build():
    return Noisy()
"""


def test_bench_transfer_judges_a_randomized_target_by_the_majority_rule(tmp_path):
    (tmp_path / "noisy.py").write_text(NOISY)
    matrix = tmp_path / "m.toml"
    matrix.write_text('[[cell]]\nattack = "fgsm"\n')
    where = api.Where(tmp_path / "results", device="cpu")
    rows = api.evaluate(
        str(tmp_path / "noisy.py") + ":build", name="noisy", matrix=str(matrix), results=where.results, device="cpu"
    )
    assert rows[0]["attack"].endswith(",votes=21")  # the matrix's own cells
    grid = api.transfer("noisy", "noisy", where=where).grid
    assert grid and all(g["cell"].endswith(",votes=21") for g in grid)
    ws = api.open_workspace(where)
    (ck,) = ws.store.checkpoints(defense="noisy")
    (row,) = ws.store.transfers([ck.id])
    assert row.extra["votes"] == 21
    x, y = load_dataset("digits", "test")
    model = load_model(ck, "cpu")
    clean = majority_correct(model, x, y, 21, device="cpu", batch_size=1024)
    # The clean column and every verdict: the seeded majority of the same 21 passes.
    assert row.clean_acc == pytest.approx(float(clean.float().mean()))
    assert ck.meta["clean_votes"] == 21 and ck.meta["clean_acc"] == pytest.approx(row.clean_acc)
