"""End-to-end: `dpo-service up` and `make demo`'s script, as real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
import pytest

from service.cli import process_threads
from service.settings import Settings
from tests.service.processes import REPO, free_port

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_up_generates_a_key_prints_it_and_stops_cleanly(tmp_path):
    port, out = free_port(), tmp_path / "up.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "up", "--port", str(port), "--data-dir",
                                 str(tmp_path / "data")], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "API key:" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        key = (tmp_path / "data" / "api_key").read_text().strip()
        text = out.read_text()
        assert f"http://127.0.0.1:{port}" in text and key in text
        assert f"dashboard: http://127.0.0.1:{port}/" in text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
            assert c.get("/").headers["content-type"].startswith("text/html")
            deadline = time.monotonic() + 30
            while c.get("/readyz").status_code != 200:  # the worker's queue may still be declaring
                assert time.monotonic() < deadline
                time.sleep(0.3)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, out.read_text()[-3000:]
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_the_demo_runs_to_the_end(tmp_path):
    out = subprocess.run([sys.executable, "-m", "service.demo", "--data-dir", str(tmp_path / "demo"), "--steps", "48"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "The model learned to prefer sorted answers." in out.stdout
    assert "before (step 0) and after (step 48)" in out.stdout
    # One held-out prompt's answers, the reference's beside the trained model's.
    assert "Prompt: 'sort : n" in out.stdout and "reference (step 0)" in out.stdout and "trained (step 48)" in out.stdout
    assert "Dashboard: http://127.0.0.1:" in out.stdout
    # The job is shown by `dpo jobs watch`: its evaluations, then its bar at the end.
    assert "evaluation at step 12: loss" in out.stdout and "48/48 steps" in out.stdout
    assert list((tmp_path / "demo" / "downloads").glob("ftckpt-*/config.json"))


def test_api_serves_from_several_processes(tmp_path):
    """`dpo-service api --workers 2`: two processes share the port and the database; SIGTERM stops all."""
    port, out, data = free_port(), tmp_path / "api.log", tmp_path / "data"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                                 "--data-dir", str(data), "--workers", "2"],
                                cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(_children(proc.pid)) < 2 or "Application startup complete" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        key = (data / "api_key").read_text().strip()
        auth = {"Authorization": f"Bearer {key}"}
        row = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n'
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth) as c:
            made = c.post("/v1/files", files={"file": ("t.jsonl", row)}, data={"purpose": "fine-tune"}).json()["id"]
        for _ in range(20):  # new connections: the kernel hands them to either process
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth) as c:
                assert [f["id"] for f in c.get("/v1/files").json()["data"]] == [made]
        for _ in range(4):  # whichever process answers a scrape counts both processes' requests
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=auth) as c:
                listed = [s for f in text_string_to_metric_families(c.get("/metrics").text) for s in f.samples
                          if s.name == "dpo_http_request_duration_seconds_count" and s.labels["route"] == "/v1/files"
                          and s.labels["method"] == "GET"]
            assert [s.value for s in listed] == [20]
        assert "2 processes, 20 request threads each" in out.read_text()  # the default 40 shared out
    finally:
        children = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0, out.read_text()[-3000:]
    deadline = time.monotonic() + 20  # multiprocessing's resource tracker exits once its pipe closes
    while [pid for pid in children if _running(pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert children and not [pid for pid in children if _running(pid)], children


def _running(pid: int) -> bool:
    """Alive, and not an exited child waiting for its new parent (a container's init) to reap it."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


@pytest.mark.parametrize("workers, environ, expected", [
    (1, {}, 40), (2, {}, 20), (3, {}, 13), (8, {}, 8),  # the default shared out, at least 8 each
    (2, {"DPO_API_THREADS": "40"}, 40), (4, {"dpo_api_threads": "40"}, 40),  # set by hand: as set
])
def test_api_processes_share_out_the_default_threads(workers, environ, expected):
    """Each API process keeps a read connection per request thread: N processes at 40 each could hold
    more connections than PostgreSQL's default 100 allows, so `--workers N` shares the default out."""
    assert process_threads(Settings(api_threads=int(environ.get("DPO_API_THREADS", 40))), workers, environ) == expected
