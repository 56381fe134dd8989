"""Real service processes for the end-to-end tests: `dpo-service api` under uvicorn and a Celery worker,
each its own OS process, on the embedded defaults or on PostgreSQL + Redis."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.service.support import MODEL_DIRS

REPO = Path(__file__).resolve().parents[2]
TERMINAL = ("succeeded", "failed", "cancelled")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Service:
    url: str
    key: str
    data_dir: Path
    env: dict
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=timeout)

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
        """Start another worker process named `name` and wait until the pool shows it idle."""
        self.start(name, ["-m", "worker", "--loglevel", "INFO"], {"DPO_WORKER_NAME": name, **env})
        self.wait_for_worker(name, "idle", timeout_s)

    def signal(self, name: str, sig: int) -> None:
        """Send `sig` to one process (and its children: the worker's job process)."""
        os.killpg(self.procs[name].pid, sig)

    def wait_for_worker(self, name: str, state: str, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while True:
                workers = {w["name"]: w for w in c.get("/v1/pool").json()["workers"]}
                if name in workers and workers[name]["state"] == state:
                    return workers[name]
                if time.monotonic() > deadline:
                    raise AssertionError(f"worker {name} is {workers.get(name)}, not {state}\n{self.logs()}")
                time.sleep(0.2)

    def wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
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

    def wait_for_job(self, job_id: str, until=TERMINAL, timeout_s: float = 180, pred=None) -> dict:
        """Poll a job until its status is in `until` (or `pred(job)` holds)."""
        deadline = time.monotonic() + timeout_s
        with self.client() as c:
            while True:
                job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if (pred(job) if pred else job["status"] in until):
                    return job
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {job_id} still {job['status']} after {timeout_s}s\n{self.logs()}")
                time.sleep(0.3)


def start_service(root: Path, key: str, extra_env: dict[str, str] | None = None) -> Service:
    """API and worker as two processes sharing `root/data`; returns once /readyz answers 200 and the
    worker has joined the pool."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    env.update(DPO_DATA_DIR=str(data_dir), DPO_API_KEY=key, DPO_METRICS_EVENT_INTERVAL_S="0",
               DPO_CANCEL_POLL_INTERVAL_S="0.5", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO),
               DPO_WORKER_NAME="worker", DPO_DISPATCH_INTERVAL_S="0.3", DPO_WORKER_HEARTBEAT_INTERVAL_S="0.5",
               DPO_WORKER_LOST_AFTER_S="3", DPO_JOB_LEASE_S="3", DPO_DISPATCH_TIMEOUT_S="10",
               DPO_MODEL_DIRS=os.pathsep.join(MODEL_DIRS), **(extra_env or {}))
    service = Service(url=f"http://127.0.0.1:{port}", key=key, data_dir=data_dir, env=env)
    service.start("api", ["-m", "api.cli", "api", "--host", "127.0.0.1", "--port", str(port)])
    service.start("worker", ["-m", "worker", "--loglevel", "INFO"])
    try:
        service.wait_ready()
        service.wait_for_worker(env.get("DPO_WORKER_NAME", "worker"), "idle", timeout_s=60)
    except BaseException:
        service.stop()
        raise
    return service
