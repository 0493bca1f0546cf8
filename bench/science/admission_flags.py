"""Reliability checks over a checkpoint's admission record (bench.science.admission): what
the model's outputs, its forward passes and its gradients showed before the first attack
(probabilities for logits, randomness, autograd inside the forward pass, zero or
disagreeing gradients, rugged predictions, a traced PGD still climbing). The checks over
its stored cells are in bench.science.flags, which imports this module first, so these
flags come first wherever flags are listed."""

from __future__ import annotations

from bench.science import admitted
from bench.science.admitted import is_randomized
from bench.science.flag_registry import flag
from bench.store.db import Checkpoint
from bench.store.rows import CellRow


def model_flag(name: str, text: str, **how):
    """A check of the model itself: judged once, whatever radii its cells ran at."""
    return flag(name, text, every_radius=False, **how)


def _admission(ck: Checkpoint) -> dict:
    return ck.admission or {}


PROBABILITY_TOLERANCE = 1e-4


@model_flag(
    "outputs_probabilities",
    "The model's outputs lie in [0, 1] and sum to 1 per sample: they are probabilities, not "
    "logits. Cross-entropy on probabilities has flattened gradients, so gradient attacks "
    "understate what is possible.",
    masking=True,
)
def outputs_probabilities(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    p = _admission(ck).get("probabilities")
    if (
        p
        and p["min"] >= -PROBABILITY_TOLERANCE
        and p["max"] <= 1 + PROBABILITY_TOLERANCE
        and p["max_row_sum_error"] <= PROBABILITY_TOLERANCE
    ):
        return {"numbers": dict(p)}
    return None


@model_flag(
    "randomized_forward",
    "Repeated forward passes on the same inputs differ: the model is randomized. Its cells "
    "are crafted with EOT (gradients averaged over passes) and each verdict is a majority of "
    "passes, as the cell keys record.",
    masking=True,
)
def randomized_forward(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    a = _admission(ck)
    return {"numbers": dict(a["randomized"])} if is_randomized(a) else None


@model_flag(
    "autograd_in_forward",
    "The forward pass calls autograd itself (a defense that optimizes at inference time): "
    "attacks that differentiate through it may follow a gradient of the wrong function; an "
    "adaptive attack is needed.",
    masking=True,
)
def autograd_in_forward(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    calls = _admission(ck).get("autograd_calls")
    return {"numbers": {"autograd_calls_per_forward": calls}} if calls else None


@model_flag(
    "zero_gradients",
    "Some samples have an input gradient of cross-entropy of exactly zero (a saturated "
    "softmax, a step function or a detached input): gradient attacks cannot move them, so "
    "their robustness is unproven (Pintor et al.'s indicator of unavailable gradients; "
    "AutoAttack's zero-gradient check).",
    masking=True,
)
def zero_gradients(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    z = admitted.zero_gradients(ck.admission)
    return {"numbers": z} if z else None


@model_flag(
    "gradient_disagrees",
    "The model's input gradient, as autograd computes it, disagrees with finite differences of "
    "its own forward pass: a custom backward (a straight-through estimator, a rescaled or "
    "reversed gradient) tells attacks something other than what the function does, so "
    "gradient attacks follow the wrong direction (Athalye et al.'s obfuscated gradients).",
    masking=True,
)
def gradient_disagrees(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    g = admitted.gradient_disagrees(ck.admission)
    return {"numbers": g} if g else None


NOISE_FLIP_SHARE = 0.02
"""More than this share of correct samples flipping under tiny noise raises noise_flips."""


@model_flag(
    "noise_flips",
    "Predictions change under uniform noise of a twentieth of the budget on a model whose "
    "passes do not vary: the loss surface is too rugged for its gradient to point anywhere "
    "useful (gradient shattering).",
    masking=True,
)
def noise_flips(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    n = _admission(ck).get("noise_flips")
    if n and n["correct"] and n["flipped"] / n["correct"] > NOISE_FLIP_SHARE:
        return {"numbers": dict(n, share=n["flipped"] / n["correct"])}
    return None


RISING = 0.05
"""A traced PGD's mean loss rising by more than this fraction over its last tenth of steps."""


@model_flag(
    "attack_not_converged",
    "A traced PGD run's cross-entropy was still rising over its last tenth of steps: the "
    "attack had not converged (Pintor et al.'s incomplete optimization), so longer or "
    "stronger attacks may find more.",
)
def attack_not_converged(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    t = _admission(ck).get("loss_rising")
    if not t:
        return None
    before, last = t["loss_before_tail"], t["loss_last"]
    if last - before > RISING * max(abs(before), 1e-12):
        return {"numbers": {k: t[k] for k in ("steps", "n", "tail", "loss_before_tail", "loss_last", "trace")}}
    return None
