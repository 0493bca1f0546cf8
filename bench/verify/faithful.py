"""The graph held to the model: a verifier's answer is about the Graph, so the Graph must
compute what the model computes.

- `refuse_hooks`: torch.fx records a module's forward, never its forward hooks or
  pre-hooks (nor the global ones of torch.nn.modules.module), which may change anything;
  a model with any is refused in one line.
- `check_points`: the model's fp32 logits against the graph's exact ones at given
  points; a difference beyond the rounding bound (rounding.py, the same SAFETY * E the
  verdicts use) means the trace missed something, and the model is refused in one line.
- `check_unit_box` (at tracing: random images and corners of [0, 1]^d) and `check_box`
  (at verification: each image, random points and corners of its own box), both seeded.

Sampling is a check, not a proof: it catches a forward that differs anywhere it looks,
and the refusals above, with Normalize read by exact type (trace.py), remove the ways
known to make the traced graph differ from the forward.
"""

from __future__ import annotations

import torch
from torch.nn.modules import module as torch_module

from bench.engine.device import full_fp32
from bench.engine.passes import PassCount
from bench.verify.graph import Graph, Unsupported
from bench.verify.rounding import SAFETY, fp32_error
from bench.verify.search import box32, model_device

UNIT_POINTS = 64
"""Random images of [0, 1]^d the graph is checked on when it is traced."""
UNIT_CORNERS = 16
"""Random corners of [0, 1]^d, likewise."""
BOX_POINTS = 64
"""Random points of the boxes checked at verification, spread over the images (at least
two per image)."""
BOX_CORNERS = 16
"""Random corners of the boxes, likewise (at least two per image)."""
SEED = 20_250_601
"""The checks' generator seed: the same points every run."""
CHUNK = 1024
"""Points per forward pass of the check."""


def refuse_hooks(model: torch.nn.Module) -> None:
    """Raise Unsupported if a forward hook or pre-hook could change what the model computes."""
    for name, m in model.named_modules():
        for kind, hooks in (("forward hook", m._forward_hooks), ("forward pre-hook", m._forward_pre_hooks)):
            # The bench's own pass counter observes outputs and changes nothing (bench.engine.passes).
            if any(not isinstance(h, PassCount) for h in hooks.values()):
                where = f"module {name!r} ({type(m).__name__})" if name else f"the model ({type(m).__name__})"
                raise Unsupported(
                    f"verify: {where} has a {kind}, which torch.fx does not record and which may "
                    f"change its output; remove it to verify the model"
                )
    for kind, hooks in (
        ("forward hook", torch_module._global_forward_hooks),
        ("forward pre-hook", torch_module._global_forward_pre_hooks),
    ):
        if hooks:
            raise Unsupported(
                f"verify: a global {kind} is registered (torch.nn.modules.module), which torch.fx "
                f"does not record and which may change the model's output; remove it to verify"
            )


def check_points(g: Graph, model: torch.nn.Module, points: torch.Tensor, where: str) -> None:
    """Raise Unsupported if the model's fp32 logits at `points` (m, *input shape) differ
    from the graph's by more than SAFETY times the rounding bound there."""
    dev = model_device(model)
    for i in range(0, len(points), CHUNK):
        pts = points[i : i + CHUNK].float()
        with full_fp32(), torch.no_grad():
            z = model(pts.to(dev)).double().cpu()
        exact = g.forward(pts)
        if z.shape != exact.shape:
            raise Unsupported(
                f"verify: the model's output has shape {tuple(z.shape[1:])}, its traced graph's "
                f"{tuple(exact.shape[1:])}; the trace missed something the forward does"
            )
        flat = pts.double().flatten(1)
        allowed = SAFETY * fp32_error(g, flat, flat)
        diff = (z - exact).abs()
        bad = ~(diff <= allowed)  # NaN counts as a difference
        if bool(bad.any()):
            p, j = (int(t) for t in bad.nonzero()[0])
            raise Unsupported(
                f"verify: the model's fp32 logits differ from its traced graph's at {where} "
                f"(logit {j}: {float(diff[p, j]):.3g}, rounding explains {float(allowed[p, j]):.3g}); "
                f"something the trace does not see changes what the model computes"
            )


def check_unit_box(g: Graph, model: torch.nn.Module) -> None:
    """The graph against the model on random images and corners of [0, 1]^d."""
    gen = torch.Generator().manual_seed(SEED)
    shape = g.input_shape
    pts = torch.cat(
        [
            torch.rand(UNIT_POINTS, *shape, generator=gen),
            (torch.rand(UNIT_CORNERS, *shape, generator=gen) < 0.5).float(),
        ]
    )
    check_points(g, model, pts, "random images of [0, 1]")


def check_box(g: Graph, model: torch.nn.Module, x: torch.Tensor, eps: float) -> None:
    """The graph against the model on the images x (n, C, H, W) themselves and on random
    points and corners of their boxes (the fp32 ones every counterexample lies in); hooks
    are refused again, since a graph may have been traced before one was added."""
    refuse_hooks(model)
    if len(x) == 0:
        return
    x = x.detach().float().cpu()
    lo, hi = box32(x, eps)
    gen = torch.Generator().manual_seed(SEED)
    n = len(x)
    inner = max(BOX_POINTS, 2 * n)
    corner = max(BOX_CORNERS, 2 * n)
    at = torch.arange(inner) % n
    t = torch.rand(inner, *x.shape[1:], generator=gen)
    inside = torch.minimum(torch.maximum(lo[at] + (hi[at] - lo[at]) * t, lo[at]), hi[at])
    at = torch.arange(corner) % n
    corners = torch.where(torch.rand(corner, *x.shape[1:], generator=gen) < 0.5, lo[at], hi[at])
    check_points(g, model, torch.cat([x, inside, corners]), f"points of the eps {eps:g} box")
