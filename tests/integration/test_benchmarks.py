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


def _bench_gpu():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_gpu

    return bench_gpu


def test_bench_gpu_all_runs_every_target_row_and_tabulates_it(tmp_path):
    """--all's whole code path (model building, LoRA for both trainers, figures, ratios, JSON, table) on a
    CPU with tiny shapes: what would otherwise crash on its first run on a GPU."""
    record_file = tmp_path / "all.json"
    # One thread a process: the figures mean nothing here, and twelve processes should not fight over cores.
    out = _run("bench_gpu.py", "--all", "--quick", "--device", "cpu", "--peak-tflops", "1",
               "--work-dir", str(tmp_path), "--json", str(record_file), OMP_NUM_THREADS="1")
    record = json.loads(record_file.read_text())
    assert out.startswith("machine: cpu: ") and record["machine"] in out
    plan = [(s.name, label) for s, label in _bench_gpu().all_plan(quick=True)]
    rows = {(r["setting"], r["label"]): r for r in record["rows"]}
    assert list(rows) == plan and len(plan) == 12
    assert {r["setting"] for r in record["rows"] if r["lora"]} == {"7B LoRA 2×256"}
    for r in rows.values():
        assert r["status"] in ("ok", "oom"), r
        if r["status"] == "ok":
            assert r["tokens_per_s"] > 0 and r["step_s_median"] > 0 and r["mfu"] > 0 and r["peak_memory_gib"] > 0
            assert r["x_trl_tokens_per_s"] > 0 and r["x_trl_memory"] > 0
            # Step 1's policy is the reference: log 2, up to the rounding between dpo_core's bf16-weight
            # reference and its fp32-weight policy under bf16 autocast.
            assert len(r["losses"]) == r["steps"] and r["losses"][0] == pytest.approx(math.log(2), abs=1e-3)
    for setting in {s for s, _ in plan}:
        trl, ours, matched = (rows[(setting, label)] for label in ("TRL", "dpo_core", "dpo_core at TRL's memory"))
        assert trl["status"] == ours["status"] == matched["status"] == "ok"
        assert trl["x_trl_tokens_per_s"] == 1.0
        # Held to TRL's peak (here its peak RSS), the planner keeps dpo_core under it; checkpointing and
        # micro-batches recompute the same sums: the same losses.
        assert matched["max_memory"] == round(trl["peak_memory_gib"] * 2**30) and matched["x_trl_memory"] <= 1.0
        assert matched["losses"] == pytest.approx(ours["losses"], abs=1e-5)
    table = [line for line in out.splitlines() if line.startswith(("| 0.5B", "| 7B"))]
    assert len(table) == 12 and "| peak RSS GiB |" in out


@pytest.mark.parametrize("failure, status", [
    ("import torch\nraise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')\n", "oom"),
    ("raise ValueError('broken')\n", "failed"),
    ("import time\ntime.sleep(60)\n", "timeout"),
], ids=["oom", "failed", "timeout"])
def test_bench_gpu_all_records_a_contender_that_does_not_finish(tmp_path, monkeypatch, failure, status):
    """A contender that runs out of memory, fails or overruns is a row of its own, not the end of the run."""
    import dataclasses
    import time

    bench_gpu = _bench_gpu()
    fake = tmp_path / "fake"  # imported as dpo_core by the contender's process
    (fake / "dpo_core").mkdir(parents=True)
    (fake / "dpo_core" / "__init__.py").write_text(failure)
    real = bench_gpu.all_contender
    monkeypatch.setattr(bench_gpu, "all_contender",
                        lambda label, lora, max_memory=None: dataclasses.replace(real(label, lora, max_memory),
                                                                                 pythonpath=str(fake)))
    setting = bench_gpu.Setting("0.5B", 8, 512, 8).quick()
    w = bench_gpu.prepare_setting(setting, tmp_path, bench_gpu.Progress(None))
    args = bench_gpu.parse_args(["--all", "--quick", "--device", "cpu"])
    deadline = time.monotonic() + 5 if status == "timeout" else None
    row = bench_gpu.run_row(setting, "dpo_core", w, args, tmp_path / setting.slug, None, deadline)
    assert row["status"] == status and row["setting"] == "0.5B 2×64"
    if status != "timeout":
        assert "Error" in row["log_tail"][-1]
    bench_gpu.with_ratios([row])
    assert row["x_trl_tokens_per_s"] is None
    assert f"| 0.5B 2×64 | dpo_core | {status.upper()} |" in bench_gpu.all_table([row], "cpu")


def test_bench_gpu_all_skips_rows_past_its_time_limit(tmp_path, capsys):
    bench_gpu = _bench_gpu()
    record_file = tmp_path / "all.json"
    args = bench_gpu.parse_args(["--all", "--quick", "--device", "cpu", "--time-limit", "1e-9",
                                 "--work-dir", str(tmp_path), "--json", str(record_file)])
    record = bench_gpu.run_all(args)
    assert [r["status"] for r in record["rows"]] == ["skipped"] * 12
    assert json.loads(record_file.read_text())["rows"] == record["rows"]
    assert capsys.readouterr().out.count("| SKIPPED |") == 12
