"""Service latency against real processes: status polling under 200 clients, listing over 100k jobs
in PostgreSQL, and how soon an idle worker starts a submitted job.

    .venv/bin/python benchmarks/bench_service.py            # the default setting, about three minutes
    .venv/bin/python benchmarks/bench_service.py --quick    # 50 clients, 10k jobs, 10 s of polling

Needs PostgreSQL and Redis, as CI has them (.ci/run): --database-url names a server database this
script may create databases from (it makes one of its own and drops it afterwards), --broker-url a
Redis (a queue of this run's own is used and deleted). It starts `dpo-service api` (uvicorn) and one
`dpo-service worker` as their own processes on loopback with the service's default settings, as an
operator would (tests/service/processes.py starts them), and talks HTTP only, with a new team's key
(as a team's users would; `--as admin` sends the admin key, which needs no lookup).

1. Listing: one tiny job is created and run through the API, then its row is copied 100k times in SQL
   (the API would take an hour to create them), and GET /v1/fine_tuning/jobs is timed one request at a
   time: the first page, and pages deep in the table through the keyset cursor `after`.
2. Polling: N clients, each on its own keep-alive connection, GET /v1/fine_tuning/jobs/{id} of a random
   job every --interval seconds (random phase) for --duration seconds; latency is client-side, from send
   to full body. Then the same clients poll back to back (no pause) for the service's ceiling.
3. Submit -> start: with the worker idle (its previous job ended --settle seconds ago), a tiny job is
   created over HTTP and polled every 20 ms until its status is `running`; then the same again with
   each job submitted the moment the previous one ended.
The client runs on the same cores as the server, so its own work is in the figures.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import secrets
import ssl
import sys
import tempfile
import time
from pathlib import Path

import httpx
import machine  # benchmarks/ is on sys.path when run as a script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.service.processes import TERMINAL, WORKER, new_service  # noqa: E402  (after the path above)
from tests.service.support import fresh_postgres  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary(ms: list[float]) -> str:
    return (f"n={len(ms)}  p50 {pct(ms, 50):.1f} ms  p95 {pct(ms, 95):.1f} ms  p99 {pct(ms, 99):.1f} ms  "
            f"max {max(ms):.1f} ms")


# ---------------------------------------------------------------- the jobs table


def clone_jobs(db_url: str, template_id: str, n: int) -> list[str]:
    """Copy the row of job `template_id` n times, each a finished job one second older than the next,
    with ids in the service's format; return every job id, oldest first.

    Copying a row the API wrote keeps this independent of the jobs table's columns, which grow."""
    from sqlalchemy import MetaData, Table, create_engine, text

    engine = create_engine(db_url)
    jobs = Table("jobs", MetaData(), autoload_with=engine)
    cols = ", ".join(f'"{c.name}"' for c in jobs.columns if c.name not in ("id", "created_at", "status"))
    start_s = int(time.time()) - n - 3600  # all older than the template
    sql = text(f"""
        INSERT INTO jobs (id, created_at, status, {cols})
        SELECT 'ftjob-' || lpad(to_hex((:start + g) * 1000::bigint), 12, '0') || substr(md5(g::text), 1, 12),
               :start + g, (ARRAY['succeeded', 'succeeded', 'failed', 'cancelled'])[1 + g % 4], {cols}
        FROM jobs, generate_series(0, :n - 1) AS g WHERE jobs.id = :template""")
    with engine.begin() as conn:
        conn.execute(sql, {"start": start_s, "n": n, "template": template_id})
        conn.execute(text("ANALYZE jobs"))
        ids = list(conn.scalars(text("SELECT id FROM jobs ORDER BY created_at, id")))
    engine.dispose()
    return ids


# ---------------------------------------------------------------- the measurements


def bench_listing(client: httpx.Client, ids: list[str], requests: int) -> dict[str, list[float]]:
    """Sequential list requests: the newest page, and pages after a random job (deep keyset pages)."""
    cases = {
        "retrieve one job (status), for reference": lambda: client.get(f"/v1/fine_tuning/jobs/{random.choice(ids)}"),
        "first page, limit 20": lambda: client.get("/v1/fine_tuning/jobs", params={"limit": 20}),
        "first page, limit 100": lambda: client.get("/v1/fine_tuning/jobs", params={"limit": 100}),
        "page after a random job, limit 20": lambda: client.get(
            "/v1/fine_tuning/jobs", params={"limit": 20, "after": random.choice(ids)}),
        "oldest page (after the 21st oldest job)": lambda: client.get(
            "/v1/fine_tuning/jobs", params={"limit": 20, "after": ids[20]}),
    }
    out = {}
    for name, call in cases.items():
        call()  # warm the connection and the query plan
        times = []
        for _ in range(requests):
            t = time.perf_counter()
            r = call()
            times.append((time.perf_counter() - t) * 1000)
            if r.status_code != 200:
                raise SystemExit(f"listing failed: {r.status_code} {r.text[:200]}")
        out[name] = times
    return out


