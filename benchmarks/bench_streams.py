"""Live event streams at scale: one API process, many open streams, events written as a worker writes them.

    .venv/bin/python benchmarks/bench_streams.py                     # SQLite and PostgreSQL, 500 streams
    .venv/bin/python benchmarks/bench_streams.py --backend sqlite --streams 100 --flow 5

For each backend it starts `dpo-service api` (uvicorn, the service's default settings, on loopback;
tests/service/processes.py starts it as an operator would) with no worker, and creates --jobs queued jobs
over HTTP. This process then holds --streams open streams (`GET .../events?stream=true`, spread evenly
over the jobs) on one asyncio event loop with httpx, each on its own connection. A writer process inserts
metrics events through service.db.jobs.add_event, in a transaction each, as a worker records them, at
--rate events per second spread over the jobs, for --flow seconds, and notes the time of each commit.

It reports the API's RSS before and after the streams open, the API's CPU (share of one core, from
/proc through psutil) while the streams are open and no event comes (--idle seconds) and while events
flow, and the delay from each commit to its arrival at each stream that shows it (the same clock: one
machine). The client and writer share the machine's cores with the API.

PostgreSQL: --database-url names a server database this script may create databases from (it makes one of
its own and drops it afterwards).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import machine  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service.processes import new_service  # noqa: E402  (after the path above)
from tests.service.support import fresh_postgres  # noqa: E402

ROW = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# ---------------------------------------------------------------- the writer (its own process)


def write_events(db_url: str, jobs: list[str], rate: float, duration: float, out: Path) -> None:
    """add_event, one committed transaction per event, at `rate` per second; each event's commit time to `out`."""
    from service.db.engine import make_engine, make_sessionmaker
    from service.db.jobs import add_event

    sessions = make_sessionmaker(make_engine(db_url))
    committed, start, n = [], time.monotonic(), 0
    while time.monotonic() - start < duration:
        job_id = random.choice(jobs)
        with sessions.begin() as s:
            event = add_event(s, job_id, f"Step {n}", type="metrics", data={"step": n})
        committed.append((event.id, job_id, time.time()))
        n += 1
        time.sleep(max(0.0, start + n / rate - time.monotonic()))
    out.write_text(json.dumps(committed))


# ---------------------------------------------------------------- the client (this process)


class Streams:
    """Open streams on one event loop; `arrivals[event id]` lists when each stream that showed it got it."""

    def __init__(self, url: str, key: str):
        self.client = httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=None,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=0))
        self.arrivals: dict[str, list[float]] = {}
        self.opened = 0
        self.failed: list[str] = []

    async def hold(self, job_id: str) -> None:
        try:
            async with self.client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events",
                                          params={"stream": "true"}) as r:
                if r.status_code != 200:
                    self.failed.append(f"{r.status_code} {(await r.aread())[:200]!r}")
                    return
                self.opened += 1
                event_id = None
                async for line in r.aiter_lines():
                    if line.startswith("id: "):
                        event_id = line[4:]
                    elif not line and event_id:
                        self.arrivals.setdefault(event_id, []).append(time.time())
                        event_id = None
        except httpx.HTTPError as err:
            self.failed.append(f"{type(err).__name__}: {err}")


def cpu_share(process, seconds: float) -> float:
    """The process's CPU time over `seconds` of wall time, as a share of one core."""
    before, t = sum(process.cpu_times()[:2]), time.monotonic()
    time.sleep(seconds)
    return (sum(process.cpu_times()[:2]) - before) / (time.monotonic() - t)


