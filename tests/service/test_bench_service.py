"""benchmarks/bench_service.py runs end to end against the test PostgreSQL and Redis: real API and
worker processes, every request answered, every timed job run. It prints latencies; no timing is
asserted here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.support import service_url

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def test_bench_service_measures_listing_polling_and_start_up():
    db, broker = service_url("DPO_TEST_DATABASE_URL"), service_url("DPO_TEST_BROKER_URL")
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_service.py", "--database-url", db, "--broker-url", broker,
         "--jobs", "300", "--clients", "10", "--duration", "2", "--list-requests", "10", "--submits", "1",
         "--settle", "0.5"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    out = done.stdout
    assert out.startswith("machine: cpu: ")
    assert "### Listing, 301 jobs in PostgreSQL" in out
    polling = [line for line in out.splitlines() if " clients, " in line]
    assert polling and all("errors 0" in line and "n=" in line for line in polling), polling
    assert "first job after start-up:" in out and "note: job" not in out  # every timed job succeeded
