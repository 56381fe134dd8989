"""POST /v1/fine_tuning/jobs/preflight through the real app (SQLite, embedded broker): the report's shape,
that nothing is queued, its warnings, the estimate on the pool's GPU types and its calibration by measured
jobs, the queue forecast, and a job created from the same request keeping the estimate. The accuracy of
the estimate against real runs is tests/service/test_e2e_estimate.py's."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from service.db.models import Job, Worker
from service.queue_forecast import _play, _Queued
from tests.service.processes import REPO
from tests.service.support import as_key, make_team, register_worker, sessions_for, upload

TRAINING = {"max_length": 32, "max_prompt_length": 16}
ROW = {"prompt": "sort : n3 n1 n2", "chosen": " n1 n2 n3", "rejected": " n3 n2 n1"}


@pytest.fixture
def data_file(tmp_path) -> Path:
    rows = [dict(ROW, prompt=f"sort : n{i} n{i + 1}") for i in range(40)]
    rows += [dict(ROW)] * 3  # one row and two duplicates of it
    rows.append({"prompt": "same", "chosen": " n1", "rejected": " n1"})  # chosen equals rejected
    rows.append({"prompt": "sort : " + " ".join(["n9"] * 40), "chosen": " n9", "rejected": " n8"})  # cut
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def body(model: str, file_id: str, **extra) -> dict:
    return {"model": model, "training_file": file_id, "training": dict(TRAINING),
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 4}}}, **extra}


def jobs_count(settings) -> int:
    with sessions_for(settings)() as s:
        return s.scalar(select(func.count()).select_from(Job))


def test_a_preflight_reports_the_data_and_queues_nothing(client, settings, tiny_model, data_file):
    file_id = upload(client, data_file)["id"]
    r = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id))
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["object"] == "fine_tuning.preflight" and report["id"].startswith("ftpre-")
    assert jobs_count(settings) == 0
    train = report["data"]["training_file"]
    assert report["data"]["validation_file"] is None
    assert train["rows"] == 45 and train["rows_used"] + train["rows_dropped"] == 45
    assert train["rows_truncated"] >= 1 and train["duplicate_pairs"] == 2 and train["identical_pairs"] == 1
    codes = {w["code"] for w in report["warnings"]}
    assert {"duplicate_pairs", "identical_pairs", "rows_truncated"} <= codes
    dup = next(w for w in report["warnings"] if w["code"] == "duplicate_pairs")
    assert dup["count"] == 2 and dup["lines"] == [42, 43] and dup["param"] == "training_file"
    estimate = report["estimate"]
    assert estimate["steps"] == -(-train["rows_used"] // 4) and estimate["tokens"] == train["tokens"]["total"]
    assert estimate["flops"]["total"] > 0 and estimate["memory"]["total"] > 0
    assert estimate["by_gpu_type"] == []  # no live worker
    assert report["queue"]["estimated_start_at"] is None and "no live worker" in report["queue"]["reason"]


def test_the_request_is_checked_as_job_creation_checks_it(client, tiny_model, data_file):
    file_id = upload(client, data_file)["id"]
    r = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id, training={"loss": {"beta": -1}}))
    assert r.status_code == 400 and r.json()["error"]["param"] == "training.loss.beta"
    r = client.post("/v1/fine_tuning/jobs/preflight", json=body("/not/allowed", file_id))
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def set_memory(settings, worker_id: str, memory_bytes: int) -> None:
    with sessions_for(settings).begin() as s:
        s.execute(update(Worker).where(Worker.id == worker_id).values(memory_bytes=memory_bytes))


def test_the_estimate_per_gpu_type_fits_and_is_calibrated_by_measured_jobs(client, settings, tiny_model,
                                                                          data_file):
    file_id = upload(client, data_file)["id"]
    set_memory(settings, register_worker(settings, "big"), 64 << 30)
    set_memory(settings, register_worker(settings, "h", gpu_type="h100"), 1 << 20)  # too small for anything
    report = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id)).json()
    types = {t["gpu_type"]: t for t in report["estimate"]["by_gpu_type"]}
    assert types["cpu"]["fits"] is True and types["cpu"]["largest_micro_batch_size"] >= 4
    assert types["h100"]["fits"] is False and types["h100"]["largest_micro_batch_size"] is None
    # The trainer's memory plan on each: the whole batch and no checkpointing on 64 GiB; nothing fits in 1 MiB,
    # and the note says what to change.
    plan = types["cpu"]["plan"]
    assert (plan["micro_batch_size"], plan["checkpointed_layers"]) == (4, 0)
    assert plan["budget_bytes"] == int(0.9 * (64 << 30))
    assert plan["predicted_bytes"] == types["cpu"]["peak_memory_bytes"] and plan["recompute_flops"] == 0
    assert types["h100"]["plan"] is None and "max_memory" in types["h100"]["plan_note"]
    assert report["estimate"]["memory"]["planned"] is True
    assert report["estimate"]["memory"]["total"] == plan["predicted_bytes"]
    assert types["cpu"]["basis"] == "flops_model" and types["cpu"]["calibrated_by"] == []
    # A job of this team that a cpu worker measured calibrates the next estimate; another team sees a count.
    job = client.post("/v1/fine_tuning/jobs", json=body(tiny_model, file_id)).json()
    measured = {"train_seconds": 10.0, "steps": 12, "tokens": 4000, "tokens_per_s": 400.0,
                "parameters": report["estimate"]["parameters"],
                "trainable_parameters": report["estimate"]["trainable_parameters"], "precision": "fp32",
                "gpu_type": "cpu", "gpus": 1, "device": "cpu", "peak_memory_bytes": 500 << 20,
                "memory_kind": "rss", "flops": report["estimate"]["flops"]["total"] * 12 / report["estimate"]["steps"],
                "lora": False, "gradient_checkpointing": False}
    with sessions_for(settings).begin() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="succeeded", measured=measured,
                                                                 finished_at=time.time()))
    again = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id, suffix="x")).json()
    cpu = next(t for t in again["estimate"]["by_gpu_type"] if t["gpu_type"] == "cpu")
    assert cpu["basis"] == "calibrated" and cpu["calibrated_by"] == [job["id"]] and cpu["other_jobs"] == 0
    other = as_key(make_team(client, "other")["key"])
    other_file = upload(client, data_file, headers=other)["id"]
    theirs = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, other_file), headers=other).json()
    cpu = next(t for t in theirs["estimate"]["by_gpu_type"] if t["gpu_type"] == "cpu")
    assert cpu["basis"] == "calibrated" and cpu["calibrated_by"] == [] and cpu["other_jobs"] == 1


def test_a_job_created_from_the_same_request_keeps_the_estimate(client, settings, tiny_model, data_file):
    file_id = upload(client, data_file)["id"]
    register_worker(settings)
    report = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id)).json()
    job = client.post("/v1/fine_tuning/jobs", json=body(tiny_model, file_id)).json()
    assert job["estimate"]["preflight_id"] == report["id"]
    assert job["estimate"]["seconds"] == report["estimate"]["by_gpu_type"][0]["seconds"]
    assert job["estimate"]["steps"] == report["estimate"]["steps"] and job["actual"] is None
    other = client.post("/v1/fine_tuning/jobs", json=body(tiny_model, file_id, seed=7)).json()
    assert other["estimate"] is None  # another request: no pre-flight of its own


def test_the_forecast_plays_the_fair_share_order_forward():
    """Two workers free at 0 and 100; team a used more GPU-seconds than b, so b's jobs go first."""
    mine = _Queued("mine", "a", 0, 50, 1, 30)
    queued = [_Queued("a1", "a", 0, 10, 1, 40), _Queued("b1", "b", 0, 20, 1, 70),
              _Queued("b2", "b", 0, 30, 1, 70), mine]
    # w1 free at 0: b1 (b used 0 < a's 500), b's use 70, w1 busy to 70; w1 at 70: b2, to 140; w2 at 100:
    # a1 (b's queue is empty), to 140; w1 at 140: mine, after 3 others.
    start, ahead = _play([(0.0, "w1"), (100.0, "w2")], queued, {"a": 500.0}, mine)
    assert (start, ahead) == (140.0, 3)


