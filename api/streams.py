"""Live event streams (`GET /v1/fine_tuning/jobs/{id}/events?stream=true`, docs/api.md "Streams").

An open stream holds no database connection and no thread: one EventHub per API process reads new events
for every open stream at once and hands each stream its own. The hub wakes when PostgreSQL notifies it
(service.db.jobs.add_event notifies on commit; one listening connection per process, read from the event
loop), or every DPO_STREAM_POLL_S on SQLite; and every SWEEP_S on both, for a notice missed while the
listener was away. Each wake is one short read in a worker thread, whatever the number of streams.

A stream first catches up by itself: it reads its job's events after its cursor a page at a time, each
page once the client has taken the one before; then it goes live on the hub. A client too slow to take
what the hub hands it (BUFFER events waiting) is dropped back to catching up from its own cursor, so a
slow reader costs a page of memory, not the stream of everything it has not read.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator

from fastapi.sse import format_sse_event
from sqlalchemy import Row
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.schemas.jobs import EventPublic
from service.db import events
from service.db.engine import is_unavailable, read_with_retry
from service.db.jobs import is_final
from service.db.models import JobStatus
from service.settings import Settings

log = logging.getLogger("dpo.api.streams")

KEEP_ALIVE = format_sse_event(comment="keep-alive")
PAGE = 200  # events a stream reads at a time while it catches up
BUFFER = 1000  # events the hub lets wait for one client before that client catches up by itself
READ_LIMIT = 2000  # events one wake of the hub reads at most (it reads the rest at once after)
SWEEP_S = 5.0  # every open stream's job is looked at this often, whatever woke the hub
RETRY_S, MAX_RETRY_S = 0.5, 5.0  # waits between reads while the database cannot answer

Message = tuple[str, int, bytes, bool]  # job id, seq, the SSE message, whether it is the job's final event


def message(row: Row) -> Message:
    """An event row as its SSE message: `id` the event's id, `event` its type, `data` its EventPublic JSON."""
    data = EventPublic.of(row).model_dump_json()
    return row.job_id, row.seq, format_sse_event(data_str=data, event=row.type, id=row.id), is_final(row.type, row.data)


class Stream:
    """One open stream: its job, its cursor (the seq of the last event it was given) and what waits to be sent."""

    def __init__(self, job_id: str, cursor: int):
        self.job_id, self.cursor = job_id, cursor
        self.pending: list[bytes] = []
        self.wake = asyncio.Event()  # something to send, or its state changed
        self.taken = asyncio.Event()  # the client took what was pending
        self.live = False  # the hub hands it new events
        self.ended = False  # nothing more comes: send what is pending, then close
        self.final_seen = False

    def add(self, seq: int, data: bytes, final: bool) -> None:
        self.pending.append(data)
        self.cursor, self.final_seen = seq, self.final_seen or final
        self.wake.set()

    def take(self) -> bytes:
        chunk = b"".join(self.pending)
        self.pending.clear()
        self.taken.set()
        return chunk

    def end(self) -> None:
        self.ended = True
        self.wake.set()


