"""The strong white-box cells (APGD, APGD-T, multi-targeted PGD) against independent
implementations, their keys and budgets, and what they hand the harness.

- `apgd` and `apgd_t` against torchattacks' APGD and APGDT (its own copy of Croce and
  Hein's code, reached through its own wrapper). Given the seed our cell draws from its
  generator, both run the same random starts on the CPU, so the tolerance is zero:
  per sample, over SEEDS, the same images survive. Without the common seed the two
  differ by the seed-to-seed spread (APGD-CE-10 on the PGD-AT model below: a standard
  deviation of 0.6 points over twelve seeds, means 27.5 vs 26.9), which a tolerance
  would have to absorb and a matched seed does not.
- `multitargeted` against a reference loop written here, torchattacks' PGD with the
  targeted margin z_t - z_y as its loss (torchattacks' own targeted PGD descends the
  target's cross-entropy, another objective), one run per target, a sample broken
  when any run's last iterate misclassifies it. Ours checks every iterate, so it is
  never weaker: on the mean over SEEDS at most TOLERANCE more robust accuracy.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import train_digits

from attacks.multitargeted import run_multitargeted
from bench.core.cells import make_cell, parse_cell_key
from bench.core.data import get_spec
from bench.core.presets import default_preset
from bench.engine.budget import ball, check_budget
from bench.engine.cell import craft, run_cell
from bench.engine.device import frozen
from bench.engine.selection import subset_indices
from bench.errors import BenchError
from bench.plugin import seed_from
from bench.registry import ATTACKS

THREAT = get_spec("digits").threat
SEEDS = range(3)
TOLERANCE = 0.005
"""Half a point of robust accuracy on the mean over SEEDS, as tests/test_references.py."""


@pytest.fixture(scope="module")
def pgd_at_model(digits_test):
    """PGD-AT with its digits preset, 8 epochs (2 s): PGD-20 leaves about 27% of the test
    set and AutoAttack about 16%, so strong and weak attacks differ on it."""
    return train_digits("pgd_at", epochs=8, **default_preset("pgd_at", "digits").config)


def ours(model, cell, x, y, seed: int) -> np.ndarray:
    """Per-sample robustness (correct on clean and adversarial input) from the cell."""
    result = run_cell(model, cell, x, y, device="cpu", batch_size=1024, seed=seed)
    return np.unpackbits(np.frombuffer(result.correct_bits, dtype=np.uint8), count=result.n).astype(bool)


def robust(model, x_adv, x, y) -> np.ndarray:
    with torch.no_grad():
        return ((model(x_adv).argmax(1) == y) & (model(x).argmax(1) == y)).numpy()


def cell_seed(seed: int) -> int:
    """The integer seed a packaged cell hands pyautoattack when evaluated with `seed`:
    the first draw of a generator seeded so (bench.plugin.seed_from)."""
    return seed_from(torch.Generator().manual_seed(seed))


# --- APGD and APGD-T against torchattacks -------------------------------------------------
@pytest.mark.parametrize(
    "params", [{"steps": 20}, {"steps": 20, "loss": "dlr"}, {"steps": 20, "norm": "l2"}], ids=["ce", "dlr", "l2"]
)
def test_apgd_equals_torchattacks_at_the_same_seed(pgd_at_model, digits_test, params):
    import torchattacks

    x, y = digits_test
    model = pgd_at_model
    cell = make_cell("apgd", params, THREAT)
    for seed in SEEDS:
        mine = ours(model, cell, x, y, seed)
        with frozen(model):
            x_adv = torchattacks.APGD(
                model,
                norm="L2" if cell.config.norm == "l2" else "Linf",
                eps=cell.config.eps,
                steps=20,
                n_restarts=1,
                seed=cell_seed(seed),
                loss=cell.config.loss,
            )(x, y)
        theirs = robust(model, x_adv, x, y)
        assert 0.1 < theirs.mean() < 0.9  # some survive, some break: a real comparison
        np.testing.assert_array_equal(mine, theirs, err_msg=f"seed {seed}: {mine.mean():.4f} vs {theirs.mean():.4f}")


def test_apgd_t_equals_torchattacks_at_the_same_seed(pgd_at_model, digits_test):
    import torchattacks

    x, y = digits_test
    model = pgd_at_model
    cell = make_cell("apgd_t", {"steps": 10}, THREAT)
    figures = []
    for seed in SEEDS:
        mine = ours(model, cell, x, y, seed)
        with frozen(model):
            x_adv = torchattacks.APGDT(
                model, norm="Linf", eps=THREAT.eps, steps=10, n_restarts=1, seed=cell_seed(seed), n_classes=10
            )(x, y)
        theirs = robust(model, x_adv, x, y)
        np.testing.assert_array_equal(mine, theirs, err_msg=f"seed {seed}")
        figures.append(mine.mean())
    # The targeted attack is the stronger one on this model (measured: about 17% against
    # APGD-CE's 28% at 10 steps), as it is on the PGD-AT models AutoAttack was made for.
    apgd = [ours(model, make_cell("apgd", {"steps": 10}, THREAT), x, y, seed).mean() for seed in SEEDS]
    assert np.mean(figures) < np.mean(apgd) - 0.05, (figures, apgd)


def test_apgd_best_loss_is_the_packages_highest_loss_iterate(pgd_at_model, digits_test):
    """`best_loss = true` hands back every sample's highest-loss iterate, as the package's
    `perturb(best_loss=True)` seeded as our cell seeds it, bit for bit; the package seeds
    nothing on that path itself, so two runs agree only because the cell does."""
    from pyautoattack.autopgd_base import APGDAttack

    x, y = digits_test
    cell = make_cell("apgd", {"steps": 10, "best_loss": True}, THREAT)
    mine = craft(pgd_at_model, cell, x, y, device="cpu", batch_size=1024, seed=4)
    assert torch.equal(mine, craft(pgd_at_model, cell, x, y, device="cpu", batch_size=1024, seed=4))
    attack = APGDAttack(pgd_at_model, n_iter=10, eps=THREAT.eps, seed=cell_seed(4), loss="ce", device="cpu")
    with torch.random.fork_rng(), frozen(pgd_at_model):
        torch.random.manual_seed(cell_seed(4))
        theirs = attack.perturb(x, y, best_loss=True)
    assert torch.equal(mine, theirs)
    # Every sample moved, the ones that stand included (the adversarial path leaves those at x).
    plain = craft(pgd_at_model, make_cell("apgd", {"steps": 10}, THREAT), x, y, device="cpu", batch_size=1024, seed=4)
    standing = torch.from_numpy(robust(pgd_at_model, plain, x, y))
    assert 0 < int(standing.sum()) < len(x)
    assert bool((mine != x).flatten(1).any(1).all()) and not bool((plain[standing] != x[standing]).any())


# --- APGD-T from a later rank ---------------------------------------------------------------
def test_apgd_t_from_the_first_rank_is_the_packages_own_loop(pgd_at_model, digits_test):
    """The loop `first_target` runs (attacks.apgd._from_rank) is the package's `perturb`
    written again: from rank 1 it gives the package's adversaries, bit for bit."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    from attacks.apgd import _from_rank

    x, y = digits_test
    runs = []
    for perturb in (lambda a: a.perturb(x, y), lambda a: _from_rank(a, x, y, 1)):
        attack = APGDAttack_targeted(pgd_at_model, n_iter=10, eps=THREAT.eps, seed=3, n_target_classes=4, device="cpu")
        with torch.random.fork_rng(), frozen(pgd_at_model):
            runs.append(perturb(attack))
    assert torch.equal(*runs)
    assert 0 < int((runs[0] != x).flatten(1).any(1).sum()) < len(x)  # some broke, some stood


