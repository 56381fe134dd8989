"""JobRunner: load a job by id, take its lease, run it with dpo_core, record the outcome.

A run works in the worker's scratch directory (worker.scratch), the only disk it uses: its inputs
are fetched from the store first (worker.inputs), its checkpoints published there as it trains
(worker.publisher), its final model and result files before it is recorded as finished. It starts
from the job's latest checkpoint in the store when an earlier run published one (a worker was lost,
handed the job back on SIGTERM, or the job was paused), on whichever worker. User errors (a bad spec,
bad data, a model that does not load) fail the job with their one-line message and a stable code; a
failed write or read of the scratch disk or of the store fails it with `storage_error` or
`checkpoint_error`; anything else is an internal error: the team sees a short message with an error
id, the worker's log has the traceback under that id. Every write names the run's lease
(worker.lease): a run that lost its job to another writes nothing more. A database that cannot answer
for a while is waited out, at the start and at the end of a run as while it trains: it never fails a
job, nor uses one of its attempts.
"""
from __future__ import annotations

import errno
import faulthandler
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dpo_core import estimate
from dpo_core.data import DataError, Problem
from dpo_core.errors import RankFailedError, TrainingError
from dpo_core.layout import FINAL_DIR, METRICS_FILE, TENSORBOARD_DIR, TENSORBOARD_TAR
from dpo_core.spec import SpecError, TrainingSpec
from service import parents, reference_cache
from service.artifacts import iter_tar, job_key, make_storage, state_key
from service.db import jobs, leases
from service.db.engine import make_engine, make_sessionmaker
from service.db.leases import Lease
from service.db.models import File, Job, JobStatus, Worker, new_id, now
from service.errors import LeaseLost
from service.jobspec import runnable
from service.model_paths import model_problem
from service.settings import Settings
from worker import inputs
from worker.lease import LeaseKeeper, retrying
from worker.recorder import JobRecorder, attach_publisher, make_recorder
from worker.scratch import RunDirs, Scratch

log = logging.getLogger("dpo.worker")
# A write or read of the scratch disk or the store failed for a reason the operator can fix.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EFBIG, errno.EACCES,
                            errno.EPERM})


@dataclass(frozen=True)
class _JobInputs:
    """What the database says a run reads: the job's stored spec, its files' keys, its starting point."""

    spec: dict
    train_key: str
    validation_key: str | None
    start: parents.Start | None
    team_id: str


@dataclass
class _Outputs:
    """What a finished run put in the store: the final model (id, key, bytes) and the result files."""

    final: tuple[str, str, int] | None = None
    metrics: tuple[str, int, int] | None = None  # key, bytes, records
    tensorboard: tuple[str, int, int] | None = None  # key, bytes, event files


