"""Shafahi et al.'s Table 1 row for stored checkpoints (what `bench diagnose` prints).

The per-checkpoint numbers come from bench.science.diagnostics, computed once from the
weights and stored (bench.run.diagnosing); the measured FGSM and PGD accuracies beside
them are the store's own cells at the checkpoint's threat eps.
"""

from __future__ import annotations

from bench.core.kinds import Role
from bench.science.white_box import is_pgd, role_of
from bench.store.db import Checkpoint, Diagnostic, Store
from bench.store.rows import CellRow

COLUMNS = [
    "defense",
    "preset",
    "dataset",
    "checkpoint",
    "eps",
    "n",
    "clean_acc",
    "median_logit_gap",
    "median_grad_gap",
    "median_eps_l",
    "median_coherence",
    "median_grad_norm_true",
    "median_grad_norm_adv",
    "logit_variance",
    "predicted_acc",
    "fgsm_acc",
    "pgd_acc",
    "pgd_cell",
]


def measured(ck: Checkpoint, cells: list[CellRow], eps: float) -> dict:
    """The weakest FGSM and PGD accuracies stored at the threat eps (whole test set)."""

    def at_eps(e: CellRow) -> bool:
        return (
            e.indices is None
            and e.threat == ck.threat
            and abs(float(e.params.get("eps", -1)) - eps) < 1e-9
            and e.params.get("norm", "linf") == "linf"
        )

    fgsm = [e for e in cells if role_of(e) is Role.ONE_STEP and at_eps(e)]
    pgd = [e for e in cells if is_pgd(e) and at_eps(e)]
    best = min(pgd, key=lambda e: e.robust_acc) if pgd else None
    return {
        "fgsm_acc": min(e.robust_acc for e in fgsm) if fgsm else None,
        "pgd_acc": best.robust_acc if best else None,
        "pgd_cell": best.cell_key if best else None,
    }


def table_row(ck: Checkpoint, diag: Diagnostic, cells: list[CellRow]) -> dict:
    s = diag.summary
    return {
        "defense": ck.defense,
        "preset": ck.preset,
        "dataset": ck.dataset,
        "checkpoint": ck.key,
        "eps": diag.eps,
        "n": diag.n,
        "clean_acc": s["clean_acc"],
        "median_logit_gap": s["logit_gap"]["median"],
        "median_grad_gap": s["grad_gap"]["median"],
        "median_eps_l": s["eps_l"]["median"],
        "median_coherence": s["coherence"]["median"],
        "median_grad_norm_true": s["grad_norm_true"]["median"],
        "median_grad_norm_adv": s["grad_norm_adv"]["median"],
        "logit_variance": s["logit_variance"],
        "predicted_acc": s["predicted_acc"],
        **measured(ck, cells, diag.eps),
    }


def diagnosis_rows(store: Store, chosen: list[Checkpoint]) -> list[dict]:
    """Table 1 rows for checkpoints whose diagnostics are stored (bench.run.diagnosing
    computes missing ones first)."""
    diags = {d.checkpoint_id: d for d in store.diagnostics([c.id for c in chosen])}
    cells: dict[int, list[CellRow]] = {c.id: [] for c in chosen}
    for e in store.evaluations([c.id for c in chosen]):
        cells[e.checkpoint_id].append(e)
    return [table_row(ck, diags[ck.id], cells[ck.id]) for ck in chosen]
