"""Real service processes for the end-to-end tests: `dpo-service api` (uvicorn) and `dpo-service worker`
(Celery), each its own OS process, on the embedded defaults or on PostgreSQL + Redis; and a Redis
server and a PostgreSQL cluster of a test's own, to stop and start again."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.service.support import MODEL_DIRS, need

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API = ["-m", "service.cli", "api", "--host", "127.0.0.1"]  # `dpo-service api`
WORKER = ["-m", "service.cli", "worker", "--loglevel", "INFO"]  # `dpo-service worker`


@dataclass
class Service:
    url: str
    key: str
    data_dir: Path
    env: dict
    port: int = 0
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

    def upload(self, path: Path) -> str:
        """Upload a preference file (purpose fine-tune) with the service's key; its id."""
        with self.client() as c:
            r = c.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
        assert r.status_code == 200, r.text
        return r.json()["id"]

    def logs(self, chars: int = 4000) -> str:
        out = []
        for name in self.procs:
            path = self.data_dir.parent / f"{name}.log"
            out.append(f"--- {name} log (tail) ---\n{path.read_text(errors='replace')[-chars:] if path.exists() else ''}")
        return "\n".join(out)

    def start(self, name: str, args: list[str], extra_env: dict[str, str] | None = None) -> None:
        log = (self.data_dir.parent / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen([sys.executable, *args], cwd=REPO, env={**self.env, **(extra_env or {})},
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def add_worker(self, name: str, timeout_s: float = 60, **env: str) -> None:
        """Start another worker process named `name` and wait until the pool shows it live: idle, or
        already busy with a job that waited for it (the dispatcher may give it one before a poll sees it
        idle)."""
        self.start(name, WORKER, {"DPO_WORKER_NAME": name, **env})
        self.wait_for_worker(name, ("idle", "busy"), timeout_s)

    def start_api(self, *args: str) -> None:
        """`dpo-service api` on this service's port; `args`: more of its flags (e.g. --workers)."""
        self.start("api", [*API, "--port", str(self.port), *args])

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """`sig` to a process and its children, then wait for it to be gone."""
        self.signal(name, sig)
        self.procs[name].wait(timeout=30)

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to one process (and its children: the worker's job process)."""
        os.killpg(self.procs[name].pid, sig)

    def wait_for_worker(self, name: str, state: str | tuple[str, ...], timeout_s: float = 30) -> dict:
        states = (state,) if isinstance(state, str) else state
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while True:
                workers = {w["name"]: w for w in c.get("/v1/pool").json()["workers"]}
                if name in workers and workers[name]["state"] in states:
                    return workers[name]
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {name} is {workers.get(name)}, not {state}\n{self.logs()}")
                time.sleep(0.2)

    def wait_ready(self, timeout_s: float = 60, watch: tuple[str, ...] = ("api",)) -> None:
        """Until /readyz answers 200; the processes in `watch` must not exit meanwhile."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n in watch if n in self.procs and self.procs[n].poll() is not None]
            assert not dead, f"{dead} exited early\n{self.logs()}"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the service was not ready within {timeout_s}s\n{self.logs()}")

    def stop(self, grace_s: float = 20) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def wait_for_job(self, job_id: str, until=TERMINAL, timeout_s: float = 180, pred=None,
                     stall_s: float | None = None) -> dict:
        """Poll a job until its status is in `until` (or `pred(job)` holds), for up to `timeout_s`.
        With `stall_s` instead: for as long as the job moves on (a new status or step) at least every
        `stall_s` seconds, for a training run whose length depends on how loaded the machine is."""
        deadline, seen = time.monotonic() + timeout_s, None
        with self.client() as c:
            while True:
                job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if (pred(job) if pred else job["status"] in until):
                    return job
                if stall_s is not None and (job["status"], job["progress"]["step"]) != seen:
                    seen, deadline = (job["status"], job["progress"]["step"]), time.monotonic() + stall_s
                if time.monotonic() > deadline:
                    waited = f"{stall_s}s without progress" if stall_s is not None else f"{timeout_s}s"
                    raise AssertionError(f"job {job_id} still {job['status']} after {waited}\n{self.logs()}")
                time.sleep(0.3)


def fast_settings() -> dict[str, str]:
    """What every service a test starts runs with: short intervals, so that heartbeats, leases and
    dispatches happen within seconds, and the tests' model directories. Webhooks may reach the tests'
    receivers on 127.0.0.1."""
    return dict(DPO_METRICS_EVENT_INTERVAL_S="0", DPO_CANCEL_POLL_INTERVAL_S="0.5", DPO_DISPATCH_INTERVAL_S="0.3",
                DPO_WEBHOOK_ALLOW_PRIVATE="1",
                DPO_WORKER_HEARTBEAT_INTERVAL_S="0.5", DPO_WORKER_LOST_AFTER_S="3", DPO_JOB_LEASE_S="3",
                DPO_DISPATCH_TIMEOUT_S="10", DPO_MODEL_DIRS=os.pathsep.join(MODEL_DIRS))


def new_service(root: Path, key: str, extra_env: dict[str, str] | None = None, tuned: bool = True) -> Service:
    """A service sharing `root/data` (its logs in `root`), its settings in `env`; nothing started yet.
    `tuned`: with fast_settings (a benchmark leaves the service's defaults)."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    env.update(DPO_DATA_DIR=str(data_dir), DPO_API_KEY=key, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               DPO_WORKER_NAME="worker")
    env.update({**(fast_settings() if tuned else {}), **(extra_env or {})})
    return Service(url=f"http://127.0.0.1:{port}", key=key, data_dir=data_dir, env=env, port=port)


def start_api(root: Path, key: str, extra_env: dict[str, str] | None = None) -> Service:
    """The API process alone (no worker), sharing `root/data`; returns once /readyz answers 200."""
    service = new_service(root, key, extra_env)
    service.start_api()
    try:
        service.wait_ready()
    except BaseException:
        service.stop()
        raise
    return service


def start_service(root: Path, key: str, extra_env: dict[str, str] | None = None) -> Service:
    """API and worker as two processes sharing `root/data`; returns once /readyz answers 200 and the
    worker has joined the pool."""
    service = new_service(root, key, extra_env)
    env = service.env
    service.start_api()
    service.start("worker", WORKER)
    try:
        service.wait_ready(watch=("api", "worker"))
        service.wait_for_worker(env.get("DPO_WORKER_NAME", "worker"), "idle", timeout_s=60)
    except BaseException:
        service.stop()
        raise
    return service


class RedisServer:
    """A redis-server of the test's own on a free port, without persistence: stopping it loses every
    message it held, as a broker restart without its data does."""

    def __init__(self, root: Path):
        need("redis-server", shutil.which("redis-server") is not None)
        self.port, self.root = free_port(), root
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = (self.root / "redis.log").open("ab")
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--daemonize", "no", "--dir", str(self.root)],
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not self.answers():
            assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        out = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True, timeout=10)
        return out.stdout.strip()


def postgres_bindir() -> str | None:
    """Where PostgreSQL's server programs are: on the PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    if shutil.which("initdb") and shutil.which("postgres"):
        return str(Path(shutil.which("initdb")).parent)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return str(Path(found[-1]).parent) if found else None


class PostgresServer:
    """A PostgreSQL cluster of the test's own: its own data directory and a free port, trust auth, no
    durability (fsync off). `stop` is a fast shutdown (every connection is closed, as in a restart or a
    failover); `start` brings it back on the same port with the same data.

    PostgreSQL refuses to run as root: as root, the cluster runs as the `postgres` OS user, in a
    directory of its own under the system's temporary directory (pytest's directories are root's only)."""

    def __init__(self):
        self.bindir = postgres_bindir()
        need("PostgreSQL's initdb and postgres", self.bindir is not None)
        self.user = "postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="dpo-test-pg-"))
        if self.user:
            shutil.chown(self.root, self.user, self.user)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, program: str, *args: str, **popen) -> subprocess.Popen:
        log = (self.root / "postgres.log").open("ab")
        return subprocess.Popen([str(Path(self.bindir) / program), *args], cwd=self.root, user=self.user,
                                group=self.user, extra_groups=[] if self.user else None, stdout=log,
                                stderr=subprocess.STDOUT, **popen)

    def init(self) -> PostgresServer:
        proc = self._run("initdb", "-D", str(self.root / "data"), "-U", "postgres", "-A", "trust", "--no-sync",
                         "-E", "UTF8", "--locale=C")
        assert proc.wait(timeout=120) == 0, f"initdb failed\n{self.log()}"
        self.start()
        return self

    def start(self) -> None:
        self.proc = self._run("postgres", "-D", str(self.root / "data"), "-p", str(self.port), "-k", str(self.root),
                              "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
                              "-c", "full_page_writes=off", "-c", "max_connections=200", start_new_session=True)
        deadline = time.monotonic() + 60
        while not self.answers():
            assert self.proc.poll() is None, f"postgres exited\n{self.log()}"
            assert time.monotonic() < deadline, f"postgres did not start\n{self.log()}"
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown (SIGINT): open transactions are rolled back and every client disconnected."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)

    def answers(self) -> bool:
        import psycopg2

        try:
            psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def log(self, chars: int = 4000) -> str:
        path = self.root / "postgres.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
class PeakRss:
    """A process's peak resident memory while a `with` block runs, against its RSS on entry: sampled from
    /proc every `interval_s` (psutil), and the kernel's own high-water mark (VmHWM), which misses no
    short peak, where Linux lets it be reset on entry (/proc/PID/clear_refs)."""

    def __init__(self, pid: int, interval_s: float = 0.002):
        import psutil

        self.process, self.interval_s = psutil.Process(pid), interval_s
        self.before = self.sampled = 0
        self.hwm: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def peak(self) -> int:
        return max(self.sampled, self.hwm or 0)

    @property
    def growth(self) -> int:
        return self.peak - self.before

    def __enter__(self) -> PeakRss:
        self._hwm_reset = _write(f"/proc/{self.process.pid}/clear_refs", "5")
        self.before = self.sampled = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sampled = max(self.sampled, self.process.memory_info().rss)
        if self._hwm_reset:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
            self.hwm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:"))

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sampled = max(self.sampled, self.process.memory_info().rss)


def _write(path: str, text: str) -> bool:
    try:
        Path(path).write_text(text)
    except OSError:
        return False
    return True
