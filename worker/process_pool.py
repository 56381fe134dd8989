"""The worker's Celery pool: prefork, with a job process's replacement started soon after it exits.

Each job runs in a process of its own (`worker_max_tasks_per_child = 1`). Celery's AsynPool starts a
replacement when it sees a process exit, and otherwise at a maintenance pass every 5 s. When it sees
the exit a moment before the process can be reaped, the replacement waits for that pass, and a job
submitted as the previous one ended would wait up to 5 s for a process to run in. A pass every quarter
second costs a few system calls.
"""
from __future__ import annotations

from celery.concurrency import asynpool, prefork

MAINTENANCE_INTERVAL_S = 0.25


class _AsynPool(asynpool.AsynPool):
    @property
    def timers(self):
        return {self.maintain_pool: MAINTENANCE_INTERVAL_S}


class TaskPool(prefork.TaskPool):
    Pool = _AsynPool
