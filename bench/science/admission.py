"""Admission checks: what a model does before it is attacked, measured once, kept in its meta.

The checks AutoAttack runs on a model (pyautoattack's checks.py) and two of Pintor et
al.'s indicators of attack failure (NeurIPS 2022), measured on the test set with numbers
rather than warnings. None refuses a model; each becomes a flag (bench.science.flags) with the
numbers that raised it, and two choose adaptive attacks (bench.science.adaptive): a forward
pass that varies gets EOT cells judged by a majority of passes.

- `probabilities`: every output row lies in [0, 1] and sums to 1, i.e. softmax outputs,
  on which cross-entropy attacks see flattened gradients.
- `randomized`: repeated forward passes on the same inputs differ.
- `autograd_calls`: torch.autograd.grad or backward called inside one forward pass (a
  defense that optimizes its input at inference time).
- `zero_gradient`: samples whose input gradient of the cross-entropy is exactly zero
  (saturated softmax, a step function, a detached input).
- `noise_flips`: correctly classified samples whose prediction changes under uniform
  noise of a twentieth of the threat budget, on a model whose passes do not vary: a
  loss surface too rugged for a gradient to describe.
- `loss_rising`: a PGD run on cross-entropy, traced step by step; the mean loss still
  climbing over its last tenth of steps means the attack stopped before converging.
- `gradient_check`: autograd's input gradient against finite differences of the forward
  pass along random directions (cosine, sign agreement): a custom backward that says
  something other than the function does (BPDA written by hand, a misleading gradient).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from attacks.pgd import PGD, plain_pgd
from bench.core.data import get_spec, load_dataset
from bench.engine.device import frozen

SCHEMA = 3
"""Bumped when a check changes, so stored checks are measured again."""


@dataclass(frozen=True)
class AdmissionConfig:
    n: int = 500
    """Test samples the checks use (the first n)."""
    passes: int = 5
    """Forward passes compared for randomness (AutoAttack's check uses 5)."""
    noise_fraction: float = 0.05
    """Noise amplitude for `noise_flips`, as a fraction of the L-inf budget."""
    trace_steps: int = 100
    """PGD steps of the traced run behind `loss_rising`."""
    seed: int = 0
    """Seed of the noise and of the traced run's random start."""
    fd_images: int = 16
    """Test samples whose input gradient is checked against finite differences."""
    fd_directions: int = 16
    """Random unit directions per sample: the check costs 2 forward passes per direction,
    whatever the input dimension."""
    fd_step: float = 1e-3
    """Central-difference step along each unit direction (pixel units): small enough that
    few ReLUs change state, large enough for fp32 differences of the loss."""


def _autograd_codes() -> set:
    fns = [torch.autograd.grad, torch.autograd.backward, torch.Tensor.backward]
    return {getattr(f, "__code__", None) for f in fns} - {None}


def count_autograd_calls(model, x) -> int:
    """Calls of torch.autograd.grad/backward made by one forward pass of model on x.

    Traced by code object (sys.setprofile), so an alias (`from torch.autograd import grad`)
    counts too; any profiler already installed is put back.
    """
    codes = _autograd_codes()
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code in codes:
            calls += 1

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        with torch.enable_grad():
            model(x.clone().requires_grad_(True))
    finally:
        sys.setprofile(previous)
    return calls


def _zero_grad_share(model, x, y) -> tuple[int, int]:
    """(samples whose cross-entropy input gradient is exactly zero, samples)."""
    xg = x.clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(xg).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, xg)
    zero = grad.flatten(1).abs().sum(1) == 0
    return int(zero.sum()), len(x)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine; two vanishing rows agree (both say flat), one alone does not."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    tiny = 1e-12
    cos = (a * b).sum(1) / (na * nb).clamp_min(tiny)
    return torch.where((na < tiny) & (nb < tiny), torch.ones_like(cos), cos)


def _gradient_check(model, x, y, cfg: AdmissionConfig, generator) -> dict:
    """autograd's input gradient of the cross-entropy against central finite differences
    of the same loss along random unit directions: the directional derivatives g.v from
    autograd and (L(x + hv) - L(x - hv)) / 2h from the forward pass alone. A custom
    backward that lies (a straight-through estimator, a negated or rescaled gradient)
    disagrees; an honest network agrees to a cosine near 1 (kinks aside)."""
    xs, ys = x[:cfg.fd_images], y[:cfg.fd_images]
    k = cfg.fd_directions
    xg = xs.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg).float(), ys, reduction="sum"), xg)
    v = torch.randn((len(xs), k, *xs.shape[1:]), generator=generator).to(xs.device)
    v = v / v.flatten(2).norm(dim=2).view(len(xs), k, *([1] * (xs.dim() - 1)))
    analytic = (grad[:, None] * v).flatten(2).sum(2)
    yy = ys.repeat_interleave(k)
    with torch.no_grad():
        up = F.cross_entropy(model((xs[:, None] + cfg.fd_step * v).flatten(0, 1)).float(), yy, reduction="none")
        down = F.cross_entropy(model((xs[:, None] - cfg.fd_step * v).flatten(0, 1)).float(), yy, reduction="none")
    numeric = ((up - down) / (2 * cfg.fd_step)).view(len(xs), k)
    cos = _cosine(analytic, numeric)
    signs = (torch.sign(analytic) == torch.sign(numeric)).float().mean(1)
    return {"images": len(xs), "directions": k, "step": cfg.fd_step,
            "median_cosine": float(cos.median()), "min_cosine": float(cos.min()),
            "sign_agreement": float(signs.mean()),
            "median_autograd_norm": float(grad.flatten(1).norm(dim=1).median())}


