"""LeaseKeeper: renews a run's lease on its job from a daemon thread in the job's own process (the one
that trains), so the lease lives exactly as long as the run does: a job process killed with its
worker stops renewing, and the reconciler takes the job back once the lease runs out.

Every write of the run goes through its keeper (`write`, `write_now`), in a transaction that first
checks and extends the lease. The keeper fences the run from its own side: when a renewal finds the
lease gone (another run owns the job, or it was cancelled), or when it could not renew for a whole
lease period (the database is unreachable, so the reconciler may be giving the job away), the run
counts as lost, writes nothing more, and stops at its next step.

A database that cannot answer for a while (a restart, a failover: service.db.engine.UNAVAILABLE) is ridden
out: the run trains on, its writes are held in the order it made them, and tried again with backoff.
Once the database answers they are written together, in that order, in one transaction under the
lease; a run that lost its lease meanwhile writes none of them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

from service.db import leases
from service.db.engine import is_unavailable
from service.db.leases import Lease
from service.errors import LeaseLost

log = logging.getLogger("dpo.worker")
T = TypeVar("T")
Write = Callable[[Session], None]
FIRST_RETRY_S = 0.2  # the first retry after a failed write; each next one waits twice as long


class LeaseKeeper:
    def __init__(self, sessions: sessionmaker[Session], lease: Lease, lease_s: float, interval_s: float):
        self.sessions, self.lease, self.lease_s, self.interval_s = sessions, lease, lease_s, interval_s
        self._renewed = time.monotonic()  # when the last successful renewal began
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held: list[Write] = []  # writes the database could not take yet, oldest first
        self._retry = Backoff(FIRST_RETRY_S, interval_s)

    @property
    def lost(self) -> bool:
        if not self._lost.is_set() and time.monotonic() - self._renewed > self.lease_s:
            log.warning("job %s: the lease could not be renewed for %.0fs; this run stops", self.lease.job_id,
                        self.lease_s)
            self._lost.set()
        return self._lost.is_set()

    def hold(self, session: Session) -> None:
        """In a transaction about to write for this run: check the lease and extend it (LeaseLost if gone)."""
        if self.lost:
            raise LeaseLost(f"job {self.lease.job_id}: this run lost its lease")
        began = time.monotonic()
        try:
            leases.hold(session, self.lease, self.lease_s)
        except LeaseLost:
            self._lost.set()
            raise
        self._renewed = max(self._renewed, began)

    def write(self, fn: Write) -> None:
        """Write `fn(session)` for this run, after every write held before it, under the lease. While the
        database cannot answer, the write is held (see the module's docstring) and this returns at once.
        LeaseLost when the run lost its job: nothing held is written then. From one thread only."""
        self._held.append(fn)
        if self._retry.due():
            self._flush()

    def write_now(self, fn: Write) -> None:
        """As `write`, but return only once it is written: tried again with backoff while the database
        cannot answer, until it is written or the lease is lost (LeaseLost). For a run's final status."""
        self._held.append(fn)
        self.drain()

    def drain(self) -> None:
        """Return once every held write is written (LeaseLost if the lease is lost first)."""
        while not self._flush():
            self._retry.wait()

    def read(self, fn: Callable[[Session], T]) -> T:
        """`fn(session)`, tried again with backoff while the database cannot answer; LeaseLost once the
        lease is lost meanwhile."""
        try:
            return retrying(lambda: _in_session(self.sessions, fn), give_up=lambda: self.lost,
                            max_delay_s=self.interval_s, what=f"job {self.lease.job_id}")
        except Exception as err:
            if is_unavailable(err) and self.lost:
                raise LeaseLost(f"job {self.lease.job_id}: this run lost its lease") from err
            raise

    def _flush(self) -> bool:
        """Write everything held, in one transaction; False (all still held) when the database cannot answer."""
        if not self._held:
            return True
        try:
            with self.sessions.begin() as s:
                self.hold(s)
                for fn in self._held:
                    fn(s)
        except Exception as err:
            if not is_unavailable(err):
                raise
            if not self._retry.failures:
                log.warning("job %s: the database cannot be reached (%s); training goes on, its writes are "
                            "held and tried again", self.lease.job_id, type(err).__name__)
            self._retry.failed()
            return False
        if self._retry.failures:
            log.warning("job %s: the database answers again; wrote the %d writes held meanwhile",
                        self.lease.job_id, len(self._held))
        self._held.clear()
        self._retry.reset()
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dpo-lease", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s) and not self._lost.is_set():
            try:
                with self.sessions.begin() as s:
                    self.hold(s)
            except LeaseLost:
                log.warning("job %s: another run owns the job now (or it ended); this run stops", self.lease.job_id)
                return
            except Exception as err:  # noqa: BLE001 - try again; `lost` says when it is too late
                if not is_unavailable(err):
                    log.exception("job %s: renewing the lease failed; trying again in %.1fs", self.lease.job_id,
                                  self.interval_s)
                else:
                    log.warning("job %s: renewing the lease failed (%s); trying again in %.1fs", self.lease.job_id,
                                type(err).__name__, self.interval_s)


def retrying(fn: Callable[[], T], give_up: Callable[[], bool], max_delay_s: float, what: str) -> T:
    """`fn()`, tried again with backoff while the database cannot answer, until `give_up()` says to stop
    trying (the database's last error is raised then)."""
    backoff = Backoff(FIRST_RETRY_S, max_delay_s)
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_unavailable(err) or give_up():
                raise
            backoff.failed()
            log.warning("%s: the database cannot be reached (%s); trying again in %.1fs", what, type(err).__name__,
                        backoff.next_s)
        backoff.wait()


def _in_session(sessions: sessionmaker[Session], fn: Callable[[Session], T]) -> T:
    with sessions() as s:
        return fn(s)


class Backoff:
    """When to try again after failures: `first_s`, then twice as long each time, up to `max_s`."""

    def __init__(self, first_s: float, max_s: float):
        self.first_s, self.max_s = first_s, max_s
        self.failures, self._at = 0, 0.0

    @property
    def next_s(self) -> float:
        return min(self.first_s * 2 ** max(self.failures - 1, 0), self.max_s)

    def failed(self) -> None:
        self.failures += 1
        self._at = time.monotonic() + self.next_s

    def reset(self) -> None:
        self.failures, self._at = 0, 0.0

    def due(self) -> bool:
        return time.monotonic() >= self._at

    def wait(self) -> None:
        time.sleep(max(0.0, self._at - time.monotonic()))
