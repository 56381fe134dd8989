"""BodyLimit: an ASGI middleware that refuses a request body over its limit with 413 while it arrives,
so an oversized upload never fills the disk (Starlette spools multipart files to disk before a route
sees them) nor the memory. A Content-Length over the limit is refused before a byte is read; a body
without one is counted as it streams in, and refused once it passes the limit.

Uploads (`POST /v1/files`) may be as large as DPO_MAX_UPLOAD_BYTES plus room for the multipart
envelope; every other request as large as DPO_MAX_REQUEST_BYTES.
"""
from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.settings import Settings

MULTIPART_ROOM = 64 * 1024  # boundaries, part headers and the purpose field around the file


class _TooLarge(Exception):
    pass


class BodyLimit:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    def limit(self, scope: Scope) -> tuple[int, str]:
        """(bytes allowed, what the error says) for this request."""
        if scope["method"] == "POST" and scope["path"].rstrip("/") == "/v1/files":
            return (self.settings.max_upload_bytes + MULTIPART_ROOM,
                    f"an upload over {self.settings.max_upload_bytes} bytes (DPO_MAX_UPLOAD_BYTES)")
        return self.settings.max_request_bytes, f"a request body over {self.settings.max_request_bytes} bytes " \
                                                "(DPO_MAX_REQUEST_BYTES)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit, what = self.limit(scope)
        if _content_length(scope) > limit:
            await _refuse(send, what)
            return
        state = {"seen": 0, "over": False, "started": False}

        async def counted() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    raise _TooLarge
            return message

        async def guarded(message: Message) -> None:
            if state["over"] and not state["started"]:
                return  # whatever the app made of the cut-off body: the answer is 413
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, guarded)
        except Exception:
            if not state["over"] or state["started"]:
                raise
        if state["over"] and not state["started"]:
            await _refuse(send, what)


def _content_length(scope: Scope) -> int:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


async def _refuse(send: Send, what: str) -> None:
    error = {"message": f"refused {what}; nothing was stored", "type": "invalid_request_error", "param": None,
             "code": "file_too_large" if "upload" in what else "request_too_large"}
    body = json.dumps({"error": error}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class InFlightLimit:
    """At most `settings.api_threads` requests in the app at once; the rest wait their turn, holding nothing.

    Sync routes and their database sessions run on a pool of `api_threads` threads, and a session gives
    its connection back only when its dependency exits, which needs a thread too. Without a cap, a burst
    of requests fills every thread with requests waiting for a connection while the connections are held
    by finished requests waiting for a thread to close their session in: the API stalls (e.g. 200
    clients polling back to back). With the cap, every request in the app can get a thread and a connection.

    An event stream (text/event-stream) gives its turn back once its response starts: it then holds no
    thread and no connection (api.streams), and may stay open for hours.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.size = app, settings.api_threads
        self._slots: dict[int, object] = {}  # per event loop: a semaphore belongs to the loop it waits on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        import asyncio

        loop = id(asyncio.get_running_loop())
        slots = self._slots.setdefault(loop, asyncio.Semaphore(self.size))
        held = True

        async def streaming(message: Message) -> None:
            nonlocal held
            if held and message["type"] == "http.response.start" and _is_event_stream(message):
                held = False
                slots.release()
            await send(message)

        await slots.acquire()
        try:
            await self.app(scope, receive, streaming)
        finally:
            if held:
                slots.release()


def _is_event_stream(start: Message) -> bool:
    return any(name == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in start.get("headers", []))
