"""The FastAPI app: `create_app(settings)`; run it with `dpo-service api`. `uvicorn --factory
api.main:create_app` (or another ASGI server) serves it too, migrating at start-up, but without what
`dpo-service api` adds for latency: a frozen heap and httptools' parser (api.server)."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deps import get_caller
from api.dispatcher import Dispatcher
from api.internal_errors import InternalErrors
from api.limits import BodyLimit, InFlightLimit
from api.logs import install_access_log_filter
from api.metrics import AppMetrics, RequestTimer
from api.openapi import openapi_with_errors
from api.queue import make_celery
from api.routes import (
    checkpoints,
    dashboard,
    events,
    files,
    health,
    jobs,
    metrics,
    pool,
    samples,
    sweep,
    teams,
    usage,
    webhooks,
)
from api.streams import EventHub, end_streams_on_exit
from service import errors
from service.artifacts import make_storage
from service.auth import admin_key
from service.db.engine import (
    UNAVAILABLE,
    make_engine,
    make_read_engine,
    make_read_sessionmaker,
    make_sessionmaker,
    read_with_retry,
)
from service.db.migrate import upgrade
from service.metrics import read_snapshot
from service.requests import PRINTABLE
from service.settings import Settings, get_settings
from service.sweep import Sweeper
from service.webhook_delivery import WebhookSender

log = logging.getLogger("dpo.api")

# Domain error -> (HTTP status, OpenAI error type). The only place errors become HTTP.
HTTP_ERRORS: dict[type[errors.ServiceError], tuple[int, str]] = {
    errors.InvalidInput: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "invalid_request_error"),
    errors.Forbidden: (403, "invalid_request_error"),
    errors.NotFound: (404, "invalid_request_error"),
    errors.Conflict: (409, "invalid_request_error"),
    errors.TooLarge: (413, "invalid_request_error"),
    errors.QuotaExceeded: (429, "insufficient_quota"),  # OpenAI's type for a quota, not a rate, limit
    errors.Unavailable: (503, "server_error"),
    errors.StorageFailed: (503, "server_error"),
}
# The database cannot answer now (down, restarting, unreachable; service.db.engine.UNAVAILABLE): every route
# answers 503 `database_unavailable` with Retry-After, and the connection stays open. The pools connect
# anew once it is back (pool_pre_ping, service.db.engine.read_with_retry).
DATABASE_RETRY_AFTER_S = 5


def _api_engines(settings: Settings) -> tuple[Engine, Engine]:
    """The API's engines, for writes and for reads. Either may need a connection for each request the
    app lets in at once (api.limits.InFlightLimit), the writer a few more for the dispatcher; a short
    checkout timeout makes an overload answer instead of hang. The writer keeps only 8 connections open
    between requests (writes are rare next to polls), so a process holds about as many as it did with
    one engine: a PostgreSQL server allows 100 by default, across every API process and worker."""
    import anyio.to_thread

    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    if settings.db_url.endswith(":memory:") or settings.db_url in ("sqlite://", "sqlite:///"):
        engine = make_engine(settings.db_url)  # one shared in-memory database: readers must share it too
        return engine, engine.execution_options(isolation_level="AUTOCOMMIT")
    writers, kept = settings.api_threads + 4, min(8, settings.api_threads + 4)
    return (make_engine(settings.db_url, pool_size=kept, max_overflow=writers - kept, pool_timeout=10),
            make_read_engine(settings.db_url, pool_size=settings.api_threads, max_overflow=0, pool_timeout=10))


def create_app(settings: Settings | None = None, migrate: bool = True) -> FastAPI:
    """Build the app. With `migrate`, the database is brought to the newest schema at start-up."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        app.state.storage = make_storage(settings)  # a bad DPO_STORAGE_URL stops the start here, named
        if migrate:
            upgrade(settings.db_url)
        engine, read_engine = _api_engines(settings)
        app.state.settings, app.state.engine = settings, engine
        app.state.sessionmaker = make_sessionmaker(engine)
        app.state.reads = make_read_sessionmaker(read_engine)
        app.state.celery = make_celery(settings)
        app.state.admin_key, _ = admin_key(settings)
        install_access_log_filter(app.state.admin_key)
        app.state.dispatcher = Dispatcher(app.state.sessionmaker, settings, app.state.celery)
        if settings.dispatcher:
            app.state.dispatcher.start()
        app.state.webhooks = WebhookSender(app.state.sessionmaker, settings)
        if settings.webhook_delivery:
            app.state.webhooks.start()
        app.state.sweeper = Sweeper(app.state.sessionmaker, app.state.storage, settings)
        if settings.sweep:
            app.state.sweeper.start()
        app.state.event_hub = EventHub(app.state.reads, settings)
        await app.state.event_hub.start()
        end_streams_on_exit(app.state.event_hub)
        yield
        await app.state.event_hub.stop()
        app.state.webhooks.stop()
        app.state.sweeper.stop()
        app.state.dispatcher.stop()
        engine.dispose()
        read_engine.dispose()

    app = FastAPI(
        title="dpo-service",
        version="0.1.0",
        description="Direct Preference Optimization as a service, shaped like the OpenAI fine-tuning API.",
        lifespan=lifespan,
    )
    # Every /v1 route needs a key. Checking a team key takes the database: each route does that itself,
    # through CurrentPrincipal or (the polled routes, in the same thread hop as their reads) api.deps.read
    # or api.deps.read_job.
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(get_caller)])
    for module in (files, jobs, events, checkpoints, samples, pool, usage, teams, webhooks, sweep):
        v1.include_router(module.router)
    app.include_router(v1)
    app.include_router(health.router)
    dashboard.install(app)
    app.include_router(metrics.router)
    app.state.metrics = AppMetrics(lambda: read_with_retry(app.state.reads, read_snapshot, app.state.settings))
    _install_error_handlers(app)
    _install_database_handler(app)
    app.add_middleware(BodyLimit, settings=settings)
    app.add_middleware(InFlightLimit, settings=settings)
    # Outside the limits: a request's latency includes its wait for a turn.
    app.add_middleware(RequestTimer, metrics=app.state.metrics)
    # Added last: the outermost layer, so an exception from any layer inside gets its 500 and error id.
    app.add_middleware(InternalErrors, admin_key=lambda: getattr(app.state, "admin_key", None))
    app.openapi = lambda: openapi_with_errors(app)
    return app


