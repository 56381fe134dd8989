"""/v1/fine_tuning/jobs/{id}/events: status changes, warnings, errors and metrics of one job."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from sqlalchemy import select

from api.deps import CurrentCaller, read_job
from api.pagination import After, Limit, page
from api.schemas.common import ListPublic
from api.schemas.jobs import EventPublic
from service.db.models import Event, is_id
from service.errors import InvalidInput

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/events", tags=["fine-tuning jobs"])


@router.get("", response_model=ListPublic[EventPublic])
async def list_events(fine_tuning_job_id: str, request: Request, caller: CurrentCaller, after: After = None,
                      limit: Limit = 20, order: Literal["desc", "asc"] = "desc") -> ListPublic[EventPublic]:
    """A job's events, newest first; `order=asc` (our extension) pages forward, to follow a running job."""
    return await read_job(request, caller, fine_tuning_job_id, _list_events, after, limit, order == "desc")


def _list_events(session, _principal, job, after: str | None, limit: int,
                 descending: bool) -> ListPublic[EventPublic]:
    anchor = (_seq_of(session, job.id, after),) if after else None
    stmt = select(Event).where(Event.job_id == job.id)
    rows = page(session, stmt, (Event.seq,), anchor, limit, descending=descending)
    return ListPublic[EventPublic].page([EventPublic.of(e) for e in rows], limit)


def _seq_of(session, job_id: str, event_id: str) -> int:
    """Where event `event_id` of this job stands in the order of events; 400 for any other string."""
    seq = session.scalar(select(Event.seq).where(Event.id == event_id, Event.job_id == job_id)) \
        if is_id(event_id, "ftevent") else None
    if seq is None:
        shown = event_id if len(event_id) <= 64 else f"{event_id[:64]}..."
        raise InvalidInput(f"no event {shown!r} of job {job_id} to page after; pass an event id from this "
                           "job's list", param="after")
    return seq
