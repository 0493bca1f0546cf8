"""Small pieces the defenses compose. Each is a plain function of tensors.

Targets: `smoothed_targets` (one-hot at s = 0), `alpha_to_smoothing`.
Inputs: `gaussian_noise`, `mixup`, `vh_mixup` (pairs of examples and their targets).
Logit terms: `logit_norm_per_example`, `logit_norm_per_batch`, `logit_sq_norm`,
`logit_pairing`, `prediction_cross_entropy`.
The adversary: `pgd_adversary`, and `training_adversary` that reads its budget from a
defense config's attack fields with the dataset's threat model as the default.
Every random number comes from the generator passed in, so a seed fixes the run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from attacks.pgd import PGD, plain_pgd
from bench.plugin import exact_view


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against a target distribution (rows sum to 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def smoothed_targets(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Summers & Dinneen Eq. 8: 1 - s on the true class, s / (C - 1) on every other."""
    t = torch.full((len(y), num_classes), smoothing / (num_classes - 1), device=y.device)
    return t.scatter_(1, y[:, None], 1.0 - smoothing)


def alpha_to_smoothing(alpha: float, num_classes: int) -> float:
    """Shafahi et al.'s y_warm = y_hot - alpha (y_hot - 1/C) as Summers & Dinneen's s.

    The true class gets 1 - alpha + alpha/C = 1 - s, so s = alpha (C - 1) / C, and every
    other class gets alpha / C = s / (C - 1): the same family, one parameter.
    """
    return alpha * (num_classes - 1) / num_classes


