"""Small pieces the defenses compose. Each is a plain function of tensors."""
from __future__ import annotations

import torch
import torch.nn.functional as F


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


def pgd_adversary(model, x, y, *, eps: float, steps: int, step_size: float,
                  generator: torch.Generator) -> torch.Tensor:
    """Madry et al.'s training adversary: L-inf PGD-k on cross-entropy from a random start.

    Unlike the evaluation attack this runs every step on every sample and returns the
    last iterate, as adversarial training prescribes. The model is put in eval mode while
    crafting so batch-norm statistics are not updated by adversarial batches, then
    restored; gradients are taken with respect to the input only.
    """
    was_training = model.training
    model.eval()
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_adv = (x + (2 * u - 1) * eps).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)
    model.train(was_training)
    return x_adv.detach()