class JobRunner:
    """Runs jobs dispatched to one worker (`worker_id`, its row in the pool), in its scratch directory
    (default: settings.worker_scratch_dir/<worker_id>)."""

    def __init__(self, settings: Settings, worker_id: str, scratch_dir: Path | None = None):
        self.settings, self.worker_id = settings, worker_id
        self.storage = make_storage(settings)
        self.scratch = Scratch(scratch_dir.parent, scratch_dir.name) if scratch_dir else \
            Scratch(settings.worker_scratch_dir, worker_id)

    def run(self, job_id: str, start_deadline_s: float | None = None) -> str:
        """Start the job if it is dispatched to this worker, train it, record the outcome; returns what
        became of it (a status, `skipped`, or `lease_lost` when another run took it over meanwhile).

        start_deadline_s: for a process of its own (the Celery task's), exit if the job has not started
        or been skipped by then, see `_exit_if_stuck`.
        """
        engine = make_engine(self.settings.db_url)
        self.sessions = make_sessionmaker(engine)
        try:
            with _exit_if_stuck(start_deadline_s):
                lease = self._start(job_id)
            if lease is None:
                return "skipped"
            keeper = LeaseKeeper(self.sessions, lease, self.settings.job_lease_s,
                                 self.settings.worker_heartbeat_interval_s)
            keeper.start()
            try:
                return self._train(keeper)
            except LeaseLost:
                log.warning("job %s: this run lost its lease (the job was taken back, or it ended); "
                            "it wrote nothing more", job_id)
                return "lease_lost"
            finally:
                keeper.stop()
        finally:
            engine.dispose()

    def _start(self, job_id: str) -> Lease | None:
        """Take the job's lease. While the database cannot answer, tried again for up to half the dispatch
        timeout; then the job, still `dispatched`, is queued again by the reconciler at that timeout."""
        give_up_at = time.monotonic() + self.settings.dispatch_timeout_s / 2
        return retrying(lambda: self._acquire(job_id), give_up=lambda: time.monotonic() > give_up_at,
                        max_delay_s=self.settings.worker_heartbeat_interval_s, what=f"job {job_id}")

    def _acquire(self, job_id: str) -> Lease | None:
        with self.sessions.begin() as s:
            if s.get(Job, job_id) is None:
                log.warning("job %s is not in the database; dropping its message", job_id)
                return None
            # Only a job dispatched to this worker starts: a cancelled one, one given back to the queue and
            # dispatched elsewhere, or a duplicate or re-delivered message is skipped; and nothing starts on
            # a worker that is shutting down (the reconciler gives its dispatched jobs to others).
            me = s.execute(select(Worker.name, Worker.stopped_at).where(Worker.id == self.worker_id)).one_or_none()
            if me is not None and me.stopped_at is not None:
                log.info("job %s: this worker is shutting down; not starting it", job_id)
                return None
            name = me.name if me is not None else self.worker_id
            lease = leases.acquire(s, job_id, self.worker_id, name, self.settings.job_lease_s)
        if lease is None:
            log.info("job %s is not dispatched to this worker; skipping it", job_id)
        return lease

    def _train(self, keeper: LeaseKeeper) -> str:
        with self.scratch.run(keeper.lease.job_id) as dirs:
            recorder = make_recorder(self.sessions, self.settings, keeper, self.storage)
            try:
                status = self._run_in(keeper, recorder, dirs)
            finally:
                recorder.close()
        if JobStatus(status).terminal:
            self._drop_state(keeper.lease.job_id)
        return status

    def _drop_state(self, job_id: str) -> None:
        """An ended job is never resumed: the state its runs kept for that goes (its result files stay)."""
        try:
            self.storage.delete(state_key(job_id))
        except OSError as err:  # the orphan sweep removes it later
            log.warning("job %s: its resume state stays in the store for now (%s)", job_id, err)

    def _run_in(self, keeper: LeaseKeeper, recorder: JobRecorder, dirs: RunDirs) -> str:
        import dpo_core  # torch comes in here, in the worker only

        lease, tables = keeper.lease, None
        try:
            with _handback_on_sigterm(recorder):
                job, gpus = keeper.read(lambda s: self._inputs(s, lease.job_id)), self._gpus(keeper)
                spec = self._spec(lease.job_id, job, dirs)
                spec, tables = inputs.fetch_reference_tables(self.storage, job.team_id, spec, dirs,
                                                             self.settings.reference_cache_team_bytes)
                if gpus > 1:
                    result = self._launch(lease, spec, gpus)
                else:
                    attach_publisher(recorder, self.settings, dirs.output)
                    result = dpo_core.train(spec, recorder)
                    recorder.drain()
                self._keep_reference_tables(keeper, tables)
                outputs = self._publish_outputs(lease.job_id, result, dirs.output)
        except LeaseLost:
            raise
        except (SpecError, DataError, TrainingError) as err:
            recorder.flush()  # the metrics logged before the failure (a diverged run's last finite ones)
            recorder.drain_quietly()
            self._keep_reference_tables(keeper, tables)  # tables computed before the failure are good for the next
            return self._fail(keeper, _code(err), one_line(err))
        except Exception as err:  # noqa: BLE001 - the job must end failed, whatever went wrong
            recorder.drain_quietly()
            if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:  # full, read-only, failing, unreachable
                return self._fail(keeper, "storage_error", storage_message(err))
            return self._fail_internal(keeper, err)
        return self._finish(keeper, result, outputs, self._measured(keeper, spec, result, gpus))

    def _keep_reference_tables(self, keeper: LeaseKeeper, tables: inputs.ReferenceTables | None) -> None:
        """Put the reference log-probs the run computed in its team's cache (service.reference_cache), and say
        so on the job. A store that refuses them costs later jobs the reference pass, never this job."""
        if tables is None or not tables.computed():
            return
        try:
            kept = reference_cache.put(self.storage, tables.team_id, tables.key, tables.path,
                                       self.settings.reference_cache_team_bytes)
        except OSError as err:
            log.warning("job %s: its reference log-probs were not cached (%s)", keeper.lease.job_id, err)
            return
        if kept:
            keeper.write(lambda s: jobs.add_event(s, keeper.lease.job_id, "Reference log-probs computed and cached "
                                                  "for the team's later jobs", data={"code": "reference_cache_stored"}))

    def _measured(self, keeper: LeaseKeeper, spec: TrainingSpec, result, gpus: int) -> dict | None:
        """What the run measured (dpo_core.estimate.measured): it calibrates later estimates. Its FLOPs come
        from the model's shape, left out (None) when that cannot be read."""
        gpu_type = keeper.read(lambda s: s.scalar(select(Worker.gpu_type).where(Worker.id == self.worker_id)))
        try:
            facts = estimate.model_facts(spec.model)
        except (OSError, ValueError, KeyError) as err:
            log.warning("job %s: no FLOPs in its measurement, the model's shape cannot be read (%s)",
                        keeper.lease.job_id, err)
            facts = None
        try:
            return estimate.measured(spec, result, gpu_type or "cpu", gpus, facts)
        except Exception:  # noqa: BLE001 - a measurement must never fail the run it measures
            log.exception("job %s: its measurement could not be made; it is recorded without one",
                          keeper.lease.job_id)
            return None

    def _launch(self, lease: Lease, spec: TrainingSpec, gpus: int):
        """Run a multi-GPU job in a subprocess (worker.distributed_job) and return rank 0's TrainResult."""
        from dpo_core.trainer import TrainResult

        with tempfile.TemporaryDirectory(prefix="dpo-job-") as tmp:
            spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_path.write_text(spec.model_dump_json())
            env = {**os.environ, "DPO_DATA_DIR": str(self.settings.data_dir), "DPO_DATABASE_URL": self.settings.db_url,
                   "DPO_STORAGE_URL": self.settings.store_url}
            args = [sys.executable, "-m", "worker.distributed_job", lease.job_id, str(lease.token), str(gpus),
                    str(spec_path), str(result_path)]
            proc = subprocess.run(args, env=env, preexec_fn=_die_with_parent)
            if not result_path.exists():
                raise RankFailedError(f"the job's launcher process exited with code {proc.returncode}")
            outcome = json.loads(result_path.read_text())
        if "error" in outcome:
            raise TrainingError(outcome["error"]["message"], code=outcome["error"]["code"])
        return TrainResult(**outcome["result"])

    def _gpus(self, keeper: LeaseKeeper) -> int:
        return keeper.read(lambda s: s.scalar(select(Job.gpus).where(Job.id == keeper.lease.job_id))) or 1

    def _inputs(self, s: Session, job_id: str) -> _JobInputs:
        job = s.get(Job, job_id)
        keys = {f.id: f.storage_key
                for f in s.scalars(select(File).where(File.id.in_([job.training_file, job.validation_file])))}
        if job.training_file not in keys or (job.validation_file and job.validation_file not in keys):
            raise DataError([_missing_file(job)])
        start = self._start_point(s, job)
        # Model names are checked against the allowed model dirs: the job's, or the base its LoRA parent trained
        # on; a checkpoint's directory is in the service's storage, not named by a request.
        model = job.model if start is None else (None if start.behind_model else start.model)
        reward_model = (job.spec.get("samples") or {}).get("reward_model")
        for name in filter(None, (model, job.spec.get("reference_model"), reward_model)):
            if problem := model_problem(name, self.settings.model_dirs, must_exist=False):
                raise TrainingError(problem, code="model_not_allowed")
        return _JobInputs(job.spec, keys[job.training_file], keys.get(job.validation_file), start, job.team_id)

    def _spec(self, job_id: str, job: _JobInputs, dirs: RunDirs) -> TrainingSpec:
        """The run's spec on this machine, once what it reads is on the scratch disk. What an interrupted
        run left half-written in the store goes first: this run holds the lease, no other writes there."""
        self.storage.remove_partial(job_key(job_id))
        train = inputs.fetch_upload(self.storage, job.train_key, dirs)
        validation = inputs.fetch_upload(self.storage, job.validation_key, dirs) if job.validation_key else None
        inputs.fetch_output(self.storage, job_id, dirs.output)
        start = inputs.fetch_parent(self.storage, job.start, dirs)
        # "auto": the latest checkpoint an earlier run of this job published, if any (a resumed job).
        return runnable(job.spec, train, validation, str(dirs.output), resume_from="auto", start=start)

    def _start_point(self, s: Session, job: Job) -> parents.Start | None:
        """Where a job that continues a checkpoint starts (in the store); a checkpoint deleted since it
        was queued fails it (parent_checkpoint_deleted)."""
        if job.parent_checkpoint is None:
            return None
        try:
            return parents.of_job(s, self.storage, job)
        except parents.ParentGone as err:
            raise TrainingError(err.message, code=err.code) from None

    def _publish_outputs(self, job_id: str, result, output: Path) -> _Outputs:
        """The final model and the result files of a run that ended (not stopped), put in the store before
        the job is recorded as finished, so its final model and result files are whole when listed."""
        outputs, prefix = _Outputs(), job_key(job_id)
        if result.stopped:
            return outputs
        if result.final_dir:
            final_id, key = new_id("ftckpt"), f"{prefix}/{FINAL_DIR}"
            outputs.final = (final_id, key, self.storage.publish_dir(Path(result.final_dir), key, final_id))
        metrics = output / METRICS_FILE
        if metrics.is_file():
            key = f"{prefix}/{METRICS_FILE}"
            records = sum(1 for _ in metrics.open("rb"))
            outputs.metrics = (key, self.storage.put_file(key, metrics), records)
        directory = output / TENSORBOARD_DIR
        if directory.is_dir():  # one uncompressed tar of the TensorBoard event files
            key = f"{prefix}/{TENSORBOARD_TAR}"
            size = self.storage.put_stream(key, iter_tar(directory, TENSORBOARD_DIR))
            outputs.tensorboard = (key, size, sum(1 for p in directory.rglob("events.out.tfevents.*") if p.is_file()))
        return outputs

    def _finish(self, keeper: LeaseKeeper, result, outputs: _Outputs, measured: dict | None) -> str:
        """Record the run's outcome, and with a success what it measured; waits out a database that cannot
        answer (LeaseLost once the lease is lost)."""
        lease, outcome = keeper.lease, {}

        def write(s: Session) -> None:
            fields = dict(trained_tokens=result.trained_tokens, step=result.global_step, estimated_finish=None)
            if jobs.cancel_requested(s, lease.job_id):
                leases.finish(s, lease, JobStatus.CANCELLED, **fields)
                outcome["status"] = JobStatus.CANCELLED
                return
            if result.stopped:  # not cancelled, and still ours: paused, or its worker is shutting down
                name = s.scalar(select(Worker.name).where(Worker.id == self.worker_id)) or self.worker_id
                # Read after the lease check locked the row: a pause asked until now ends the job paused.
                paused = bool(s.scalar(select(Job.pause_requested).where(Job.id == lease.job_id)))
                jobs.update_job(s, lease.job_id, **fields)
                leases.hand_back(s, lease, name, result.global_step, paused=paused)
                outcome["status"] = JobStatus.PAUSED if paused else JobStatus.QUEUED
                return
            if outputs.final is not None:
                final_id, key, size = outputs.final
                # The final model is the best evaluation's weights under early stopping or load_best_at_end.
                step = result.global_step if result.best_step is None else result.best_step
                jobs.add_checkpoint(s, lease.job_id, step, key, {**result.metrics, **(result.eval_metrics or {})},
                                    final=True, size=size, id=final_id)
                s.flush()
                fields["fine_tuned_model"] = final_id
            fields["result_files"] = self._result_files(s, lease.job_id, outputs)
            leases.finish(s, lease, JobStatus.SUCCEEDED, measured=measured, **fields)
            outcome["status"] = JobStatus.SUCCEEDED
        keeper.write_now(write)
        return outcome["status"].value

    def _result_files(self, s, job_id: str, outputs: _Outputs) -> list[str]:
        """The run's outputs registered as downloadable files (OpenAI's result_files): dpo_core's
        metrics.jsonl, and the TensorBoard event files packed as one tar (report_to: tensorboard)."""
        team_id = s.scalar(select(Job.team_id).where(Job.id == job_id))
        files = []
        if outputs.metrics is not None:
            key, size, records = outputs.metrics
            files.append(File(id=new_id("file"), team_id=team_id, filename=f"{job_id}-metrics.jsonl",
                              purpose="fine-tune-results", bytes=size, format="metrics", rows=records,
                              status="processed", storage_key=key, created_at=now()))
        if outputs.tensorboard is not None:
            key, size, event_files = outputs.tensorboard
            files.append(File(id=new_id("file"), team_id=team_id, filename=f"{job_id}-{TENSORBOARD_TAR}",
                              purpose="fine-tune-results", bytes=size, format="tensorboard", rows=event_files,
                              status="processed", storage_key=key, created_at=now()))
        s.add_all(files)
        return [f.id for f in files]

    def _fail_internal(self, keeper: LeaseKeeper, err: Exception) -> str:
        """An error no code path names: the team gets its kind and an error id, never the traceback (it
        holds the server's paths and code); the worker's log gets the traceback under that id."""
        error_id = new_id("error")
        log.error("job %s: internal error %s", keeper.lease.job_id, error_id, exc_info=err,
                  extra={"error_id": error_id})
        message = (f"internal error ({type(err).__name__}), error id {error_id}; report the id to the operator, "
                   "whose worker log has the details")
        return self._fail(keeper, "internal_error", message, {"error_id": error_id})

    def _fail(self, keeper: LeaseKeeper, code: str, message: str, data: dict | None = None) -> str:
        """Fail the job; waits out a database that cannot answer (LeaseLost once the lease is lost)."""
        job_id = keeper.lease.job_id

        def write(s: Session) -> None:
            jobs.add_event(s, job_id, message, level="error", data={"code": code, **(data or {})})
            leases.finish(s, keeper.lease, JobStatus.FAILED, error_code=code, error_message=message,
                          estimated_finish=None)
        keeper.write_now(write)
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