def _error(status: int, type_: str, message: str, param=None, code=None, **extra) -> JSONResponse:
    body = {"message": message, "type": type_, "param": param, "code": code, **extra}
    return JSONResponse({"error": body}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.ServiceError)
    async def service_error(_: Request, err: errors.ServiceError) -> JSONResponse:
        found = next((v for k, v in HTTP_ERRORS.items() if isinstance(err, k)), None)
        if found is None:  # not meant for a client (LeaseLost): an internal error (api.internal_errors)
            raise err
        status, type_ = found
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        response = _error(status, type_, err.message, err.param, err.code, **err.extra)
        response.headers.update(headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        problems: dict[str | None, list[str]] = {}
        for e in err.errors():  # a union gives one error per member: merge them per parameter
            if e["type"] == "json_invalid":  # its location is a byte offset, not a parameter
                detail = (e.get("ctx") or {}).get("error", "")
                return _error(400, "invalid_request_error", f"the body is not valid JSON: {detail} at byte "
                              f"{e['loc'][-1]}", None, "invalid_json")
            problems.setdefault(_param(e["loc"]), []).append(_message(e))
        message = "; ".join(f"{p}: {' or '.join(m)}" if p else " or ".join(m) for p, m in problems.items())
        return _error(400, "invalid_request_error", message, next(iter(problems), None), "invalid_value",
                      problems=[{"param": p, "message": " or ".join(m)} for p, m in problems.items()])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        response = _error(err.status_code, "invalid_request_error", str(err.detail),
                          code=_HTTP_CODES.get(err.status_code))
        response.headers.update(err.headers or {})  # a 416's Content-Range
        return response



def _install_database_handler(app: FastAPI) -> None:
    async def database_unavailable(_: Request, err: Exception) -> JSONResponse:
        cause = str(getattr(err, "orig", None) or type(err).__name__).strip().splitlines()
        log.warning("database unavailable (%s: %s); answered 503", type(err).__name__, cause[0] if cause else "")
        response = _error(503, "server_error", "the database cannot be reached just now; try again in "
                          f"{DATABASE_RETRY_AFTER_S} seconds", code="database_unavailable")
        response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_S)
        return response

    for error in UNAVAILABLE:  # handled here, not by the catch-all for Exception: no 500, no dropped connection
        app.add_exception_handler(error, database_unavailable)


_TYPE_TAGS = {"float", "int", "str", "bool", "dict", "list", "none", "json-or-python", "constrained-float",
              "constrained-int"}
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "invalid_value", 416: "range_not_satisfiable"}


def _message(e: dict) -> str:
    if e["type"] == "string_pattern_mismatch" and (e.get("ctx") or {}).get("pattern") == PRINTABLE:
        return "must not hold control characters"
    if tuple(e["loc"]) == ("body",):
        return "the request needs a JSON body" if e["type"] == "missing" else "the body must be a JSON object"
    return e["msg"].removeprefix("Value error, ")


def _param(loc) -> str | None:
    # FastAPI locations start with where the value came from: ("body", "method", "type"), ("query", "limit");
    # union members add a type tag ("float", "literal['auto']") that is no parameter name.
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("body", "query", "path", "header", "form") else []
    return ".".join(p for p in parts if p not in _TYPE_TAGS and "[" not in p) or None
