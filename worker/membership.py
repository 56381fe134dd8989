"""The worker's place in the pool: what it serves (detected or configured), its registration, a
heartbeat thread, a hand-back of the running job when it is asked to stop, and a goodbye.

The heartbeat runs in the worker's main process, which outlives the per-job child processes, so a
worker busy with a long job still says it is alive. That process forks a fresh process for every job
(Celery's prefork pool), so its threads never talk to the database while it forks (`no_fork`). GPUs
are detected in a subprocess: initializing CUDA in a process that later forks its job processes would
break CUDA in them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.pool import NullPool

from dpo_core import reporting
from service.db import leases, workers
from service.db.engine import is_unavailable, make_engine, make_sessionmaker
from service.reconciler import requeue_from_dead_worker
from service.settings import Settings

log = logging.getLogger("dpo.worker")
CPU = "cpu"
_PROBE = ("import json, torch; n = torch.cuda.device_count() if torch.cuda.is_available() else 0; "
          "print(json.dumps([(torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory) "
          "for i in range(n)]))")
_VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro", "amd", "radeon", "instinct", "graphics"}

# Held by a thread of this process while it uses the database, and by os.fork() while it forks. A job
# process forked in the middle of a heartbeat inherits the database driver's locks held by a thread it
# does not have (SQLite's mutexes and its bookkeeping of file locks; libpq's): its own first database
# call then hangs for good, or fails with "database is locked" after the busy timeout. A hung job
# process never starts its job and keeps the worker's one pool slot, so no re-sent message could run.
no_fork = threading.Lock()
os.register_at_fork(before=no_fork.acquire, after_in_parent=no_fork.release, after_in_child=no_fork.release)


@dataclass(frozen=True)
class Identity:
    name: str
    gpu_type: str
    gpus: int
    hostname: str
    pid: int
    integrations: tuple[str, ...] = ()  # the trackers of training.report_to this worker can import
    memory_bytes: int | None = None  # one GPU's memory; a CPU worker's RAM; None when unknown


def identity(settings: Settings) -> Identity:
    """Who this worker is: DPO_WORKER_* settings first, the GPUs it sees for the rest."""
    hostname, pid = socket.gethostname(), os.getpid()
    gpu_type, gpus = settings.worker_gpu_type, settings.worker_gpus
    devices = [] if gpu_type is not None and gpu_type.lower() == CPU else detect_gpus()
    names = [name for name, _ in devices]
    if gpu_type is None or (gpus is None and gpu_type.lower() != CPU):
        gpu_type = gpu_type or (gpu_type_of(names[0]) if names else CPU)
        if len({gpu_type_of(n) for n in names}) > 1:
            log.warning("this worker sees different GPUs (%s); it registers as %s", ", ".join(names), gpu_type)
        gpus = gpus or max(len(names), 1)
    memory = ram_bytes() if gpu_type.lower() == CPU else (min(m for _, m in devices) if devices else None)
    return Identity(name=settings.worker_name or f"{hostname}-{pid}", gpu_type=gpu_type.lower(), gpus=gpus or 1,
                    hostname=hostname, pid=pid, integrations=tuple(reporting.available()), memory_bytes=memory)


def detect_gpus() -> list[tuple[str, int]]:
    """(name, total memory in bytes) of each CUDA device this process may use (CUDA_VISIBLE_DEVICES
    applies); [] without CUDA."""
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        log.warning("GPU detection failed (%s); registering as cpu", out.stderr.strip().splitlines()[-1:])
        return []
    return [(name, int(memory)) for name, memory in json.loads(out.stdout.strip().splitlines()[-1])]


def ram_bytes() -> int | None:
    """This machine's physical memory: what a CPU worker's jobs share."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # a platform without these names
        return None


def gpu_type_of(device_name: str) -> str:
    """A short GPU type from a device name: 'NVIDIA H100 80GB HBM3' -> 'h100', 'Tesla T4' -> 't4',
    'NVIDIA GeForce RTX 4090' -> 'rtx4090'. Set DPO_WORKER_GPU_TYPE where this guesses wrong."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w not in _VENDOR_WORDS]
    for i, word in enumerate(words):
        if word == "rtx" and i + 1 < len(words) and words[i + 1].isdigit():
            return word + words[i + 1]
        if any(ch.isdigit() for ch in word):
            return word
    return words[0] if words else "gpu"


def process_gone(pid: int, registered_at: float, my_pid: int) -> bool:
    """Whether the process of this host that registered a worker as `pid` at `registered_at` is gone:
    no process has that pid now, or only a zombie (dead, not yet reaped); or the one that has it
    started after that registration (pids are reused); or it is `my_pid`, this process, which registers
    now (a restarted container gets the same pid). Where /proc cannot tell more, a live pid counts as
    the worker."""
    if pid == my_pid:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, and another user's
    stat = process_stat(pid)
    return stat is not None and (stat[0] == "Z" or stat[1] > registered_at)


def process_stat(pid: int) -> tuple[str, float] | None:
    """Process `pid`'s state letter and start time (seconds since the epoch, to within a second), from
    Linux's /proc; None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, ValueError):
        return None
    # The fields after the command name (which may hold spaces and parentheses), numbered as in proc(5):
    # the state is field 3, the start time (clock ticks after boot) field 22.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], boot + int(fields[22 - 3]) / os.sysconf("SC_CLK_TCK")