def storage_message(err: OSError) -> str:
    """A failed write or read of the scratch disk or the store, said plainly: what failed, where, and what
    to do."""
    where = f" ({err.filename})" if err.filename else ""
    return (f"storage error: {err.strerror or type(err).__name__}{where}; the job's earlier checkpoints are "
            "intact. Free space on (or repair) the worker's scratch disk or the store, then resubmit the job")


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


@contextmanager
def _exit_if_stuck(seconds: float | None):
    """Exit the process, with every thread's traceback on stderr, if the block runs past `seconds`.

    A job process that hangs before taking its lease (a lock inherited across the fork, a database that
    never answers) would hold the worker's one pool slot for good, and the reconciler's re-send of the
    job would wait behind it. Exiting lets Celery replace the process, so the re-send can run.
    """
    if seconds is None:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


@contextmanager
def _handback_on_sigterm(recorder: JobRecorder):
    """While a job trains in this process's main thread, SIGTERM (a `kill` of the worker's process group,
    a node shutting down) makes it checkpoint at its next step and hand the job back; Celery's pool had
    reset SIGTERM to kill the job process outright. (Run in another thread, as in tests: nothing to do.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: recorder.handback.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _missing_file(job: Job) -> Problem:
    return Problem(job.training_file, None, None, "the job's training or validation file was deleted; upload it again")
