"""APGD and APGD-T (Croce & Hein, 2020, "Reliable evaluation of adversarial robustness
with an ensemble of diverse parameter-free attacks"), L-inf or L2, through the
`pyautoattack` package: AutoAttack's two gradient attacks as cells of their own.

APGD is PGD with momentum and a step size that starts at 2 * eps and halves wherever
the loss stops rising (checkpoints at 22%, then ever shorter intervals of the steps),
restarting from the best point so far; it needs no step size. `apgd` ascends the
cross-entropy (APGD-CE, AutoAttack's first attack) or, with loss="dlr", the
Difference of Logits Ratio, which is invariant to the logits' scale (APGD-DLR, of
AutoAttack's `plus` version). `apgd_t` is APGD-T: the targeted DLR loss, one run per
target class, the classes ranked by the clean logits from the highest wrong one down
(AutoAttack's standard version: 9 targets, 1 restart each), each run only on the
samples the earlier ones left unbroken.

The package's own classes run the attack (APGDAttack, APGDAttack_targeted), so a cell
is exactly what AutoAttack's sub-attack computes at that budget. Around them, as for the
autoattack cell (attacks._packaged): seeded from the cell's generator, torch's global
generator saved and restored, fp32 whatever the caller's autocast, and the package's
zero-gradient check (DLR losses) re-raised as an AutoAttackWarning. Only samples the
model classifies correctly are attacked; every sample keeps its adversary (the
package's last misclassified iterate), x itself where nothing broke it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

from attacks._packaged import LOGGER, package_run, reraise
from bench.plugin import NORMS, Crafted, Role, at_least, one_of, radius, register_attack, seed_from

APGD_LOSSES = ("ce", "dlr")


@dataclass(frozen=True)
class APGD:
    role: ClassVar[Role] = Role.ITERATIVE
    """An iterative white-box gradient attack: the masking checks' reference."""
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    steps: int = 100
    """Iterations per restart (AutoAttack's 100)."""
    restarts: int = 1
    """Random starts, each on the samples earlier ones left unbroken (AutoAttack's
    standard version: 1; `plus`: 5)."""
    loss: str = "ce"
    """`ce` (cross-entropy: APGD-CE) or `dlr` (Difference of Logits Ratio: APGD-DLR)."""
    best_loss: bool = field(default=False, metadata={"key": "set"})
    """Every sample's highest-loss iterate over its restarts (the package's `best_loss`),
    misclassified or not, in place of its last misclassified one: what a cascade's probe
    ranks images by (bench.core.nearest). As an attack it is no stronger, since the
    highest-loss point need not be misclassified. Only in the key where set."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        one_of("loss", self.loss, APGD_LOSSES)
        radius("eps", self.eps, self.norm)
        at_least("steps", self.steps, 1)
        at_least("restarts", self.restarts, 1)

    def with_threat(self, threat) -> APGD:
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"


@dataclass(frozen=True)
class APGDT:
    role: ClassVar[Role] = Role.ITERATIVE
    """An iterative white-box gradient attack: the masking checks' reference."""
    eps: float | None = None
    """Radius; unset means the dataset's threat model (L-inf eps or L2 eps)."""
    norm: str = "linf"
    """`linf` or `l2`."""
    steps: int = 100
    """Iterations per target and restart (AutoAttack's 100)."""
    restarts: int = 1
    """Random starts per target class (AutoAttack's 1)."""
    n_target_classes: int = 9
    """The last target class, as a rank by clean logit from the highest wrong one down
    (AutoAttack's 9): with `first_target` 1, the number of targets. At most the number
    of classes less one are attacked."""
    first_target: int = field(default=1, metadata={"key": "set"})
    """The first target class's rank (1: the likeliest wrong class, as AutoAttack). A
    cascade whose earlier cell ran APGD-T toward the likeliest class for more steps
    starts at 2 rather than run that target again for fewer (`fast`). Only in the key
    where set, so the cells that never set it keep their keys."""

    def __post_init__(self):
        one_of("norm", self.norm, NORMS)
        radius("eps", self.eps, self.norm)
        at_least("steps", self.steps, 1)
        at_least("restarts", self.restarts, 1)
        at_least("n_target_classes", self.n_target_classes, 1)
        at_least("first_target", self.first_target, 1)
        if self.first_target > self.n_target_classes:
            raise ValueError(
                f"first_target must be at most n_target_classes ({self.n_target_classes}), the last "
                f"rank attacked; got {self.first_target}"
            )

    def with_threat(self, threat) -> APGDT:
        if self.eps is not None:
            return self
        return replace(self, eps=threat.eps if self.norm == "linf" else threat.l2_eps)

    def threat_key(self) -> str:
        return f"{self.norm}-{self.eps:g}"


