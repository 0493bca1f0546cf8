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
  Checked at every batch size the attacks run at (a backward can look at its batch) and
  at random points of the threat balls as well as the clean images (a backward can look
  at its input), so a cheat honest only where the check looks is still caught; it also
  names the custom autograd.Functions the forward applies.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from attacks.pgd import PGD, plain_pgd
from bench.core.data import get_spec, load_dataset, test_size
from bench.engine.device import frozen
from bench.engine.mirror import custom_functions
from bench.science.admitted import GRADIENT_COSINE, varies
from bench.store.db import Checkpoint, Store

SCHEMA = 5
"""Bumped when a check changes, so stored checks are measured again (4: the gradient check
at the attacks' batch sizes and inside the threat balls, and the custom Functions; 5: its
finite differences in float64)."""


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
    """Inputs per probe whose input gradient is checked against finite differences, and the
    batch size of the smallest probe (`_gradient_check`)."""
    fd_directions: int = 16
    """Random unit directions per sample: the check costs 2 forward passes per direction,
    whatever the input dimension."""
    fd_step: float = 1e-3
    """Central-difference step along each unit direction (pixel units): small enough that
    few ReLUs change state, large enough for fp32 differences of the loss."""
    batch_sizes: tuple[int, ...] = ()
    """Batch sizes autograd's gradient is also checked at: those the attacks run at
    (`attack_batches`; ensure_admission passes the workspace's)."""


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


def _zero_grad_share(model, x, y, parts: list[slice]) -> tuple[int, int]:
    """(samples whose cross-entropy input gradient is exactly zero, samples), a part at a time."""
    zero = 0
    for p in parts:
        xg = x[p].clone().requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(xg).float(), y[p], reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
        zero += int((grad.flatten(1).abs().sum(1) == 0).sum())
    return zero, len(x)


def _parts(n: int, batch_sizes: tuple[int, ...]) -> list[slice]:
    """The admission's n images in parts no larger than the attack's batch: one part on
    every dataset whose batch holds them all (the checks' numbers as they always were),
    parts of 20 on ImageNet on the CPU, where 500 images at once held 0.3 GB a tensor."""
    size = max(batch_sizes) if batch_sizes else n
    return [slice(i, i + size) for i in range(0, n, max(1, size))]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine; two vanishing rows agree (both say flat), one alone does not."""
    na, nb = a.norm(dim=1), b.norm(dim=1)
    tiny = 1e-12
    cos = (a * b).sum(1) / (na * nb).clamp_min(tiny)
    return torch.where((na < tiny) & (nb < tiny), torch.ones_like(cos), cos)


POINTS = ("clean", "ball")
"""Where autograd's gradient is checked: the test images themselves, and a uniform random
point of each one's L-inf threat ball (where every attack after its first step, and PGD
from its random start, asks for gradients)."""


def attack_batches(test_size: int, batch_size: int) -> tuple[int, ...]:
    """The batch sizes a cell's attack runs at on a test set of `test_size` images in
    batches of `batch_size` (bench.engine.cell.craft): full batches and the remainder."""
    full = min(batch_size, test_size)
    rest = test_size % batch_size if test_size > batch_size else 0
    return tuple(sorted({full, rest} - {0}))


def float64_copy(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module | None:
    """A float64 copy of the model, for the finite differences of the gradient check: in
    fp32 a directional derivative of a confident model on a large input (ImageNet's
    150,528 pixels, where |g . v| is near 1e-5 for a unit direction) sinks below the
    rounding of the loss, and an honest network's gradient would read as wrong. None where
    the model will not run in float64 (its differences are then taken in fp32)."""
    try:
        double = copy.deepcopy(model).double()
        with torch.no_grad():
            double(x[:1].double())
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return None
    return double


def _probe(model, x, y, batch: int, points: str, eps: float, cfg: AdmissionConfig, generator, double=None) -> dict:
    """One gradient check: autograd's input gradient of the cross-entropy on a batch of
    `batch` inputs (the test images in turn, tiled past their number), against central
    finite differences of the same loss along random unit directions, on `fd_images` rows
    spread over the batch: the directional derivatives g.v from autograd and
    (L(x + hv) - L(x - hv)) / 2h from the forward pass alone. The batch is the size under
    test, since a backward may answer differently at the attack's batch size than at
    the check's; the finite differences need no particular batch."""
    idx = torch.arange(batch, device=x.device) % len(x)
    xs, ys = x[idx], y[idx]
    if points == "ball":
        xs = (xs + (2 * torch.rand(xs.shape, generator=generator).to(xs.device) - 1) * eps).clamp(0, 1)
    xg = xs.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(xg).float(), ys, reduction="sum"), xg)
    rows = torch.linspace(0, batch - 1, min(cfg.fd_images, batch)).round().long().unique().to(x.device)
    xs, ys, grad = xs[rows], ys[rows], grad[rows]
    k = cfg.fd_directions
    v = torch.randn((len(xs), k, *xs.shape[1:]), generator=generator).to(xs.device)
    v = v / v.flatten(2).norm(dim=2).view(len(xs), k, *([1] * (xs.dim() - 1)))
    analytic = (grad[:, None] * v).flatten(2).sum(2)
    yy = ys.repeat_interleave(k)
    forward, dtype = (model, torch.float32) if double is None else (double, torch.float64)
    xd, vd = xs.to(dtype), v.to(dtype)
    with torch.no_grad():
        up = F.cross_entropy(forward((xd[:, None] + cfg.fd_step * vd).flatten(0, 1)).to(dtype), yy, reduction="none")
        down = F.cross_entropy(forward((xd[:, None] - cfg.fd_step * vd).flatten(0, 1)).to(dtype), yy, reduction="none")
    numeric = ((up - down) / (2 * cfg.fd_step)).view(len(xs), k).float()
    cos = _cosine(analytic, numeric)
    signs = (torch.sign(analytic) == torch.sign(numeric)).float().mean(1)
    return {
        "batch": batch,
        "points": points,
        "images": len(xs),
        "median_cosine": float(cos.median()),
        "min_cosine": float(cos.min()),
        "sign_agreement": float(signs.mean()),
        "median_autograd_norm": float(grad.flatten(1).norm(dim=1).median()),
    }


