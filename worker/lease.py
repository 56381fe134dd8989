"""LeaseKeeper: renews a run's lease on its job from a daemon thread in the job's own process (the one
that trains), so the lease lives exactly as long as the run does: a job process killed with its
worker stops renewing, and the reconciler takes the job back once the lease runs out.

The keeper also fences the run from its own side: when a renewal finds the lease gone (another run
owns the job, or it was cancelled), or when it could not renew for a whole lease period (the database
is unreachable, so the reconciler may be giving the job away), the run counts as lost and stops at its
next step without writing anything more.
"""
from __future__ import annotations

import logging
import threading
import time

from sqlalchemy.orm import Session, sessionmaker

from api.errors import LeaseLost
from api.store import leases
from api.store.leases import Lease

log = logging.getLogger("dpo.worker")


class LeaseKeeper:
    def __init__(self, sessions: sessionmaker[Session], lease: Lease, lease_s: float, interval_s: float):
        self.sessions, self.lease, self.lease_s, self.interval_s = sessions, lease, lease_s, interval_s
        self._renewed = time.monotonic()  # when the last successful renewal began
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
            except Exception:  # noqa: BLE001 - a database hiccup: try again; `lost` says when it is too late
                log.exception("job %s: renewing the lease failed; trying again in %.1fs", self.lease.job_id,
                              self.interval_s)
