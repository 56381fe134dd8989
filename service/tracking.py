"""Whether the pool can run a job's training.report_to: the one rule, applied at submission.

Workers say which trackers they can import when they register (Worker.integrations, from
dpo_core.reporting.available). When live workers that could run the job (its gpu_type and gpus, by the
scheduler's own rule) exist and none of them has a tracker it asks for, the job is refused with 400
`report_to_unavailable`. With no such worker alive nothing is known, and the job is taken: a worker
without the package fails it when it starts, with the same code (dpo_core.reporting).
"""
from __future__ import annotations

from sqlalchemy import Integer, String, literal, select
from sqlalchemy.orm import Session

from dpo_core.reporting import unavailable_message
from service.db.models import Worker
from service.db.workers import is_live
from service.dispatch_rules import serves
from service.errors import InvalidInput


def refuse_unavailable_trackers(session: Session, report_to: list[str], gpu_type: str | None, gpus: int,
                                lost_after_s: float, at: float) -> None:
    """InvalidInput `report_to_unavailable` naming the first tracker no live worker that could run the
    job can import; nothing when every one is available somewhere, or nothing is known."""
    if not report_to:
        return
    could_run = serves(Worker.gpu_type, Worker.gpus, literal(gpu_type, String), literal(gpus, Integer))
    known = list(session.scalars(select(Worker.integrations).where(is_live(lost_after_s, at), could_run)))
    if not known or any(integrations is None for integrations in known):  # none alive, or one that did not say
        return
    for name in report_to:
        if not any(name in integrations for integrations in known):
            where = f"on any of the {len(known)} live workers that could run this job"
            raise InvalidInput(unavailable_message(name, where), param="training.report_to",
                               code="report_to_unavailable")