class Membership:
    """Registers the worker, keeps its heartbeat going from a daemon thread, and says goodbye."""

    def __init__(self, settings: Settings, me: Identity):
        self.settings, self.me = settings, me
        # NullPool: no connection stays open in this process while it forks a job's process.
        self.engine = make_engine(settings.db_url, poolclass=NullPool)
        self.sessions = make_sessionmaker(self.engine)
        self.worker_id: str | None = None
        self.queue: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drain: threading.Thread | None = None

    def join(self) -> None:
        """Register (raises service.errors.Conflict while a live worker has this name). A worker that restarts
        after a crash takes its name over at once: when the name's holder ran on this host and its process
        is gone, the runs it held are lost now and its jobs queued again (service.reconciler), instead of
        after their leases run out."""
        with self.sessions.begin() as s:
            dead = workers.dead_holder(s, self.me.name, self.me.hostname, lambda pid, since: process_gone(
                pid, since, self.me.pid))
            row = workers.register(s, name=self.me.name, gpu_type=self.me.gpu_type, gpus=self.me.gpus,
                                 queue_prefix=self.settings.queue, hostname=self.me.hostname, pid=self.me.pid,
                                 lost_after_s=self.settings.worker_lost_after_s, holder_dead=dead is not None,
                                 integrations=list(self.me.integrations), memory_bytes=self.me.memory_bytes)
            self.worker_id, self.queue = row.id, row.queue
            requeued = requeue_from_dead_worker(s, self.settings, row.id, time.time()) if dead else []
        if dead:
            log.warning("worker %s took its name over from its dead process on this host; its jobs %s were "
                        "queued again", self.me.name, requeued or "(none)")
        log.info("worker %s (%s) joined the pool: %s x%d, queue %s, report_to %s", self.me.name, self.worker_id,
                 self.me.gpu_type, self.me.gpus, self.queue, ", ".join(self.me.integrations) or "none")

    def start_heartbeats(self) -> None:
        self._thread = threading.Thread(target=self._beat, name="dpo-heartbeat", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """The worker is shutting down (SIGTERM): take no more jobs, and ask the job running here to
        checkpoint at its next step and hand itself back to the queue. Runs in a thread of its own,
        because Celery calls it from its signal handler."""
        self._drain = threading.Thread(target=self._ask_handback, name="dpo-drain", daemon=True)
        self._drain.start()

    def _ask_handback(self) -> None:
        self._stop.set()  # no more heartbeats: the worker is `stopped` from now on (its job renews its own lease)
        try:
            with no_fork, self.sessions.begin() as s:
                workers.mark_stopped(s, self.worker_id)
                jobs = leases.request_handback(s, self.worker_id)
            log.info("worker %s is shutting down; asked %s to hand back", self.me.name, jobs or "no job")
        except Exception:  # noqa: BLE001 - the job still stops (SIGTERM reaches its process) or its lease runs out
            log.exception("could not ask the running job to hand back")

    def leave(self) -> None:
        """Stop the heartbeats and mark the worker stopped (a clean shutdown)."""
        self._stop.set()
        if self._drain is not None:
            self._drain.join(timeout=10)
        if self._thread is not None:
            try:
                self._thread.join(timeout=10)
            except RuntimeError:  # a SIGTERM interrupted its start: it sees _stop and ends by itself
                pass
        if self.worker_id is not None:
            with self.sessions.begin() as s:
                workers.mark_stopped(s, self.worker_id)
            log.info("worker %s left the pool", self.me.name)
        self.engine.dispose()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.worker_heartbeat_interval_s):
            try:
                with no_fork, self.sessions.begin() as s:
                    if not workers.heartbeat(s, self.worker_id):
                        log.warning("worker %s is no longer registered; heartbeats go nowhere", self.me.name)
            except Exception as err:  # noqa: BLE001 - a database hiccup must not end the heartbeats
                if not is_unavailable(err):
                    log.exception("heartbeat failed; trying again in %.1fs", self.settings.worker_heartbeat_interval_s)
                else:
                    log.warning("heartbeat failed (the database cannot be reached: %s); trying again in %.1fs",
                                type(err).__name__, self.settings.worker_heartbeat_interval_s)
