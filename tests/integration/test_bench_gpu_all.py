"""bench_gpu.py --all's whole path on a CPU with tiny shapes (a file of its own: at about two minutes it is the
longest benchmark smoke, and the suite's processes each take whole files)."""
from __future__ import annotations

import json
import math
import sys

import pytest

from tests.integration.test_benchmarks import REPO, _run

pytestmark = pytest.mark.slow


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