class EventHub:
    """The one reader of new events for all of a process's open streams."""

    def __init__(self, reads: sessionmaker[Session], settings: Settings):
        self.reads, self.url, self.poll_s = reads, settings.db_url, settings.stream_poll_s
        self.postgres = make_url(settings.db_url).get_backend_name() == "postgresql"
        self.streams: set[Stream] = set()  # every open stream
        self.live: dict[str, set[Stream]] = {}  # job id -> its live streams
        self.due: set[str] = set()  # jobs with new events to read at the next wake
        self.sweep_due = True
        self.seen: int | None = None  # SQLite: the latest seq of any event its polls have seen
        self.closed = False
        self.wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._outage = False

    async def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._run(), name="event-hub"))
        if self.postgres:
            self._tasks.append(asyncio.create_task(self._listen(), name="event-hub-listener"))

    def close(self) -> None:
        """End every open stream (the server is shutting down) and open no more."""
        self.closed = True
        for stream in list(self.streams):
            stream.end()

    async def stop(self) -> None:
        self.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def open(self, job_id: str, cursor: int) -> Stream:
        stream = Stream(job_id, cursor)
        self.streams.add(stream)
        if self.closed:
            stream.end()
        return stream

    def drop(self, stream: Stream) -> None:
        self.streams.discard(stream)
        self._unlive(stream)

    def go_live(self, stream: Stream) -> None:
        """From now on the hub hands `stream` its job's events after its cursor (read at the next wake)."""
        stream.live = True
        self.live.setdefault(stream.job_id, set()).add(stream)
        self.notice({stream.job_id})

    def notice(self, jobs: set[str]) -> None:
        """These jobs have new events."""
        self.due |= jobs
        self.wake.set()

    def _unlive(self, stream: Stream) -> None:
        stream.live = False
        streams = self.live.get(stream.job_id)
        if streams is not None:
            streams.discard(stream)
            if not streams:
                del self.live[stream.job_id]

    async def catch_up(self, stream: Stream) -> None:
        """Give `stream` its job's events after its cursor, a page at a time as the client takes them;
        then end it (its job has ended) or hand it to the hub."""
        while not self.closed:
            found = await self._retrying(self._page, stream.job_id, stream.cursor)
            status, page = found
            for job_id, seq, data, final in page:
                stream.add(seq, data, final)
            if len(page) < PAGE:
                if stream.final_seen or status is None or JobStatus(status).terminal:
                    stream.end()
                else:
                    self.go_live(stream)
                return
            while stream.pending:
                stream.taken.clear()
                await stream.taken.wait()

    @staticmethod
    def _page(session: Session, job_id: str, cursor: int) -> tuple[str | None, list[Message]]:
        status, rows = events.page_after(session, job_id, cursor, PAGE)
        return status, [message(r) for r in rows]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + SWEEP_S
        while True:
            wait = min(self.poll_s, next_sweep - loop.time()) if not self.postgres else next_sweep - loop.time()
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await self.wake.wait()
            except TimeoutError:
                pass
            self.wake.clear()
            if loop.time() >= next_sweep:
                self.sweep_due, next_sweep = True, loop.time() + SWEEP_S
            try:
                await self._wake_once()
            except Exception:  # a bug must not stop every stream of the process
                log.exception("event streams: reading new events failed")
                await asyncio.sleep(RETRY_S)

    async def _wake_once(self) -> None:
        if not self.live:
            self.due.clear()
            return
        cursors = {job: min(s.cursor for s in streams) for job, streams in self.live.items()}
        due, sweep = self.due & cursors.keys(), self.sweep_due
        self.due, self.sweep_due = set(), False
        try:
            found, more, targets, self.seen = await run_in_threadpool(
                read_with_retry, self.reads, self._read, cursors, due, sweep, self.seen)
        except Exception as err:
            if not is_unavailable(err):
                raise
            self._unavailable(err)
            self.due |= due
            self.sweep_due = True
            await asyncio.sleep(RETRY_S)
            return
        self._available()
        self._deliver(found, cursors)
        if more:
            self.notice(targets)

    def _read(self, session: Session, cursors: dict[str, int], due: set[str], sweep: bool,
              seen: int | None) -> tuple[list[Message], bool, set[str], int | None]:
        """In a worker thread: which of the jobs in `cursors` have new events, and those events."""
        targets = set(due)
        if not self.postgres:
            if seen is None:
                seen, sweep = events.last_seq(session), True
            changed = events.changed_since(session, seen)
            seen = max(changed.values(), default=seen)
            targets |= changed.keys() & cursors.keys()
        if sweep:
            targets |= {job for job, seq in events.latest(session, cursors).items() if seq > cursors[job]}
        if not targets:
            return [], False, targets, seen
        rows, more = events.events_after(session, {job: cursors[job] for job in targets}, READ_LIMIT)
        return [message(r) for r in rows], more, targets, seen

    def _deliver(self, found: list[Message], cursors: dict[str, int]) -> None:
        """Hand each live stream the events after its cursor. A stream that went live during the read, behind
        the cursor its job was read after, gets them at the next wake (its job is due), from its own cursor."""
        ended: set[str] = set()
        for job_id, seq, data, final in found:
            for stream in list(self.live.get(job_id, ())):
                if seq <= stream.cursor or stream.cursor < cursors[job_id]:
                    continue
                if len(stream.pending) >= BUFFER:  # too slow: it catches up from its cursor by itself
                    self._unlive(stream)
                    stream.wake.set()
                    continue
                stream.add(seq, data, final)
            if final:
                ended.add(job_id)
        for job_id in ended:
            for stream in [s for s in self.live.get(job_id, ()) if s.final_seen]:
                self._unlive(stream)
                stream.end()

    async def _retrying(self, fn, *args):
        """`fn(session, *args)` in a worker thread, tried again while the database cannot answer."""
        delay = RETRY_S
        while True:
            try:
                found = await run_in_threadpool(read_with_retry, self.reads, fn, *args)
            except Exception as err:
                if not is_unavailable(err):
                    raise
                self._unavailable(err)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_S)
                continue
            self._available()
            return found

    async def _listen(self) -> None:
        """PostgreSQL: LISTEN on one connection, read when its socket is readable; connect again when it
        is lost (the open streams wait meanwhile, and a sweep reads what was missed)."""
        loop, delay = asyncio.get_running_loop(), RETRY_S
        while True:
            try:
                conn = await run_in_threadpool(events.listen, self.url)
            except ConnectionError as err:
                self._unavailable(err)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_RETRY_S)
                continue
            delay = RETRY_S
            self.sweep_due = True
            self.wake.set()
            try:
                await self._read_notices(loop, conn)
            except ConnectionError as err:
                log.warning("event streams: the listening connection was lost (%s); connecting again", err)
            finally:
                conn.close()

    async def _read_notices(self, loop: asyncio.AbstractEventLoop, conn) -> None:
        readable, fd = asyncio.Event(), conn.fileno()
        loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                jobs = events.notified(conn)
                if jobs:
                    self.notice(jobs)
        finally:
            loop.remove_reader(fd)

    def _unavailable(self, err: Exception) -> None:
        if not self._outage:
            self._outage = True
            log.warning("event streams: the database cannot answer (%s); open streams wait for it",
                        type(err).__name__)

    def _available(self) -> None:
        if self._outage:
            self._outage = False
            log.info("event streams: the database answers again")


