"""The store: SQLAlchemy models are the only schema. SQLite by default, any URL works.

Every evaluation is one row per (checkpoint, cell key), committed in its own
transaction together with the packed per-sample correctness bits, so a killed run
loses at most the cell it was in. What the cells say together (the worst case, its
completeness, the bracket) is computed in bench.store.evidence.

Writes are idempotent (INSERT ... ON CONFLICT DO NOTHING on each table's unique key), so
several drivers may share one store, SQLite on one machine or PostgreSQL
(`postgresql+psycopg://...`) across many; the `claims` table keeps them from computing
the same work twice (bench.store.claims).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
    text,
)
from sqlalchemy import insert as sa_insert
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

from bench.core.kinds import CellKind
from bench.errors import BenchError
from bench.store.meta import META_KEYS
from bench.store.rows import CellRow, cell_query
from bench.store.upgrade import upgrade


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Base(DeclarativeBase):
    pass


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    dataset: Mapped[str] = mapped_column(String(32), index=True)
    defense: Mapped[str] = mapped_column(String(64), index=True)
    preset: Mapped[str | None] = mapped_column(String(128))
    arch: Mapped[str] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(Integer)
    threat: Mapped[str] = mapped_column(String(32))
    """The dataset's threat model when trained, e.g. linf-0.2: the worst case's scope."""
    config: Mapped[dict] = mapped_column(JSON)
    train_config: Mapped[dict] = mapped_column(JSON)
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    epochs: Mapped[int] = mapped_column(Integer)
    train_seconds: Mapped[float] = mapped_column(Float)
    device: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict] = mapped_column(JSON)
    """The checkpoint's whole sidecar: versions, commit, losses, logit statistics, paper numbers."""
    created_at: Mapped[str] = mapped_column(String(32), default=_now)
    evaluations: Mapped[list[Evaluation]] = relationship(back_populates="checkpoint")

    @property
    def admission(self) -> dict | None:
        """The admission checks measured on the model before its first attack
        (bench.science.admission), kept in its meta; None until measured."""
        return (self.meta or {}).get("admission")


class _CellResult:
    """One cell's stored result, the same columns for an attack, a verifier and a transfer;
    read back as bench.store.rows.CellRow."""

    cell_key: Mapped[str] = mapped_column(String(512))
    kind: Mapped[str] = mapped_column(String(16), default=CellKind.ATTACK.value)
    """A bench.core.kinds.CellKind value: what the bits below say."""
    attack: Mapped[str] = mapped_column(String(64))
    params: Mapped[dict] = mapped_column(JSON)
    threat: Mapped[str] = mapped_column(String(32))
    clean_acc: Mapped[float] = mapped_column(Float)
    robust_acc: Mapped[float] = mapped_column(Float)
    n: Mapped[int] = mapped_column(Integer)
    seconds: Mapped[float] = mapped_column(Float)
    correct_bits: Mapped[bytes] = mapped_column(LargeBinary)
    """np.packbits of the per-sample robust correctness, in test-set (or subset) order:
    what the cell left standing (a certify cell's: what it certified, see CellKind)."""
    proven_bits: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """A verifier cell's images proven robust, packed like `correct_bits`; None for an attack."""
    top5_bits: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """Packed like `correct_bits`: the true label still among the five largest logits after
    the cell (and before it); None for a row stored before top-5 was kept, a verifier's,
    and a randomized model's (judged by majority votes of the top-1 label)."""
    indices: Mapped[list | None] = mapped_column(JSON, nullable=True)
    """Test-set indices of a subset cell; None means the whole test set in order."""
    test_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """The size of the test set the cell ran on (or took its subset from)."""
    forward_passes: Mapped[float | None] = mapped_column(Float, nullable=True)
    """The model's forward passes per image of the cell's while it crafted
    (bench.engine.passes); None for a row stored before passes were counted."""
    backward_passes: Mapped[float | None] = mapped_column(Float, nullable=True)
    """Its backward passes per image."""
    extra: Mapped[dict] = mapped_column(JSON, default=dict)
    """What plots need (logit histograms) and what the attack warned about."""
    device: Mapped[str] = mapped_column(String(64), default="cpu")
    created_at: Mapped[str] = mapped_column(String(32), default=_now)