def test_apgd_t_from_a_later_rank_attacks_those_targets_on_what_stands(pgd_at_model, digits_test, monkeypatch):
    """first_target = 2, n_target_classes = 4: three runs, toward each sample's 2nd, 3rd
    and 4th likeliest wrong class by its clean logits, each on the samples no earlier run
    broke; a sample's adversary is the one that broke it."""
    from pyautoattack.autopgd_base import APGDAttack_targeted

    x, y = digits_test
    seen = []
    single = APGDAttack_targeted.attack_single_run

    def spy(self, x_to_fool, y_to_fool, x_init=None):
        result = single(self, x_to_fool, y_to_fool, x_init)
        seen.append((x_to_fool.clone(), self.y_target.clone(), result[1].clone()))
        return result

    monkeypatch.setattr(APGDAttack_targeted, "attack_single_run", spy)
    cell = make_cell("apgd_t", {"steps": 10, "n_target_classes": 4, "first_target": 2}, THREAT)
    x_adv = craft(pgd_at_model, cell, x, y, device="cpu", batch_size=1024, seed=0)
    assert len(seen) == 3
    with torch.no_grad():
        logits = pgd_at_model(x)
    standing = logits.argmax(1) == y
    for rank, (attacked, target, still) in zip((2, 3, 4), seen, strict=True):
        idx = standing.nonzero().flatten()
        assert torch.equal(attacked, x[idx])
        # Only correct samples are attacked, so column 0 of the descending sort is y.
        assert torch.equal(target, logits[idx].argsort(1, descending=True)[:, rank])
        standing[idx[still == 0]] = False
    broken = ~standing & (logits.argmax(1) == y)
    assert int(broken.sum()) > 0 and int(standing.sum()) > 0
    with torch.no_grad():
        assert bool((pgd_at_model(x_adv[broken]).argmax(1) != y[broken]).all())
    assert torch.equal(x_adv[standing], x[standing])


