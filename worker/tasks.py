"""The worker's only task. Thin: everything it does lives in worker.runner."""
from __future__ import annotations

from celery import shared_task

from service.broker import RUN_JOB_TASK


@shared_task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    """Run the stored job `job_id` with dpo_core and record what happens; returns its final status."""
    from worker.runner import JobRunner

    settings = self.app.dpo_settings
    # A process that cannot start its job within the dispatch timeout is stuck: it exits, and the
    # reconciler, which queues the job again at that timeout, finds the worker's slot free.
    runner = JobRunner(settings, self.app.dpo_worker_id, self.app.dpo_scratch_dir)
    return runner.run(job_id, start_deadline_s=settings.dispatch_timeout_s)
