"""`python -m worker [--data-dir D]`: run one Celery worker process (what `dpo-service worker` starts).

It joins the pool (registers its name, GPU type and count; see worker.membership), sends heartbeats
from a thread while it runs, listens on its own queue, and marks itself stopped when it shuts down.
Its jobs run in its own scratch directory (worker.scratch), locked while it lives.
On SIGTERM the job it runs checkpoints at its next step and goes back to the queue (a hand-back), so
another worker resumes it there.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from service.broker import declare_queue
from service.db.migrate import upgrade
from service.errors import Conflict
from service.settings import settings_for_command
from worker.app import create_worker_app, worker_argv
from worker.membership import Membership, identity
from worker.scratch import Scratch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dpo-service worker", description="Run one job worker (one GPU).")
    parser.add_argument("--data-dir", help="default: $DPO_DATA_DIR or ./.dpo-data")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # keep the worker log readable
    settings = settings_for_command("dpo-service worker", data_dir=args.data_dir)
    if settings is None:
        return 2
    logging.basicConfig(level=args.loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)  # harmless when the API already did it: migrations run under a lock
    membership = Membership(settings, identity(settings))
    scratch = Scratch(settings.worker_scratch_dir, membership.me.name)
    # From here on a SIGTERM, wherever start-up is, exits through `leave` (which copes with a heartbeat
    # thread interrupted as it starts), so the pool shows the worker stopped, not lost. Without the
    # handler, SIGTERM's default action would end the worker with its row unmarked.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        try:
            membership.join()
            scratch.claim()
        except Conflict as err:
            print(f"dpo-service worker: {err.message}", file=sys.stderr)
            return 2
        app = create_worker_app(settings, membership.worker_id, scratch.path)
        declare_queue(app, membership.queue)  # before Celery consumes it (see service.broker.declare_queue)
        membership.start_heartbeats()
        _drain_on_shutdown(membership)
        _hold_sigterm_until_celery_listens()
        app.worker_main(worker_argv(settings, membership.queue, args.loglevel))
    finally:
        membership.leave()
        scratch.close()
    return 0


def _drain_on_shutdown(membership: Membership) -> None:
    """On Celery's warm shutdown (SIGTERM, Ctrl-C) the running job checkpoints at its next step and goes
    back to the queue; Celery then waits for it to return, and the worker leaves the pool."""
    from celery.signals import worker_shutting_down

    @worker_shutting_down.connect(weak=False)
    def _shutting_down(**_):
        membership.drain()


def _hold_sigterm_until_celery_listens() -> None:
    """Celery turns SIGTERM into a warm shutdown once it is up; one that comes while it starts would be
    lost in its start-up code, so it is kept and sent again when the worker is ready."""
    from celery.signals import worker_ready

    requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: requested.set())

    @worker_ready.connect(weak=False)
    def _ready(**_):
        if requested.is_set():
            os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
