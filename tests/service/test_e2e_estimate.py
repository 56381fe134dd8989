"""End-to-end: the pre-flight estimate against real jobs on a CPU worker (real API and worker processes).
One job calibrates; the pre-flight of a job of another model size names it, the job created from that
request keeps the estimate, and what its run measured lands within ±25% of the estimated time and ±20% of
the estimated peak memory (its job process's peak RSS).

Timing: `make test` runs this alone, after the parallel run (a neighbour on the two cores would slow one
job and not the other). tests/integration/test_estimate_accuracy.py checks the same model in lockstep.
"""
from __future__ import annotations

import json
import random
import secrets

import pytest

from tests.service.processes import start_service

pytestmark = [pytest.mark.slow, pytest.mark.timing]

# The sizes of tests/integration/test_estimate_accuracy.py: the model's own memory is a real share of RSS.
SMALL = dict(hidden_size=768, num_layers=2, num_heads=12, intermediate_size=2048)  # 26.5M parameters
LARGE = dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=2048)  # 54.8M parameters
VOCAB = 8000
TIME_MARGIN, MEMORY_MARGIN = 0.25, 0.20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dpo_core.toy import NUMBER_WORDS, build_model

    root = tmp_path_factory.mktemp("estimate")
    models = {name: build_model(root / name, vocab_size=VOCAB, **shape)
              for name, shape in (("small", SMALL), ("large", LARGE))}
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(NUMBER_WORDS) for _ in range(k))  # noqa: E731
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"sort : {words(40)}", "chosen": " " + words(24),
                                        "rejected": " " + words(24)}) + "\n" for _ in range(64)))
    # One thread a job: the two jobs run minutes apart, and a second core's share would come and go with
    # whatever else the machine runs meanwhile; a single thread's rate holds.
    env = {"DPO_WORKER_GPU_TYPE": "cpu", "DPO_WORKER_GPUS": "1", "OMP_NUM_THREADS": "1"}
    service = start_service(root / "svc", "est-" + secrets.token_hex(8), env)
    yield service, models, service.upload(data)
    service.stop()


def body(model: str, file_id: str, steps: int) -> dict:
    return {"model": model, "training_file": file_id,
            "training": {"batch_size": 4, "max_steps": steps, "max_length": 128, "logging_steps": steps}}


def test_after_a_calibrating_job_the_estimate_of_another_size_holds(setup):
    service, models, file_id = setup
    with service.client(timeout=120) as c:
        first = c.post("/v1/fine_tuning/jobs", json=body(models["small"], file_id, 12)).json()
        done = service.wait_for_job(first["id"], timeout_s=600)
        assert done["status"] == "succeeded", f"{done['error']}\n{service.logs()}"
        assert done["actual"]["steps"] == 12 and done["actual"]["memory_kind"] == "rss"

        report = c.post("/v1/fine_tuning/jobs/preflight", json=body(models["large"], file_id, 5))
        assert report.status_code == 200, report.text
        report = report.json()
        (cpu,) = report["estimate"]["by_gpu_type"]
        assert (cpu["gpu_type"], cpu["basis"], cpu["calibrated_by"]) == ("cpu", "calibrated", [first["id"]])
        assert cpu["fits"] is True and report["queue"]["estimated_start_in_s"] == 0

        job = c.post("/v1/fine_tuning/jobs", json=body(models["large"], file_id, 5)).json()
        assert job["estimate"]["preflight_id"] == report["id"]
        done = service.wait_for_job(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", f"{done['error']}\n{service.logs()}"
    estimate, actual = done["estimate"], done["actual"]
    assert (actual["steps"], actual["tokens"]) == (report["estimate"]["steps"], report["estimate"]["tokens"])
    time_error = estimate["seconds"] / actual["train_seconds"] - 1
    memory_error = estimate["peak_memory_bytes"] / actual["peak_memory_bytes"] - 1
    print(f"time: estimated {estimate['seconds']:.2f} s, took {actual['train_seconds']:.2f} s ({time_error:+.1%}); "
          f"memory: estimated {estimate['peak_memory_bytes'] / 2**20:,.0f} MiB, peak RSS "
          f"{actual['peak_memory_bytes'] / 2**20:,.0f} MiB ({memory_error:+.1%})")
    assert abs(time_error) <= TIME_MARGIN
    assert abs(memory_error) <= MEMORY_MARGIN
