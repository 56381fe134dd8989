"""worker.publisher on a real LocalStorage, inline (a local store's way) and in its background process
(a remote store's way, here forced onto a local store so that what it uploads can be read back at once):
the order checkpoints are published and recorded in, the state published before each, the limit of
pending uploads, the deletion of pruned checkpoints, drain, and a failed upload raised as the OSError a
job fails with (storage_error). Also worker.scratch's lock and cleanup, and a JobRunner whose store
refuses a checkpoint."""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dpo_core.layout import checkpoint_dir
from service.artifacts import LocalStorage
from tests.service.stores import JOB, GatedStore, RefusingStore, make, write_checkpoint
from worker.publisher import CHECKPOINT, DELETE
from worker.scratch import LOCK_FILE, Scratch

@pytest.fixture
def dirs(tmp_path):
    output, store = tmp_path / "run" / "output", tmp_path / "store"
    output.mkdir(parents=True)
    return output, store


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_checkpoints_are_published_in_order_with_their_state_and_pruned_ones_deleted(dirs, background):
    output, root = dirs
    storage, done = LocalStorage(root), []
    pub = make(storage, output, done, background, functools.partial(LocalStorage, root))
    try:
        for step in (1, 2, 3):
            write_checkpoint(output, step)
            if step == 3:  # the trainer's save_total_limit=2 pruned the oldest before saying so
                shutil.rmtree(checkpoint_dir(output, 1))
            pub.checkpoint(step, checkpoint_dir(output, step), {"step": step})
        pub.drain()
    finally:
        pub.close()
    assert [(t.kind, t.step) for t in done] == [(CHECKPOINT, 1), (CHECKPOINT, 2), (DELETE, 1), (CHECKPOINT, 3)]
    assert [t.checkpoint_id for t in done if t.kind == CHECKPOINT] == ["ftckpt-0", "ftckpt-1", "ftckpt-2"]
    assert all(t.size == 1024 + len(json.dumps({"step": t.step})) for t in done if t.kind == CHECKPOINT)
    checkpoints = [k for k in storage.list_dirs(f"jobs/{JOB}") if "/checkpoint-" in k]
    assert checkpoints == [f"jobs/{JOB}/checkpoint-2", f"jobs/{JOB}/checkpoint-3"]
    stored = storage.path(f"jobs/{JOB}/checkpoint-3/model.safetensors").read_bytes()
    assert stored == (checkpoint_dir(output, 3) / "model.safetensors").read_bytes()
    metrics = storage.path(f"jobs/{JOB}/state/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2, 3]
    assert not (output.parent / ".publish").exists() or not any((output.parent / ".publish").iterdir())


def gated(output, root, tmp_path):
    """A background Publisher whose checkpoint uploads wait for the file `gate`; and `gate`, and the list
    of the publishes it hands over."""
    gate, done = tmp_path / "gate", []
    return make(LocalStorage(root), output, done, True, functools.partial(GatedStore, root, gate)), gate, done


def test_the_state_is_published_as_it_was_at_the_checkpoint(dirs, tmp_path):
    """Metrics appended after a checkpoint, while its upload waits, are not in what it publishes."""
    output, root = dirs
    pub, gate, done = gated(output, root, tmp_path)
    try:
        write_checkpoint(output, 1)
        pub.checkpoint(1, checkpoint_dir(output, 1))
        with (output / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 2, "loss": 0.5}) + "\n")
        shutil.rmtree(checkpoint_dir(output, 1))  # pruned meanwhile: its staged links still publish
        gate.touch()
        pub.drain()
    finally:
        pub.close()
    storage = LocalStorage(root)
    assert [json.loads(x)["step"] for x in storage.path(f"jobs/{JOB}/state/metrics.jsonl").read_text().splitlines()] == [1]
    assert storage.dir_exists(f"jobs/{JOB}/checkpoint-1") and done[0].step == 1


def test_at_most_two_uploads_wait_and_training_goes_on_meanwhile(dirs, tmp_path):
    output, root = dirs
    pub, gate, done = gated(output, root, tmp_path)
    returned: list[int] = []

    def train():
        for step in (1, 2, 3):
            write_checkpoint(output, step)
            started = time.monotonic()
            pub.checkpoint(step, checkpoint_dir(output, step))
            returned.append((step, time.monotonic() - started))

    thread = threading.Thread(target=train)
    try:
        thread.start()
        time.sleep(1.5)
        # Two checkpoints returned at once, uploads pending; the third waits for the first to be done.
        assert [s for s, _ in returned] == [1, 2] and all(t < 1.0 for _, t in returned) and done == []
        gate.touch()
        thread.join(30)
        assert not thread.is_alive() and [s for s, _ in returned] == [1, 2, 3] and returned[2][1] > 1.0
        pub.drain()
    finally:
        gate.touch()
        pub.close()
    assert [t.step for t in done] == [1, 2, 3]


