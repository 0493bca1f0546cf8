"""Reliability checks over stored results: signs of gradient masking and weak attacks.

Each check reads the checkpoint's stored cells and returns a flag with the numbers that
raised it (and the keys of the cells they come from), or nothing. Flags are derived
data: recomputed after every run and replaced in one transaction. "More than a point"
means more than 0.01 of accuracy. The masking flags measure black-box attacks against
the strongest white-box cell the checkpoint has faced (bench.science.white_box), never
against PGD alone; a subset cell (SPSA on 100 images) is compared with the white-box
cells on the very same images. Each flag's key is given to `@flag` and never changes (it
is a database key): `..._than_pgd` reads "than the white-box attacks", as the functions'
names say.
"""

from __future__ import annotations

from collections import defaultdict

from bench.core.kinds import Role

# The checks of the model itself (its admission record) register first, those of its cells below.
from bench.science import admission_flags  # noqa: F401
from bench.science.flag_registry import FLAGS, flag
from bench.science.white_box import (
    BLACK_BOX,
    ITERATIVE,
    beyond,
    beyond_white_box,
    is_pgd,
    of_role,
    role_of,
    strongest_white_box_on,
    white_box,
)
from bench.store.db import Checkpoint, Store
from bench.store.evidence import evidence, radii
from bench.store.rows import CellRow


def _pgd(cells: list[CellRow], threat: str) -> list[CellRow]:
    """PGD: the iterative white-box cells with a step size, a step count and restarts
    (APGD adapts its step, multi-targeted restarts over targets), full-set L-inf cells of
    the threat model."""
    return [c for c in white_box(cells, threat, ITERATIVE) if is_pgd(c) and c.params.get("norm", "linf") == "linf"]


def _variant(c: CellRow, *fields: str) -> tuple:
    """What a cell shares with the cells it is compared to (all but steps or restarts)."""
    return tuple(c.params.get(f) for f in fields)