async def create_jobs(url: str, key: str, n: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        file_id = (await c.post("/v1/files", files={"file": ("t.jsonl", ROW * 8)},
                                data={"purpose": "fine-tune"})).json()["id"]
        body = {"model": "owner/tiny-model", "training_file": file_id,
                "training": {"max_length": 64, "max_prompt_length": 32}}
        gate = asyncio.Semaphore(8)

        async def one() -> str:
            async with gate:
                r = await c.post("/v1/fine_tuning/jobs", json=body)
                r.raise_for_status()
                return r.json()["id"]

        return list(await asyncio.gather(*(one() for _ in range(n))))


async def measure(args, url: str, key: str, db_url: str, api_pid: int, root: Path) -> list[str]:
    import psutil

    api = psutil.Process(api_pid)
    jobs = await create_jobs(url, key, args.jobs)
    await asyncio.sleep(1)
    rss_before = api.memory_info().rss
    streams = Streams(url, key)
    tasks = [asyncio.create_task(streams.hold(jobs[i % len(jobs)])) for i in range(args.streams)]
    deadline = time.monotonic() + 120
    while streams.opened + len(streams.failed) < args.streams and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    await asyncio.sleep(2)  # each stream's backlog (its job's created and queued events)
    rss_after = api.memory_info().rss
    idle = await asyncio.to_thread(cpu_share, api, args.idle)
    out = root / "committed.json"
    writer = subprocess.Popen([sys.executable, __file__, "--write", db_url, json.dumps(jobs), str(args.rate),
                               str(args.flow), str(out)], env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    flowing = await asyncio.to_thread(cpu_share, api, args.flow)
    await asyncio.to_thread(writer.wait, 60)
    await asyncio.sleep(2)  # the last events' arrival
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await streams.client.aclose()
    committed = json.loads(out.read_text())
    per_job = args.streams / len(jobs)
    watching = Counter(jobs[i % len(jobs)] for i in range(args.streams))
    delays = [(t - at) * 1000 for event_id, _, at in committed for t in streams.arrivals.get(event_id, [])]
    missing = sum(watching[job] for _, job, _ in committed) - len(delays)
    return [
        f"  streams open: {streams.opened} of {args.streams} over {len(jobs)} jobs; failed {len(streams.failed)}"
        + (f" (first: {streams.failed[0]})" if streams.failed else ""),
        f"  API RSS: {rss_before / 2**20:.0f} MiB before, {rss_after / 2**20:.0f} MiB with the streams open "
        f"(+{(rss_after - rss_before) / 2**10 / max(1, streams.opened):.0f} KiB a stream)",
        f"  API CPU, streams open, no events: {idle * 100:.1f}% of a core over {args.idle:g} s",
        f"  API CPU, {args.rate:g} events/s for {args.flow:g} s ({args.rate * per_job:g} messages/s out): "
        f"{flowing * 100:.1f}% of a core",
        f"  commit -> client: {len(delays)} messages ({missing:.0f} missing), p50 {pct(delays, 50):.1f} ms, "
        f"p99 {pct(delays, 99):.1f} ms, max {max(delays):.1f} ms" if delays else "  commit -> client: no message",
    ]


def run_backend(args, backend: str) -> None:
    root = Path(tempfile.mkdtemp(prefix=f"dpo-bench-streams-{backend}-"))
    with fresh_postgres(args.database_url) if backend == "postgres" else contextlib.nullcontext() as url:
        env = {"DPO_DATABASE_URL": url} if url else {}
        service = new_service(root, "bench-" + secrets.token_hex(8), tuned=False, extra_env=env)
        try:
            service.start_api()
            service.wait_ready(timeout_s=90)
            db_url = url or f"sqlite:///{service.data_dir / 'dpo.sqlite'}"
            lines = asyncio.run(measure(args, service.url, service.key, db_url, service.procs["api"].pid, root))
        finally:
            service.stop()
    print(f"### {backend}: {args.streams} streams, one API process", *lines, sep="\n", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--database-url", default=os.environ.get(
        "DPO_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--streams", type=int, default=500)
    p.add_argument("--jobs", type=int, default=500, help="jobs the streams are spread over")
    p.add_argument("--rate", type=float, default=50.0, help="events written per second")
    p.add_argument("--idle", type=float, default=10.0, help="seconds of CPU measured with no event coming")
    p.add_argument("--flow", type=float, default=20.0, help="seconds events are written for")
    args = p.parse_args(argv)
    print(machine.describe(with_torch=False), flush=True)
    for backend in ("sqlite", "postgres") if args.backend == "both" else (args.backend,):
        run_backend(args, backend)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        _, _, db, jobs, rate, flow, out = sys.argv
        write_events(db, json.loads(jobs), float(rate), float(flow), Path(out))
    else:
        main()