# --- multi-targeted PGD against a reference loop ------------------------------------------
def reference_multitargeted(model, x, y, eps, alpha, steps, targets):
    """Gowal et al.'s multi-targeted PGD written as torchattacks writes PGD (uniform start
    from the global generator, sign steps, clip to the ball and the box), one run per
    target of the top `targets` wrong classes by clean logit, ascending z_t - z_y; broken
    where any run's last iterate misclassifies."""
    with torch.no_grad():
        logits = model(x)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).argsort(1, descending=True)
    broken = torch.zeros(len(x), dtype=torch.bool)
    for j in range(targets):
        # Each run on what the runs before left standing (as torchattacks' MultiAttack):
        # the same verdicts, since a broken sample stays broken, at a fraction of the work.
        # Every run draws its start for the whole batch, so the draws do not depend on it.
        noise = torch.empty_like(x).uniform_(-eps, eps)
        left = (~broken).nonzero().squeeze(1)
        xs, ys, t = x[left], y[left], wrong[left, j : j + 1]
        x_adv = (xs + noise[left]).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                z = model(x_adv)
                (grad,) = torch.autograd.grad((z.gather(1, t) - z.gather(1, ys[:, None])).sum(), x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = (xs + (x_adv - xs).clamp(-eps, eps)).clamp(0, 1)
        with torch.no_grad():
            broken[left] = model(x_adv).argmax(1) != ys
    with torch.no_grad():
        return ((~broken) & (model(x).argmax(1) == y)).numpy()


@pytest.mark.parametrize("which", ["natural", "pgd_at"])
def test_multitargeted_is_never_weaker_than_a_reference_loop(natural_model, pgd_at_model, digits_test, which):
    model = natural_model if which == "natural" else pgd_at_model
    x, y = digits_test
    cell = make_cell("multitargeted", {"steps": 10}, THREAT)
    mine, theirs = [], []
    for seed in SEEDS:
        mine.append(ours(model, cell, x, y, seed).mean())
        torch.manual_seed(seed)
        with frozen(model):
            theirs.append(reference_multitargeted(model, x, y, THREAT.eps, THREAT.step_size, 10, 9).mean())
    assert np.mean(mine) <= np.mean(theirs) + TOLERANCE, (mine, theirs)
    if which == "pgd_at":
        assert np.mean(theirs) > 0.1  # the comparison means something only where some survive
        # Its point: the targets find what untargeted PGD of the same steps does not
        # (measured: about 17% against PGD-10's 29% on this model).
        pgd = [ours(model, make_cell("pgd", {"steps": 10}, THREAT), x, y, seed).mean() for seed in SEEDS]
        assert np.mean(mine) < np.mean(pgd) - 0.05, (mine, pgd)


def test_multitargeted_keeps_the_first_break_and_runs_only_on_what_is_left(pgd_at_model, digits_test):
    """Every broken sample's adversary misclassifies (the iterate that first did), every
    other one is a point of the ball; a sample broken by the first target costs the
    others nothing: one target's run on the whole batch breaks the same images as the
    whole attack's first target."""
    x, y = digits_test
    model = pgd_at_model
    cfg = make_cell("multitargeted", {"steps": 10}, THREAT).config
    fn = ATTACKS.get("multitargeted").fn
    with frozen(model):
        x_adv, broken = run_multitargeted(model, x, y, cfg, torch.Generator().manual_seed(0))
        first, broken_first = run_multitargeted(model, x, y, replace(cfg, targets=1), torch.Generator().manual_seed(0))
        again = fn(model, x, y, cfg, generator=torch.Generator().manual_seed(0)).x_adv
        preds = model(x_adv).argmax(1)
    assert torch.equal(again, x_adv)
    assert bool((preds[broken] != y[broken]).all())
    assert bool((broken_first <= broken).all()) and int(broken.sum()) > int(broken_first.sum())
    assert torch.equal(x_adv[broken_first], first[broken_first])
    assert float((x_adv - x).abs().max()) <= THREAT.eps + 1e-6


# --- keys, budgets, settings --------------------------------------------------------------
KEYS = {
    ("apgd", ()): "apgd:eps=0.2,loss=ce,norm=linf,restarts=1,steps=100",
    ("apgd", (("loss", "dlr"),)): "apgd:eps=0.2,loss=dlr,norm=linf,restarts=1,steps=100",
    ("apgd", (("norm", "l2"),)): "apgd:eps=1,loss=ce,norm=l2,restarts=1,steps=100",
    ("apgd_t", ()): "apgd_t:eps=0.2,n_target_classes=9,norm=linf,restarts=1,steps=100",
    ("apgd_t", (("norm", "l2"),)): "apgd_t:eps=1,n_target_classes=9,norm=l2,restarts=1,steps=100",
    (
        "apgd_t",
        (("first_target", 2),),
    ): "apgd_t:eps=0.2,first_target=2,n_target_classes=9,norm=linf,restarts=1,steps=100",
    ("apgd", (("best_loss", True),)): "apgd:best_loss=true,eps=0.2,loss=ce,norm=linf,restarts=1,steps=100",
    ("multitargeted", ()): "multitargeted:eps=0.2,random_start=true,step_size=0.05,steps=100,targets=9",
}


@pytest.mark.parametrize("attack,params", list(KEYS), ids=list(KEYS.values()))
def test_keys_threats_and_budgets(natural_model, digits_test, attack, params):
    """The canonical key with the threat model's budget filled in, parsed back from
    itself and from its short form; the ball the harness holds the cell to; a crafted
    batch inside it, at the cell's own budget."""
    cell = make_cell(attack, dict(params), THREAT)
    assert cell.key == KEYS[attack, params]
    assert parse_cell_key(cell.key, THREAT) == cell
    short = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params)
    assert parse_cell_key(f"{attack}:{short}", THREAT).key == cell.key
    norm = dict(params).get("norm", "linf")
    eps = THREAT.l2_eps if norm == "l2" else THREAT.eps
    assert cell.threat == f"{norm}-{eps:g}" and ball(cell) == (norm, eps)
    x, y = digits_test
    idx = torch.as_tensor(subset_indices(len(x), 32))
    small = make_cell(attack, {**dict(params), "steps": 5}, THREAT)
    x_adv = craft(natural_model, small, x[idx], y[idx], device="cpu", batch_size=1024, seed=0)
    check_budget(cell, x[idx], x_adv)  # craft checked the budget too; this is the figure
    delta = (x_adv - x[idx]).flatten(1)
    size = delta.norm(dim=1).max() if norm == "l2" else delta.abs().max()
    assert float(size) > 0.5 * eps  # it did move: the budget is used, not ignored


