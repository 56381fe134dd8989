"""What `dpo-service api` hands uvicorn, by import path, in each of its processes: the app and the
HTTP/1.1 protocol (httptools' C parser; uvicorn picks uvloop's event loop where it is installed)."""
from __future__ import annotations

import gc
import socket

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.main import create_app
from service.settings import get_settings


def served_app():
    """The app, built from the environment (service.settings); the CLI has migrated the database already."""
    app = create_app(get_settings(), migrate=False)
    # What is built by now (modules, routes, schemas) lives as long as the process: freeze it, so the
    # collector's full passes stop walking it: each such walk pauses every request in flight, and with
    # many clients polling, those pauses show in the status route's tail latency.
    gc.collect()
    gc.freeze()
    return app


class NoDelayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with Nagle's algorithm off on every connection. With --workers,
    uvicorn binds the socket itself without naming TCP as its protocol, so asyncio's own loop leaves
    Nagle on (uvloop sets TCP_NODELAY itself, but is not installed everywhere): a small response then
    goes out as two segments, the second held until the client's delayed ACK, and each sequential
    request waits out that delay.

    httptools, not uvicorn's pure-Python h11: its parser is C, so a status poll costs the API less CPU."""

    def connection_made(self, transport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)
