"""The defense zoo: every loss term against numbers worked out by hand, every defense in
the registry trained for an epoch on digits, and bad settings refused.

Hand-computed values use logits chosen so the softmax is exact: logits (0, ln 3) give
probabilities (1/4, 3/4), and an identity "model" makes the input the logits, so a
defense's whole loss can be checked on a 2-class toy batch.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import defenses._parts as parts
from bench.core.data import get_spec, load_dataset
from bench.core.models import build_model
from bench.engine.train import TrainConfig, TrainContext, train_model
from bench.errors import BenchError
from bench.registry import DEFENSES, field_docs

LN3 = math.log(3.0)
THREAT = get_spec("digits").threat


def ctx(num_classes: int = 2, seed: int = 0) -> TrainContext:
    return TrainContext(num_classes, THREAT, torch.Generator().manual_seed(seed))


def identity(x):
    return x


def config(name: str, **values):
    return DEFENSES.get(name).make_config(values)


# --- targets ---------------------------------------------------------------------------
def test_smoothed_targets_by_hand():
    t = parts.smoothed_targets(torch.tensor([0, 2]), 3, 0.3)
    assert torch.allclose(t, torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.15, 0.7]]))


@pytest.mark.parametrize(
    "alpha, classes, s",
    [(0.2, 10, 0.18), (0.5, 10, 0.45), (0.95, 10, 0.855), (0.95, 100, 0.9405), (1.0, 10, 0.9), (0.0, 10, 0.0)],
)
def test_alpha_to_smoothing(alpha, classes, s):
    assert parts.alpha_to_smoothing(alpha, classes) == pytest.approx(s)


@pytest.mark.parametrize("alpha, classes", [(0.2, 10), (0.75, 10), (0.95, 100), (0.5, 3)])
def test_alpha_and_smoothing_give_the_same_targets(alpha, classes):
    """Shafahi et al.'s y_warm = y_hot - alpha (y_hot - 1/C) is Summers & Dinneen's Eq. 8."""
    y = torch.tensor([0, classes - 1])
    y_hot = torch.nn.functional.one_hot(y, classes).float()
    y_warm = y_hot - alpha * (y_hot - 1.0 / classes)
    s = parts.alpha_to_smoothing(alpha, classes)
    assert torch.allclose(parts.smoothed_targets(y, classes, s), y_warm, atol=1e-6)


def test_soft_cross_entropy_by_hand():
    # softmax(0, ln 3) = (1/4, 3/4); H((1/2, 1/2), .) = -(ln 1/4 + ln 3/4) / 2
    value = parts.soft_cross_entropy(torch.tensor([[0.0, LN3]]), torch.tensor([[0.5, 0.5]]))
    assert float(value) == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), rel=1e-6)


# --- noise and mixing ------------------------------------------------------------------
def test_gaussian_noise_is_seeded_and_off_at_zero():
    x = torch.zeros(2, 1, 2, 2)
    assert parts.gaussian_noise(x, 0.0, torch.Generator().manual_seed(0)) is x
    a = parts.gaussian_noise(x, 0.5, torch.Generator().manual_seed(3))
    b = parts.gaussian_noise(x, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a, 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3)))


def test_beta_sample_is_seeded_and_in_range():
    a = parts.beta_sample(1.0, 2000, torch.Generator().manual_seed(1))
    b = parts.beta_sample(1.0, 2000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert bool(((a > 0) & (a < 1)).all())
    assert float(a.mean()) == pytest.approx(0.5, abs=0.03)  # Beta(1, 1) is uniform


X_A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
X_B = torch.tensor([[5.0, 6.0], [7.0, 8.0]])
PAIR = torch.stack([X_A, X_B])[:, None]  # two 1x2x2 images
ONE_HOT = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


@pytest.fixture
def fixed_draws(monkeypatch):
    """Fix the mixing coefficients and make the two examples each other's partner."""

    def use(lams):
        monkeypatch.setattr(parts, "beta_sample", lambda alpha, n, g: torch.tensor(lams[:n]))
        monkeypatch.setattr(parts, "_partners", lambda n, g: torch.tensor([1, 0]))

    return use


