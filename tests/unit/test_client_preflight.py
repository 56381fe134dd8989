"""How `dpo` prints a pre-flight report and a job's estimate beside its measured run: hand-made objects of the
API's shape (docs/api.md), read back as a person reads the terminal. The real route is exercised end to end
in tests/service/test_client_cli.py."""
from __future__ import annotations

import io

from rich.console import Console

from dpo_client.preflight import basis, preflight_view, queue_line
from dpo_client.render import actual_line, estimate_line


def shown(renderable) -> str:
    screen = io.StringIO()
    Console(file=screen, width=200, color_system=None).print(renderable)
    return screen.getvalue()


def lengths(p50: int, top: int) -> dict:
    return {"p50": p50, "p90": top - 2, "p99": top - 1, "max": top}


def file_report(rows: int, **extra) -> dict:
    return {"rows": rows, "rows_used": rows - 1, "rows_dropped": 1, "rows_truncated": 2, "truncated_tokens": 17,
            "lengths": {"prompt": lengths(10, 40), "chosen": lengths(5, 20), "rejected": lengths(4, 12)},
            "tokens": {"total": 12345, "longest_sequence": 64}, "duplicate_pairs": 3, "identical_pairs": 1,
            "length_bias": {"chosen_longer_share": 0.75, "mean_difference_tokens": 2.26}, **extra}


REPORT = {
    "object": "fine_tuning.preflight", "id": "ftpre-1", "created_at": 0, "model": "org/tiny",
    "data": {"training_file": file_report(100, groups={"default": 60, "safety": 40}),
             "validation_file": file_report(20, overlap_with_training=4)},
    "warnings": [{"code": "identical_pairs", "param": "training_file", "count": 12, "lines": list(range(1, 11)),
                  "message": "chosen equals rejected: drop those rows"}],
    "estimate": {"steps": 25, "epochs": 1.0, "tokens": 24690, "parameters": 1000, "trainable_parameters": 10,
                 "flops": {"policy": 3e12, "reference": 1e12, "total": 4e12},
                 "memory": {"micro_batch_size": 4, "precision": "bf16", "device": "cuda",
                            "breakdown": {"weights": 2_000_000_000, "activations": 500_000_000},
                            "total": 2_500_000_000},
                 "by_gpu_type": [{"gpu_type": "a100", "workers": 2, "gpus": 8, "memory_bytes": 80_000_000_000,
                                  "peak_memory_bytes": 2_500_000_000, "fits": True, "largest_micro_batch_size": 64, "seconds": 125.0, "basis": "calibrated",
                                  "calibrated_by": ["ftjob-a"], "other_jobs": 2, "mfu": None},
                                 {"gpu_type": "t4", "workers": 1, "gpus": 1, "memory_bytes": 2_000_000_000,
                                  "peak_memory_bytes": 2_500_000_000, "fits": False, "largest_micro_batch_size": None, "seconds": 0.5,
                                  "basis": "flops_model", "calibrated_by": [], "other_jobs": 0, "mfu": 0.3}]},
    "queue": {"position": 3, "jobs_ahead": 2, "estimated_start_at": None, "estimated_start_in_s": None,
              "reason": "waiting for a free a100"},
}


def test_the_report_reads_as_a_column_per_file_with_every_finding():
    text = shown(preflight_view(REPORT))
    assert "Pre-flight ftpre-1 for org/tiny: nothing was queued" in text
    rows = {line.split("  ")[0]: line.split() for line in text.splitlines() if line and not line.startswith(" ")}
    assert rows["rows"][-2:] == ["100", "20"] and rows["used"][-2:] == ["99", "19"]
    assert "2 (17 tokens cut)" in text and "12,345" in text
    assert "10 / 38 / 39 / 40" in text and "4 / 10 / 11 / 12" in text  # prompt and rejected percentiles
    assert "75% (mean +2.3 tokens)" in text
    assert "default 60, safety 40" in text
    assert rows["prompts also in training"][-2:] == ["-", "4"]  # validation only


def test_warnings_give_the_code_count_first_lines_and_advice():
    text = shown(preflight_view(REPORT))
    assert "identical_pairs  12 in training_file, line(s) 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ..." in text
    assert "chosen equals rejected: drop those rows" in text
    assert "No warnings" in shown(preflight_view({**REPORT, "warnings": []}))


def test_the_estimate_names_its_basis_per_gpu_type():
    text = shown(preflight_view(REPORT))
    assert "25 steps, 1 epoch(s), 24,690 tokens" in text and "FLOPs 4e12 (policy forward and backward 3e12" in text
    assert "Memory on cuda: 2.5 GB at micro batch 4, bf16 (weights 2.0 GB, activations 500.0 MB)" in text
    a100, t4 = REPORT["estimate"]["by_gpu_type"]
    assert basis(a100) == "calibrated by ftjob-a, 2 job(s) of other teams"
    assert basis(t4) == "FLOPs model at 30% MFU"
    assert a100["gpu_type"] in text and "2m05s" in text and "0.5s" in text
    assert [line.split()[7] for line in text.splitlines() if line.startswith(("a100", "t4"))] == ["yes", "NO"]


def test_the_queue_line_says_when_there_is_no_start_estimate():
    assert queue_line(REPORT["queue"]) == "position 3, 2 job(s) ahead; no start estimate; waiting for a free a100"
    now = {"position": 1, "jobs_ahead": 0, "estimated_start_at": 0, "estimated_start_in_s": 0.0, "reason": ""}
    assert queue_line(now) == "position 1, 0 job(s) ahead; would start now"


def test_a_job_shows_its_estimate_and_the_measured_run_beside_it():
    estimate = {"preflight_id": "ftpre-1", "gpu_type": "cpu", "seconds": 100.0, "peak_memory_bytes": 2_000_000_000,
                "steps": 25, "tokens": 24690}
    actual = {"train_seconds": 110.0, "peak_memory_bytes": 1_800_000_000, "memory_kind": "rss",
              "tokens_per_s": 224.5, "tokens": 24690, "steps": 25}
    assert estimate_line(estimate) == ("1m40s of training, 2.0 GB peak memory, 25 steps, 24,690 tokens on cpu "
                                       "(ftpre-1)")
    assert actual_line(actual, estimate) == ("1m50s (+10% vs estimate) of training, 1.8 GB (-10% vs estimate) peak "
                                             "memory (rss), 25 steps, 24,690 tokens at 224.5 tokens/s")
    assert "vs estimate" not in actual_line(actual, None) and estimate_line(None) is None
    slow = {**actual, "train_seconds": 2.0}
    assert actual_line(slow, {**estimate, "seconds": 0.01}).startswith("2s (200x the estimate) of training")
    assert estimate_line({**estimate, "seconds": 0.011}).startswith("0.011s of training")
