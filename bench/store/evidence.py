"""The evidence of a checkpoint: what its stored cells say, computed in one place.

Every reader (the result rows, the board, the checkpoint page, the flags, the CLI) asks
`evidence(...)` for one frozen `Evidence` and shows its fields; none re-assembles them.

- The **worst case** of a threat model is the per-sample AND over every cell of that
  threat model whose kind breaks images (attacks, transfers, the complete verifier's
  counterexamples): an upper bound on the true robust accuracy. A subset cell (SPSA on
  100 images, say) can only break the samples it ran on.
- It is **complete** when every cell the checkpoint's matrices asked for (recorded in
  its meta by the run layer) is stored, and says which are **missing** otherwise.
- The **bracket** (bench.store.bracket) is what the verifier cells prove beside it: a
  certified floor, the exact figure where every image was decided, and the
  contradictions that withhold both; one per threat model a verifier cell ran at.
- Its **radii**: its own threat model first, then every other L-inf radius its cells ran
  at (`bench run --eps`, a matrix's eps); each has a worst case, a bracket and flags.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from bench.core.kinds import CellKind
from bench.core.stats import interval
from bench.store.bracket import Bracket, bracket
from bench.store.db import Checkpoint, Store
from bench.store.meta import CheckpointMeta, transfer_name
from bench.store.rows import CellRow


@dataclass(frozen=True)
class WorstCase:
    """The per-sample AND over the cells of one threat model."""

    threat: str
    robust_acc: float
    n: int
    """The test-set size: every image counts, whichever cells ran on it."""
    cells: tuple[str, ...]
    """The keys of the cells ANDed (a transfer's as `<source defense>|<cell key>`)."""
    bits: np.ndarray = field(repr=False, compare=False)
    """Per test image: left standing by every cell."""
    missing: tuple[str, ...] = ()
    """Cells the matrices asked for in this threat model that are not stored."""
    forward_passes: float | None = None
    """What the cells ANDed cost: the model's forward passes per test image, summed over
    them (a subset cell's in proportion to its images); None where a cell was not counted."""
    backward_passes: float | None = None
    """Their backward passes per test image."""
    top5: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Per test image: the label still among the top five logits after every cell that
    kept top-5 verdicts; None where an attack or transfer cell kept none (a row stored
    before they were kept, a randomized model's). A verifier's counterexamples are top-1
    claims and stay out of it."""

    @property
    def top5_acc(self) -> float | None:
        return None if self.top5 is None else float(self.top5.mean())

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% exact binomial interval of the robust accuracy, on the n test images."""
        return interval(int(self.bits.sum()), self.n)

    @property
    def complete(self) -> bool:
        return not self.missing


@dataclass(frozen=True)
class Evidence:
    """Everything one checkpoint's stored cells say, for every reader."""

    checkpoint: Checkpoint
    meta: CheckpointMeta
    cells: tuple[CellRow, ...]
    """The checkpoint's own cells, in the order they were stored."""
    transfers: tuple[CellRow, ...]
    """Transfer cells onto the checkpoint."""
    test_size: int
    """The size of its test set; 0 while no whole-set cell is stored."""
    worst: Mapping[str, WorstCase]
    """The worst case of each threat model some cell counts toward."""
    brackets: Mapping[str, Bracket]
    """What the verifier cells prove, per threat model some verifier cell ran at."""

    @property
    def threat(self) -> str:
        """The checkpoint's own threat model (the one it was trained for)."""
        return self.checkpoint.threat

    @property
    def own(self) -> WorstCase | None:
        """The worst case of the checkpoint's own threat model."""
        return self.worst.get(self.threat)

    def worst_case(self, threat: str | None = None) -> WorstCase | None:
        return self.worst.get(threat or self.threat)

    @property
    def bracket(self) -> Bracket | None:
        """What the verifier cells prove in the checkpoint's own threat model; None without one."""
        return self.brackets.get(self.threat)

    def bracket_of(self, threat: str | None = None) -> Bracket | None:
        return self.brackets.get(threat or self.threat)

    @property
    def radii(self) -> list[str]:
        """The L-inf radii its cells ran at, its own first (see `radii`)."""
        return radii(self.threat, (*self.cells, *self.transfers))

    @property
    def not_verifiable(self) -> str | None:
        """Why the verifier does not take the model, where it does not."""
        return self.meta.not_verifiable

    def rows(self, threat: str | None = None) -> list[CellRow]:
        """The cells (own, then transfers onto it) of a threat model; all, unset."""
        return [c for c in (*self.cells, *self.transfers) if threat is None or c.threat == threat]


def radii(own: str, cells: Iterable[CellRow]) -> list[str]:
    """The checkpoint's own threat model, then every other L-inf radius some cell that
    breaks images ran at (a run's `--eps`, a matrix's eps), in increasing order: each has
    its worst case, its bracket and its flags."""
    others = {c.threat for c in cells if c.cell_kind.breaks and c.threat.startswith("linf-") and c.threat != own}
    return [own, *sorted(others, key=lambda t: float(t.removeprefix("linf-")))]


def test_size_of(cells: Iterable[CellRow]) -> int:
    """The test-set size the cells ran on, as they recorded it (a row written before cells
    recorded it: the size of its whole-set cells)."""
    sizes = [c.test_size or (c.n if c.indices is None else 0) for c in cells]
    return max(sizes, default=0)


def worst_case(threat: str, cells: Iterable[CellRow], test_size: int) -> WorstCase | None:
    """The per-sample AND over the cells of `threat` whose kind breaks images; None when
    no cell counts."""
    robust = np.ones(test_size, dtype=bool)
    top5: np.ndarray | None = np.ones(test_size, dtype=bool)
    judged5 = False  # some cell kept top-5 verdicts
    keys: list[str] = []
    anded: list[CellRow] = []
    for cell in cells:
        if cell.threat != threat or not cell.cell_kind.breaks:
            continue
        correct, kept5 = cell.correct(), cell.top5()
        if cell.indices is None:
            if len(correct) != test_size:
                continue
            at: slice | np.ndarray = slice(None)
        else:
            at = np.asarray(cell.indices, dtype=np.int64)
        robust[at] &= correct
        if kept5 is not None and top5 is not None:
            top5[at] &= kept5
            judged5 = True
        elif cell.cell_kind is not CellKind.VERIFY:
            top5 = None
        keys.append(cell.cell_key)
        anded.append(cell)
    if not keys:
        return None
    return WorstCase(
        threat,
        float(robust.mean()),
        test_size,
        tuple(keys),
        robust,
        (),
        *cost(anded, test_size),
        top5 if judged5 else None,
    )


def cost(cells: list[CellRow], test_size: int) -> tuple[float | None, float | None]:
    """(forward, backward) passes per test image of the cells together; None where any
    cell's were not counted (a row stored before passes were)."""
    if not cells or any(c.forward_passes is None or c.backward_passes is None for c in cells):
        return None, None
    forward = sum((c.forward_passes or 0.0) * c.n for c in cells) / test_size
    backward = sum((c.backward_passes or 0.0) * c.n for c in cells) / test_size
    return forward, backward


def missing_cells(
    meta: CheckpointMeta,
    own_threat: str,
    threat: str,
    cells: Iterable[CellRow],
    transfers: Iterable[CellRow],
    defense_of: Mapping[int, str],
) -> tuple[str, ...]:
    """The expected cells of `threat` that are not stored. `defense_of` maps checkpoint ids
    to defense names (a transfer is expected by its source's defense). A cell recorded
    without a threat model counts toward the checkpoint's own."""
    have = {c.cell_key for c in cells}
    have |= {transfer_name(defense_of.get(t.source_id or 0, "?"), t.cell_key) for t in transfers}
    wanted = {k for k in meta.expected_cells if meta.cell_threats.get(k, own_threat) == threat}
    return tuple(sorted(wanted - have))


def evidence(
    ck: Checkpoint, cells: Iterable[CellRow], transfers: Iterable[CellRow], defense_of: Mapping[int, str]
) -> Evidence:
    """The evidence of one checkpoint from its own cells and the transfers onto it."""
    cells, transfers = tuple(cells), tuple(t for t in transfers if t.checkpoint_id == ck.id)
    meta = CheckpointMeta.of(ck)
    size = test_size_of(cells) or test_size_of(transfers)
    worst: dict[str, WorstCase] = {}
    if size:
        threats = dict.fromkeys(c.threat for c in (*cells, *transfers) if c.cell_kind.breaks)
        for threat in threats:
            wc = worst_case(threat, (*cells, *transfers), size)
            if wc is not None:
                missing = missing_cells(meta, ck.threat, threat, cells, transfers, defense_of)
                worst[threat] = replace(wc, missing=missing)
    brackets: dict[str, Bracket] = {}
    if size:
        for threat in dict.fromkeys(c.threat for c in cells if c.cell_kind.proves):
            b = bracket(threat, cells, transfers, size)
            if b is not None:
                brackets[threat] = b
    return Evidence(ck, meta, cells, transfers, size, worst, brackets)


def load_evidence(store: Store, checkpoints: Iterable[Checkpoint]) -> dict[int, Evidence]:
    """The evidence of each checkpoint, by id, from one read of each table."""
    cks = list(checkpoints)
    ids = [c.id for c in cks]
    own: dict[int, list[CellRow]] = {i: [] for i in ids}
    for e in store.evaluations(ids):
        own[e.checkpoint_id].append(e)
    onto: dict[int, list[CellRow]] = {i: [] for i in ids}
    for t in store.transfers(ids):
        if t.checkpoint_id in onto:
            onto[t.checkpoint_id].append(t)
    defense_of = {c.id: c.defense for c in store.checkpoints()}
    return {c.id: evidence(c, own[c.id], onto[c.id], defense_of) for c in cks}
