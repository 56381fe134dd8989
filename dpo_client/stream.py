"""A job's live events: GET /v1/fine_tuning/jobs/{id}/events?stream=true (Server-Sent Events).

The stream sends the job's events after a cursor, then new ones as they happen, and ends after the job's
final event. A dropped connection (a restarted API, a proxy's timeout, a network blip) is picked up again
with backoff, resuming after the last event received (Last-Event-ID), so no event is lost or repeated.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator

import httpx
from httpx_sse import EventSource, SSEError

from dpo_client.api import Api
from dpo_client.errors import ClientError

TERMINAL = ("succeeded", "failed", "cancelled")
# The server sends a keep-alive comment every DPO_STREAM_HEARTBEAT_S (15 s by default); a connection
# silent for much longer than that is dead, even if TCP has not noticed.
READ_TIMEOUT_S = 60.0
BACKOFF_S = (0.5, 10.0)
POLL_S = 1.0  # first and longest wait between reconnections


def follow_events(api: Api, job_id: str, after: str | None = None,
                  on_retry: Callable[[Exception, float], None] | None = None) -> Iterator[dict]:
    """Yield the job's events after event `after` (None: from its first), oldest first, as they happen,
    until its final one. `on_retry(error, wait_s)` is told of each lost connection before the wait."""
    last, wait = after, BACKOFF_S[0]
    while True:
        try:
            for event in _read(api, job_id, last):
                last, wait = event["id"], BACKOFF_S[0]
                yield event
            # The server ends the stream after a finished job's last event; a stream that ends while
            # the job still runs was cut (an API shutting down), so it is taken up again.
            if api.get(f"/v1/fine_tuning/jobs/{job_id}")["status"] in TERMINAL:
                return
        except (httpx.TransportError, SSEError, ClientError) as err:
            if isinstance(err, ClientError) and not _transient(err):
                raise
            if on_retry:
                on_retry(err, wait)
        time.sleep(wait)
        wait = min(wait * 2, BACKOFF_S[1])


def _transient(err: ClientError) -> bool:
    """Worth trying again: no answer at all, or a server-side error (a restart, a database failover)."""
    return err.status is None or err.status >= 500


def _read(api: Api, job_id: str, after: str | None) -> Iterator[dict]:
    headers = {"Accept": "text/event-stream", "Cache-Control": "no-store"}
    if after:
        headers["Last-Event-ID"] = after
    timeout = httpx.Timeout(READ_TIMEOUT_S, connect=10.0)
    with api.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                    headers=headers, timeout=timeout) as response:
        streams = response.headers.get("content-type", "").startswith("text/event-stream")
        if streams:
            for sse in EventSource(response).iter_sse():
                if sse.data:
                    yield json.loads(sse.data)
            return
    yield from _poll(api, job_id, after)


def _poll(api: Api, job_id: str, after: str | None) -> Iterator[dict]:
    """For a service without event streams (it answers the list instead): page the list forward once a
    second until the job has ended."""
    path = f"/v1/fine_tuning/jobs/{job_id}/events"
    while True:
        # The status first: an event written before a final status was read is listed below.
        ended = api.get(f"/v1/fine_tuning/jobs/{job_id}")["status"] in TERMINAL
        more = True
        while more:
            page = api.get(path, order="asc", limit=100, after=after)
            for event in page["data"]:
                after = event["id"]
                yield event
            more = page["has_more"] and page["data"]
        if ended:
            return
        time.sleep(POLL_S)