def test_mixup_by_hand(fixed_draws):
    fixed_draws([0.25, 0.5])
    x, t = parts.mixup(PAIR, ONE_HOT, 1.0, torch.Generator())
    assert torch.allclose(x[0, 0], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))  # 1/4 A + 3/4 B
    assert torch.allclose(x[1, 0], torch.tensor([[3.0, 4.0], [5.0, 6.0]]))  # 1/2 B + 1/2 A
    assert torch.allclose(t, torch.tensor([[0.25, 0.75], [0.5, 0.5]]))


def test_vh_mixup_by_hand(fixed_draws):
    # Coefficients as (lam1, lam2, lam3) rows over the two examples.
    fixed_draws([0.5, 0.99, 0.5, 0.0, 0.25, 0.5])
    x, t = parts.vh_mixup(PAIR, ONE_HOT, 1.0, torch.Generator())
    # Example 0 (A, partner B): 1 top row of A, 1 left column of A, then 1/4 V + 3/4 H.
    vertical, horizontal = torch.tensor([[1.0, 2.0], [7.0, 8.0]]), torch.tensor([[1.0, 6.0], [3.0, 8.0]])
    assert torch.allclose(x[0, 0], 0.25 * vertical + 0.75 * horizontal)
    assert torch.allclose(x[0, 0], torch.tensor([[1.0, 5.0], [4.0, 8.0]]))
    # Example 1 (B, partner A): floor(0.99 * 2) = 1 top row of B, no column of B, half and half.
    assert torch.allclose(x[1, 0], torch.tensor([[3.0, 4.0], [3.0, 4.0]]))
    # Label shares: 1/4 * 1/2 + 3/4 * 1/2 = 1/2 for A; 1/2 * 1/2 + 1/2 * 0 = 1/4 for B.
    assert torch.allclose(t, torch.tensor([[0.5, 0.5], [0.75, 0.25]]))


def test_vh_mixup_targets_are_distributions():
    x = torch.rand(16, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16) % 10
    xm, t = parts.vh_mixup(x, parts.smoothed_targets(y, 10, 0.1), 1.0, torch.Generator().manual_seed(0))
    assert xm.shape == x.shape and torch.allclose(t.sum(1), torch.ones(16))
    assert float(xm.min()) >= 0 and float(xm.max()) <= 1  # convex combinations of pixels


# --- logit terms -----------------------------------------------------------------------
def test_logit_norms_by_hand():
    z = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    assert float(parts.logit_norm_per_example(z)) == pytest.approx(7.5)  # (5 + 10) / 2
    assert float(parts.logit_norm_per_batch(z)) == pytest.approx(math.sqrt(125) / 2)
    assert float(parts.logit_norm_per_batch(z, gamma=3.0)) == pytest.approx(math.sqrt(0 + 1 + 9 + 25) / 2)
    assert float(parts.logit_sq_norm(torch.tensor([[3.0, 4.0], [1.0, 0.0]]))) == pytest.approx(13.0)


def test_logit_pairing_by_hand():
    a = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    assert float(parts.logit_pairing(a, b)) == pytest.approx((1 + 4 + 0 + 4) / 4)


def test_prediction_cross_entropy_by_hand():
    # H((1/4, 3/4), (3/4, 1/4)) = -(1/4 ln 3/4 + 3/4 ln 1/4)
    value = parts.prediction_cross_entropy(torch.tensor([[0.0, LN3]]), torch.tensor([[LN3, 0.0]]))
    assert float(value) == pytest.approx(-(0.25 * math.log(0.75) + 0.75 * math.log(0.25)), rel=1e-6)


# --- whole losses on an identity model -------------------------------------------------
def ce(z0: float, z1: float, label: int) -> float:
    """Two-class cross-entropy by hand."""
    other, own = (z1, z0) if label == 0 else (z0, z1)
    return math.log(1 + math.exp(other - own))


def loss_of(name, x, y, num_classes=2, **values):
    cfg = config(name, **values)
    return float(DEFENSES.get(name).fn(identity, x, torch.tensor(y), cfg, ctx(num_classes)))