def _gradient_check(model, x, y, eps: float, cfg: AdmissionConfig, generator) -> dict:
    """autograd's gradient against finite differences of the forward pass (`_probe`; again
    in float64, where the model runs in it, when fp32's disagree: `float64_copy`) at
    every batch size the attacks use and the check's own, on clean images and on points
    of their threat balls. A custom backward that lies (a straight-through estimator, a
    negated or rescaled gradient), everywhere or only at some batch sizes or away from
    the clean images, disagrees somewhere; an honest network agrees to a cosine near 1
    everywhere (kinks aside). The numbers at the top are the probe that agrees least
    (its median cosine decides `gradient_disagrees`), `min_cosine` the least of all;
    `probes` has each one, `custom_functions` the user-defined autograd.Functions the
    forward applies (whose forward bench.engine.mirror can differentiate instead)."""
    sizes = sorted({cfg.fd_images, *cfg.batch_sizes})
    state = generator.get_state()
    probes = [_probe(model, x, y, b, p, eps, cfg, generator) for b in sizes for p in POINTS]
    if min(p["median_cosine"] for p in probes) < GRADIENT_COSINE:
        # Disagreement in fp32 may be the loss's rounding (a large input, a confident model):
        # taken again in float64 from the same draws, where a model runs in it, only then,
        # since float64 convolutions on a CPU cost tens of times fp32's.
        double = float64_copy(model, x)
        if double is not None:
            generator.set_state(state)
            probes = [_probe(model, x, y, b, p, eps, cfg, generator, double) for b in sizes for p in POINTS]
    worst = min(probes, key=lambda p: p["median_cosine"])
    return {
        **worst,
        "directions": cfg.fd_directions,
        "step": cfg.fd_step,
        "min_cosine": min(p["min_cosine"] for p in probes),
        "probes": probes,
        "custom_functions": custom_functions(model, x[: cfg.fd_images]),
    }


def _traced_pgd(model, x, y, eps: float, steps: int, generator) -> list[float]:
    """Mean cross-entropy per step of a plain L-inf PGD (step 2.5 eps / steps), no early stop."""
    cfg = PGD(eps=eps, steps=steps, step_size=2.5 * eps / steps, loss="xent", norm="linf")
    trace: list[float] = []
    plain_pgd(
        model,
        x,
        y,
        cfg,
        generator,
        loss=lambda z, t: F.cross_entropy(z.float(), t, reduction="none"),
        on_step=lambda losses: trace.append(float(losses.mean())),
    )
    return trace


