"""Fine-tuning jobs, their events and checkpoints, shaped like the OpenAI API's, plus our extensions
(`training`, `progress`, `metrics`, `eval_metrics`, `download_url`, and what a job asks of the pool:
`team`, `priority`, `gpu_type`, `gpus`, `queue_position`, `queue_reason`, `worker`)."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.schemas.common import PRINTABLE
from api.store.models import Checkpoint, Event, Job, JobStatus
from dpo_core.spec import SERVER_PATH_FIELDS, Beta, Epochs, Rows

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


INT64 = 2**63 - 1
# Scales training.learning_rate; the product must be in learning_rate's own range too (api.jobspec).
Multiplier = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=1e-6, le=1e4)]


class DpoHyperparameters(_Strict):
    """The OpenAI hyperparameters; each sets a TrainingSpec field and takes that field's range."""

    beta: Beta | Auto | None = Field(None, description="sets training.loss.beta: the pull towards the reference")
    batch_size: Rows | Auto | None = Field(None, description="sets training.batch_size: pairs per optimizer step")
    n_epochs: Epochs | Auto | None = Field(None, description="sets training.num_epochs: passes over the training file")
    learning_rate_multiplier: Multiplier | Auto | None = Field(
        None, description="scales training.learning_rate (default 5e-6); the product must be in learning_rate's range"
    )


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class MethodCreate(_Strict):
    type: Literal["dpo"] = Field(description="only `dpo` is supported")
    dpo: DpoMethod | None = None


class JobCreate(_Strict):
    """Create a job. `training` takes any TrainingSpec field except the ones naming server paths."""

    model: str = Field(min_length=1, max_length=1024, pattern=PRINTABLE,
                       description="a hub id (owner/name), or an absolute path under one of the service's model "
                       "directories (DPO_MODEL_DIRS)")
    training_file: str = Field(max_length=64, description="id of an uploaded file (purpose fine-tune)")
    validation_file: str | None = Field(None, max_length=64,
                                        description="id of an uploaded file for held-out evaluation")
    method: MethodCreate | None = Field(None, description="default: {type: dpo}")
    hyperparameters: DpoHyperparameters | None = Field(
        None, description="deprecated OpenAI form of method.dpo.hyperparameters"
    )
    seed: int | None = Field(None, strict=True, ge=0, le=INT64, description="sets training.seed",
                             json_schema_extra={"default_text": "training.seed (42)"})
    suffix: str | None = Field(None, max_length=64, pattern=PRINTABLE)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16, description="up to 16 pairs; keys up to 64 characters, values up to 512")
    training: dict[str, Any] | None = Field(
        None,
        description="dpo-service extension: TrainingSpec fields (loss, lora, max_length, learning_rate, "
        f"eval_steps, save_steps, precision, reference_mode, ...); not {', '.join(SERVER_PATH_FIELDS)}",
    )
    priority: int = Field(0, strict=True, ge=-100, le=100,
                          description="extension: among the team's waiting jobs, higher first")
    gpu_type: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$",
                                 description="extension: run only on workers of this GPU type (e.g. h100, cpu)")
    gpus: int = Field(1, strict=True, ge=1, le=64, description="extension: GPUs the job needs on one worker")
    max_attempts: int | None = Field(None, strict=True, ge=1, le=100, description="extension: runs the job may lose to "
                                     "lost workers before it fails", json_schema_extra={"default_text":
                                     "DPO_JOB_MAX_ATTEMPTS (3)"})

    @field_validator("gpu_type")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.lower() if value else value


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class Progress(BaseModel):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    tokens_per_s: float | None = None


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    status: str = Field(description="validating_files | queued | running | succeeded | failed | cancelled")
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

    @classmethod
    def of(cls, job: Job, position: int | None = None, reason: str | None = None) -> JobPublic:
        """From a Job, or a row of api.store.jobs.JOB_FIELDS (the same names), as the status route reads it."""
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        # `dispatched` is ours: to OpenAI clients a job handed to a worker but not started is still queued.
        status = JobStatus.QUEUED.value if job.status == JobStatus.DISPATCHED else job.status
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
        )


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

    @classmethod
    def of(cls, ckpt: Checkpoint) -> CheckpointPublic:
        return cls(
            id=ckpt.id, created_at=ckpt.created_at, fine_tuned_model_checkpoint=ckpt.id,
            fine_tuning_job_id=ckpt.job_id, step_number=ckpt.step_number, metrics=ckpt.metrics,
            final=ckpt.final, download_url=f"/v1/fine_tuning/jobs/{ckpt.job_id}/checkpoints/{ckpt.id}/content",
        )
