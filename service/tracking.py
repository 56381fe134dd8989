"""Whether the pool can run a job's training.report_to: the one rule, applied at submission.

Workers say which trackers they can import when they register (Worker.integrations, from
dpo_core.reporting.available). When live workers that could run the job (its gpu_type and gpus) exist
and none of them can serve it by the scheduler's own rule (service.dispatch_rules.serves: every tracker
it asks for among the worker's integrations, a worker that did not say counting as able), the job is
refused with 400 `report_to_unavailable`: the scheduler would never give it to any of them. With no
such worker alive nothing is known, and the job is taken: it waits until a worker that can serve it
joins, and a worker that did not say but lacks the package fails it when it starts, with the same code
(dpo_core.reporting).
"""
from __future__ import annotations

from sqlalchemy import Integer, String, exists, literal, select
from sqlalchemy.orm import Session

from dpo_core.reporting import TRACKING_EXTRA, unavailable_message
from service.db.models import Worker
from service.db.workers import is_live
from service.dispatch_rules import fits, serves
from service.errors import InvalidInput


def refuse_unavailable_trackers(session: Session, report_to: list[str], gpu_type: str | None, gpus: int,
                                lost_after_s: float, at: float) -> None:
    """InvalidInput `report_to_unavailable` when live workers that could run the job exist and none can
    import every tracker of `report_to`; nothing when one can, or nothing is known."""
    if not report_to:
        return
    job_gpu_type, job_gpus = literal(gpu_type, String), literal(gpus, Integer)
    live = is_live(lost_after_s, at)
    known = list(session.scalars(select(Worker.integrations).where(
        live, fits(Worker.gpu_type, Worker.gpus, job_gpu_type, job_gpus))))
    if not known:
        return
    can = serves(Worker.gpu_type, Worker.gpus, Worker.integrations, job_gpu_type, job_gpus, list(report_to))
    if session.scalar(select(exists().where(live, can))):
        return
    raise InvalidInput(_why(report_to, known), param="training.report_to", code="report_to_unavailable")


def _why(report_to: list[str], known: list[list[str]]) -> str:
    """What to tell: the first tracker none of these workers has, or that none has them all at once."""
    where = f"on any of the {len(known)} live workers that could run this job"
    for name in report_to:
        if not any(name in integrations for integrations in known):
            return unavailable_message(name, where)
    names = ", ".join(report_to)
    return (f"report_to: no live worker that could run this job has all of {names} (each is installed on some of "
            f"the {len(known)}); install them together on a worker ({TRACKING_EXTRA} installs every one), or "
            "remove some from report_to")
