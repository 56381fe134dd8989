"""Downloads that resume: one `Range: bytes=...` request header read as RFC 9110 says, and a body
streamed whole (200) or in part (206 with Content-Range). A range past the end is 416, with the
length in Content-Range so the client can ask again; a header this module does not take (another
unit, several ranges, bad syntax) is ignored and the whole body sent, as the RFC allows."""
from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator

from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException

_RANGE = re.compile(r"bytes=(\d*)-(\d*)")

# OpenAPI entries for a route that answers this way (merged into its `responses`).
RESPONSES = {
    206: {"description": "the part of the body a single `Range: bytes=a-b`, `a-` or `-n` asks for, with "
                         "Content-Range"},
    416: {"description": "the range starts past the end; Content-Range: bytes */<length>"},
}


def head_responses(responses: dict) -> dict:
    """The OpenAPI entries of a route's HEAD twin: the same statuses, no body."""
    return {status: {"description": entry.get("description", "as GET answers it, without the body")}
            for status, entry in responses.items()}


class Unsatisfiable(Exception):
    """The range asks for no byte of a body of `size` bytes."""

    def __init__(self, size: int):
        super().__init__(f"bytes */{size}")
        self.size = size


def parse(header: str | None, size: int) -> tuple[int, int] | None:
    """The first and last byte (inclusive) a Range header asks of a body of `size` bytes; None for the
    whole body (no header, or one not taken); Unsatisfiable when it asks for none of them."""
    if not header:
        return None
    found = _RANGE.fullmatch(header.strip().replace(" ", ""))
    if found is None or (not found[1] and not found[2]):
        return None  # another unit, several ranges, or not a range at all
    first, last = found[1], found[2]
    if not first:  # "-n": the last n bytes
        if int(last) == 0 or size == 0:
            raise Unsatisfiable(size)
        return max(0, size - int(last)), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid range: ignored, not refused
    if start >= size:
        raise Unsatisfiable(size)
    return start, min(int(last), size - 1) if last else size - 1


def respond(size: int, read: Callable[[int, int], Iterator[bytes]], range_header: str | None,
            if_range: str | None, media_type: str, headers: dict[str, str], head: bool = False) -> Response:
    """The response for a body of `size` bytes whose bytes `read(start, end)` streams (end inclusive).
    With If-Range the whole body is sent: these bodies carry no validator it could match. The first
    chunk is read here, so a source that cannot be opened raises before the status line is sent.
    `head`: the same status and headers, and no body (nothing is read)."""
    try:
        wanted = None if if_range is not None else parse(range_header, size)
    except Unsatisfiable:
        raise HTTPException(416, f"the range {range_header!r} starts past the end of the {size} bytes",
                            headers={"Content-Range": f"bytes */{size}", "Accept-Ranges": "bytes"}) from None
    headers = {**headers, "Accept-Ranges": "bytes"}
    if head:
        return _head(size, wanted, media_type, headers)
    if wanted is None:
        body = _primed(read(0, size - 1)) if size else iter(())
        return StreamingResponse(body, media_type=media_type, headers={**headers, "Content-Length": str(size)})
    start, end = wanted
    headers.update({"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(end - start + 1)})
    return StreamingResponse(_primed(read(start, end)), status_code=206, media_type=media_type, headers=headers)


def _head(size: int, wanted: tuple[int, int] | None, media_type: str, headers: dict[str, str]) -> Response:
    # Response() would set Content-Length from its empty body: the header is set after, to what GET sends.
    start, end = wanted or (0, size - 1)
    response = Response(status_code=200 if wanted is None else 206, media_type=media_type, headers=headers)
    if wanted is not None:
        response.headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    response.headers["Content-Length"] = str(end - start + 1)
    return response


def _primed(chunks: Iterator[bytes]) -> Iterator[bytes]:
    first = next(chunks, None)
    return itertools.chain(() if first is None else (first,), chunks)
