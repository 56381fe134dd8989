"""End-to-end: `dpo-service up` and `make demo`'s script, as real processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.service.processes import REPO, free_port

pytestmark = pytest.mark.slow


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    return {**env, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def test_up_generates_a_key_prints_it_and_stops_cleanly(tmp_path):
    port, out = free_port(), tmp_path / "up.log"
    with out.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--port", str(port), "--data-dir",
                                 str(tmp_path / "data")], cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "API key:" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.3)
        key = (tmp_path / "data" / "api_key").read_text().strip()
        text = out.read_text()
        assert f"http://127.0.0.1:{port}" in text and key in text
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
            assert c.get("/v1/files", headers={"Authorization": f"Bearer {key}"}).status_code == 200
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
    out = subprocess.run([sys.executable, "-m", "api.demo", "--data-dir", str(tmp_path / "demo"), "--steps", "48"],
                         cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "The model learned to prefer sorted answers." in out.stdout
    assert "before (step 0) and after (step 48)" in out.stdout
    assert list((tmp_path / "demo" / "downloads").glob("ftckpt-*/config.json"))