def _package_norm(norm: str) -> str:
    return "Linf" if norm == "linf" else "L2"


def run_apgd(model, x, y, cfg: APGD, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(x_adv, the package's warnings) for one batch; the global RNG is left untouched."""
    with package_run(x) as messages:
        attack = APGDAttack(
            model,
            n_iter=cfg.steps,
            norm=_package_norm(cfg.norm),
            n_restarts=cfg.restarts,
            eps=cfg.eps,
            seed=seed,
            loss=cfg.loss,
            device=x.device,
            logger=logging.getLogger(LOGGER),
        )
        if cfg.best_loss:
            # The package seeds its generator only on its adversarial path, not on this one:
            # seeded here as there, inside the run's forked generator.
            torch.random.manual_seed(seed)
        x_adv = attack.perturb(x.float(), y, best_loss=cfg.best_loss)
    return x_adv, messages


def run_apgd_t(model, x, y, cfg: APGDT, seed: int) -> tuple[torch.Tensor, list[str]]:
    """(x_adv, the package's warnings) for one batch; the global RNG is left untouched."""
    with package_run(x) as messages:
        # The package ranks targets with `sort(...)[:, -k]` for k up to n_target_classes + 1,
        # which fails past the number of classes; AutoAttack only warns there. So a model
        # with fewer classes gets every wrong class as a target (one forward pass asks).
        with torch.no_grad():
            classes = model(x[:1].float()).shape[1]
        attack = APGDAttack_targeted(
            model,
            n_iter=cfg.steps,
            norm=_package_norm(cfg.norm),
            n_restarts=cfg.restarts,
            eps=cfg.eps,
            seed=seed,
            n_target_classes=min(cfg.n_target_classes, classes - 1),
            device=x.device,
            logger=logging.getLogger(LOGGER),
        )
        if cfg.first_target == 1:
            x_adv = attack.perturb(x.float(), y)
        else:
            x_adv = _from_rank(attack, x.float(), y, cfg.first_target)
    return x_adv, messages


def _from_rank(attack: APGDAttack_targeted, x: torch.Tensor, y: torch.Tensor, first: int) -> torch.Tensor:
    """The package's `perturb` loop, from the `first`-ranked wrong class on: it has no
    start rank of its own, so its loop is written again here around its own single run.
    As there: the seed set once before the targets, each target (and restart) run only
    on the samples still standing, the target chosen by sorting their clean logits
    again, and a broken sample keeping the adversary that broke it."""
    attack.init_hyperparam(x)
    y = y.to(attack.device)
    with torch.no_grad():
        standing = attack.model(x).argmax(1) == y
    adv = x.clone()
    torch.random.manual_seed(attack.seed)
    # The package's own ranks: column -1 of the ascending sort is the true class (only
    # correctly classified samples are attacked), -2 the likeliest wrong one.
    for rank in range(first + 1, attack.n_target_classes + 2):
        for _ in range(attack.n_restarts):
            todo = standing.nonzero().flatten()
            if not len(todo):
                return adv
            with torch.no_grad():
                attack.y_target = attack.model(x[todo]).sort(dim=1)[1][:, -rank]
            _, still, _, found = attack.attack_single_run(x[todo].clone(), y[todo].clone())
            broke = (still == 0).nonzero().flatten()
            standing[todo[broke]] = False
            adv[todo[broke]] = found[broke].clone()
    return adv


@register_attack("apgd", config=APGD)
def perturb_apgd(model, x, y, cfg: APGD, *, generator=None) -> Crafted:
    """APGD-CE (or APGD-DLR with loss="dlr") at the cell's eps and norm, `steps`
    iterations and `restarts` random starts, seeded from the generator."""
    x_adv, messages = run_apgd(model, x, y, cfg, seed_from(generator))
    reraise(messages)
    # The package clamps every iterate to [0, 1]: an exact no-op kept as a guard.
    return Crafted(x_adv.clamp(0, 1).detach())


@register_attack("apgd_t", config=APGDT)
def perturb_apgd_t(model, x, y, cfg: APGDT, *, generator=None) -> Crafted:
    """APGD-T: targeted DLR over the top `n_target_classes` wrong classes, `steps`
    iterations and `restarts` random starts per target, seeded from the generator."""
    x_adv, messages = run_apgd_t(model, x, y, cfg, seed_from(generator))
    reraise(messages)
    return Crafted(x_adv.clamp(0, 1).detach())
