"""Claims: leases on work, so that drivers sharing one store never compute a thing twice.

Before a driver trains a checkpoint or runs a cell it claims the work's key in the
store's `claims` table (an INSERT that only one driver can win, or the take-over of a
claim whose lease has run out). While it works, a background thread renews its leases;
when the result is committed, the claim is deleted. A second driver that finds the work
claimed waits for the result and reads it. A driver that dies stops renewing, so its
claims expire after the lease and another driver takes the work over; a dead driver on
the same host is noticed at once (its process is gone), so a rerun after `kill -9`
resumes without waiting out the lease.

Lease times are wall-clock (Unix) seconds of the driver's host: drivers on several
machines need clocks that agree to well within the lease (NTP does).
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from sqlalchemy import delete, select, update

from bench.store.db import Claim, Store

LEASE_SECONDS = 60.0
"""How long a claim lives without renewal; renewed every third of it while working."""
POLL_SECONDS = 0.5
"""How often a driver waiting for another's work looks again."""

T = TypeVar("T")


# The keys of the work a driver claims, built here alone: two drivers agree on a key only
# if they spell it alike, and a claim held under one spelling guards nothing against another.
def train_claim(checkpoint_key: str) -> str:
    """The claim on training one checkpoint."""
    return f"train:{checkpoint_key}"


def eval_claim(checkpoint_key: str, cell_key: str) -> str:
    """The claim on running one cell on one checkpoint."""
    return f"eval:{checkpoint_key}:{cell_key}"


def craft_claim(source_key: str, cell_key: str) -> str:
    """The claim on crafting one cell's transfer examples on one source checkpoint."""
    return f"craft:{source_key}:{cell_key}"


def new_owner() -> str:
    """host:pid:nonce, unique to one driver (the nonce tells apart two Claims in one process)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _dead_here(owner: str) -> bool:
    """The owner ran on this host and its process is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class Claims:
    """One driver's claims on a store, renewed in the background while it is open.

    Use as a context manager: on exit the renewing stops and every claim still held is
    released (the work it guarded is either committed or given up).
    """

    def __init__(self, store: Store, lease: float = LEASE_SECONDS, owner: str | None = None):
        self.store = store
        self.lease = lease
        self.owner = owner or new_owner()
        self.held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Claims:
        self._thread = threading.Thread(target=self._renew_loop, name="bench-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for key in list(self.held):
            self.release(key)

    def acquire(self, key: str) -> bool:
        """Claim `key` for this driver: True if it is now ours, False if another holds it."""
        now = time.time()
        until = now + self.lease
        won = self.store.insert_new(Claim, {"key": key, "owner": self.owner, "expires_at": until}, ["key"])
        if not won:
            with self.store.Session.begin() as s:
                holder = s.scalar(select(Claim.owner).where(Claim.key == key))
                if holder is None:  # released between our insert and this read: try again
                    return self.acquire(key)
                if holder == self.owner:
                    return True
                # Take over an expired lease, or the claim of a driver that died on this host;
                # the WHERE makes it a compare-and-swap, so of two drivers only one wins.
                where = [Claim.key == key, Claim.owner == holder]
                if not _dead_here(holder):
                    where.append(Claim.expires_at < now)
                # RETURNING says whether the row changed (as the store's inserts ask it).
                won = (
                    s.execute(
                        update(Claim).where(*where).values(owner=self.owner, expires_at=until).returning(Claim.key)
                    ).first()
                    is not None
                )
        if won:
            self.held.add(key)
        return won

    def release(self, key: str) -> None:
        with self.store.Session.begin() as s:
            s.execute(delete(Claim).where(Claim.key == key, Claim.owner == self.owner))
        self.held.discard(key)

    def renew(self) -> None:
        if self.held:
            with self.store.Session.begin() as s:
                s.execute(update(Claim).where(Claim.owner == self.owner).values(expires_at=time.time() + self.lease))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease / 3):
            self.renew()


def claimed(
    items: Iterable[T], claims: Claims, key: Callable[[T], str], done: Callable[[T], bool], poll: float = POLL_SECONDS
) -> Iterator[T | None]:
    """The items this driver should compute, each yielded once its claim is held.

    An item already done is skipped; one another driver holds is tried again later, until
    it is done (the other driver committed it) or claimable (the other driver died). While
    only such items remain, None is yielded after each `poll` seconds (executors take None
    as "nothing to start yet; collect results and ask again"). The caller releases the
    claim of each item yielded once its result is committed.
    """
    pending = list(items)
    while pending:
        waiting = []
        for item in pending:
            if done(item):
                continue
            if not claims.acquire(key(item)):
                waiting.append(item)
            elif done(item):  # committed by the other driver between our check and our claim
                claims.release(key(item))
            else:
                yield item
        pending = waiting
        if pending:
            time.sleep(poll)
            yield None
