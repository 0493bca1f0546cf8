"""Reliability checks over stored results: signs of gradient masking and weak attacks.

Each check reads the checkpoint's stored cells and returns a flag with the numbers that
raised it, or nothing. Flags are derived data: recomputed after every run and replaced
in one transaction. "More than a point" means more than 0.01 of accuracy.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from bench.store import Checkpoint, Evaluation, Store, Transfer

POINT = 0.01

FLAG_TEXT = {
    "pgd_still_falling": "Accuracy keeps falling from PGD-20 to the longest PGD run: the shorter "
                         "attacks had not converged, so short-PGD numbers overstate robustness.",
    "restarts_matter": "Random restarts lower accuracy by more than a point: single-start PGD is "
                       "not finding the worst case, a sign of a rugged or masked loss surface.",
    "fgsm_stronger_than_pgd": "One FGSM step beats iterative PGD: the iterative attack is being "
                              "misled, a classic sign of gradient masking.",
    "spsa_stronger_than_pgd": "The gradient-free SPSA attack beats white-box PGD on the same images: "
                              "the gradients PGD follows are not informative (gradient masking).",
    "transfer_stronger_than_pgd": "A black-box transfer attack beats white-box PGD: white-box "
                                  "gradients are masked.",
    "unbounded_not_zero": "PGD with an unbounded budget does not drive accuracy to zero: the attack "
                          "cannot follow the model's gradients (Athalye et al.'s sanity check).",
    "autoattack_warning": "AutoAttack's own checks warned about this model.",
}


def _linf_pgd(cells: list[Evaluation], threat: str, **match) -> list[Evaluation]:
    out = []
    for c in cells:
        if c.attack != "pgd" or c.threat != threat or c.indices is not None:
            continue
        if all(c.params.get(k) == v for k, v in match.items()):
            out.append(c)
    return out


def _best_pgd(cells: list[Evaluation], threat: str) -> Evaluation | None:
    pgd = _linf_pgd(cells, threat)
    return min(pgd, key=lambda c: c.robust_acc) if pgd else None


def pgd_still_falling(ck: Checkpoint, cells: list[Evaluation], transfers: list[Transfer]) -> dict | None:
    for loss in ("xent", "cw"):
        runs = _linf_pgd(cells, ck.threat, loss=loss, restarts=1)
        by_steps = {c.params["steps"]: c for c in runs}
        if 20 not in by_steps or max(by_steps) <= 20:
            continue
        longest = by_steps[max(by_steps)]
        drop = by_steps[20].robust_acc - longest.robust_acc
        if drop > POINT:
            return {"numbers": {"loss": loss, "pgd20": by_steps[20].robust_acc,
                                "steps": longest.params["steps"], "longest": longest.robust_acc}}
    return None


def restarts_matter(ck, cells, transfers):
    single = {c.params["steps"]: c for c in _linf_pgd(cells, ck.threat, loss="xent", restarts=1)}
    for c in _linf_pgd(cells, ck.threat, loss="xent"):
        base = single.get(c.params["steps"])
        if c.params["restarts"] > 1 and base and base.robust_acc - c.robust_acc > POINT:
            return {"numbers": {"steps": c.params["steps"], "restarts": c.params["restarts"],
                                "single": base.robust_acc, "restarts_acc": c.robust_acc}}
    return None


def fgsm_stronger_than_pgd(ck, cells, transfers):
    fgsm = [c for c in cells if c.attack == "fgsm" and c.threat == ck.threat and c.indices is None]
    best = _best_pgd(cells, ck.threat)
    if fgsm and best:
        f = min(fgsm, key=lambda c: c.robust_acc)
        if best.robust_acc - f.robust_acc > POINT:
            return {"numbers": {"fgsm": f.robust_acc, "best_pgd": best.robust_acc, "pgd_cell": best.cell_key}}
    return None


def spsa_stronger_than_pgd(ck, cells, transfers):
    best = _best_pgd(cells, ck.threat)
    if best is None:
        return None
    pgd_bits = best.correct()
    for c in cells:
        if c.attack != "spsa" or c.threat != ck.threat:
            continue
        # Compare on the very images SPSA ran on.
        pgd_acc = float(pgd_bits[np.asarray(c.indices)].mean()) if c.indices is not None else best.robust_acc
        if pgd_acc - c.robust_acc > POINT:
            return {"numbers": {"spsa": c.robust_acc, "pgd_same_images": pgd_acc, "n": c.n}}
    return None


def transfer_stronger_than_pgd(ck, cells, transfers):
    best = _best_pgd(cells, ck.threat)
    if best is None:
        return None
    incoming = [t for t in transfers if t.target_id == ck.id and t.threat == ck.threat and t.source_id != ck.id]
    if incoming:
        t = min(incoming, key=lambda t: t.robust_acc)
        if best.robust_acc - t.robust_acc > POINT:
            return {"numbers": {"transfer": t.robust_acc, "source_id": t.source_id, "best_pgd": best.robust_acc}}
    return None


def unbounded_not_zero(ck, cells, transfers):
    sweep = [c for c in cells if c.attack == "unbounded"]
    if sweep:
        top = max(sweep, key=lambda c: c.params["eps"])
        if top.robust_acc > 0:
            return {"numbers": {"eps": top.params["eps"], "accuracy": top.robust_acc}}
    return None


def autoattack_warning(ck, cells, transfers):
    messages = sorted({m for c in cells if c.attack == "autoattack" for m in c.extra.get("warnings", [])})
    return {"numbers": {"warnings": messages}} if messages else None


CHECKS: dict[str, Callable] = {
    "pgd_still_falling": pgd_still_falling,
    "restarts_matter": restarts_matter,
    "fgsm_stronger_than_pgd": fgsm_stronger_than_pgd,
    "spsa_stronger_than_pgd": spsa_stronger_than_pgd,
    "transfer_stronger_than_pgd": transfer_stronger_than_pgd,
    "unbounded_not_zero": unbounded_not_zero,
    "autoattack_warning": autoattack_warning,
}


def compute_flags(ck: Checkpoint, cells: list[Evaluation], transfers: list[Transfer]) -> list[dict]:
    flags = []
    for name, check in CHECKS.items():
        hit = check(ck, cells, transfers)
        if hit:
            flags.append({"name": name, "message": FLAG_TEXT[name], "numbers": hit["numbers"]})
    return flags


def recompute_flags(store: Store, ck: Checkpoint) -> list[dict]:
    flags = compute_flags(ck, store.evaluations([ck.id]), store.transfers([ck.id]))
    store.replace_flags(ck.id, flags)
    return flags
