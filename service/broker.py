"""The queue contract between the API and the workers: the task's name, each worker's own queue, the
options both sides give their Celery app, and the embedded broker's queue declaration.

Imports no Celery: the API (api.queue) and the worker (worker.app) each build their own app from
`celery_config`, so neither imports the other. Only job ids travel through the broker; everything
else is read from the database.
"""
from __future__ import annotations

import warnings
from typing import Any

from service.settings import Settings

RUN_JOB_TASK = "worker.tasks.run_job"
# Redis re-delivers an unacknowledged task after its visibility timeout (default one hour). A job that
# trains for longer would then run twice; 48 hours is above any job we expect.
REDIS_VISIBILITY_TIMEOUT_S = 48 * 3600

# kombu's SQLAlchemy transport (the embedded broker) still uses a loader option SQLAlchemy 2.1
# deprecates; the warning is kombu's to fix and says nothing about this service.
warnings.filterwarnings("ignore", message="The ``noload`` loader strategy", category=DeprecationWarning)


def worker_queue(prefix: str, worker_id: str) -> str:
    """Each worker listens on a queue of its own (`DPO_QUEUE.<worker id>`): the dispatcher, not the
    broker, decides which worker runs a job."""
    return f"{prefix}.{worker_id}"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings for hours-long jobs, one per GPU: what both sides' apps are configured with."""
    return dict(
        task_default_queue=settings.queue,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the job store, not in a result backend
        # Ack a message when a pool process takes it (Celery's early ack; a message received but not yet
        # taken stays unacked either way). The database, not the broker, keeps a job from being lost: a job
        # whose worker dies before starting it is queued again by the reconciler, one whose worker dies
        # while it trains loses its lease. A late ack would only leave a message to ack after the job, on
        # a connection that a broker outage may have replaced.
        task_acks_late=False,
        # A broker outage must not stop a job that trains.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_prefetch_multiplier=1,  # never hold a second job while one trains
        worker_concurrency=1,  # one job per GPU
        worker_max_tasks_per_child=1,  # a fresh process per job returns all GPU memory
        broker_transport_options=transport_options(settings.broker),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,  # model-loading progress bars are not warnings
    )


def transport_options(broker_url: str) -> dict:
    scheme = _scheme(broker_url)
    if scheme in ("redis", "rediss", "sentinel"):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    if _embedded(scheme):
        # kombu passes these straight to create_engine: wait on SQLite's lock instead of failing.
        return {"connect_args": {"timeout": 30}}
    return {}


def declare_queue(app, name: str, attempts: int = 5) -> None:
    """Create queue `name` on the embedded (SQLAlchemy) broker before any process uses it.

    kombu's SQLAlchemy transport inserts a queue's row on first use, guarded by an in-process lock only:
    a worker starting to consume its queue and the API dispatching to it can both insert the row, and
    the loser fails with IntegrityError (a worker would die at start-up), and its session is left
    unusable. On a new broker database the same goes for kombu's tables, which it creates on first use
    by checking, then creating: the loser gets OperationalError ("table already exists"). So both declare the queue first, each on a fresh connection, and a lost race is
    retried there, where the row and tables are then found. A queue this app has declared is not
    declared again (the row stays), so a dispatch opens no extra connection. Other brokers need nothing.
    """
    declared = app.__dict__.setdefault("_dpo_declared_queues", set())
    if not _embedded(_scheme(app.conf.broker_url)) or name in declared:
        return
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(attempts):
        try:
            with app.connection_for_write() as conn:
                conn.default_channel.queue_declare(queue=name)
            declared.add(name)
            return
        except (IntegrityError, OperationalError):
            if attempt == attempts - 1:
                raise


def _scheme(broker_url: str) -> str:
    from kombu.utils.url import url_to_parts

    return url_to_parts(broker_url).scheme or ""


def _embedded(scheme: str) -> bool:
    return scheme.startswith(("sqla+", "sqlalchemy+"))