def test_a_running_job_and_a_queued_one_delay_the_start(client, settings, tiny_model, data_file):
    file_id = upload(client, data_file)["id"]
    worker_id = register_worker(settings)
    now = time.time()
    running = client.post("/v1/fine_tuning/jobs", json=body(tiny_model, file_id, seed=1)).json()
    queued = client.post("/v1/fine_tuning/jobs", json=body(tiny_model, file_id, seed=2)).json()
    with sessions_for(settings).begin() as s:
        s.execute(update(Job).where(Job.id == running["id"]).values(
            status="running", worker_id=worker_id, started_at=now, estimated_finish=int(now + 100)))
        s.execute(update(Job).where(Job.id == queued["id"]).values(estimate={"seconds": 50.0}))
    report = client.post("/v1/fine_tuning/jobs/preflight", json=body(tiny_model, file_id)).json()
    queue = report["queue"]
    assert queue["position"] == 2 and queue["jobs_ahead"] == 1
    assert 145 <= queue["estimated_start_in_s"] <= 152


PROBE = r"""
import json, sys, tempfile
from pathlib import Path
import api.main
from fastapi.testclient import TestClient
from service.settings import Settings

model = sys.argv[1]
settings = Settings(data_dir=Path(tempfile.mkdtemp()), api_key="k", database_url=None, broker_url=None,
                    model_dirs=[str(Path(model).parent)])
with TestClient(api.main.create_app(settings), headers={"Authorization": "Bearer k"}) as c:
    row = b'{"prompt": "sort : n1 n2", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
    f = c.post("/v1/files", files={"file": ("t.jsonl", row * 4)}, data={"purpose": "fine-tune"}).json()
    r = c.post("/v1/fine_tuning/jobs/preflight", json={"model": model, "training_file": f["id"]})
print(json.dumps({"status": r.status_code, "used": r.json()["data"]["training_file"]["rows_used"],
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}))
"""


def test_a_preflight_loads_the_tokenizer_without_torch(tiny_model):
    out = subprocess.run([sys.executable, "-c", PROBE, tiny_model], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"status": 200, "used": 4, "torch": []}
