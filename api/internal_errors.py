"""InternalErrors: the answer to an exception that nothing turned into an HTTP error (a bug, a corrupt row).

The client gets a 500 whose body holds a short error id and neither a traceback nor a server path; the
service log gets the traceback under that id (api.logs.scrub masks any key in it); and the connection
stays open for the client's next request. Starlette's own last resort (ServerErrorMiddleware) answers and
then re-raises, and uvicorn closes the connection on an exception, so a client's next request on it failed
too. An exception after the response has started can only cut that response short: the middleware then
returns without finishing it, and uvicorn closes the connection, which tells the client it is incomplete.
"""
from __future__ import annotations

import logging
import secrets
import traceback
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.logs import safe_target, scrub

log = logging.getLogger("dpo.api")


def new_error_id() -> str:
    return f"err-{secrets.token_hex(6)}"


class InternalErrors:
    """Outermost middleware of the app (api.main.create_app), so it sees whatever the layers inside raise."""

    def __init__(self, app: ASGIApp, admin_key: Callable[[], str | None]):
        self.app, self.admin_key = app, admin_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as err:  # noqa: BLE001 - the last resort: every exception gets an id and a log entry
            error_id = new_error_id()
            self._log(scope, err, error_id)
            if not started:
                await internal_error_response(error_id)(scope, receive, send)

    def _log(self, scope: Scope, err: Exception, error_id: str) -> None:
        hidden = [self.admin_key() or "", *_credentials(scope)]
        query = scope.get("query_string", b"").decode("latin-1")
        target = safe_target(scope.get("path", "") + (f"?{query}" if query else ""), *hidden)
        trace = scrub("".join(traceback.format_exception(err)), *hidden).rstrip()
        log.error("internal error %s on %s %s\n%s", error_id, scope.get("method"), target, trace)


def internal_error_response(error_id: str) -> JSONResponse:
    message = f"internal error {error_id}: the service failed on this request; its operator finds the cause " \
              "in the service log under this id"
    return JSONResponse({"error": {"message": message, "type": "server_error", "param": None,
                                   "code": "internal_error", "error_id": error_id}}, status_code=500)


def _credentials(scope: Scope) -> list[str]:
    """The Authorization header's value and the credentials in it (the caller's key)."""
    out = []
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            header = value.decode("latin-1")
            out += [header, header.partition(" ")[2].strip()]
    return out
