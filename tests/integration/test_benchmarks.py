"""The benchmarks run end to end and compare like with like. They print figures; these tests
check what the figures rest on (the same batches for both contenders, every run's record present),
never a timing."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, **env: str) -> str:
    done = subprocess.run([sys.executable, f"benchmarks/{script}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def test_bench_trainer_trains_trl_and_dpo_core_on_the_same_batches(tmp_path):
    record_file = tmp_path / "record.json"
    out = _run("bench_trainer.py", "--max-length", "96", "--batch-size", "2", "--steps", "3", "--repeats", "1",
               "--no-extra-rows", "--work-dir", str(tmp_path), "--json", str(record_file))
    record = json.loads(record_file.read_text())
    assert out.startswith("machine: cpu: ") and record["machine"] in out
    trl, ours = record["runs"]
    assert (trl["contender"], ours["contender"]) == ("trl", "dpo_core")
    for run in (trl, ours):
        assert len(run["wall"]) == len(run["losses"]) == 3
        assert run["peak_rss"] > 0 and run["tokens_per_s"] > 0
    # Same batches in the same order: both start from log 2 (policy = reference) and stay together,
    # and dpo_core's own token count is the one the ratios are computed from.
    assert trl["losses"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert ours["losses"] == pytest.approx(trl["losses"], abs=1e-4)
    assert ours["own_num_tokens"] == sum(record["step_tokens"])
    assert "| dpo_core |" in out and "× TRL" in out


def test_bench_scaling_reports_every_length(tmp_path):
    out = _run("bench_scaling.py", "--lengths", "64", "128", "--steps", "2", "--batch-size", "2", "--repeats", "1",
               "--work-dir", str(tmp_path))
    assert out.startswith("machine: cpu: ")
    rows = [line for line in out.splitlines() if line.startswith(("| 64 |", "| 128 |"))]
    assert len(rows) == 2, out
    assert rows[0].split("|")[-3].strip() == "1.00"  # the shortest is its own baseline


def test_bench_upload_reports_the_api_memory_for_one_upload(tmp_path):
    record_file = tmp_path / "record.json"
    out = _run("bench_upload.py", "--size-mb", "4", "--long-line-kb", "64", "--work-dir", str(tmp_path),
               "--json", str(record_file))
    record = json.loads(record_file.read_text())
    assert out.startswith("machine: cpu: ") and record["machine"] in out
    assert record["bytes"] == (tmp_path / "upload.jsonl").stat().st_size >= 4_000_000
    assert record["longest_line"] == 64 * 1024 and record["rows"] > 1000
    assert 0 < record["rss_before"] <= record["rss_peak_sampled"] and record["seconds"] > 0
    assert record["bound"] == 64 * 2**20 + 2 * 64 * 1024
    assert "growth: " in out and "MB/s" in out


def test_bench_preflight_reports_the_data_report_time_without_torch(tmp_path):
    record_file = tmp_path / "record.json"
    out = _run("bench_preflight.py", "--rows", "200", "--vocab-size", "2000", "--repeats", "1",
               "--work-dir", str(tmp_path), "--json", str(record_file))
    record = json.loads(record_file.read_text())
    assert out.startswith("machine: cpu: ") and record["machine"] in out
    assert record["rows"] == 200 and record["tokens"] > 200 * 20
    assert record["lengths"]["prompt"]["p50"] > 0 and record["report_s"][0] > 0
    assert record["torch_imported"] is False
    assert "data_report: " in out


def test_bench_samples_times_every_sampling_step_against_the_whole_job(tmp_path):
    record_file = tmp_path / "record.json"
    out = _run("bench_samples.py", "--steps", "2", "--eval-steps", "1", "--max-length", "64", "--max-share", "1",
               "--work-dir", str(tmp_path), "--json", str(record_file))
    record = json.loads(record_file.read_text())
    assert record["machine"] in out and "of the job's time" in out
    assert record["sample_steps"] == [0, 1, 2]
    assert 0 < record["samples_s"] < record["job_s"] and record["share"] == record["samples_s"] / record["job_s"]


def test_bench_store_times_steps_beside_uploads_and_resumes_from_both_stores(tmp_path, s3_server):
    record_file = tmp_path / "record.json"
    # The test's S3 server (its credentials are in this process's environment, handed to the bench).
    out = _run("bench_store.py", "--quick", "--endpoint", s3_server.endpoint, "--bucket", s3_server.bucket,
               "--work-dir", str(tmp_path), "--json", str(record_file))
    record = json.loads(record_file.read_text())
    assert out.startswith("machine: cpu: ") and record["machine"] in out and "step time: " in out
    assert record["checkpoint_bytes"] > 16 << 20  # more than one multipart part: an upload spans steps
    counts = record["step_counts"]
    assert sum(counts.values()) == record["steps"] - 1 and counts["upload"] > 0 and counts["quiet"] > 0
    assert record["ratio"] == record["median_step_s"]["upload"] / record["median_step_s"]["quiet"]
    checkpoints = record["steps"] // record["save_steps"]
    assert len(record["save_s"]) == checkpoints and len(record["upload_s"]) >= checkpoints
    for store in ("local", "s3"):
        times = record["resume"][store]
        assert len(times["fetch_s"]) == len(times["ready_s"]) == 1 and times["ready_s"][0] > 0
    assert record["resume"]["s3"]["fetch_s"][0] > 0


def test_bench_footprint_starts_the_api_from_a_venv_and_reads_its_size_and_rss(tmp_path):
    record_file = tmp_path / "footprint.json"
    out = _run("bench_footprint.py", sys.prefix, "--runs", "1", "--no-size", "--json", str(record_file))
    (record,) = json.loads(record_file.read_text())
    assert record["torch"] is True and record["venv_mib"] is None  # this venv has the worker's install
    assert 0 < record["healthz_s"] <= record["readyz_s"]
    assert 0 < record["rss_started_mib"] <= record["rss_preflight_mib"]
    assert "/healthz s" in out
