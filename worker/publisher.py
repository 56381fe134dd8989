"""Publisher: a run's checkpoints go to the store while training goes on.

`checkpoint(step, path)` stages the checkpoint the trainer just wrote (hard links into `staging/`, so the
trainer's pruning may delete the original at once) with a copy of the run's state (metrics.jsonl,
tracking.json, tensorboard/, which the trainer keeps appending to), then publishes, in order: the state
objects, then the checkpoint directory as `jobs/J/checkpoint-N` under a pre-generated checkpoint id (its
tar's arcname). The state goes first: a run killed between the two resumes from the checkpoint before,
and its metrics.jsonl, ahead of that checkpoint, is cut back to it (dpo_core.metrics); the other way
round a resume would lose the records between the two checkpoints.

With a remote store the uploads run in one background process (FIFO, niced, started afresh from the
interpreter, killed with its parent, deaf to the worker's SIGTERM, which is for the training): the
step after a checkpoint does not wait for its upload. At most `max_pending` checkpoints wait for their
upload; the next one waits for the oldest to be done. With a local store, publishing is a few hard
links and a rename, done at once in the training thread.

A publish that is done is handed to `on_done` in the training thread (`poll`, `drain`): only then is a
checkpoint recorded, so one appears in the API only once it is whole in the store. Checkpoints the
trainer pruned (the known ones missing from its output directory) are deleted from the store after
their own publish, and `on_done` hears of that too. A failed upload raises OSError (errno.EIO for a
store's failure) from the next `poll`.

`python -m worker.publisher PARENT_PID` is the background process: it reads pickled (task id, ops)
from stdin, runs them in order on a store it builds with the factory sent first, and answers
(task id, size, error) on stdout.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpo_core.layout import METRICS_FILE, TENSORBOARD_DIR, TRACKING_FILE, checkpoint_dir, list_checkpoints
from service.artifacts import Storage, job_key, link_tree, state_key

log = logging.getLogger("dpo.worker")
MAX_PENDING = 2
NICENESS = 10
CHECKPOINT, DELETE = "checkpoint", "delete"

Op = tuple[str, tuple]  # a Storage method's name and its arguments


@dataclass
class Task:
    """One unit of publishing: a checkpoint (with the state before it) or a pruned checkpoint's deletion."""

    kind: str
    step: int
    key: str
    ops: list[Op]
    id: int = 0
    checkpoint_id: str | None = None
    metrics: dict | None = None  # the checkpoint row's metrics
    staged: list[Path] = field(default_factory=list)  # removed once done
    size: int = 0
    error: BaseException | None = None
    done: bool = False


class Publisher:
    """One run's publishing (see the module's docstring). `known_steps`: the checkpoints already in the
    store, by default those in `output_dir` now (fetched from the store as the run starts)."""

    def __init__(self, storage: Storage, job_id: str, output_dir: Path, staging: Path,
                 on_done: Callable[[Task], None], new_id: Callable[[], str],
                 store_factory: Callable[[], Storage] | None = None, known_steps: set[int] | None = None,
                 max_pending: int = MAX_PENDING, background: bool | None = None):
        self.storage, self.job_id, self.prefix = storage, job_id, job_key(job_id)
        self.output_dir, self.staging = Path(output_dir), Path(staging)
        self.on_done, self.new_id, self.max_pending = on_done, new_id, max_pending
        # Steps published or queued, not deleted: a pruned one among them is deleted from the store.
        self.known = set(known_steps) if known_steps is not None else {s for s, _ in list_checkpoints(output_dir)}
        self.tasks: deque[Task] = deque()
        self._count = 0
        self.stage = storage.remote if background is None else background
        self.backend = _Background(store_factory) if self.stage else _Inline(storage)

    def checkpoint(self, step: int, path: str | Path, metrics: dict | None = None) -> None:
        """Publish the checkpoint the trainer wrote at `path`; delete from the store those it pruned."""
        self.poll()
        while sum(t.kind == CHECKPOINT for t in self.tasks) >= self.max_pending:
            self._wait_one()
        local = {s for s, _ in list_checkpoints(self.output_dir)}
        for gone in sorted(self.known - local - {step}):
            self._submit(Task(DELETE, gone, self._key(gone), [("delete", (self._key(gone),))]))
            self.known.discard(gone)
        # A step already in the store is the one the run resumed from, saved again as it stops before its
        # first step: the same state, published and recorded once.
        if step not in self.known:
            self._submit(self._checkpoint_task(step, Path(path), metrics))
            self.known.add(step)
        self.poll()

    def poll(self) -> None:
        """Hand every publish done so far to on_done, in order; raise the first failure."""
        for result in self.backend.results():
            self._record(result)
        while self.tasks and self.tasks[0].done:
            task = self.tasks.popleft()
            for staged in task.staged:
                shutil.rmtree(staged, ignore_errors=True)
            if task.error is not None:
                raise task.error
            self.on_done(task)

    def drain(self) -> None:
        """Return once every publish is done and handed to on_done (the first failure raised)."""
        self.poll()
        while self.tasks:
            self._wait_one()

    def close(self) -> None:
        """Stop publishing: what is still queued is dropped (a run that failed or lost its job)."""
        self.backend.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def _wait_one(self) -> None:
        self._record(self.backend.wait())
        self.poll()

    def _record(self, result: tuple[int, int, BaseException | None]) -> None:
        task_id, size, error = result
        task = next(t for t in self.tasks if t.id == task_id)
        task.size, task.error, task.done = size, error, True

    def _submit(self, task: Task) -> None:
        self._count += 1
        task.id = self._count
        self.tasks.append(task)
        self.backend.submit(task.id, task.ops)

    def _key(self, step: int) -> str:
        return f"{self.prefix}/{checkpoint_dir('', step).name}"

    def _checkpoint_task(self, step: int, path: Path, metrics: dict | None) -> Task:
        checkpoint_id, staged = self.new_id(), []
        if self.stage:  # a background upload reads files the trainer may prune or append to meanwhile
            root = self.staging / checkpoint_id
            staged = [root]
            root.mkdir(parents=True)
            link_tree(path, root / path.name)
            path = root / path.name
            ops = self.state_ops(self.output_dir, root / "state")
        else:
            ops = self.state_ops(self.output_dir)
        ops.append(("publish_dir", (path, self._key(step), checkpoint_id)))
        return Task(CHECKPOINT, step, self._key(step), ops, checkpoint_id=checkpoint_id, metrics=metrics,
                    staged=staged)

    def state_ops(self, output_dir: Path, copy_to: Path | None = None) -> list[Op]:
        """Publishing the run's state objects (copied first into `copy_to`, when given: the trainer
        goes on appending to them while a background upload reads)."""
        ops: list[Op] = []
        for name, op in ((METRICS_FILE, "put_file"), (TRACKING_FILE, "put_file"), (TENSORBOARD_DIR, "publish_dir")):
            source = output_dir / name
            if not source.exists():
                continue
            if copy_to is not None:
                copy_to.mkdir(parents=True, exist_ok=True)
                source = _copy(source, copy_to / name)
            key = state_key(self.job_id, name)
            ops.append((op, (source, key, name) if op == "publish_dir" else (key, source)))
        return ops


