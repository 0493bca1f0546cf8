"""Why a defense works: the linearized robustness of Shafahi et al. (Sec. 2.1), measured.

For a test image x of class y, with logits z and ȳ the strongest other class at x:

- logit gap       z_y − z_ȳ                                  (negative when misclassified)
- gradient gap    ‖∇x z_y − ∇x z_ȳ‖₁
- εL              logit gap / gradient gap                   (their Eq. 4)

Under a linear model, the FGSM-form step δ = −ε·sign(∇x z_y − ∇x z_ȳ) lowers the
margin z_y − z_ȳ by exactly ε·‖∇x z_y − ∇x z_ȳ‖₁, so εL is the L-inf size of the
smallest such step that makes ȳ overtake y. The predicted accuracy at a budget ε is
the share of test images classified correctly with εL > ε (their Table 1). Beside
these: gradient coherence, the cosine of ∇x z_y and ∇x z_ȳ (their Fig. 1, right), the
L1 norms of both gradients (their Fig. 7), the clean logits (their Fig. 2; Summers &
Dinneen Sec. 3 read ALP by the logits' variance), and the cross-entropy landscape
around the first eight test images along the adversarial direction sign(∇x xent) and
a Rademacher direction (their Fig. 9).

Everything here is pure computation on a model and a test set; the driver stores it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bench.engine.device import frozen

LANDSCAPE_IMAGES = 8
"""The first eight test images, as in Shafahi et al. Figs. 5 and 9."""
LANDSCAPE_POINTS = 21
"""Grid points per direction (odd, so the clean image is the centre)."""
LANDSCAPE_SPAN = 1.25
"""Half-width of the landscape grid in units of the threat eps: Shafahi et al. walk
−10..10 (of 255) around CIFAR images attacked at eps 8, i.e. 1.25 eps."""
LANDSCAPE_SEED = 0
"""Seed of the Rademacher direction: the same direction for every checkpoint."""

SAMPLE_FIELDS = ("logit_gap", "grad_gap", "eps_l", "coherence", "grad_norm_true", "grad_norm_adv")
"""Per-sample quantities kept in the store (besides `correct` and the clean logits)."""


@dataclass(frozen=True)
class Gradients:
    """Per-sample logit gradients and the quantities built from them (CPU tensors)."""

    logits: torch.Tensor
    """Clean logits, (N, classes)."""
    other: torch.Tensor
    """ȳ: the strongest class other than the label, (N,)."""
    grad_true: torch.Tensor
    """∇x z_y, flattened to (N, D)."""
    grad_other: torch.Tensor
    """∇x z_ȳ, flattened to (N, D)."""


def logit_gradients(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: str = "cpu", batch_size: int = 1024
) -> Gradients:
    """∇x z_y and ∇x z_ȳ for every sample in one forward and one backward per batch.

    The batch is stacked twice: the first copy's summed true logits and the second
    copy's summed strongest-other logits are one scalar whose input gradient holds both
    per-sample gradients (in eval mode samples do not interact, so the sum separates).
    ȳ is read off the first copy's logits, which are the clean logits themselves.
    """
    logits, others, gts, gos = [], [], [], []
    with frozen(model):
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device)
            yb = y[i : i + batch_size].to(device)
            n = len(xb)
            x2 = torch.cat([xb, xb]).requires_grad_(True)
            z2 = model(x2)
            z2 = z2.to(torch.promote_types(z2.dtype, torch.float32))  # fp32 at least, fp64 kept
            z = z2[:n].detach()
            masked = z.clone()
            masked.scatter_(1, yb[:, None], float("-inf"))
            other = masked.argmax(1)
            picked = z2.gather(1, torch.cat([yb, other])[:, None])
            (grad,) = torch.autograd.grad(picked.sum(), x2)
            grad = grad.flatten(1)
            logits.append(z.cpu())
            others.append(other.cpu())
            gts.append(grad[:n].cpu())
            gos.append(grad[n:].cpu())
    return Gradients(torch.cat(logits), torch.cat(others), torch.cat(gts), torch.cat(gos))


def per_sample(grads: Gradients, y: torch.Tensor) -> dict[str, np.ndarray]:
    """The per-sample quantities of Eq. 4 and Fig. 1, as float64 numpy arrays.

    εL is +inf where the gradient gap is exactly zero and the image is classified
    correctly (no linear step flips it), and −inf where it is zero and misclassified.
    """
    y = y.cpu()
    z = grads.logits.double()
    gt, go = grads.grad_true.double(), grads.grad_other.double()
    gap = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, grads.other[:, None]).squeeze(1)
    diff = gt - go
    grad_gap = diff.abs().sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps_l = np.where(grad_gap.numpy() > 0, (gap / grad_gap).numpy(), np.where(gap.numpy() > 0, np.inf, -np.inf))
    norm_t, norm_o = gt.norm(dim=1), go.norm(dim=1)
    denom = norm_t * norm_o
    coherence = torch.where(denom > 0, (gt * go).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return {
        "logit_gap": gap.numpy(),
        "grad_gap": grad_gap.numpy(),
        "eps_l": eps_l,
        "coherence": coherence.numpy(),
        "grad_norm_true": gt.abs().sum(1).numpy(),
        "grad_norm_adv": go.abs().sum(1).numpy(),
        "correct": (z.argmax(1) == y).numpy(),
    }


def predicted_accuracy(eps_l: np.ndarray, correct: np.ndarray, eps: float) -> float:
    """Shafahi et al. Table 1: the share of images classified correctly with εL > eps."""
    return float(np.mean(np.asarray(correct, dtype=bool) & (np.asarray(eps_l) > eps)))


def _quantiles(values: np.ndarray) -> dict[str, float | None]:
    finite = values[np.isfinite(values)]
    if not len(finite):
        return {"median": None, "mean": None, "q25": None, "q75": None}
    q25, med, q75 = np.quantile(finite, [0.25, 0.5, 0.75])
    return {"median": float(med), "mean": float(finite.mean()), "q25": float(q25), "q75": float(q75)}


def summarize(samples: dict[str, np.ndarray], logits: torch.Tensor, eps: float) -> dict:
    """Medians, means and quartiles over the whole test set (misclassified images
    included, with their negative gaps, as in Shafahi et al.'s histograms; an infinite
    εL, from a zero gradient gap, is left out of its statistics) and the predicted
    accuracy (which counts it)."""
    out: dict = {name: _quantiles(samples[name]) for name in SAMPLE_FIELDS}
    out["eps"] = eps
    out["n"] = len(samples["correct"])
    out["clean_acc"] = float(np.mean(samples["correct"]))
    out["predicted_acc"] = predicted_accuracy(samples["eps_l"], samples["correct"], eps)
    out["logit_variance"] = float(logits.double().var())
    out["logit_mean_abs"] = float(logits.double().abs().mean())
    return out


def landscape(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    *,
    device: str = "cpu",
    images: int = LANDSCAPE_IMAGES,
    points: int = LANDSCAPE_POINTS,
    span: float = LANDSCAPE_SPAN,
    seed: int = LANDSCAPE_SEED,
) -> dict:
    """Cross-entropy at clip(x_i + e1·a + e2·r, 0, 1) on a grid (Shafahi et al. Fig. 9).

    a = sign(∇x xent) at the clean image, r ~ Rademacher(0.5) drawn once from `seed`
    (one direction shared by the images, as the figure's caption reads), and e1, e2 run
    over `points` values in [−span·eps, span·eps]. Inputs are clipped to the image
    range, as every attack's are. Returns the grid values and `loss[i][row][col]` with
    rows along a and columns along r.
    """
    xs, ys = x[:images].to(device), y[:images].to(device)
    gen = torch.Generator().manual_seed(seed)
    r = (torch.randint(0, 2, xs.shape[1:], generator=gen) * 2 - 1).to(device, xs.dtype)
    values = torch.linspace(-span * eps, span * eps, points, dtype=torch.float64)
    losses = []
    with frozen(model):
        xg = xs.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(xg).float(), ys, reduction="sum"), xg)
        a = g.sign()
        e1, e2 = torch.meshgrid(values, values, indexing="ij")
        e1 = e1.reshape(-1, 1, 1, 1).to(device, xs.dtype)
        e2 = e2.reshape(-1, 1, 1, 1).to(device, xs.dtype)
        with torch.no_grad():
            for i in range(len(xs)):
                grid = (xs[i] + e1 * a[i] + e2 * r).clamp(0.0, 1.0)
                loss = F.cross_entropy(model(grid).float(), ys[i].expand(len(grid)), reduction="none")
                losses.append(loss.reshape(points, points).cpu().double().numpy())
    return {
        "values": [round(float(v), 6) for v in values],
        "span": span,
        "eps": eps,
        "seed": seed,
        "loss": [_rounded(m) for m in losses],
    }


def _rounded(arr: np.ndarray, digits: int = 6) -> list:
    """JSON-ready nested lists: finite floats to `digits` significant figures, ±inf as
    None (JSON has no infinity; readers map None back by the sign of the logit gap)."""

    def one(v: float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}")

    if arr.ndim == 1:
        return [one(float(v)) for v in arr]
    return [_rounded(row, digits) for row in arr]


def diagnose(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, device: str = "cpu", batch_size: int = 1024
) -> dict:
    """Everything stored for one checkpoint: summary, per-sample values and landscape."""
    grads = logit_gradients(model, x, y, device=device, batch_size=batch_size)
    samples = per_sample(grads, y)
    summary = summarize(samples, grads.logits, eps)
    stored = {name: _rounded(samples[name]) for name in SAMPLE_FIELDS}
    stored["correct"] = [bool(c) for c in samples["correct"]]
    stored["logits"] = _rounded(grads.logits.double().numpy(), 4)
    return {"summary": summary, "samples": stored, "landscape": landscape(model, x, y, eps, device=device)}


def stored_eps_l(samples: dict) -> np.ndarray:
    """εL from the stored per-sample lists, ±inf restored from the logit gap's sign."""
    gap = np.array([0.0 if v is None else v for v in samples["logit_gap"]])
    return np.array(
        [(np.inf if g > 0 else -np.inf) if v is None else v for v, g in zip(samples["eps_l"], gap, strict=True)],
        dtype=np.float64,
    )