def gaussian_noise(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """x + N(0, sigma^2) in [0, 1] pixel units. Not clipped: Shafahi et al. add raw noise."""
    if sigma == 0:
        return x
    return x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def logit_norm_per_example(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's logit L2 norm (Kannan et al.'s squeezing)."""
    return logits.norm(dim=1).mean()


def logit_norm_per_batch(logits: torch.Tensor, gamma: float = 0.0) -> torch.Tensor:
    """||Z - gamma||_F / b: the poster's batch-wise squeezing (gamma = 0) and similarity."""
    return (logits - gamma).norm() / logits.shape[0]


def pgd_adversary(model, x, y, *, eps: float, steps: int, step_size: float, generator: torch.Generator) -> torch.Tensor:
    """Madry et al.'s training adversary: L-inf PGD-k on cross-entropy from a random start.

    Unlike the evaluation attack this runs every step on every sample and returns the
    last iterate, as adversarial training prescribes. The model is put in eval mode while
    crafting so batch-norm statistics are not updated by adversarial batches, then
    restored; gradients are taken with respect to the input only. `y` is class indices
    or, for mixed examples, a target distribution per row (F.cross_entropy takes both).
    The steps are attacks/pgd.py's `plain_pgd`, on the model's exact rewrite: the same
    gradients, bit for bit, in less time.
    """
    was_training = model.training
    model.eval()
    cfg = PGD(eps=eps, steps=steps, step_size=step_size, loss="xent", norm="linf")
    # The mean over the batch, as the textbook loop differentiates: its sign steps are
    # those of the sum, and the checkpoints trained with it stay bit for bit.
    x_adv = plain_pgd(exact_view(model), x, y, cfg, generator, loss=F.cross_entropy)
    model.train(was_training)
    return x_adv


def training_adversary(model, x, y, cfg, ctx) -> torch.Tensor:
    """`pgd_adversary` with a defense config's `attack_steps`, `attack_eps` and
    `attack_step_size`; an unset budget is the dataset's threat model (ctx.threat)."""
    eps = ctx.threat.eps if cfg.attack_eps is None else cfg.attack_eps
    step = ctx.threat.step_size if cfg.attack_step_size is None else cfg.attack_step_size
    return pgd_adversary(model, x, y, eps=eps, steps=cfg.attack_steps, step_size=step, generator=ctx.generator)


def logit_sq_norm(logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each example's squared logit L2 norm, ||f(x)||^2.

    The regularizer of Summers & Dinneen's Eq. 11 (beta (||f(x)||^2 + ||f(x_adv)||^2))
    and the "L2 regularization on the logits" of their Fig. 1.
    """
    return logits.pow(2).sum(1).mean()


def logit_pairing(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kannan et al.'s L2 logit-pairing loss: the mean squared difference of two logit
    batches, averaged over examples and classes.

    This is Summers & Dinneen's Eq. 9, ||f(x) - f(x')||^2, divided by the number of
    classes: the mean-squared-error form of the L2 loss that ALP implementations (and
    CleverHans, which Summers & Dinneen used) compute, so the papers' pairing weights
    (0.5 on CIFAR-10, 5.0 on CIFAR-100) keep the scale they were tuned at.
    """
    return (a - b).pow(2).mean()


def prediction_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(softmax(target_logits), softmax(logits)).

    The cross entropy between the distributions two logit batches induce (Summers &
    Dinneen's pairing term h). Gradients flow into both arguments.
    """
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


def beta_sample(alpha: float, n: int, generator: torch.Generator) -> torch.Tensor:
    """n draws of Beta(alpha, alpha) on the generator's device, from the generator.

    torch's Beta sampler takes no generator, so a seed is drawn from the generator and
    handed to numpy's: the draws stay a function of the run's seed.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    draws = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    return torch.as_tensor(draws, dtype=torch.float32, device=generator.device)


def _partners(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation: example i is mixed with example partner[i] of the batch."""
    return torch.randperm(n, generator=generator, device=generator.device)


def mixup(
    x: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """mixup (Zhang et al., ICLR 2018): lam x_i + (1 - lam) x_j with targets mixed alike.

    Each example gets its own lam ~ Beta(alpha, alpha) and a partner j drawn by a random
    permutation of the batch. `targets` are distributions (one-hot or smoothed).
    """
    n = len(x)
    partner = _partners(n, generator)
    lam = beta_sample(alpha, n, generator).to(x.dtype)
    lx = lam.view(-1, *([1] * (x.dim() - 1)))
    lt = lam[:, None].to(targets.dtype)
    return lx * x + (1 - lx) * x[partner], lt * targets + (1 - lt) * targets[partner]


def vh_mixup(
    x: torch.Tensor, targets: torch.Tensor, alpha: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """VH-mixup (Summers & Dinneen, "Improved mixed-example data augmentation", WACV 2019).

    For a pair (x1, x2) three coefficients are drawn, lam1, lam2, lam3 ~ Beta(alpha,
    alpha) (alpha = 1, uniform, as in the authors' release):
      - vertical concatenation: the top r = floor(lam1 H) rows of x1 over the remaining
        rows of x2, with label weight r / H on x1;
      - horizontal concatenation: the left c = floor(lam2 W) columns of x1 beside the
        remaining columns of x2, with label weight c / W on x1;
      - mixup of those two images: lam3 * vertical + (1 - lam3) * horizontal, so x1's
        label weight is lam3 r / H + (1 - lam3) c / W and x2 takes the rest.
    Label weights are the exact share of x1's pixels in each concatenation. Pairs are
    formed as in `mixup`: each example with a random partner of the batch.
    """
    n, _, h, w = x.shape
    partner = _partners(n, generator)
    lam = beta_sample(alpha, 3 * n, generator).view(3, n)
    rows = (lam[0] * h).floor().clamp(max=h - 1)
    cols = (lam[1] * w).floor().clamp(max=w - 1)
    top = torch.arange(h, device=x.device)[None, :] < rows[:, None]  # (n, h): row from x1
    left = torch.arange(w, device=x.device)[None, :] < cols[:, None]  # (n, w): column from x1
    x2 = x[partner]
    vertical = torch.where(top[:, None, :, None], x, x2)
    horizontal = torch.where(left[:, None, None, :], x, x2)
    mix = lam[2].to(x.dtype).view(-1, 1, 1, 1)
    share = (lam[2] * rows / h + (1 - lam[2]) * cols / w)[:, None].to(targets.dtype)
    return (mix * vertical + (1 - mix) * horizontal, share * targets + (1 - share) * targets[partner])


@dataclass(frozen=True)
class TrainingAdversary:
    """The training adversary's fields, shared by every defense that trains on PGD
    examples (pgd_at, alp, lrm); a subclass's __post_init__ calls this one's."""

    attack_steps: int = 10
    """k: PGD steps of the training adversary."""
    attack_eps: float | None = None
    """L-inf radius of the training adversary; unset is the dataset's threat model eps."""
    attack_step_size: float | None = None
    """PGD step of the training adversary; unset is the dataset's threat model step."""

    def __post_init__(self):
        if self.attack_steps < 1:
            raise ValueError(f"attack_steps must be at least 1, got {self.attack_steps}")
        for name in ("attack_eps", "attack_step_size"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise ValueError(
                    f"{name} must be in (0, 1] pixel units or unset (the dataset's threat model), got {value}"
                )