class Evaluation(_CellResult, Base):
    __tablename__ = "evaluations"
    __table_args__ = (UniqueConstraint("checkpoint_id", "cell_key"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    checkpoint: Mapped[Checkpoint] = relationship(back_populates="evaluations")


class Transfer(_CellResult, Base):
    __tablename__ = "transfers"
    __table_args__ = (UniqueConstraint("source_id", "target_id", "cell_key"),)
    kind: Mapped[str] = mapped_column(String(16), default=CellKind.TRANSFER.value)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)


class Claim(Base):
    """A driver's lease on one piece of work (a training, a cell): see bench.store.claims."""

    __tablename__ = "claims"
    key: Mapped[str] = mapped_column(String(640), primary_key=True)
    """What is claimed, e.g. `train:<checkpoint key>` or `eval:<checkpoint key>:<cell key>`."""
    owner: Mapped[str] = mapped_column(String(128))
    """host:pid:nonce of the driver holding it."""
    expires_at: Mapped[float] = mapped_column(Float)
    """Unix time after which any driver may take the claim over (renewed while working)."""


class Flag(Base):
    __tablename__ = "flags"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(String(1024))
    numbers: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[str] = mapped_column(String(32), default=_now)

    def threat(self, own: str) -> str:
        """The radius it was raised at, `own` being its checkpoint's threat model: a flag
        raised at another radius names it in its numbers (bench.science.flags)."""
        return (self.numbers or {}).get("threat") or own


class Diagnostic(Base):
    """Shafahi et al.'s linearized robustness of one checkpoint on its test set
    (bench.science.diagnostics): derived once from the weights, so one row per checkpoint."""

    __tablename__ = "diagnostics"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[int] = mapped_column(ForeignKey("checkpoints.id"), unique=True, index=True)
    eps: Mapped[float] = mapped_column(Float)
    """The threat eps the predicted accuracy is taken at."""
    n: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict] = mapped_column(JSON)
    """Medians, means, quartiles, predicted and clean accuracy, logit variance."""
    samples: Mapped[dict] = mapped_column(JSON)
    """Per-sample lists in test-set order: logit_gap, grad_gap, eps_l, coherence,
    grad_norm_true, grad_norm_adv, correct, and the clean logits."""
    landscape: Mapped[dict] = mapped_column(JSON)
    """Cross-entropy grids around the first test images (adversarial x random direction)."""
    seconds: Mapped[float] = mapped_column(Float)
    created_at: Mapped[str] = mapped_column(String(32), default=_now)


