"""The worker's Celery app: the queue contract's configuration (service.broker) plus the task module."""
from __future__ import annotations

import os
import socket
from pathlib import Path

from celery import Celery

from service.broker import celery_config
from service.settings import Settings


def create_worker_app(settings: Settings, worker_id: str, scratch_dir: Path | None = None) -> Celery:
    app = Celery("dpo", broker=settings.broker, set_as_current=False)
    app.conf.update(celery_config(settings))
    # The task reads its settings, identity and scratch directory (worker.scratch) from its app, not globals.
    app.dpo_settings = settings
    app.dpo_worker_id = worker_id
    app.dpo_scratch_dir = scratch_dir
    app.conf.include = ["worker.tasks"]
    app.conf.worker_pool = "worker.process_pool:TaskPool"  # prefork, quicker to replace a finished job's process
    import worker.tasks  # noqa: F401  - registers run_job (a shared task) with this app

    return app


def worker_argv(settings: Settings, queue: str, loglevel: str = "INFO") -> list[str]:
    """Command-line arguments for `app.worker_main`: one job at a time, on this worker's own queue."""
    return [
        "worker",
        f"--loglevel={loglevel}",
        "--queues", queue,
        "--concurrency", "1",
        "--hostname", f"dpo-{os.getpid()}@{socket.gethostname()}",
        # Cluster chatter this service does not use (and the embedded broker cannot fan out).
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