def test_label_smoothing_loss_by_hand():
    # targets (1/2, 1/2) at s = 0.5 for two classes
    value = loss_of("label_smoothing", torch.tensor([[0.0, LN3]]), [1], smoothing=0.5, sigma=0.0)
    assert value == pytest.approx(0.5 * (math.log(4) + math.log(4 / 3)), rel=1e-6)


def test_logit_squeeze_loss_by_hand():
    z = torch.tensor([[3.0, 4.0], [6.0, 8.0]])
    ce_mean = (ce(3, 4, 0) + ce(6, 8, 0)) / 2
    assert loss_of("logit_squeeze", z, [0, 0], beta=0.5, sigma=0.0, form="example") == pytest.approx(
        ce_mean + 0.5 * 7.5, rel=1e-6
    )
    assert loss_of("logit_squeeze", z, [0, 0], beta=0.5, sigma=0.0, form="batch") == pytest.approx(
        ce_mean + 0.5 * math.sqrt(125) / 2, rel=1e-6
    )


def test_logit_similarity_loss_by_hand():
    # Z - 1 = [[0, 0], [2, 0]]: Frobenius norm 2, over b = 2 is 1.
    z = torch.tensor([[1.0, 1.0], [3.0, 1.0]])
    expected = (math.log(2) + ce(3, 1, 0)) / 2 + 0.5 * 1.0
    value = loss_of("logit_similarity", z, [0, 0], beta=0.5, gamma=1.0, sigma=0.0)
    assert value == pytest.approx(expected, rel=1e-6)


def test_clp_loss_by_hand():
    # Pairs (row 0, row 2) and (row 1, row 3): squared differences 1, 0, 0, 1 -> mean 1/2.
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 0.0]])
    ce_mean = (ce(1, 0, 0) + ce(0, 1, 1) + ce(2, 0, 0) + ce(0, 0, 1)) / 4
    value = loss_of("clp", z, [0, 1, 0, 1], pair_weight=0.5, sigma=0.0)
    assert value == pytest.approx(ce_mean + 0.5 * 0.5, rel=1e-6)


def test_ibp_loss_by_hand():
    # z = W x + b on x = (0.5, 0.5) with W = [[1, -2], [0.5, 1]], b = (0, 0.1): (-0.5, 0.85).
    # Over the box of radius 0.1 the intervals are z -+ |W| 0.1 = (0.3, 0.15):
    # z_0 in [-0.8, -0.2], z_1 in [0.7, 1.0]. For y = 0 the worst case is (-0.8, 1.0).
    net = torch.nn.Linear(2, 2)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))
        net.bias.copy_(torch.tensor([0.0, 0.1]))
    x, y = torch.tensor([[0.5, 0.5]]), torch.tensor([0])
    c = ctx()
    c.threat = dataclasses.replace(c.threat, eps=0.1)
    c.total_steps = c.step = 10  # ramped: kappa = kappa_end
    cfg = DEFENSES.get("ibp").make_config({"eps_scale": 1.0, "kappa_end": 0.25})
    value = float(DEFENSES.get("ibp").fn(net, x, y, cfg, c).detach())
    assert value == pytest.approx(0.25 * ce(-0.5, 0.85, 0) + 0.75 * ce(-0.8, 1.0, 0), rel=1e-5)
    c.step = 0  # the warm-up: natural cross-entropy alone
    assert float(DEFENSES.get("ibp").fn(net, x, y, cfg, c).detach()) == pytest.approx(ce(-0.5, 0.85, 0), rel=1e-6)


@pytest.fixture
def fixed_adversary(monkeypatch):
    """Make the training adversary return given logits (the model is the identity)."""

    def use(module_name, x_adv):
        import importlib

        module = importlib.import_module(f"defenses.{module_name}")
        monkeypatch.setattr(module, "training_adversary", lambda model, x, y, cfg, ctx: x_adv)

    return use