@flag(
    "pgd_still_falling",
    "Accuracy keeps falling from PGD-20 to the longest PGD run: the shorter attacks had not "
    "converged, so short-PGD numbers overstate robustness.",
)
def pgd_still_falling(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    # PGD-20 and the longest run of the same loss and base step, whatever their schedules
    # (the full matrix runs its long PGD with a decaying step); targeted runs apart.
    groups: dict[tuple, dict[int, CellRow]] = defaultdict(dict)
    for c in _pgd(cells, threat):
        if c.params.get("restarts", 1) == 1:
            groups[_variant(c, "loss", "step_size", "random_start", "targeted")][c.params["steps"]] = c
    worst = None
    for by_steps in groups.values():
        longest = max(by_steps)
        if 20 not in by_steps or longest <= 20:
            continue
        drop = by_steps[20].robust_acc - by_steps[longest].robust_acc
        if beyond(drop) and (worst is None or drop > worst["drop"]):
            worst = {
                "loss": by_steps[20].params.get("loss"),
                "pgd20": by_steps[20].robust_acc,
                "steps": longest,
                "longest": by_steps[longest].robust_acc,
                "drop": drop,
                "cells": [by_steps[20].cell_key, by_steps[longest].cell_key],
            }
    return {"numbers": worst} if worst else None


@flag(
    "restarts_matter",
    "Random restarts lower accuracy by more than a point: single-start PGD is not finding the "
    "worst case, a sign of a rugged or masked loss surface.",
)
def restarts_matter(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    groups: dict[tuple, list[CellRow]] = defaultdict(list)
    for c in _pgd(cells, threat):
        groups[_variant(c, "loss", "steps", "step_size", "random_start")].append(c)
    worst = None
    for runs in groups.values():
        single = next((c for c in runs if c.params.get("restarts", 1) == 1), None)
        if single is None:
            continue
        for c in runs:
            drop = single.robust_acc - c.robust_acc
            if c.params.get("restarts", 1) > 1 and beyond(drop) and (worst is None or drop > worst["drop"]):
                worst = {
                    "loss": c.params.get("loss"),
                    "steps": c.params["steps"],
                    "restarts": c.params["restarts"],
                    "single": single.robust_acc,
                    "restarts_acc": c.robust_acc,
                    "drop": drop,
                    "cells": [single.cell_key, c.cell_key],
                }
    return {"numbers": worst} if worst else None


@flag(
    "fgsm_stronger_than_pgd",
    "One FGSM step beats every iterative gradient attack (PGD, APGD, multi-targeted): the "
    "iterative attacks are being misled, a classic sign of gradient masking.",
    masking=True,
)
def fgsm_beats_iterative(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    fgsm = white_box(cells, threat, frozenset({Role.ONE_STEP}))
    pgd = white_box(cells, threat, ITERATIVE)
    if not fgsm or not pgd:
        return None
    f = min(fgsm, key=lambda c: c.robust_acc)
    best = min(pgd, key=lambda c: c.robust_acc)
    if beyond(best.robust_acc - f.robust_acc):
        return {"numbers": {"fgsm": f.robust_acc, "best_pgd": best.robust_acc, "cells": [f.cell_key, best.cell_key]}}
    return None


def _stronger_than_pgd(cells: list[CellRow], rivals: list, threat: str) -> dict | None:
    """The rival cell that beats the strongest white-box cell on its own images by the most."""
    worst = None
    for r in rivals:
        pgd = strongest_white_box_on(cells, threat, r.indices)
        if pgd is None:
            return None
        gap = pgd[0] - r.robust_acc
        if beyond(gap) and (worst is None or gap > worst[0]):
            worst = (gap, r, pgd)
    return worst


@flag(
    "spsa_stronger_than_pgd",
    "The gradient-free SPSA attack beats the strongest white-box attack on the same images: "
    "the gradients it follows are not informative (gradient masking).",
    masking=True,
    calls_witness=True,
)
def spsa_beats_white_box(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    spsa = of_role(cells, threat, frozenset({Role.GRADIENT_ESTIMATE}))
    hit = _stronger_than_pgd(cells, spsa, threat)
    if hit is None:
        return None
    _gap, c, (pgd_acc, pgd_key) = hit
    return {"numbers": {"spsa": c.robust_acc, "pgd_same_images": pgd_acc, "n": c.n, "cells": [c.cell_key, pgd_key]}}


@flag(
    "transfer_stronger_than_pgd",
    "A black-box transfer attack beats the strongest white-box attack: white-box gradients are masked.",
    masking=True,
    calls_witness=True,
)
def transfer_beats_white_box(
    ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str
) -> dict | None:
    incoming = [t for t in transfers if t.target_id == ck.id and t.threat == threat and t.source_id != ck.id]
    hit = _stronger_than_pgd(cells, incoming, threat)
    if hit is None:
        return None
    _gap, t, (pgd_acc, pgd_key) = hit
    return {
        "numbers": {
            "transfer": t.robust_acc,
            "source_id": t.source_id,
            "pgd_same_images": pgd_acc,
            "n": t.n,
            "cells": [t.cell_key, pgd_key],
        }
    }


@flag(
    "unbounded_not_zero",
    "PGD with an unbounded budget does not drive accuracy to zero: the attack cannot follow "
    "the model's gradients (Athalye et al.'s sanity check).",
    masking=True,
    every_radius=False,  # the sweep's radii are multiples of the checkpoint's own
)
def unbounded_not_zero(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    sweep = [c for c in cells if role_of(c) is Role.SWEEP]
    if not sweep:
        return None
    top_eps = max(c.params["eps"] for c in sweep)
    # Several cells may share the top eps (Table 9 has two at 150/255): the best of them.
    top = min((c for c in sweep if c.params["eps"] == top_eps), key=lambda c: c.robust_acc)
    if top.robust_acc > 0:
        curve = {
            f"{e:g}": min(c.robust_acc for c in sweep if c.params["eps"] == e)
            for e in sorted({c.params["eps"] for c in sweep})
        }
        return {"numbers": {"eps": top_eps, "accuracy": top.robust_acc, "sweep": curve, "cells": [top.cell_key]}}
    return None


@flag("autoattack_warning", "AutoAttack's own checks warned about this model.", every_radius=False)
def autoattack_warning(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    raised = [c for c in cells if role_of(c) is Role.ENSEMBLE and c.warnings]
    if not raised:
        return None
    messages = sorted({m for c in raised for m in c.warnings})
    return {"numbers": {"warnings": messages, "cells": [c.cell_key for c in raised]}}


@flag(
    "square_stronger_than_pgd",
    "The query-based Square attack broke more than a point of samples that no white-box "
    "gradient attack (FGSM, PGD, APGD, multi-targeted) broke: a black-box attack beating white-box ones means the "
    "gradients are masked (Pintor et al.; AutoAttack's Square check).",
    masking=True,
    calls_witness=True,
)
def square_beats_white_box(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    return beyond_white_box(cells, BLACK_BOX, "square", threat)


@flag(
    "distilled_stronger_than_pgd",
    "A surrogate distilled from the model's own answers (the witness cell a model whose "
    "gradients say nothing gets) broke more than a point of samples that no white-box "
    "gradient attack broke: the model's gradients hide what its answers give away "
    "(Papernot et al.'s substitute; Athalye et al.'s obfuscated gradients).",
    masking=True,
)
def witness_beats_white_box(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    return beyond_white_box(cells, frozenset({Role.WITNESS}), "distill", threat)


@flag(
    "attacks_missed",
    "The complete verifier found counterexamples, which reproduced on the model, for images "
    "that every attack cell left standing: the attacks' worst case was above the truth by "
    "that many images (the count and the image indices are kept).",
)
def attacks_missed(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    return _in_bracket(ck, cells, transfers, threat, "attacks_missed", "missed_indices")


@flag(
    "unsound",
    "An image proven robust (certified, or verified by the complete verifier) was broken by "
    "an attack cell, or by the verifier's own reproducing counterexample. A sound verifier "
    "and a correct attack can never disagree so: this is a bug in one of them, the run "
    "fails, and the exact and certified figures are withheld.",
)
def unsound(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str) -> dict | None:
    return _in_bracket(ck, cells, transfers, threat, "unsound", "unsound_indices")


def _in_bracket(
    ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow], threat: str, count: str, indices: str
) -> dict | None:
    """A flag's numbers from the checkpoint's bracket at `threat`: the images it counts, if any."""
    ev = evidence(ck, cells, transfers, {})
    b = ev.bracket_of(threat)
    if b and getattr(b, count):
        return {"numbers": {"count": getattr(b, count), "n": ev.test_size, "indices": list(getattr(b, indices))}}
    return None


FLAG_TEXT = {f.name: f.text for f in FLAGS}
MASKING = tuple(f.name for f in FLAGS if f.masking)
"""Flags that say the gradients an attack follows are masked, broken or random."""
CALLS_WITNESS = frozenset(f.name for f in FLAGS if f.calls_witness)
"""Flags after which the checkpoint also faces the witness cells: a black-box attack beat
every white-box one, so the model's gradients hide what its answers give away."""


def compute_flags(ck: Checkpoint, cells: list[CellRow], transfers: list[CellRow]) -> list[dict]:
    """Every flag the checkpoint raises: at its own radius, then at each other L-inf radius
    some cell ran at (a run's `--eps`, a matrix's eps), where a flag's numbers name the
    radius (`threat`). Checks of the model itself, and of cells that belong to no one
    radius, run once."""
    flags = []
    for threat in radii(ck.threat, (*cells, *transfers)):
        own = threat == ck.threat
        for f in FLAGS:
            if not (own or f.every_radius):
                continue
            hit = f.check(ck, cells, transfers, threat)
            if hit:
                numbers = hit["numbers"] if own else {**hit["numbers"], "threat": threat}
                flags.append({"name": f.name, "message": f.text, "numbers": numbers})
    return flags


def recompute_flags(store: Store, ck: Checkpoint) -> list[dict]:
    """Recompute and store a checkpoint's flags; raises once they are stored if one is
    `unsound` (a verifier and an attack contradict each other: a bug, never a result)."""
    flags = compute_flags(ck, store.evaluations([ck.id]), store.transfers([ck.id]))
    store.replace_flags(ck.id, flags)
    bad = next((f for f in flags if f["name"] == "unsound"), None)
    if bad:
        n = bad["numbers"]
        raise RuntimeError(
            f"unsound: {n['count']} image(s) of checkpoint {ck.key[:8]} proven robust were broken "
            f"by an attack (images {n['indices'][:10]}); the verifier or an attack has a bug"
        )
    return flags