def _traced_pgd(model, x, y, eps: float, steps: int, generator) -> list[float]:
    """Mean cross-entropy per step of a plain L-inf PGD (step 2.5 eps / steps), no early stop."""
    cfg = PGD(eps=eps, steps=steps, step_size=2.5 * eps / steps, loss="xent", norm="linf")
    trace: list[float] = []
    plain_pgd(model, x, y, cfg, generator, loss=lambda z, t: F.cross_entropy(z.float(), t, reduction="none"),
              on_step=lambda losses: trace.append(float(losses.mean())))
    return trace


def admit(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
          cfg: AdmissionConfig = AdmissionConfig()) -> dict:
    """Every admission check on the first cfg.n samples; numbers only, judged in bench.science.flags."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x[:cfg.n].to(device), y[:cfg.n].to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    with frozen(model):
        with torch.no_grad():
            outs = [model(x).float() for _ in range(cfg.passes)]
        z = outs[0]
        preds = torch.stack([o.argmax(1) for o in outs])
        norm = z.norm(dim=1).clamp_min(1e-10)
        randomized = {
            "passes": cfg.passes,
            "max_output_diff": max(float((o - z).abs().max()) for o in outs),
            # Per sample, relative to its output's norm (AutoAttack's check): a GPU kernel
            # choice moves outputs by ~1e-7 of that, which is not randomness.
            "max_relative_diff": max(float(((o - z).norm(dim=1) / norm).max()) for o in outs),
            "share_prediction_changed": float((preds != preds[0]).any(0).float().mean()),
        }
        probabilities = {"min": float(z.min()), "max": float(z.max()),
                         "max_row_sum_error": float((z.sum(1) - 1).abs().max())}
        zero, n = _zero_grad_share(model, x, y)
        calls = count_autograd_calls(model, x[:8])
        noise = None
        if not _varies(randomized):
            amp = cfg.noise_fraction * eps
            noisy = (x + (2 * torch.rand(x.shape, generator=gen).to(device) - 1) * amp).clamp(0, 1)
            with torch.no_grad():
                flipped = model(noisy).float().argmax(1) != z.argmax(1)
            correct = z.argmax(1) == y
            noise = {"amplitude": amp, "flipped": int((flipped & correct).sum()), "correct": int(correct.sum())}
        sub = slice(0, min(100, len(x)))
        trace = _traced_pgd(model, x[sub], y[sub], eps, cfg.trace_steps, gen)
        # Finite differences of a randomized forward are its noise: not measured there.
        gradient = None if _varies(randomized) else _gradient_check(model, x, y, cfg, gen)
    tail = max(2, cfg.trace_steps // 10)
    return {
        "schema": SCHEMA, "config": asdict(cfg), "n": n,
        "probabilities": probabilities,
        "randomized": randomized,
        "autograd_calls": calls,
        "zero_gradient": {"count": zero, "n": n, "share": zero / n},
        "noise_flips": noise,
        "gradient_check": gradient,
        "loss_rising": {"steps": cfg.trace_steps, "n": len(x[sub]), "tail": tail,
                        "loss_before_tail": trace[-tail - 1], "loss_last": trace[-1],
                        "trace": [round(v, 5) for v in trace[:: max(1, cfg.trace_steps // 20)]]},
    }


RELATIVE_TOLERANCE = 1e-4
"""Outputs that move by more than this fraction of their norm between passes, or any
prediction that changes, make a model randomized (AutoAttack's check uses 1e-4)."""


def _varies(r: dict) -> bool:
    relative = r.get("max_relative_diff", r["max_output_diff"])
    return r["share_prediction_changed"] > 0 or relative > RELATIVE_TOLERANCE


def is_randomized(admission: dict | None) -> bool:
    return bool(admission) and _varies(admission["randomized"])


GRADIENT_COSINE = 0.8
"""A median cosine between autograd's and the finite-difference directional derivatives
under this means the gradient disagrees with the function (honest ReLU networks give
about 0.99); it raises gradient_disagrees."""


def zero_gradients(admission: dict | None) -> dict | None:
    """The zero-gradient check's numbers when some sample's input gradient is exactly zero."""
    z = (admission or {}).get("zero_gradient")
    return dict(z) if z and z["count"] > 0 else None


def gradient_disagrees(admission: dict | None) -> dict | None:
    """The gradient check's numbers when autograd's gradient disagrees with finite
    differences of the forward pass."""
    g = (admission or {}).get("gradient_check")
    return dict(g) if g and g["median_cosine"] < GRADIENT_COSINE else None


def gradients_say_nothing(admission: dict | None) -> bool:
    """Some sample's input gradient is exactly zero, or autograd's gradient disagrees with
    the model's own forward pass: gradient attacks have nothing true to follow."""
    return bool(zero_gradients(admission) or gradient_disagrees(admission))


def ensure_admission(bench, row, model) -> dict:
    """The checkpoint's admission checks: from its meta, or measured now and stored there.

    `model` builds the model; it is called only when the checks are missing or stale.
    """
    stored = row.admission
    if stored and stored.get("schema") == SCHEMA:
        return stored
    x, y = load_dataset(row.dataset, "test", bench.data_root)
    result = admit(model(), x, y, get_spec(row.dataset).threat.eps)
    bench.store.update_meta(row, admission=result)
    return result
