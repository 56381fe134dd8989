"""The Celery app both sides share: the API sends tasks by name with it, the worker adds its tasks to it.

Building it imports no task module, so the API never loads worker/ (nor torch through it).
Only job ids travel through the broker; everything else is read from the database.
"""
from __future__ import annotations

import warnings

from celery import Celery
from kombu.utils.url import url_to_parts

from api.settings import REDIS_VISIBILITY_TIMEOUT_S, Settings

RUN_JOB_TASK = "worker.tasks.run_job"

# kombu's SQLAlchemy transport (the embedded broker) still uses a loader option SQLAlchemy 2.1
# deprecates; the warning is kombu's to fix and says nothing about this service.
warnings.filterwarnings("ignore", message="The ``noload`` loader strategy", category=DeprecationWarning)


def transport_options(broker_url: str) -> dict:
    scheme = url_to_parts(broker_url).scheme or ""
    if scheme in ("redis", "rediss", "sentinel"):
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    if scheme.startswith(("sqla+", "sqlalchemy+")):
        # kombu passes these straight to create_engine: wait on SQLite's lock instead of failing.
        return {"connect_args": {"timeout": 30}}
    return {}


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for hours-long jobs, one per GPU."""
    app = Celery("dpo", broker=settings.broker, set_as_current=False)
    app.conf.update(
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
    return app


def enqueue_job(app: Celery, job_id: str, queue: str) -> None:
    """Hand a job to the worker listening on `queue`. Only its id goes through the broker."""
    declare_queue(app, queue)
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)


def declare_queue(app: Celery, name: str, attempts: int = 5) -> None:
    """Create queue `name` on the embedded (SQLAlchemy) broker before any process uses it.

    kombu's SQLAlchemy transport inserts a queue's row on first use, guarded by an in-process lock only:
    a worker starting to consume its queue and the API dispatching to it can both insert the row, and
    the loser fails with IntegrityError (a worker would die at start-up), and its session is left
    unusable. On a new broker database the same goes for kombu's tables, which it creates on first use
    by checking, then creating: the loser gets OperationalError ("table already exists"). So both
    declare the queue first, each on a fresh connection, and a lost race is retried there, where the
    row and tables are then found. A queue this app has declared is not
    declared again (the row stays), so a dispatch opens no extra connection. Other brokers need nothing.
    """
    scheme = url_to_parts(app.conf.broker_url).scheme or ""
    declared = app.__dict__.setdefault("_dpo_declared_queues", set())
    if not scheme.startswith(("sqla+", "sqlalchemy+")) or name in declared:
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
