"""/v1/fine_tuning/jobs/{id}/events: status changes, warnings, errors and metrics of one job, as a list
or (`stream=true`) live, as server-sent events (api.streams)."""
from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, Query, Request
from fastapi.sse import EventSourceResponse
from sqlalchemy import select

from api.deps import CurrentCaller, read_job
from api.pagination import After, Limit, page
from api.schemas.common import ListPublic
from api.schemas.jobs import EventPublic
from api.streams import event_stream
from service.db.models import Event, is_id
from service.errors import InvalidInput

router = APIRouter(prefix="/fine_tuning/jobs/{fine_tuning_job_id}/events", tags=["fine-tuning jobs"])

Stream = Annotated[bool, Query(description="answer text/event-stream: the job's events after the cursor, then "
                                           "new ones as they happen, until the job's final event")]
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", description="with stream=true: resume after this "
                                           "event (an EventSource sends it when it reconnects); wins over `after`")]
STREAM_DOC = {200: {"description": "a page of events; with `stream=true`, server-sent events (docs/api.md, Streams)",
                    "content": {"text/event-stream": {"schema": {"type": "string", "description": (
                        "one message per event: `id: <event id>`, `event: <type>`, `data: <the event as JSON>`; "
                        "a `: keep-alive` comment every DPO_STREAM_HEARTBEAT_S seconds")}}}}}


@router.get("", response_model=ListPublic[EventPublic], responses=STREAM_DOC)
async def list_events(fine_tuning_job_id: str, request: Request, caller: CurrentCaller, after: After = None,
                      limit: Limit = 20, order: Literal["desc", "asc"] = "desc", stream: Stream = False,
                      last_event_id: LastEventId = None):
    """A job's events, newest first; `order=asc` (our extension) pages forward, to follow a running job.
    `stream=true` (our extension) follows it live instead, oldest first (`limit` and `order` do not apply)."""
    if stream:
        cursor, param = (last_event_id, "Last-Event-ID") if last_event_id else (after, "after")
        seq = await read_job(request, caller, fine_tuning_job_id, _cursor, cursor, param)
        hub = request.app.state.event_hub
        body = event_stream(hub, hub.open(fine_tuning_job_id, seq), request.app.state.settings.stream_heartbeat_s)
        return EventSourceResponse(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await read_job(request, caller, fine_tuning_job_id, _list_events, after, limit, order == "desc")


def _cursor(session, _principal, job, event_id: str | None, param: str) -> int:
    """Where a stream of `job` starts: after event `event_id`, or before the job's first event."""
    return _seq_of(session, job.id, event_id, param) if event_id is not None else 0


def _list_events(session, _principal, job, after: str | None, limit: int,
                 descending: bool) -> ListPublic[EventPublic]:
    anchor = (_seq_of(session, job.id, after),) if after else None
    stmt = select(Event).where(Event.job_id == job.id)
    rows = page(session, stmt, (Event.seq,), anchor, limit, descending=descending)
    return ListPublic[EventPublic].page([EventPublic.of(e) for e in rows], limit)


def _seq_of(session, job_id: str, event_id: str, param: str = "after") -> int:
    """Where event `event_id` of this job stands in the order of events; 400 for any other string."""
    seq = session.scalar(select(Event.seq).where(Event.id == event_id, Event.job_id == job_id)) \
        if is_id(event_id, "ftevent") else None
    if seq is None:
        shown = event_id if len(event_id) <= 64 else f"{event_id[:64]}..."
        raise InvalidInput(f"no event {shown!r} of job {job_id} to start after; pass an event id from this "
                           "job's list or stream", param=param)
    return seq