def admit(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, cfg: AdmissionConfig = AdmissionConfig()
) -> dict:
    """Every admission check on the first cfg.n samples; numbers only, judged in bench.science.flags."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x, y = x[: cfg.n].to(device), y[: cfg.n].to(device)
    gen = torch.Generator().manual_seed(cfg.seed)
    parts = _parts(len(x), cfg.batch_sizes)
    with frozen(model):
        with torch.no_grad():
            outs = [torch.cat([model(x[p]).float() for p in parts]) for _ in range(cfg.passes)]
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
        probabilities = {
            "min": float(z.min()),
            "max": float(z.max()),
            "max_row_sum_error": float((z.sum(1) - 1).abs().max()),
        }
        zero, n = _zero_grad_share(model, x, y, parts)
        calls = count_autograd_calls(model, x[:8])
        noise = None
        if not varies(randomized):
            amp = cfg.noise_fraction * eps
            # Drawn part by part, in order: one part (every small dataset) is one draw.
            with torch.no_grad():
                noisy_argmax = torch.cat(
                    [
                        model((x[p] + (2 * torch.rand(x[p].shape, generator=gen).to(device) - 1) * amp).clamp(0, 1))
                        .float()
                        .argmax(1)
                        for p in parts
                    ]
                )
            flipped = noisy_argmax != z.argmax(1)
            correct = z.argmax(1) == y
            noise = {"amplitude": amp, "flipped": int((flipped & correct).sum()), "correct": int(correct.sum())}
        sub = slice(0, min(100, len(x)))
        trace = _traced_pgd(model, x[sub], y[sub], eps, cfg.trace_steps, gen)
        # Finite differences of a randomized forward are its noise: not measured there.
        gradient = None if varies(randomized) else _gradient_check(model, x, y, eps, cfg, gen)
    tail = max(2, cfg.trace_steps // 10)
    return {
        "schema": SCHEMA,
        "config": asdict(cfg),
        "n": n,
        "probabilities": probabilities,
        "randomized": randomized,
        "autograd_calls": calls,
        "zero_gradient": {"count": zero, "n": n, "share": zero / n},
        "noise_flips": noise,
        "gradient_check": gradient,
        "loss_rising": {
            "steps": cfg.trace_steps,
            "n": len(x[sub]),
            "tail": tail,
            "loss_before_tail": trace[-tail - 1],
            "loss_last": trace[-1],
            "trace": [round(v, 5) for v in trace[:: max(1, cfg.trace_steps // 20)]],
        },
    }


def _covers(stored: dict, batches: tuple[int, ...]) -> bool:
    """The stored checks were measured under this schema, and their gradient check (where
    there is one: not on a randomized model) at these attack batch sizes."""
    if stored.get("schema") != SCHEMA:
        return False
    if stored.get("gradient_check") is None:
        return True
    return set(batches) <= set(stored.get("config", {}).get("batch_sizes", ()))


class AdmissionWorkspace(Protocol):
    """What the admission checks read of the run's workspace (bench.run.workspace.Workspace,
    which the science layer cannot import): where the data is, the attack batch size, and
    the store the checks are kept in."""

    data_root: str | None
    store: Store

    def batch_size(self) -> int: ...


def ensure_admission(ws: AdmissionWorkspace, row: Checkpoint, model: Callable[[], torch.nn.Module]) -> dict:
    """The checkpoint's admission checks: from its meta, or measured now and stored there.

    `model` builds the model; it is called only when the checks are missing or stale, or
    when the workspace attacks in batches of a size they were not measured at (another
    device, another --batch-size), since a backward may answer differently there.
    """
    spec = get_spec(row.dataset)
    batches = attack_batches(test_size(spec, ws.data_root), ws.batch_size(row.dataset))
    stored = row.admission
    if stored and _covers(stored, batches):
        return stored
    x, y = load_dataset(row.dataset, "test", ws.data_root)
    cfg = AdmissionConfig(batch_sizes=batches)
    result = admit(model(), x, y, spec.threat.eps, cfg)
    ws.store.update_meta(row, admission=result)
    return result
