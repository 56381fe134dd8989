"""JobRunner: load a job by id, run it with dpo_core, record the outcome.

User errors (a bad spec, bad data, a model that does not load) fail the job with their one-line
message and a stable code; anything else is an internal error whose traceback goes into an event.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from sqlalchemy import select

from api.jobspec import runnable
from api.settings import Settings
from api.storage import LocalStorage
from api.store import jobs as store
from api.store.db import make_engine, make_sessionmaker
from api.store.models import File, Job, JobStatus, new_id, now
from dpo_core.data import DataError, Problem
from dpo_core.errors import RankFailedError, TrainingError
from dpo_core.spec import SpecError, TrainingSpec
from worker.recorder import JobRecorder

log = logging.getLogger("dpo.worker")
RUNNING = (JobStatus.RUNNING,)


class JobRunner:
    """Runs jobs dispatched to one worker (`worker_id`, its row in the pool)."""

    def __init__(self, settings: Settings, worker_id: str):
        self.settings, self.worker_id = settings, worker_id
        self.storage = LocalStorage(settings.storage_dir)

    def run(self, job_id: str) -> str:
        engine = make_engine(self.settings.db_url)
        self.sessions = make_sessionmaker(engine)
        try:
            if not self._start(job_id):
                return "skipped"
            return self._train(job_id)
        finally:
            engine.dispose()

    def _start(self, job_id: str) -> bool:
        with self.sessions.begin() as s:
            if s.get(Job, job_id) is None:
                log.warning("job %s is not in the database; dropping its message", job_id)
                return False
            # Only a job dispatched to this worker starts: a cancelled one, one given back to the queue and
            # dispatched elsewhere, or a duplicate message is skipped.
            started = store.transition(s, job_id, JobStatus.RUNNING, (JobStatus.DISPATCHED,),
                                       where=(Job.worker_id == self.worker_id,), started_at=time.time())
        if not started:
            log.info("job %s is not dispatched to this worker; skipping it", job_id)
        return started

    def _train(self, job_id: str) -> str:
        import dpo_core  # torch comes in here, in the worker only

        recorder = JobRecorder(self.sessions, self.storage, job_id, self.settings.metrics_event_interval_s,
                               self.settings.cancel_poll_interval_s)
        try:
            spec, gpus = self._spec(job_id), self._gpus(job_id)
            result = self._launch(job_id, spec, gpus) if gpus > 1 else dpo_core.train(spec, recorder)
        except (SpecError, DataError, TrainingError) as err:
            return self._fail(job_id, _code(err), one_line(err))
        except Exception as err:  # noqa: BLE001 - the job must end failed, whatever went wrong
            log.exception("job %s failed", job_id)
            return self._fail(job_id, "internal_error", f"internal error: {type(err).__name__}: {one_line(err)}",
                              traceback.format_exc())
        return self._finish(job_id, result)

    def _launch(self, job_id: str, spec: TrainingSpec, gpus: int):
        """Run a multi-GPU job in a subprocess (worker.distributed_job) and return rank 0's TrainResult."""
        from dpo_core.trainer import TrainResult

        with tempfile.TemporaryDirectory(prefix="dpo-job-") as tmp:
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(spec.model_dump_json())
            env = {**os.environ, "DPO_DATA_DIR": str(self.settings.data_dir), "DPO_DATABASE_URL": self.settings.db_url}
            args = [sys.executable, "-m", "worker.distributed_job", job_id, str(gpus), str(spec_path), str(result_path)]
            proc = subprocess.run(args, env=env, preexec_fn=_die_with_parent)
            if not result_path.exists():
                raise RankFailedError(f"the job's launcher process exited with code {proc.returncode}")
            outcome = json.loads(result_path.read_text())
        if "error" in outcome:
            raise TrainingError(outcome["error"]["message"], code=outcome["error"]["code"])
        return TrainResult(**outcome["result"])

    def _gpus(self, job_id: str) -> int:
        with self.sessions() as s:
            return s.scalar(select(Job.gpus).where(Job.id == job_id)) or 1

    def _spec(self, job_id: str) -> TrainingSpec:
        with self.sessions() as s:
            job = s.get(Job, job_id)
            paths = {f.id: str(self.storage.path(f.storage_key))
                     for f in s.scalars(select(File).where(File.id.in_([job.training_file, job.validation_file])))}
        if job.training_file not in paths or (job.validation_file and job.validation_file not in paths):
            raise DataError([_missing_file(job)])
        output_dir = str(self.storage.path(f"jobs/{job_id}"))
        return runnable(job.spec, paths[job.training_file], paths.get(job.validation_file), output_dir)

    def _finish(self, job_id: str, result) -> str:
        with self.sessions.begin() as s:
            fields = dict(trained_tokens=result.trained_tokens, step=result.global_step, estimated_finish=None)
            if result.stopped or store.cancel_requested(s, job_id):
                store.transition(s, job_id, JobStatus.CANCELLED, RUNNING, **fields)
                return JobStatus.CANCELLED.value
            if result.final_dir:
                final = store.add_checkpoint(s, job_id, result.global_step, self.storage.key_for(result.final_dir),
                                             {**result.metrics, **(result.eval_metrics or {})}, final=True)
                s.flush()
                fields["fine_tuned_model"] = final.id
            fields["result_files"] = self._result_files(s, job_id)
            store.transition(s, job_id, JobStatus.SUCCEEDED, RUNNING, **fields)
        return JobStatus.SUCCEEDED.value

    def _result_files(self, s, job_id: str) -> list[str]:
        """dpo_core's metrics.jsonl of the run, registered as a downloadable file (OpenAI's result_files)."""
        key = f"jobs/{job_id}/metrics.jsonl"
        if not self.storage.exists(key):
            return []
        path = self.storage.path(key)
        team_id = s.scalar(select(Job.team_id).where(Job.id == job_id))
        file = File(id=new_id("file"), team_id=team_id, filename=f"{job_id}-metrics.jsonl", purpose="fine-tune-results",
                    bytes=path.stat().st_size, format="metrics", rows=sum(1 for _ in path.open("rb")),
                    status="processed", storage_key=key, created_at=now())
        s.add(file)
        return [file.id]

    def _fail(self, job_id: str, code: str, message: str, trace: str | None = None) -> str:
        with self.sessions.begin() as s:
            if trace:
                store.add_event(s, job_id, "Traceback of the internal error", level="error", data={"traceback": trace})
            store.add_event(s, job_id, message, level="error", data={"code": code})
            store.transition(s, job_id, JobStatus.FAILED, RUNNING, error_code=code, error_message=message,
                             estimated_finish=None)
        return JobStatus.FAILED.value


def one_line(err: Exception) -> str:
    """An error as one line: the first problem (with a count of the rest) or the first line of the message."""
    if isinstance(err, SpecError) and err.problems:
        return "invalid training spec: " + "; ".join(f"{loc}: {msg}" for loc, msg in err.problems)
    if isinstance(err, DataError) and err.problems:
        rest = err.total - 1
        return str(err.problems[0]).strip() + (f" (and {rest} more problems)" if rest > 0 else "")
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _code(err: Exception) -> str:
    if isinstance(err, SpecError):
        return "invalid_training_spec"
    if isinstance(err, DataError):
        return "invalid_training_file"
    return getattr(err, "code", "training_error")


def _die_with_parent() -> None:
    """In the launcher subprocess: get SIGTERM if the job process dies, so no rank outlives its job
    (the elastic agent turns SIGTERM into stopping every rank)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the agent still ends with its ranks when the job finishes normally


def _missing_file(job: Job) -> Problem:
    return Problem(job.training_file, None, None, "the job's training or validation file was deleted; upload it again")