class Store:
    def __init__(self, url: str):
        self.url = url
        try:
            self.engine = create_engine(url)
            if url.startswith("sqlite"):
                event.listen(self.engine, "connect", _sqlite_pragmas)
            _create_schema(self.engine)
        except ImportError as exc:  # the URL names a database driver that is not installed
            raise BenchError(
                f"cannot open the store at {url!r}: its database driver ({exc.name or exc}) is not "
                'installed; for PostgreSQL install the postgres extra (pip install -e ".[postgres]") '
                "and give --db postgresql+psycopg://USER@HOST/DBNAME"
            ) from exc
        except (SQLAlchemyError, ValueError, TypeError) as exc:
            raise BenchError(
                f"cannot open the store at {url!r}: {(str(exc).splitlines() or [type(exc).__name__])[0]}; "
                "check --db (an SQLAlchemy URL such as sqlite:///results/bench.db or "
                "postgresql+psycopg://USER@HOST/DBNAME) or that the results folder is writable"
            ) from exc
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def for_results(cls, results: Path, db: str | None = None) -> Store:
        if db:
            return cls(db)
        return cls(f"sqlite:///{(results / 'bench.db').resolve()}")

    # --- checkpoints -------------------------------------------------------------------
    def checkpoint(self, key: str) -> Checkpoint | None:
        with self.Session() as s:
            return s.scalar(select(Checkpoint).where(Checkpoint.key == key))

    def add_checkpoint(self, **fields: Any) -> Checkpoint:
        """Record a checkpoint, or keep the row another driver recorded first; the stored row."""
        self.insert_new(Checkpoint, fields, ["key"])
        row = self.checkpoint(fields["key"])
        if row is None:  # written or kept a moment ago: only a store emptied meanwhile lacks it
            raise BenchError(
                f"checkpoint {fields['key'][:8]} vanished from the store {self.url!r} as it was "
                "recorded; was the database reset by another process?"
            )
        return row

    def set_meta(self, checkpoint_id: int, meta: dict) -> None:
        """Replace a checkpoint's meta (derived measurements such as admission checks)."""
        with self.Session.begin() as s:
            row = s.get(Checkpoint, checkpoint_id)
            if row is None:
                raise BenchError(f"no checkpoint with id {checkpoint_id} in the store {self.url!r}")
            row.meta = dict(meta)

    def update_meta(self, row: Checkpoint, **fields: Any) -> None:
        """Add or replace `fields` in a checkpoint's meta, in the store and on `row`; each
        must be a key bench.store.meta.CheckpointMeta declares."""
        unknown = sorted(set(fields) - META_KEYS)
        if unknown:
            raise TypeError(f"undeclared checkpoint meta key(s) {unknown}: declare them in bench.store.meta")
        meta = dict(row.meta or {}, **fields)
        self.set_meta(row.id, meta)
        row.meta = meta

    def checkpoints(self, dataset: str | None = None, defense: str | None = None) -> list[Checkpoint]:
        q = select(Checkpoint).order_by(Checkpoint.id)
        if dataset:
            q = q.where(Checkpoint.dataset == dataset)
        if defense:
            q = q.where(Checkpoint.defense == defense)
        with self.Session() as s:
            return list(s.scalars(q))

    # --- cells -------------------------------------------------------------------------
    def done_cells(self, checkpoint_id: int) -> set[str]:
        with self.Session() as s:
            return set(s.scalars(select(Evaluation.cell_key).where(Evaluation.checkpoint_id == checkpoint_id)))

    def add_evaluation(self, checkpoint_id: int, **fields: Any) -> bool:
        """Store one cell's result; False (and nothing written) if the row exists already."""
        return self.insert_new(Evaluation, dict(fields, checkpoint_id=checkpoint_id), ["checkpoint_id", "cell_key"])

    def evaluations(self, checkpoint_ids: Iterable[int] | None = None) -> list[CellRow]:
        """The checkpoints' own cells (all of them, unset), in the order they were stored."""
        q = cell_query(Evaluation, transfer=False)
        if checkpoint_ids is not None:
            q = q.where(Evaluation.checkpoint_id.in_(list(checkpoint_ids)))
        with self.Session() as s:
            return [CellRow(*row) for row in s.execute(q)]

    def done_transfers(self, source_id: int, cell_key: str) -> set[int]:
        with self.Session() as s:
            return set(
                s.scalars(
                    select(Transfer.target_id).where(Transfer.source_id == source_id, Transfer.cell_key == cell_key)
                )
            )

    def add_transfer(self, source_id: int, target_id: int, **fields: Any) -> bool:
        """Store one transfer result; False (and nothing written) if the row exists already."""
        return self.insert_new(
            Transfer, dict(fields, source_id=source_id, target_id=target_id), ["source_id", "target_id", "cell_key"]
        )

    def transfers(self, checkpoint_ids: Iterable[int] | None = None) -> list[CellRow]:
        """Transfer cells onto or from the checkpoints (all of them, unset)."""
        q = cell_query(Transfer, transfer=True)
        if checkpoint_ids is not None:
            ids = list(checkpoint_ids)
            q = q.where(Transfer.target_id.in_(ids) | Transfer.source_id.in_(ids))
        with self.Session() as s:
            return [CellRow(*row) for row in s.execute(q)]

    # --- idempotent writes ---------------------------------------------------------------
    def insert_new(self, model: type[Base], values: dict, unique: list[str]) -> bool:
        """INSERT ... ON CONFLICT (unique) DO NOTHING: two drivers writing the same row
        leave one row and no error. True if this call wrote it."""
        # The dialect's own INSERT (SQLite, PostgreSQL) has ON CONFLICT DO NOTHING.
        stmt = _DIALECT_INSERT.get(self.engine.dialect.name, sa_insert)(model).values(**values)
        with self.Session.begin() as s:
            if hasattr(stmt, "on_conflict_do_nothing"):
                # RETURNING the key tells whether a row went in (rowcount is not reliable
                # for an INSERT that returns rows, which PostgreSQL's dialect adds).
                stmt = stmt.on_conflict_do_nothing(index_elements=unique)
                return s.execute(stmt.returning(*sa_inspect(model).primary_key)).first() is not None
            try:  # other databases: the unique constraint still guards; losing is not an error
                with s.begin_nested():
                    s.execute(stmt)
                return True
            except IntegrityError:
                return False

    # --- flags -------------------------------------------------------------------------
    def replace_flags(self, checkpoint_id: int, flags: list[dict]) -> None:
        """Flags are derived data: recomputed from the cells, replaced in one transaction."""
        with self.Session.begin() as s:
            # Lock the checkpoint's row first (PostgreSQL; SQLite has one writer anyway), so
            # two drivers replacing flags at once queue instead of both inserting theirs.
            s.execute(select(Checkpoint.id).where(Checkpoint.id == checkpoint_id).with_for_update())
            s.execute(delete(Flag).where(Flag.checkpoint_id == checkpoint_id))
            for f in flags:
                s.add(Flag(checkpoint_id=checkpoint_id, **f))

    def flags(self, checkpoint_ids: Iterable[int] | None = None) -> list[Flag]:
        q = select(Flag).order_by(Flag.id)
        if checkpoint_ids is not None:
            q = q.where(Flag.checkpoint_id.in_(list(checkpoint_ids)))
        with self.Session() as s:
            return list(s.scalars(q))

    # --- diagnostics -------------------------------------------------------------------
    def diagnostics(self, checkpoint_ids: Iterable[int] | None = None) -> list[Diagnostic]:
        q = select(Diagnostic).order_by(Diagnostic.checkpoint_id)
        if checkpoint_ids is not None:
            q = q.where(Diagnostic.checkpoint_id.in_(list(checkpoint_ids)))
        with self.Session() as s:
            return list(s.scalars(q))

    def add_diagnostic(self, checkpoint_id: int, **fields: Any) -> bool:
        """Insert once: a row another driver committed first is the same derived data."""
        return self.insert_new(Diagnostic, {"checkpoint_id": checkpoint_id, **fields}, ["checkpoint_id"])


def _create_schema(engine) -> None:
    """Create missing tables, one driver at a time: two drivers opening a new store at
    once would otherwise both see a table missing and the second CREATE would fail."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # held until this transaction ends
            conn.execute(text("SELECT pg_advisory_xact_lock(7364021)"))
        elif engine.dialect.name == "sqlite":  # take the write lock now (waits busy_timeout)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        Base.metadata.create_all(conn)
        upgrade(conn)


_DIALECT_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL keeps readers (bench site, bench results) working while a run commits cells,
    # and a busy timeout waits out a concurrent writer instead of failing at once.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