def test_pgd_at_loss_by_hand(fixed_adversary):
    fixed_adversary("pgd_at", torch.tensor([[0.0, 1.0]]))
    clean = torch.tensor([[1.0, 0.0]])
    assert loss_of("pgd_at", clean, [0], clean_weight=0.0, squeeze_beta=0.1) == pytest.approx(
        ce(0, 1, 0) + 0.1 * 1.0, rel=1e-6
    )
    assert loss_of("pgd_at", clean, [0], clean_weight=0.5, squeeze_beta=0.1) == pytest.approx(
        0.5 * ce(1, 0, 0) + 0.5 * ce(0, 1, 0) + 0.1 * 1.0, rel=1e-6
    )


def test_alp_loss_by_hand(fixed_adversary):
    fixed_adversary("alp", torch.tensor([[0.0, 1.0]]))
    # pairing: squared differences 1 and 1 over 2 entries = 1; squeeze 1/2 * 1 + 1/2 * 1 = 1
    expected = 0.5 * ce(1, 0, 0) + 0.5 * ce(0, 1, 0) + 0.5 * 1.0 + 0.1 * 1.0
    assert loss_of(
        "alp", torch.tensor([[1.0, 0.0]]), [0], clean_weight=0.5, pair_weight=0.5, squeeze_beta=0.1
    ) == pytest.approx(expected, rel=1e-6)
    # adversarial-only still pairs with the clean logits
    expected = ce(0, 1, 0) + 2.0 * 1.0
    assert loss_of("alp", torch.tensor([[1.0, 0.0]]), [0], clean_weight=0.0, pair_weight=2.0) == pytest.approx(
        expected, rel=1e-6
    )


LRM_CLEAN = [[0.0, 0.0]]  # p = (1/2, 1/2)
LRM_ADV = [[0.0, LN3]]  # q = (1/4, 3/4)


def lrm_by_hand(ratio, beta):
    """s = 0.2 on label 0: target (0.8, 0.2)."""
    adv_loss = -(0.8 * math.log(0.25) + 0.2 * math.log(0.75))
    h = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    return adv_loss + (adv_loss / h) / ratio * h + beta * (0.0 + LN3**2)


def test_lrm_loss_by_hand(fixed_adversary):
    fixed_adversary("lrm", torch.tensor(LRM_ADV))
    for ratio in (0.125, 0.95):
        value = loss_of("lrm", torch.tensor(LRM_CLEAN), [0], smoothing=0.2, mixing="none", beta=0.1, ratio=ratio)
        assert value == pytest.approx(lrm_by_hand(ratio, 0.1), rel=1e-6)
    # The pairing term is the adversarial loss over the ratio: at 0.125, 8 times it.
    adv_loss = -(0.8 * math.log(0.25) + 0.2 * math.log(0.75))
    value = loss_of("lrm", torch.tensor(LRM_CLEAN), [0], smoothing=0.2, mixing="none", beta=0.0, ratio=0.125)
    assert value == pytest.approx(9 * adv_loss, rel=1e-6)


def test_lrm_pairing_coefficient_carries_no_gradient(fixed_adversary):
    clean = torch.tensor(LRM_CLEAN, requires_grad=True)
    adv = torch.tensor(LRM_ADV, requires_grad=True)
    fixed_adversary("lrm", adv)
    cfg = config("lrm", smoothing=0.2, mixing="none", beta=0.1, ratio=0.5)
    import defenses.lrm as lrm

    loss = lrm.loss(identity, clean, torch.tensor([0]), cfg, ctx())
    loss.backward()
    # The same loss with the coefficient as a plain number: the gradients must agree.
    clean2 = torch.tensor(LRM_CLEAN, requires_grad=True)
    adv2 = torch.tensor(LRM_ADV, requires_grad=True)
    target = parts.smoothed_targets(torch.tensor([0]), 2, 0.2)
    adv_loss = parts.soft_cross_entropy(adv2, target)
    h = parts.prediction_cross_entropy(clean2, adv2)
    c = float(adv_loss.detach()) / float(h.detach()) / 0.5
    manual = adv_loss + c * h + 0.1 * (parts.logit_sq_norm(clean2) + parts.logit_sq_norm(adv2))
    manual.backward()
    assert torch.allclose(clean.grad, clean2.grad) and torch.allclose(adv.grad, adv2.grad)
    # and the coefficient itself is a constant of the graph
    coefficient = lrm.pairing_coefficient(adv_loss, h, 0.5)
    assert not coefficient.requires_grad
    assert float(coefficient * h.detach()) == pytest.approx(float(adv_loss.detach()) / 0.5, rel=1e-6)


