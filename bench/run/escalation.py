"""Escalation: a cheap matrix (`fast`) that smells masking stops being cheap.

After a matrix that names one to escalate to (`escalate = "full"`), each checkpoint whose
admission checks or flags signal masking faces that matrix in full (its cells adapted to
the model, its transfers) and the witness, and its meta says why (`escalated`). A cheap
worst case is only as good as the gradients it follows.
"""

from __future__ import annotations

from bench.core.cells import Cell, make_cell
from bench.core.data import get_spec
from bench.core.matrix import Matrix
from bench.run.attacking import CellsRun, attack_checkpoints
from bench.run.plan import checked_cells
from bench.run.surrogates import transfer_cells
from bench.run.workspace import Workspace
from bench.science.adaptive import WITNESS
from bench.science.flags import MASKING
from bench.store.db import Checkpoint


class Escalation(CellsRun):
    """The cells a checkpoint's escalation ran, and every cell it asked for."""

    def __init__(self, cells: list[Cell]):
        super().__init__()
        self.cells = cells


def escalate(ws: Workspace, row: Checkpoint, full: Matrix, build, executor=None) -> Escalation | None:
    """After a cheap matrix (`fast`): where the admission checks or any flag signal
    masking, the matrix it escalates to (`full`) for this checkpoint (its cells adapted to
    the model, its transfers) and the witness, and the reason in the meta (`escalated`). A
    cheap worst case is only as good as the gradients it follows; on a masked model it
    must stop being cheap."""
    masking = sorted({f.name for f in ws.store.flags([row.id])} & set(MASKING))
    if not masking:
        return None
    ws.store.update_meta(row, escalated=", ".join(masking))
    spec = get_spec(row.dataset)
    cells = checked_cells(full, spec, ws.data_root)
    # The witness whatever the flags say: masking was signalled, and a surrogate distilled
    # from the model's answers does not follow its gradients.
    known = {c.key for c in cells}
    cells += [c for c in (make_cell(name, {}, spec.threat) for name in WITNESS) if c.key not in known]
    out = Escalation(cells)
    ran = attack_checkpoints(ws, [(row, cells, build)], executor)[row.id]
    out.extend(ran)
    out.failures.update(ran.failures)
    out.extend(transfer_cells(ws, row, full, build).ran)
    return out
