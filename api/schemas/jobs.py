"""Fine-tuning jobs, their events and checkpoints as responses, shaped like the OpenAI API's, plus our
extensions (`training`, `progress`, `metrics`, `eval_metrics`, `download_url`, and what a job asks of the
pool: `team`, `priority`, `gpu_type`, `gpus`, `queue_position`, `queue_reason`, `worker`; what its training
said of itself: `warnings`, `early_stopped_at_step`; the checkpoint it continues: `parent`). The request
(JobCreate) is service.requests'."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from service.db.jobs import JobRow
from service.db.models import Checkpoint, Event, public_status


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    tokens_per_s: float | None = None


class JobWarning(BaseModel):
    code: str = Field(description="stable: rewards_both_falling, accuracy_saturated, eval_gap, grad_norm_spike, "
                      "loss_flat")
    step: int | None = Field(description="the step at which it was raised")
    message: str = Field(description="what was seen and what to try")


class JobParent(BaseModel):
    checkpoint: str = Field(description="id of the checkpoint the job's policy starts from")
    job: str = Field(description="id of that checkpoint's job")


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: str = Field(description="queued | running | paused | succeeded | failed | cancelled")
    created_at: int
    started_at: int | None
    finished_at: int | None
    model: str
    training_file: str
    validation_file: str | None
    method: dict[str, Any]
    hyperparameters: dict[str, Any]
    trained_tokens: int | None
    error: JobError | None
    fine_tuned_model: str | None = Field(description="id of the final checkpoint; download it like one")
    result_files: list[Any]
    metadata: dict[str, Any] | None
    seed: int | None
    user_provided_suffix: str | None
    estimated_finish: int | None
    organization_id: str = Field(description="the team id")
    integrations: list[Any] = []
    progress: Progress
    metrics: dict[str, Any] | None = Field(description="latest training metrics from dpo_core")
    eval_metrics: dict[str, Any] | None = Field(description="latest held-out evaluation metrics")
    training: dict[str, Any] = Field(description="the resolved TrainingSpec, server paths left out")
    cancel_requested: bool
    pause_requested: bool = Field(False, description="while running: a pause was asked; it stops at its next step")
    team: str = Field(description="id of the team the job belongs to (also its organization_id)")
    priority: int
    gpu_type: str | None
    gpus: int
    queue_position: int | None = Field(
        description="while queued: its place in the team's queue (1: next); 0: handed to a worker, starting")
    queue_reason: str | None = Field(description="while queued: why it waits")
    worker: str | None = Field(description="the worker it was handed to")
    attempts: int = Field(description="runs that started and were not handed back cleanly (a lost worker's counts)")
    max_attempts: int = Field(description="at this many lost runs the job fails with worker_lost")
    estimate: dict[str, Any] | None = Field(
        description="the pre-flight estimate it was created with: preflight_id, gpu_type, seconds, "
        "peak_memory_bytes, steps, tokens")
    actual: dict[str, Any] | None = Field(
        description="once it succeeded, what its run measured: train_seconds, peak_memory_bytes, memory_kind, "
        "tokens_per_s, tokens, steps")
    warnings: list[JobWarning] = Field(
        default=[], description="the diagnostics its training raised so far (docs/training.md, Diagnostics); "
        "their evidence is in the job's warn events")
    early_stopped_at_step: int | None = Field(
        None, description="the step at which training.early_stopping ended training; null otherwise")
    parent: JobParent | None = Field(
        None, description="when `model` names a checkpoint or a job: the checkpoint the job starts from, and its job")

    @classmethod
    def of(cls, job: JobRow, position: int | None = None, reason: str | None = None) -> JobPublic:
        """From a job as the read paths read it (service.db.jobs.JobRow)."""
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        status = public_status(job.status)
        return cls(
            id=job.id, status=status, created_at=job.created_at, started_at=_int(job.started_at),
            finished_at=_int(job.finished_at), model=job.model, training_file=job.training_file,
            validation_file=job.validation_file, method=job.method, hyperparameters=job.hyperparameters,
            trained_tokens=job.trained_tokens, error=error, fine_tuned_model=job.fine_tuned_model,
            result_files=job.result_files or [], metadata=job.metadata_, seed=job.seed,
            user_provided_suffix=job.suffix, estimated_finish=job.estimated_finish,
            progress=Progress(step=job.step, total_steps=job.total_steps, epoch=job.epoch,
                              tokens_per_s=job.tokens_per_s),
            metrics=job.metrics, eval_metrics=job.eval_metrics, training=job.spec,
            cancel_requested=job.cancel_requested, organization_id=job.team_id, team=job.team_id,
            priority=job.priority, gpu_type=job.gpu_type, gpus=job.gpus, queue_position=position,
            queue_reason=reason, worker=job.worker, attempts=job.attempts, max_attempts=job.max_attempts,
            estimate=job.estimate, actual=_actual(job.measured),
            warnings=job.warnings or [], early_stopped_at_step=job.early_stopped_at_step,
            parent=JobParent(checkpoint=job.parent_checkpoint, job=job.parent_job) if job.parent_checkpoint else None,
            pause_requested=bool(job.pause_requested) and status == "running",
        )


ACTUAL_FIELDS = ("train_seconds", "peak_memory_bytes", "memory_kind", "tokens_per_s", "tokens", "steps")


def _actual(measured: dict[str, Any] | None) -> dict[str, Any] | None:
    """What a finished run measured, as users read it beside the estimate (the rest calibrates estimates)."""
    if not isinstance(measured, dict):
        return None
    return {k: measured.get(k) for k in ACTUAL_FIELDS}


def _int(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds)


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str = Field(description="info | warn | error")
    message: str
    type: str = Field(description="message (status changes, warnings, errors) | metrics (train and eval)")
    data: dict[str, Any] | None

    @classmethod
    def of(cls, event: Event) -> EventPublic:
        return cls(id=event.id, created_at=event.created_at, level=event.level,
                   message=event.message, type=event.type, data=event.data)


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    step_number: int
    metrics: dict[str, Any] | None
    final: bool = Field(description="the job's final model (its fine_tuned_model)")
    download_url: str = Field(description="GET it for a tar of the checkpoint directory")
    bytes: int = Field(description="size of the checkpoint's files when it was saved (what counts against the team's "
                       "storage); the download is a little larger (tar headers), exactly its Content-Length")

    @classmethod
    def of(cls, ckpt: Checkpoint) -> CheckpointPublic:
        return cls(
            id=ckpt.id, created_at=ckpt.created_at, fine_tuned_model_checkpoint=ckpt.id,
            fine_tuning_job_id=ckpt.job_id, step_number=ckpt.step_number, metrics=ckpt.metrics,
            final=ckpt.final, download_url=f"/v1/fine_tuning/jobs/{ckpt.job_id}/checkpoints/{ckpt.id}/content",
            bytes=ckpt.bytes or 0,
        )


class CompletionPublic(BaseModel):
    text: str
    tokens: int = Field(description="its length in tokens, the stop token included")
    reward: float = Field(description="its implicit reward under the policy at this step: beta * (log pi - log "
                                      "pi_ref), summed over its tokens")
    score: float | None = Field(None, description="the reward model's score, with training.samples.reward_model")


class PromptSamplesPublic(BaseModel):
    prompt: str
    reference: CompletionPublic = Field(description="the reference model's completion (made at step 0)")
    policy: CompletionPublic = Field(description="the policy's completion at this step (at step 0: the reference's)")


class SamplesPublic(BaseModel):
    object: Literal["fine_tuning.job.samples"] = "fine_tuning.job.samples"
    fine_tuning_job_id: str
    step: int | None = Field(description="the step of these samples; null while the job has none")
    steps: list[int] = Field(description="every step with samples so far, ascending")
    summary: dict[str, Any] | None = Field(description="samples/length and samples/reference_length (mean tokens), "
                                                       "samples/win_rate with a reward model")
    data: list[PromptSamplesPublic] = Field(description="one entry per prompt, in the validation file's order")
