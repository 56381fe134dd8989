"""The dispatcher loop each API process runs: a daemon thread that runs a scheduling pass (the reconciler,
then dispatching) every `dispatch_interval_s`, and at once when woken (a job was created). Every pass
re-reads the database, so the loop keeps no state worth losing and any number of API processes may run
one."""
from __future__ import annotations

import logging
import threading
import time

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from api.queue import enqueue_job
from service.db.engine import is_unavailable
from service.scheduler import Assignment, dispatch_pass
from service.settings import Settings

log = logging.getLogger("dpo.dispatcher")


class Dispatcher:
    def __init__(self, sessions: sessionmaker[Session], settings: Settings, celery: Celery):
        self.sessions, self.settings, self.celery = sessions, settings, celery
        self._wake, self._stop = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._failed_sends, self._send_after = 0, 0.0

    def send(self, assignment: Assignment) -> None:
        """Send a job id to its worker's queue. While the broker is down, dispatching backs off (the
        interval doubling up to 30 intervals), so a long outage leaves a few events per job, not one a pass."""
        try:
            enqueue_job(self.celery, assignment.job_id, assignment.queue)
        except Exception:
            self._failed_sends += 1
            interval = self.settings.dispatch_interval_s
            self._send_after = time.monotonic() + min(interval * 2 ** self._failed_sends, 30 * interval)
            raise
        self._failed_sends = 0

    def run_once(self) -> list[Assignment]:
        dispatch = time.monotonic() >= self._send_after
        return dispatch_pass(self.sessions, self.settings, self.send, dispatch=dispatch)

    def wake(self) -> None:
        """Run a pass soon, without waiting for the interval (a no-op when the loop is off)."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dpo-dispatcher", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        unavailable = False  # the database did not answer the last pass: said once per outage
        while not self._stop.is_set():
            try:
                for a in self.run_once():
                    log.info("dispatched %s to %s", a.job_id, a.worker_name)
                if unavailable:
                    log.warning("the database answers again; dispatching goes on")
                unavailable = False
            except Exception as err:  # noqa: BLE001 - a failed pass is retried next time; the loop never ends
                if not is_unavailable(err):
                    log.exception("dispatch pass failed; retrying in %.1fs", self.settings.dispatch_interval_s)
                elif not unavailable:
                    log.warning("the database cannot be reached (%s); dispatch passes are retried every %.1fs",
                                type(err).__name__, self.settings.dispatch_interval_s)
                    unavailable = True
            self._wake.wait(self.settings.dispatch_interval_s)
            self._wake.clear()
