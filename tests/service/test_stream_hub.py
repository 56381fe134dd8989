"""The event hub behind live streams (api.streams), driven directly on a real database (SQLite, and
PostgreSQL with its notifications): streams at different cursors each get their own events once, in
order; a client that stops reading is dropped back to catching up by itself and loses nothing; a lost
listening connection comes back."""
from __future__ import annotations

import asyncio
import json
from contextlib import nullcontext

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

import api.streams as streams
from api.main import create_app
from api.streams import EventHub, event_stream
from service.db.engine import make_read_engine, make_read_sessionmaker
from service.db.jobs import add_event, cancel
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, sessions_for

GOOD = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def settings(request, tmp_path):
    with fresh_postgres() if request.param == "postgres" else nullcontext() as url:
        yield make_settings(tmp_path / "data", stream_poll_s=0.05, **({"database_url": url} if url else {}))


def make_jobs(settings, n: int) -> list[str]:
    """`n` queued jobs made through the API (its database migrated), each with its created and queued events."""
    with TestClient(create_app(settings), headers=as_key(API_KEY)) as c:
        file_id = c.post("/v1/files", files={"file": ("t.jsonl", GOOD * 4)}, data={"purpose": "fine-tune"}).json()["id"]
        body = {"model": "owner/tiny-model", "training_file": file_id, "training": {"max_length": 64,
                                                                                     "max_prompt_length": 32}}
        return [c.post("/v1/fine_tuning/jobs", json=body).json()["id"] for _ in range(n)]


def write(settings, job_id: str, *messages: str, end: bool = False) -> None:
    with sessions_for(settings).begin() as s:
        for m in messages:
            add_event(s, job_id, m, type="metrics", data={"m": m})
        if end:
            cancel(s, job_id)


def event_ids(settings, job_id: str) -> list[str]:
    with sessions_for(settings)() as s:
        return list(s.scalars(text("SELECT id FROM events WHERE job_id = :j ORDER BY seq"), {"j": job_id}))


def parse(chunks: list[bytes]) -> list[str]:
    """The event ids of SSE messages, in order (comments skipped)."""
    ids = []
    for block in b"".join(chunks).split(b"\n\n"):
        fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if not line.startswith(":"))
        if fields:
            json.loads(fields["data"])
            ids.append(fields["id"])
    return ids


async def collect(hub: EventHub, job_id: str, cursor: int, out: list[bytes]) -> None:
    async for chunk in event_stream(hub, hub.open(job_id, cursor), heartbeat_s=0.2):
        out.append(chunk)


def hub_for(settings) -> EventHub:
    return EventHub(make_read_sessionmaker(make_read_engine(settings.db_url)), settings)


def test_streams_at_different_cursors_each_get_their_events_once(settings):
    jobs = make_jobs(settings, 3)

    async def scenario():
        hub = hub_for(settings)
        await hub.start()
        got = {(job, cursor): [] for job in jobs for cursor in (0, 1)}
        seq_of_first = {job: _seq(settings, event_ids(settings, job)[0]) for job in jobs}
        tasks = [asyncio.create_task(collect(hub, job, seq_of_first[job] if cursor else 0, out))
                 for (job, cursor), out in got.items()]
        for i in range(4):
            for job in jobs:
                await asyncio.to_thread(write, settings, job, f"{job} {i}a", f"{job} {i}b")
            await asyncio.sleep(0.02)
        for job in jobs:
            await asyncio.to_thread(write, settings, job, "last", end=True)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)  # every stream ends after its job's final event
        await hub.stop()
        return got

    got = asyncio.run(scenario())
    for (job, cursor), chunks in got.items():
        assert parse(chunks) == event_ids(settings, job)[cursor:], (job, cursor)