def test_training_adversary_uses_the_threat_model_unless_told():
    torch.manual_seed(0)
    model = build_model("digits_cnn", get_spec("digits"))
    x, y = load_dataset("digits", "test")
    x, y = x[:32], y[:32]
    default = parts.training_adversary(model, x, y, config("pgd_at", attack_steps=3), ctx(10))
    assert float((default - x).abs().max()) <= THREAT.eps + 1e-6
    assert float((default - x).abs().max()) > THREAT.eps / 2
    small = parts.training_adversary(model, x, y, config("pgd_at", attack_steps=3, attack_eps=0.01), ctx(10))
    assert float((small - x).abs().max()) <= 0.01 + 1e-6
    assert float(small.min()) >= 0 and float(small.max()) <= 1
    assert model.training  # restored after crafting


# --- bad settings ----------------------------------------------------------------------
BAD = [
    ("logit_squeeze", {"form": "foo"}),
    ("logit_squeeze", {"beta": -1.0}),
    ("label_smoothing", {"smoothing": 1.0}),
    ("label_smoothing", {"smoothing": -0.1}),
    ("label_smoothing", {"sigma": 20.0}),
    ("gaussian_noise", {"sigma": -0.1}),
    ("logit_similarity", {"beta": -0.5}),
    ("mixup", {"mix_alpha": 0.0}),
    ("vh_mixup", {"mix_alpha": -1.0}),
    ("pgd_at", {"clean_weight": 1.5}),
    ("pgd_at", {"attack_steps": 0}),
    ("pgd_at", {"attack_eps": 0.0}),
    ("pgd_at", {"squeeze_beta": -1.0}),
    ("alp", {"pair_weight": -0.5}),
    ("alp", {"attack_step_size": 2.0}),
    ("clp", {"pair_weight": -1.0}),
    ("clp", {"sigma": 2.0}),
    ("lrm", {"ratio": 0.0}),
    ("lrm", {"mixing": "cutmix"}),
    ("lrm", {"smoothing": 1.0}),
    ("lrm", {"beta": -1e-3}),
]


@pytest.mark.parametrize("name, values", BAD, ids=[f"{n}-{next(iter(v))}" for n, v in BAD])
def test_bad_settings_are_refused(name, values):
    entry = DEFENSES.get(name)
    with pytest.raises(ValueError):
        entry.config(**values)
    with pytest.raises(BenchError, match=name):  # what `--set` and presets go through
        entry.make_config(values)


# --- the whole registry ----------------------------------------------------------------
@pytest.mark.parametrize("name", DEFENSES.names())
def test_config_is_documented_frozen_and_buildable(name):
    entry = DEFENSES.get(name)
    cfg = entry.make_config({})  # the defaults are a valid config
    assert type(cfg).__dataclass_params__.frozen
    docs = field_docs(entry.config)
    undocumented = [f.name for f in dataclasses.fields(entry.config) if not docs.get(f.name, "").strip()]
    assert not undocumented, f"{name}: fields without a docstring: {undocumented}"
    assert entry.doc, f"{name}: the loss function needs a docstring (`bench ls defenses` shows it)"


def train_one_epoch(name: str, seed: int):
    spec = get_spec("digits")
    x, y = load_dataset("digits", "train")
    entry = DEFENSES.get(name)
    return train_model("digits_cnn", spec, entry.fn, entry.make_config({}), TrainConfig(epochs=1), x, y, seed=seed)


@pytest.mark.parametrize("name", DEFENSES.names())
def test_every_defense_trains_an_epoch_reproducibly(name):
    model_a, result = train_one_epoch(name, seed=0)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])
    model_b, _ = train_one_epoch(name, seed=0)
    for (key, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {key} differs between two runs with seed 0"
