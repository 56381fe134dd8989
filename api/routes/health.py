"""/healthz (the process answers) and /readyz (the database and the broker answer)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

router = APIRouter(tags=["health"])
RETRY_AFTER_S = 5  # what a 503 from /readyz tells a client (a load balancer) to wait before it asks again


@router.get("/healthz")
def healthz() -> dict:
    """Alive."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(request: Request) -> JSONResponse:
    """Ready to take jobs: 200 when the database and the broker both answer, else 503 naming which not."""
    checks = {"database": _check_database(request), "broker": _check_broker(request)}
    ok = all(v == "ok" for v in checks.values())
    headers = None if ok else {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503,
                        headers=headers)


def _check_database(request: Request) -> str:
    try:
        with request.app.state.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as err:  # noqa: BLE001 - any failure means "not ready"; report its kind
        return f"error: {type(err).__name__}"


def _check_broker(request: Request) -> str:
    app, queue = request.app.state.celery, request.app.state.settings.queue
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            # Declaring the queue talks to the broker on every transport (the worker declares it too).
            conn.default_channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        return "ok"
    except Exception as err:  # noqa: BLE001
        return f"error: {type(err).__name__}"