async def event_stream(hub: EventHub, stream: Stream, heartbeat_s: float) -> AsyncIterator[bytes]:
    """The body of one stream: its events as SSE messages, a keep-alive comment every `heartbeat_s`, until
    its job's final event (or the server's shutdown). A client that goes away cancels it where it waits."""
    loop = asyncio.get_running_loop()
    beat, catching_up = loop.time() + heartbeat_s, None
    try:
        while True:
            if stream.pending:
                yield stream.take()
                continue
            if stream.ended:
                return
            if not stream.live and (catching_up is None or catching_up.done()):
                if catching_up is not None and catching_up.exception() is not None:
                    raise catching_up.exception()
                catching_up = asyncio.create_task(hub.catch_up(stream))
            if loop.time() >= beat:
                beat = max(beat + heartbeat_s, loop.time())
                yield KEEP_ALIVE
                continue
            stream.wake.clear()
            try:
                async with asyncio.timeout(beat - loop.time()):
                    await stream.wake.wait()
            except TimeoutError:
                pass
    finally:
        if catching_up is not None:
            catching_up.cancel()
        hub.drop(stream)


def end_streams_on_exit(hub: EventHub) -> None:
    """End the open streams when the server is told to stop. uvicorn waits for every open connection to
    close before it shuts the app down, so the app's own shutdown comes too late to end them: chain the
    server's SIGINT/SIGTERM handlers (installed before the app starts; uvicorn restores its own after)."""
    if threading.current_thread() is not threading.main_thread():
        return  # an app served from another thread (a test client): no signals to chain
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(hub.close)
            previous(signum, frame)

        signal.signal(sig, handler)