@pytest.mark.parametrize(
    "attack,values",
    [
        ("apgd", {"loss": "xent"}),
        ("apgd", {"steps": 0}),
        ("apgd", {"restarts": 0}),
        ("apgd", {"norm": "l1"}),
        ("apgd", {"best_loss": "yes"}),
        ("apgd_t", {"n_target_classes": 0}),
        ("apgd_t", {"eps": -0.1}),
        ("apgd_t", {"first_target": 0}),
        ("apgd_t", {"first_target": 5, "n_target_classes": 4}),
        ("multitargeted", {"targets": 0}),
        ("multitargeted", {"step_size": 0.0}),
        ("multitargeted", {"norm": "l2"}),
    ],
)
def test_bad_settings_are_refused(attack, values):
    with pytest.raises(BenchError, match=next(iter(values))):
        ATTACKS.get(attack).make_config(values)


# --- what the packaged cells hand the harness ---------------------------------------------
@pytest.mark.parametrize("attack", ["apgd", "apgd_t"])
def test_unbroken_samples_keep_x_and_broken_ones_misclassify(pgd_at_model, digits_test, attack):
    x, y = digits_test
    cell = make_cell(attack, {"steps": 10}, THREAT)
    x_adv = craft(pgd_at_model, cell, x, y, device="cpu", batch_size=1024, seed=0)
    with torch.no_grad():
        wrong = pgd_at_model(x_adv).argmax(1) != y
    unbroken = ~wrong
    assert 0 < int(unbroken.sum()) < len(y)
    assert torch.equal(x_adv[unbroken], x[unbroken])