def test_a_client_that_stops_reading_catches_up_by_itself(settings, monkeypatch):
    monkeypatch.setattr(streams, "BUFFER", 3)
    monkeypatch.setattr(streams, "PAGE", 2)
    [job] = make_jobs(settings, 1)

    async def scenario():
        hub = hub_for(settings)
        await hub.start()
        stream = hub.open(job, 0)
        body = event_stream(hub, stream, heartbeat_s=30)
        chunks = [await anext(body)]  # the backlog: created, queued
        while not stream.live:
            await asyncio.sleep(0.01)
        for i in range(12):  # the client reads nothing meanwhile
            await asyncio.to_thread(write, settings, job, f"e{i}")
            await asyncio.sleep(0.03)
        await asyncio.sleep(0.3)
        held, live = len(stream.pending), stream.live
        await asyncio.to_thread(write, settings, job, "last", end=True)
        chunks += [chunk async for chunk in body]
        await hub.stop()
        return chunks, held, live

    chunks, held, live = asyncio.run(scenario())
    assert held <= 3 and not live, "the hub kept handing events to a client that took none"
    assert parse(chunks) == event_ids(settings, job)


@pytest.mark.postgres
def test_the_listener_connects_again_when_its_connection_is_lost(tmp_path, monkeypatch):
    monkeypatch.setattr(streams, "SWEEP_S", 3600.0)  # only a notification wakes the hub
    with fresh_postgres() as url:
        settings = make_settings(tmp_path / "data", database_url=url)
        [job] = make_jobs(settings, 1)

        async def scenario():
            hub = hub_for(settings)
            await hub.start()
            chunks: list[bytes] = []
            task = asyncio.create_task(collect(hub, job, 0, chunks))
            await asyncio.sleep(0.5)
            await asyncio.to_thread(_terminate_listener, settings)
            await asyncio.sleep(1.5)  # it connects again after RETRY_S
            await asyncio.to_thread(write, settings, job, "after the loss", end=True)
            await asyncio.wait_for(task, 15)
            await hub.stop()
            return chunks

        chunks = asyncio.run(scenario())
        assert parse(chunks) == event_ids(settings, job)


def _terminate_listener(settings) -> None:
    with sessions_for(settings).begin() as s:
        killed = s.scalars(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                                "datname = current_database() AND query LIKE 'LISTEN%'")).all()
    assert killed == [True]


def _seq(settings, event_id: str) -> int:
    with sessions_for(settings)() as s:
        return s.scalar(text("SELECT seq FROM events WHERE id = :i"), {"i": event_id})


def test_streams_take_no_turn_of_the_in_flight_cap_and_a_disconnect_closes_them(tmp_path):
    """Through the app (ASGI): with room for one request at a time, three open streams leave that room
    free for the next request; a client's disconnect ends its stream and takes it off the hub."""
    settings = make_settings(tmp_path / "data", api_threads=1)
    [job] = make_jobs(settings, 1)
    app = create_app(settings)

    async def request(path: str, query: bytes, disconnect: asyncio.Event, sent: list[dict]) -> None:
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query,
                 "root_path": "", "headers": [(b"host", b"test"), (b"authorization", f"Bearer {API_KEY}".encode())],
                 "client": ("127.0.0.1", 1), "server": ("test", 80)}
        asked = False

        async def receive():
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        await app(scope, receive, send)

    async def scenario():
        async with app.router.lifespan_context(app):
            hub = app.state.event_hub
            gone = [asyncio.Event() for _ in range(3)]
            sent: list[list[dict]] = [[] for _ in range(4)]
            path = f"/v1/fine_tuning/jobs/{job}/events"
            tasks = [asyncio.create_task(request(path, b"stream=true", gone[i], sent[i])) for i in range(3)]
            while len(hub.live.get(job, ())) < 3:
                await asyncio.sleep(0.01)
            await asyncio.wait_for(request(f"/v1/fine_tuning/jobs/{job}", b"", asyncio.Event(), sent[3]), 10)
            gone[0].set()
            await asyncio.wait_for(tasks[0], 5)
            left = len(hub.streams)
            for event in gone[1:]:
                event.set()
            await asyncio.wait_for(asyncio.gather(*tasks[1:]), 5)
            return sent, left, len(hub.streams), dict(hub.live)

    sent, left, after, live = asyncio.run(scenario())
    assert sent[3][0]["status"] == 200  # answered while three streams were open
    assert all(s[0]["status"] == 200 and (b"content-type", b"text/event-stream; charset=utf-8") in s[0]["headers"]
               for s in sent[:3])
    assert left == 2 and after == 0 and live == {}
