"""/metrics: the service's metrics in Prometheus' text format, for the admin key or DPO_METRICS_TOKEN."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentCaller
from service.db.engine import read_with_retry
from service.db.teams import hash_key
from service.errors import Forbidden

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}})
async def metrics(request: Request, caller: CurrentCaller) -> Response:
    """Jobs, queues, workers, job and step durations, request latencies (docs/api.md, Metrics)."""
    if not (caller.admin or _is_metrics_token(request, caller.key)):
        # Tell a team key (403) from a wrong one (401): Caller.principal raises 401 for the latter.
        await run_in_threadpool(read_with_retry, request.app.state.reads, caller.principal)
        raise Forbidden("GET /metrics needs the admin key or the metrics token (DPO_METRICS_TOKEN); team keys "
                        "cannot read it")
    # The service's numbers are read from the database as the registry is collected: in a thread.
    body = await run_in_threadpool(generate_latest, request.app.state.metrics.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _is_metrics_token(request: Request, key: str) -> bool:
    token = request.app.state.settings.metrics_token
    # As digests, like the admin key (service.auth.authenticate): the timing tells nothing of the token.
    return token is not None and hmac.compare_digest(hash_key(key), hash_key(token.get_secret_value()))
