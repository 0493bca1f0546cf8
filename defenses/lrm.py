"""LRM, logit regularization methods (Summers & Dinneen, Sec. 4.1 and 5.2).

Adversarial-only PGD training (a = 0 in their Eq. 1) on mixed examples with smoothed
labels, plus ALP's pairing decoupled into a pairing term h and a squeezing term
(their Eq. 11):

    x_m, t      = mix(x, smoothed labels)                 VH-mixup (mixup on SVHN)
    x_adv       = PGD-k on H(t, softmax(f(.))) from x_m   the training adversary
    L_adv       = H(t, softmax(f(x_adv)))
    h           = H(softmax(f(x_m)), softmax(f(x_adv)))
    loss        = L_adv + c h + beta (||f(x_m)||^2 + ||f(x_adv)||^2)
    c           = (L_adv / h) / ratio, held constant (no gradient flows through c)

Choices the paper leaves open, and what is done here:
- Direction of h. The clean prediction is the target distribution and the adversarial
  one is fitted to it, H(p_clean, p_adv) = H(p_clean) + KL(p_clean || p_adv). Gradients
  flow into both sides, as ALP's L2 pairing pulls both; the H(p_clean) part is what
  makes h mildly squeeze or expand the logits depending on how alike they already are,
  the behaviour the paper describes.
- Mixing and the adversary. Examples are mixed first (targets smoothed, then mixed like
  the inputs) and the adversary attacks the mixed example against its mixed target, so
  every input the model trains on is a mixed one and h pairs a mixed example with its
  own adversarial version. Mixing adversarial examples of unmixed inputs is the
  alternative; the paper does not say which it did.
- The ratio. The paper sets "the ratio between the adversarial training loss and the
  pairing loss" to 0.125 on CIFAR-10, saying this focuses the loss on pairing, and to
  0.95 on CIFAR-100, saying this lets it focus more on fitting the data. Both remarks
  hold only if ratio = L_adv / (c h), so c = (L_adv / h) / ratio: at 0.125 the pairing
  term is 8 times the adversarial loss, at 0.95 about equal to it.
- ||.||^2 is each example's squared logit norm, averaged over the batch; L_adv and h
  are batch means.

A failure mode to know: the pairing term's gradient is (L_adv / ratio) * grad(log h),
which grows as the clean and adversarial predictions become identical and confident
(h -> 0). When the pairing term outweighs the adversarial loss early in training, a
model can fall into that state, every prediction one confident class; a small digits
CNN trained from scratch does so at ratio 0.125 and 0.95 (lrm_digits uses 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.plugin import register_defense
from defenses._parts import (
    TrainingAdversary,
    logit_sq_norm,
    mixup,
    prediction_cross_entropy,
    smoothed_targets,
    soft_cross_entropy,
    training_adversary,
    vh_mixup,
)

MIXINGS = {"vh_mixup": vh_mixup, "mixup": mixup}


@dataclass(frozen=True)
class LRM(TrainingAdversary):
    smoothing: float = 0.1
    """s: label smoothing of the targets (Summers & Dinneen Eq. 8)."""
    mixing: str = "vh_mixup"
    """Mixed-example augmentation: `vh_mixup` (CIFAR), `mixup` (SVHN) or `none`."""
    mix_alpha: float = 1.0
    """alpha of Beta(alpha, alpha), the law of the mixing coefficients; 1 is uniform."""
    beta: float = 1e-3
    """Weight of the squeezing term ||f(x)||^2 + ||f(x_adv)||^2."""
    ratio: float = 0.125
    """Adversarial loss / pairing term: h's coefficient is (L_adv / h) / ratio, held constant."""

    def __post_init__(self):
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.mixing not in (*MIXINGS, "none"):
            raise ValueError(f"mixing must be vh_mixup, mixup or none, got {self.mixing!r}")
        if not self.mix_alpha > 0:
            raise ValueError(f"mix_alpha must be positive, got {self.mix_alpha}")
        if self.beta < 0:
            raise ValueError(f"beta must be non-negative, got {self.beta}")
        if not self.ratio > 0:
            raise ValueError(f"ratio must be positive, got {self.ratio}")
        super().__post_init__()


def pairing_coefficient(adv_loss: torch.Tensor, h: torch.Tensor, ratio: float) -> torch.Tensor:
    """c with c h = adv_loss / ratio in value, as a constant: no gradient flows through it."""
    return (adv_loss / h.clamp_min(1e-12)).detach() / ratio


@register_defense("lrm", config=LRM)
def loss(model, x, y, cfg: LRM, ctx):
    """Adversarial-only PGD on mixed, smoothed examples + decoupled pairing and squeezing."""
    targets = smoothed_targets(y, ctx.num_classes, cfg.smoothing)
    if cfg.mixing != "none":
        x, targets = MIXINGS[cfg.mixing](x, targets, cfg.mix_alpha, ctx.generator)
    x_adv = training_adversary(model, x, targets, cfg, ctx)
    clean, adv = model(torch.cat([x, x_adv])).split(len(x))
    adv_loss = soft_cross_entropy(adv, targets)
    h = prediction_cross_entropy(clean, adv)
    squeeze = logit_sq_norm(clean) + logit_sq_norm(adv)
    return adv_loss + pairing_coefficient(adv_loss, h, cfg.ratio) * h + cfg.beta * squeeze
