"""The API's Celery app: it sends a job to a worker's queue by task name (service.broker's contract)
and never imports a task module, so the API loads neither worker/ nor torch."""
from __future__ import annotations

from celery import Celery

from service.broker import RUN_JOB_TASK, celery_config, declare_queue
from service.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("dpo", broker=settings.broker, set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


def enqueue_job(app: Celery, job_id: str, queue: str) -> None:
    """Hand a job to the worker listening on `queue`. Only its id goes through the broker."""
    declare_queue(app, queue)
    app.send_task(RUN_JOB_TASK, args=[job_id], queue=queue)