def _copy(source: Path, dest: Path) -> Path:
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=True)
    else:
        shutil.copy2(source, dest, follow_symlinks=False)
    return dest


def run_ops(storage: Storage, ops: list[Op]) -> int:
    """Run the ops in order; the result of the last (a checkpoint's bytes)."""
    result = 0
    for name, args in ops:
        result = getattr(storage, name)(*args) or 0
    return result


class _Inline:
    """Publishing in the calling thread: a local store's hard links and renames."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.done: deque = deque()

    def submit(self, task_id: int, ops: list[Op]) -> None:
        try:
            self.done.append((task_id, run_ops(self.storage, ops), None))
        except Exception as err:  # noqa: BLE001 - handed to the training thread by poll, as a background failure is
            self.done.append((task_id, 0, err))

    def results(self) -> list:
        out, self.done = list(self.done), deque()
        return out

    def wait(self):
        return self.done.popleft()  # never empty when a task waits: each was done as it was submitted

    def close(self) -> None:
        pass


class _Background:
    """One process that runs the uploads in order (`python -m worker.publisher`).

    A plain subprocess rather than a multiprocessing pool: the worker's job process is a daemonic
    Celery child, and those may not start children through multiprocessing."""

    def __init__(self, store_factory: Callable[[], Storage]):
        self.proc = subprocess.Popen([sys.executable, "-m", "worker.publisher", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.answers: queue.Queue = queue.Queue()
        self.sent: list[int] = []  # task ids not yet answered, in order
        pickle.dump(store_factory, self.proc.stdin)
        self.proc.stdin.flush()
        threading.Thread(target=self._read, name="publisher-answers", daemon=True).start()

    def submit(self, task_id: int, ops: list[Op]) -> None:
        self.sent.append(task_id)
        try:
            pickle.dump((task_id, ops), self.proc.stdin)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the process is gone: _read answers every task sent with the failure

    def results(self) -> list:
        out = []
        while self.sent:
            try:
                out.append(self._take(self.answers.get_nowait()))
            except queue.Empty:
                break
        return out

    def wait(self):
        return self._take(self.answers.get())

    def _take(self, answer):
        if answer is None:  # the process exited: each task it had fails, in turn
            self.answers.put(None)
            code = self.proc.wait()
            return (self.sent.pop(0), 0, OSError(errno.EIO, f"the upload process exited (code {code}) before "
                                                            "its upload was done"))
        self.sent.remove(answer[0])
        return answer

    def _read(self) -> None:
        try:
            while True:
                self.answers.put(pickle.load(self.proc.stdout))
        except (EOFError, OSError, pickle.UnpicklingError):
            self.answers.put(None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


def _as_sendable(err: BaseException) -> BaseException:
    """`err` if it crosses the pipe intact; else the OSError every store failure is."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return OSError(errno.EIO, f"{type(err).__name__}: {err}")


def _child_setup(parent_pid: int) -> None:
    # Uploads must not slow the training down, and must not outlive it.
    os.nice(NICENESS)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker's SIGTERM is for the training (a hand-back)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the end of stdin ends this process
    if os.getppid() != parent_pid:
        sys.exit(0)  # the parent died before the line above


def main(argv: list[str]) -> int:
    _child_setup(int(argv[0]))
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed goes to the worker's log, not into the answers
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    requests = sys.stdin.buffer
    storage = pickle.load(requests)()
    while True:
        try:
            task_id, ops = pickle.load(requests)
        except EOFError:
            return 0
        try:
            answer: Any = (task_id, run_ops(storage, ops), None)
        except Exception as err:  # noqa: BLE001 - every failure is the parent's to report
            log.warning("upload failed: %s", err)
            answer = (task_id, 0, _as_sendable(err))
        pickle.dump(answer, answers)
        answers.flush()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