@pytest.mark.parametrize("background", [False, True], ids=["inline", "background"])
def test_a_refused_upload_is_an_oserror_and_nothing_is_recorded(dirs, background):
    output, root = dirs
    done = []
    pub = make(RefusingStore(root), output, done, background, functools.partial(RefusingStore, root))
    try:
        write_checkpoint(output, 1)
        with pytest.raises(OSError) as err:
            pub.checkpoint(1, checkpoint_dir(output, 1))
            pub.drain()
        assert err.value.errno == errno.EIO and "ServiceUnavailable" in str(err.value)
    finally:
        pub.close()
    assert done == [] and not LocalStorage(root).dir_exists(f"jobs/{JOB}/checkpoint-1")


def test_an_upload_process_that_dies_fails_its_uploads(dirs, tmp_path):
    output, root = dirs
    pub, gate, done = gated(output, root, tmp_path)
    try:
        write_checkpoint(output, 1)
        pub.checkpoint(1, checkpoint_dir(output, 1))
        pub.backend.proc.kill()
        with pytest.raises(OSError) as err:
            pub.drain()
        assert err.value.errno == errno.EIO and "upload process exited" in str(err.value)
    finally:
        pub.close()
    assert done == []


def test_the_upload_process_ignores_sigterm_and_dies_with_its_parent(tmp_path):
    """SIGTERM to the worker's process group is a hand-back for the training, not the end of its uploads;
    the uploads end with the process that started them."""
    script = (
        "import functools, os, sys, time\n"
        "from service.artifacts import LocalStorage\n"
        "from worker.publisher import _Background\n"
        f"b = _Background(functools.partial(LocalStorage, {str(tmp_path)!r}))\n"
        "print(b.proc.pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    child = int(parent.stdout.readline())
    time.sleep(1.0)  # the child has set itself up
    os.kill(child, 15)
    time.sleep(0.3)
    assert _alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_scratch_removes_dead_workers_directories_and_each_runs_files(tmp_path):
    root = tmp_path / "scratch"
    (root / "dead" / "ftjob-x").mkdir(parents=True)
    (root / "dead" / LOCK_FILE).touch()
    (root / "live").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(root / 'live' / LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        scratch = Scratch(root, "me/1").claim()
        assert sorted(p.name for p in root.iterdir()) == ["live", "me_1"]
        again = Scratch(root, "me/1").claim()  # its job process still holds it: one of its own
        assert again.path.name == f"me_1-{os.getpid()}"
        again.close()
        with pytest.raises(ValueError), scratch.run("ftjob-a") as run:
            (run.output / "checkpoint-1").mkdir()
            assert run.data.is_dir() and run.parent.is_dir()
            raise ValueError("the run failed")
        assert sorted(p.name for p in scratch.path.iterdir()) == [LOCK_FILE]
        fd = os.open(scratch.path / LOCK_FILE, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
        scratch.close()
    finally:
        holder.kill()
        holder.wait()


def test_a_store_that_refuses_checkpoints_fails_the_job_with_a_storage_error(client, settings, task_files,
                                                                            tiny_model):
    from tests.service.support import dispatch, register_worker, upload
    from worker.runner import JobRunner

    train_id = upload(client, task_files[0])["id"]
    r = client.post("/v1/fine_tuning/jobs", json={
        "model": tiny_model, "training_file": train_id,
        "training": {"max_steps": 3, "save_steps": 1, "max_length": 64, "max_prompt_length": 32},
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    job_id = r.json()["id"]
    worker_id = register_worker(settings)
    assert [a.job_id for a in dispatch(settings)] == [job_id]
    runner = JobRunner(settings, worker_id)
    runner.storage = RefusingStore(settings.data_dir)
    assert runner.run(job_id) == "failed"
    job = client.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert job["error"]["code"] == "storage_error" and "ServiceUnavailable" in job["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
    assert not (settings.worker_scratch_dir / worker_id / job_id).exists()  # the run's scratch is gone


def test_checkpoints_fetched_at_the_start_are_deleted_when_the_trainer_prunes_them(dirs):
    output, root = dirs
    storage, done = LocalStorage(root), []
    storage.publish_dir(write_checkpoint(output, 2), f"jobs/{JOB}/checkpoint-2", "ftckpt-old")
    pub = make(storage, output, done, False)  # a resumed run: checkpoint-2 is in the store and on disk
    try:
        write_checkpoint(output, 4)
        shutil.rmtree(checkpoint_dir(output, 2))  # save_total_limit=1
        pub.checkpoint(4, checkpoint_dir(output, 4))
        pub.checkpoint(4, checkpoint_dir(output, 4))  # saved again as the run stops where it resumed
        pub.drain()
    finally:
        pub.close()
    assert [(t.kind, t.step) for t in done] == [(DELETE, 2), (CHECKPOINT, 4)]
    assert [k for k in storage.list_dirs(f"jobs/{JOB}") if "/checkpoint-" in k] == [f"jobs/{JOB}/checkpoint-4"]
