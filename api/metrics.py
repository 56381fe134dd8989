"""The app's Prometheus registry: the service's metrics read from the database at scrape time
(service.metrics), and request latency histograms this process measures (`RequestTimer`).

A request is labelled by its route's path template (`/v1/fine_tuning/jobs/{fine_tuning_job_id}`),
never by the URL it asked for, so ids do not make a series each; by its method (unknown methods are
`other`) and by the class of its status (`2xx`). Its duration is the time until the response starts
(status and headers sent): for a download or an event stream, how long the client waited for the
first byte, not how long it read.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import ServiceCollector, Snapshot

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"  # no route took the request (a 404, or a body refused before routing)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AppMetrics:
    """One registry per app (so tests may build several apps in one process). Under `dpo-service api
    --workers N`, PROMETHEUS_MULTIPROC_DIR is set (service.cli): each process then writes its request
    histograms to files there, and a scrape of any process reads every process's (prometheus_client's
    multiprocess mode)."""

    def __init__(self, read: Callable[[], Snapshot]):
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(read))
        shared = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if shared:
            MultiProcessCollector(self.registry, path=shared)
        self.requests = Histogram("dpo_http_request_duration_seconds",
                                  "Time from a request's arrival until its response started, by route template, "
                                  "method and status class", ["route", "method", "status"],
                                  buckets=LATENCY_BUCKETS, registry=None if shared else self.registry)


class RequestTimer:
    """ASGI middleware: observe every HTTP request's latency into AppMetrics.requests."""

    def __init__(self, app: ASGIApp, metrics: AppMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        seen: dict = {}

        async def timed(message: Message) -> None:
            if message["type"] == "http.response.start" and not seen:
                seen.update(status=message["status"], seconds=time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            route = route_template(scope)
            method = scope["method"] if scope["method"] in METHODS else "other"
            status = f"{seen.get('status', 500) // 100}xx"
            self.metrics.requests.labels(route, method, status).observe(
                seen.get("seconds", time.perf_counter() - started))


def route_template(scope: Scope) -> str:
    """The path template of the route that took the request, from the scope every layer shares. The
    route's own path lacks the prefixes of the routers it was included in (`/v1`): those are the leading
    segments of the request's path that the template does not account for (no route of this app takes
    a `{name:path}` parameter, whose value could hold slashes)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return UNMATCHED
    if isinstance(route, Mount):
        path = f"{path}/{{path}}"
    asked = scope["path"].rstrip("/").split("/")
    extra = len(asked) - len(path.rstrip("/").split("/"))
    return "/".join(asked[: extra + 1]) + path if extra > 0 else path  # asked[0] is the "" before the first /
