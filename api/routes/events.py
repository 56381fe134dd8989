"""/v1/fine_tuning/jobs/{id}/events: status changes, warnings, errors and metrics of one job."""
from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from sqlalchemy import select

from api.deps import CurrentCaller, read_job
from api.errors import InvalidInput
from api.pagination import After, Limit, page
from api.schemas.common import ListPublic
from api.schemas.jobs import EventPublic
from api.store.models import Event

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/events", tags=["fine-tuning jobs"])


@router.get("", response_model=ListPublic[EventPublic])
async def list_events(fine_tuning_job_id: str, request: Request, caller: CurrentCaller, after: After = None,
                      limit: Limit = 20, order: Literal["desc", "asc"] = "desc") -> ListPublic[EventPublic]:
    """A job's events, newest first; `order=asc` (our extension) pages forward, to follow a running job."""
    return await read_job(request, caller, fine_tuning_job_id, _list_events, after, limit, order == "desc")


def _list_events(session, _principal, job, after: str | None, limit: int,
                 descending: bool) -> ListPublic[EventPublic]:
    anchor = (_seq(after),) if after else None
    stmt = select(Event).where(Event.job_id == job.id)
    rows = page(session, stmt, (Event.seq,), anchor, limit, descending=descending)
    return ListPublic[EventPublic].page([EventPublic.of(e) for e in rows], limit)


def _seq(event_id: str) -> int:
    prefix, _, number = event_id.partition("-")
    if prefix != "ftevent" or not number.isdigit():
        raise InvalidInput(f"{event_id!r} is not an event id (ftevent-<number>)", param="after")
    return int(number)
