"""training.report_to through the service: refused at submission when no live worker that could run the
job can import its trackers (the scheduler's own rule, on SQLite and PostgreSQL), taken when none is
alive (a worker that did not say what it has, and lacks it, then fails the job as a user error), and the
TensorBoard event files of a job downloadable as a result file."""
from __future__ import annotations

import io
import sys
import tarfile
import time

import pytest

from service.db.migrate import upgrade
from service.errors import InvalidInput
from service.tracking import refuse_unavailable_trackers
from tests.service.support import dispatch, make_settings, register_worker, run_on_worker, sessions_for, upload

JOB = {"max_steps": 2, "max_length": 64, "logging_steps": 1, "batch_size": 4}


@pytest.fixture
def train_id(client, task_files) -> str:
    return upload(client, task_files[0])["id"]


def submit(client, train_id: str, model: str = "owner/model", **extra):
    training = {**JOB, **extra.pop("training", {})}
    return client.post("/v1/fine_tuning/jobs", json={"model": model, "training_file": train_id,
                                                     "training": training, **extra})


def test_a_tracker_no_live_worker_that_could_run_the_job_has_is_refused(client, settings, train_id):
    # No live worker: nothing is known, so the job is taken.
    assert submit(client, train_id, training={"report_to": ["wandb"]}).status_code == 200
    register_worker(settings, "cpu-worker", integrations=["tensorboard"])
    register_worker(settings, "h100-worker", gpu_type="h100", gpus=8, pid=2, integrations=["wandb", "mlflow"])
    shown = {w["name"]: w["integrations"] for w in client.get("/v1/pool").json()["workers"]}
    assert shown == {"cpu-worker": ["tensorboard"], "h100-worker": ["wandb", "mlflow"]}
    refused = submit(client, train_id, training={"report_to": ["tensorboard", "wandb"]}, gpu_type="cpu")
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("report_to_unavailable", "training.report_to")
    assert "wandb" in error["message"] and "pip install wandb" in error["message"]
    # The h100 worker has it, and can run a job that asks for no type or for h100.
    assert submit(client, train_id, training={"report_to": ["wandb"]}, gpu_type="h100").status_code == 200
    assert submit(client, train_id, training={"report_to": ["wandb"]}).status_code == 200
    # A job that needs more GPUs than the h100 worker has could run on no worker: nothing is known.
    assert submit(client, train_id, training={"report_to": ["wandb"]}, gpus=16).status_code == 200
    assert submit(client, train_id, training={"report_to": ["tensorboard"]}, gpu_type="cpu").status_code == 200


def test_a_worker_that_never_said_what_it_has_never_causes_a_refusal(client, settings, train_id):
    from sqlalchemy import update

    from service.db.models import Worker
    from tests.service.support import sessions_for

    worker = register_worker(settings, "old-worker", integrations=[])
    assert submit(client, train_id, training={"report_to": ["mlflow"]}).status_code == 400
    with sessions_for(settings).begin() as s:  # a worker registered before workers said (NULL)
        s.execute(update(Worker).where(Worker.id == worker).values(integrations=None))
    assert submit(client, train_id, training={"report_to": ["mlflow"]}).status_code == 200


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def pool_settings(request, tmp_path):
    """Settings on an empty, migrated database of each kind the service runs on."""
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None
    s = make_settings(tmp_path / "pool", **({"database_url": url} if url else {}))
    upgrade(s.db_url)
    return s


def refusal(settings, report_to: list[str], gpu_type: str | None = None, gpus: int = 1) -> InvalidInput | None:
    with sessions_for(settings)() as s:
        try:
            refuse_unavailable_trackers(s, report_to, gpu_type, gpus, settings.worker_lost_after_s, time.time())
        except InvalidInput as err:
            return err
    return None


def test_a_job_is_taken_only_if_one_worker_that_could_run_it_has_all_its_trackers(pool_settings):
    """Two live workers, one with mlflow and one without: [mlflow] is taken (the scheduler gives it to
    the one with it); trackers that no single worker has together, or that only a worker that cannot run
    the job has, are refused."""
    register_worker(pool_settings, "with-mlflow", pid=1, integrations=["mlflow"])
    register_worker(pool_settings, "plain", pid=2, integrations=["wandb"])
    register_worker(pool_settings, "h100", gpu_type="h100", pid=3, integrations=["wandb"])
    assert refusal(pool_settings, ["mlflow"]) is None
    assert refusal(pool_settings, ["wandb"], gpu_type="h100") is None
    together = refusal(pool_settings, ["mlflow", "wandb"])
    assert (together.code, together.param) == ("report_to_unavailable", "training.report_to")
    assert "all of mlflow, wandb" in together.message
    elsewhere = refusal(pool_settings, ["mlflow"], gpu_type="h100")
    assert elsewhere.code == "report_to_unavailable" and "pip install mlflow-skinny" in elsewhere.message
    assert refusal(pool_settings, ["tensorboard"]).code == "report_to_unavailable"


def test_a_worker_without_the_package_fails_the_job_as_a_user_error(client, settings, train_id, tiny_model,
                                                                     monkeypatch):
    """A worker that says it lacks the tracker never gets the job; one that did not say (NULL) may, and
    then fails it with the same code as at submission."""
    from sqlalchemy import update

    from service.db.models import Worker
    from worker.runner import JobRunner

    job_id = submit(client, train_id, tiny_model, training={"report_to": ["wandb"]}).json()["id"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does where it is not installed
    worker_id = register_worker(settings)  # says what this process can import: not wandb
    assert dispatch(settings) == []
    with sessions_for(settings).begin() as s:  # a worker registered before workers said (NULL)
        s.execute(update(Worker).where(Worker.id == worker_id).values(integrations=None))
    assert [a.job_id for a in dispatch(settings)] == [job_id]
    assert JobRunner(settings, worker_id).run(job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "report_to_unavailable" and "pip install wandb" in job["error"]["message"]


def test_the_tensorboard_files_of_a_job_download_as_a_result_file(client, settings, train_id, tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job_id = submit(client, train_id, tiny_model, training={"report_to": ["tensorboard"]}).json()["id"]
    assert run_on_worker(settings, job_id) == "succeeded"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    files = {f["format"]: f for f in (client.get(f"/v1/files/{i}").json() for i in job["result_files"])}
    assert set(files) == {"metrics", "tensorboard"}
    board = files["tensorboard"]
    assert board["filename"] == f"{job_id}-tensorboard.tar" and board["purpose"] == "fine-tune-results"
    blob = client.get(f"/v1/files/{board['id']}/content").content
    assert len(blob) == board["bytes"]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(tmp_path, filter="data")
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