async def _poller(client: httpx.AsyncClient, ids: list[str], interval: float, until: float, out: list, errors: list):
    """One client: poll a random job's status until `until`, every `interval` s (0: back to back).
    The client was opened by the warm-up; bench_polling closes it."""
    if interval:
        await asyncio.sleep(random.uniform(0, interval))
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            r = await client.get(f"/v1/fine_tuning/jobs/{random.choice(ids)}")
            (out if r.status_code == 200 else errors).append((time.perf_counter() - started) * 1000)
        except httpx.HTTPError:
            errors.append((time.perf_counter() - started) * 1000)
        if interval:
            await asyncio.sleep(max(0.0, interval - (time.perf_counter() - started)))


async def _warm(client: httpx.AsyncClient, job_id: str) -> None:
    try:
        await client.get(f"/v1/fine_tuning/jobs/{job_id}")
    except httpx.HTTPError:
        pass  # counted in the measurement proper, if it persists


async def bench_polling(url: str, key: str, ids: list[str], clients: int, interval: float, duration: float):
    out, errors = [], []
    headers = {"Authorization": f"Bearer {key}"}
    # One client (one keep-alive connection) per simulated user, made up front: building an httpx client
    # costs milliseconds of CPU (its TLS context), which would otherwise stall the loop mid-measurement.
    tls = ssl.create_default_context()
    made = [httpx.AsyncClient(base_url=url, headers=headers, timeout=120, verify=tls,
                              limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
            for _ in range(clients)]
    # Open every connection before the clock starts, ten at a time: 200 requests at once is a burst
    # the back-to-back phase measures on purpose, not something a warm-up should.
    for lo in range(0, clients, 10):
        await asyncio.gather(*(_warm(c, ids[0]) for c in made[lo : lo + 10]))
    # This one process stands in for 200 users: its own garbage collections (hundreds of ms over 200
    # clients' objects) would count as the server's latency, so none run while the clock does.
    gc.collect()
    gc.disable()
    until = time.perf_counter() + duration
    started = time.perf_counter()
    try:
        await asyncio.gather(*(_poller(c, ids, interval, until, out, errors) for c in made))
    finally:
        gc.enable()
    wall = time.perf_counter() - started
    await asyncio.gather(*(c.aclose() for c in made))
    return out, errors, wall


def make_tiny_job_files(root: Path) -> tuple[str, Path]:
    from dpo_core.toy import build_model, make_synthetic_task

    # Under data_dir/models: the service refuses model paths outside its allowed directories.
    model = build_model(root / "data" / "models" / "tiny-model", seed=0)
    train, _ = make_synthetic_task(root / "task", n_train=64, n_eval=8)
    return model, Path(train)


def upload(client: httpx.Client, train: Path) -> str:
    r = client.post("/v1/files", files={"file": (train.name, train.read_bytes())}, data={"purpose": "fine-tune"})
    if r.status_code != 200:
        raise SystemExit(f"upload failed: {r.status_code} {r.text[:200]}")
    return r.json()["id"]


def bench_submit(client: httpx.Client, model: str, file_id: str, jobs: int, settle_s: float) -> tuple[list[float], str]:
    """POST a tiny job to an idle worker, poll every 20 ms until it runs; wait for its end, and then
    `settle_s` more (the worker is idle), before the next. Returns the latencies and the last job's id."""
    body = {"model": model, "training_file": file_id,
            "training": {"max_steps": 2, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}}
    latencies = []
    for _ in range(jobs):
        time.sleep(settle_s)
        r = client.post("/v1/fine_tuning/jobs", json=body)
        submitted = time.perf_counter()
        if r.status_code != 200:
            raise SystemExit(f"job creation failed: {r.status_code} {r.text[:200]}")
        job_id, status = r.json()["id"], r.json()["status"]
        while status not in ("running", *TERMINAL):
            time.sleep(0.02)
            status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
            if time.perf_counter() - submitted > 120:
                raise SystemExit(f"job {job_id} did not start within 120 s")
        latencies.append((time.perf_counter() - submitted) * 1000)
        while status not in TERMINAL:
            time.sleep(0.2)
            status = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"]
        if status != "succeeded":
            print(f"  note: job {job_id} ended {status}")
    return latencies, job_id


# ---------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--database-url", default=os.environ.get(
        "DPO_TEST_DATABASE_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"))
    p.add_argument("--broker-url", default=os.environ.get("DPO_TEST_BROKER_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--jobs", type=int, default=100_000, help="jobs in the table for the listing test")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between one client's polls")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of paced polling")
    p.add_argument("--list-requests", type=int, default=200)
    p.add_argument("--submits", type=int, default=5)
    p.add_argument("--settle", type=float, default=5.0, help="seconds a worker stays idle before a timed submit")
    p.add_argument("--api-workers", type=int, default=1, help="API processes (dpo-service api --workers)")
    p.add_argument("--as", dest="caller", choices=("team", "admin"), default="team",
                   help="whose key every request carries: a team's (looked up in the database) or the admin's")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs, args.clients, args.duration, args.list_requests, args.submits = 10_000, 50, 10.0, 50, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(machine.describe(with_torch=False), flush=True)
    root = Path(tempfile.mkdtemp(prefix="dpo-bench-service-"))
    queue = f"dpo-bench-{secrets.token_hex(4)}"
    with fresh_postgres(args.database_url) as db_url:
        service = new_service(root, "bench-" + secrets.token_hex(8), tuned=False, extra_env={
            "DPO_DATABASE_URL": db_url, "DPO_BROKER_URL": args.broker_url, "DPO_QUEUE": queue})
        try:
            service.start_api("--workers", str(args.api_workers))
            service.start("worker", WORKER)
            service.wait_ready(timeout_s=90, watch=("api", "worker"))
            print(f"service up at {service.url} ({args.api_workers} API process(es), {args.caller} key); logs in "
                  f"{root}", flush=True)
            print()
            print(run_all(args, service.url, service.key, db_url, root))
        finally:
            service.stop()
            _drop_queue(args.broker_url, queue)


def team_key(url: str, admin_key: str) -> str:
    """A new team's key: teams poll with their own keys, which the API looks up in the database (the
    admin key it compares in memory)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as admin:
        team = admin.post("/v1/admin/teams", json={"name": f"bench-{secrets.token_hex(3)}"})
        if team.status_code != 200:
            raise SystemExit(f"team creation failed: {team.status_code} {team.text[:200]}")
        return admin.post(f"/v1/admin/teams/{team.json()['id']}/keys").json()["key"]


def run_all(args, url: str, key: str, db_url: str, root: Path) -> str:
    model, train = make_tiny_job_files(root)
    if args.caller == "team":
        key = team_key(url, key)
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
        file_id = upload(client, train)
        # The first job also warms the worker up; its latency is reported on its own.
        first, template = bench_submit(client, model, file_id, 1, 0.0)
        t = time.perf_counter()
        ids = clone_jobs(db_url, template, args.jobs)
        print(f"copied job {template} {args.jobs:,} times in {time.perf_counter() - t:.0f} s", flush=True)
        lines = [f"### Listing, {len(ids):,} jobs in PostgreSQL, one request at a time, with the {args.caller} key"]
        for name, ms in bench_listing(client, ids, args.list_requests).items():
            lines.append(f"  {name:<42} {summary(ms)}")
        print("\n".join(lines), flush=True)
        polls = []
        for interval, label in ((args.interval, f"every {args.interval:g} s"), (0.0, "back to back")):
            ok, errors, wall = asyncio.run(bench_polling(url, key, ids, args.clients, interval, args.duration))
            failed = f" (slowest failure {max(errors) / 1000:.1f} s)" if errors else ""
            polls.append(f"  {args.clients} clients, {label:<13} {len(ok) / wall:6.0f} req/s  errors {len(errors)}{failed}  "
                         f"{summary(ok) if ok else 'no successful request'}")
            print(polls[-1], flush=True)
        lines += [f"### Status polling, GET /v1/fine_tuning/jobs/{{id}}, {args.duration:g} s each", *polls]
        submit, _ = bench_submit(client, model, file_id, args.submits, args.settle)
        soon, _ = bench_submit(client, model, file_id, args.submits, 0.0)
        lines += ["### Submit -> running, tiny job",
                  f"  first job after start-up: {first[0]:.0f} ms",
                  f"  worker idle for {args.settle:g} s: {summary(submit)}",
                  f"  submitted the moment the previous job ended: {summary(soon)}"]
    return "\n".join(lines)


def _drop_queue(broker_url: str, queue: str) -> None:
    try:
        import redis

        client = redis.Redis.from_url(broker_url)
        leftovers = [queue, *client.scan_iter(match=f"*{queue}*")]
        client.delete(*leftovers)
    except Exception as err:  # noqa: BLE001 - clean-up is best effort; say what was left
        print(f"could not delete Redis queue {queue}: {err}")


if __name__ == "__main__":
    main()