class FiveClasses(torch.nn.Module):
    """A linear model over five classes: fewer than the default 9 targets plus one."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(64, 5)
        torch.nn.init.normal_(self.linear.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return self.linear(x.flatten(1))


@pytest.mark.parametrize("attack", ["apgd_t", "multitargeted"])
def test_targets_are_capped_at_the_wrong_classes(digits_test, attack):
    """9 targets on a 5-class model attack its 4 wrong classes (pyautoattack's ranking
    would index past the classes); the result equals asking for 4."""
    x, y = digits_test
    x, y = x[:40], y[:40] % 5
    model = FiveClasses().eval()
    field = "n_target_classes" if attack == "apgd_t" else "targets"
    fn = ATTACKS.get(attack).fn
    runs = []
    for k in (9, 4):
        cfg = make_cell(attack, {"steps": 5, field: k}, THREAT).config
        with frozen(model):
            runs.append(fn(model, x, y, cfg, generator=torch.Generator().manual_seed(0)).x_adv)
    assert torch.equal(*runs)


class ConstantLogits(torch.nn.Module):
    """Logits that ignore the input: every gradient is zero, every prediction 9, so an
    attack leaves every image standing."""

    def forward(self, x):
        return torch.arange(10.0).expand(len(x), 10) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_zero_gradients_reach_the_cell_as_warnings(digits_test, caplog):
    """pyautoattack's zero-gradient check (run with the DLR losses) is recorded with the
    cell, and nothing reaches the `auto-attack` logger's own handlers or the root."""

    x, y = digits_test
    y = torch.full_like(y[:16], 9)  # the constant model's prediction: all correct, all attacked
    package_logger = logging.getLogger("auto-attack")
    # as logging.config.dictConfig leaves every logger that existed before it disabled
    # (import-linter's CLI calls it in-process): the run must hear the checks all the same
    package_logger.disabled = True
    try:
        with caplog.at_level(logging.DEBUG):
            result = run_cell(
                ConstantLogits(),
                make_cell("apgd", {"loss": "dlr", "steps": 5}, THREAT),
                x[:16],
                y,
                device="cpu",
                batch_size=1024,
                seed=0,
            )
        assert package_logger.disabled  # put back as it was found
    finally:
        package_logger.disabled = False
    assert any("zero gradient" in w for w in result.extra["warnings"])
    assert result.robust_acc == 1.0
    assert not caplog.records and package_logger.handlers == []


def test_a_randomized_cells_later_rounds_record_their_warnings_too(digits_test):
    """The rounds that attack again what the majority verdict left standing warn into the
    cell's record, as the first round does, and nothing reaches the caller."""
    x, y = digits_test
    cell = replace(make_cell("apgd", {"loss": "dlr", "steps": 5}, THREAT), votes=3, rounds=3)
    with warnings.catch_warnings(record=True) as leaked:
        warnings.simplefilter("always")
        result = run_cell(
            ConstantLogits(), cell, x[:8], torch.full_like(y[:8], 9), device="cpu", batch_size=1024, seed=0
        )
    assert [str(w.message) for w in leaked] == []
    assert any("zero gradient" in w for w in result.extra["warnings"])


# --- under the GPU fast path's bf16 autocast ----------------------------------------------
def under_autocast(model, attack, params, x, y, bf16: bool):
    cell = make_cell(attack, params, THREAT)
    with frozen(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return (
            run_multitargeted(model, x, y, cell.config, torch.Generator().manual_seed(0))
            if attack == "multitargeted"
            else ATTACKS.get(attack).fn(model, x, y, cell.config, generator=torch.Generator().manual_seed(0)).x_adv
        )


@pytest.mark.parametrize("attack", ["apgd", "apgd_t"])
def test_packaged_cells_ignore_a_callers_bf16_autocast(pgd_at_model, digits_test, attack):
    """The package's own result, in fp32, whatever the caller's autocast."""
    x, y = digits_test
    params = {"steps": 10}
    plain = under_autocast(pgd_at_model, attack, params, x, y, bf16=False)
    under = under_autocast(pgd_at_model, attack, params, x, y, bf16=True)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_multitargeted_breaks_under_bf16_are_breaks_in_fp32(pgd_at_model, digits_test):
    """Under bf16 autocast every sample counted broken misclassifies in fp32 (hits near
    the boundary are confirmed in fp32), and the attack is as strong as in fp32 within
    the few samples rounding moves."""
    x, y = digits_test
    params = {"steps": 10}
    x_adv, broken = under_autocast(pgd_at_model, "multitargeted", params, x, y, bf16=True)
    _, broken_fp32 = under_autocast(pgd_at_model, "multitargeted", params, x, y, bf16=False)
    with torch.no_grad():
        wrong = pgd_at_model(x_adv).argmax(1) != y
    assert bool(wrong[broken].all())
    assert abs(int(broken.sum()) - int(broken_fp32.sum())) <= 0.01 * len(y)
