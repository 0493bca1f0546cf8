"""What a stored admission says (bench.science.admission measures it): whether the model is
randomized, whether its input gradients are zero or disagree with its forward pass, and
so whether gradient attacks have anything true to follow. Read by the flags, the
adaptive attacks and the scheduler, from the checkpoint's meta alone."""

from __future__ import annotations

RELATIVE_TOLERANCE = 1e-4
"""Outputs that move by more than this fraction of their norm between passes, or any
prediction that changes, make a model randomized (AutoAttack's check uses 1e-4)."""


def varies(r: dict) -> bool:
    """Whether the repeated passes of an admission's `randomized` check differ."""
    relative = r.get("max_relative_diff", r["max_output_diff"])
    return r["share_prediction_changed"] > 0 or relative > RELATIVE_TOLERANCE


def is_randomized(admission: dict | None) -> bool:
    return bool(admission) and varies(admission["randomized"])


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
    differences of the forward pass: those of the probe that agrees least (without the
    list of every probe, which the admission record keeps)."""
    g = (admission or {}).get("gradient_check")
    if not g or g["median_cosine"] >= GRADIENT_COSINE:
        return None
    return {k: v for k, v in g.items() if k != "probes"}


def forward_differentiable(admission: dict | None) -> bool:
    """The gradient disagrees with the forward pass, and the forward applies custom
    autograd.Functions: their backward is the suspect, and their forward can be
    differentiated instead (bench.engine.mirror)."""
    g = gradient_disagrees(admission)
    return bool(g and g.get("custom_functions"))


def gradients_say_nothing(admission: dict | None) -> bool:
    """Some sample's input gradient is exactly zero, or autograd's gradient disagrees with
    the model's own forward pass: gradient attacks have nothing true to follow."""
    return bool(zero_gradients(admission) or gradient_disagrees(admission))
