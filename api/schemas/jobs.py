"""Fine-tuning jobs, their events and checkpoints, shaped like the OpenAI API's, plus our extensions
(`training`, `progress`, `metrics`, `eval_metrics`, `download_url`)."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.store.models import Checkpoint, Event, Job
from dpo_core.spec import SERVER_PATH_FIELDS

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DpoHyperparameters(_Strict):
    beta: float | Auto | None = Field(None, description="loss.beta: strength of the pull towards the reference")
    batch_size: int | Auto | None = Field(None, description="preference pairs per optimizer step")
    n_epochs: float | Auto | None = Field(None, description="passes over the training file")
    learning_rate_multiplier: float | Auto | None = Field(
        None, description="scales the learning rate (training.learning_rate, default 5e-6)"
    )


class DpoMethod(_Strict):
    hyperparameters: DpoHyperparameters | None = None


class MethodCreate(_Strict):
    type: Literal["dpo"] = Field(description="only `dpo` is supported")
    dpo: DpoMethod | None = None


class JobCreate(_Strict):
    """Create a job. `training` takes any TrainingSpec field except the ones naming server paths."""

    model: str = Field(min_length=1, max_length=1024, description="local model directory or hub id")
    training_file: str = Field(description="id of an uploaded file (purpose fine-tune)")
    validation_file: str | None = Field(None, description="id of an uploaded file for held-out evaluation")
    method: MethodCreate | None = Field(None, description="default: {type: dpo}")
    hyperparameters: DpoHyperparameters | None = Field(
        None, description="deprecated OpenAI form of method.dpo.hyperparameters"
    )
    seed: int | None = None
    suffix: str | None = Field(None, max_length=64)
    metadata: dict[str, str] | None = Field(None, max_length=16)
    training: dict[str, Any] | None = Field(
        None,
        description="dpo-service extension: TrainingSpec fields (loss, lora, max_length, learning_rate, "
        f"eval_steps, save_steps, precision, reference_mode, ...); not {', '.join(SERVER_PATH_FIELDS)}",
    )


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
    status: str
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
    organization_id: str = "org-local"
    integrations: list[Any] = []
    progress: Progress
    metrics: dict[str, Any] | None = Field(description="latest training metrics from dpo_core")
    eval_metrics: dict[str, Any] | None = Field(description="latest held-out evaluation metrics")
    training: dict[str, Any] = Field(description="the resolved TrainingSpec, server paths left out")
    cancel_requested: bool

    @classmethod
    def of(cls, job: Job) -> JobPublic:
        error = JobError(code=job.error_code, message=job.error_message or "") if job.error_code else None
        return cls(
            id=job.id, status=job.status, created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, model=job.model, training_file=job.training_file,
            validation_file=job.validation_file, method=job.method, hyperparameters=job.hyperparameters,
            trained_tokens=job.trained_tokens, error=error, fine_tuned_model=job.fine_tuned_model,
            result_files=job.result_files or [], metadata=job.metadata_, seed=job.seed,
            user_provided_suffix=job.suffix, estimated_finish=job.estimated_finish,
            progress=Progress(step=job.step, total_steps=job.total_steps, epoch=job.epoch,
                              tokens_per_s=job.tokens_per_s),
            metrics=job.metrics, eval_metrics=job.eval_metrics, training=job.spec,
            cancel_requested=job.cancel_requested,
        )


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
        return cls(id=event_id(event.seq), created_at=event.created_at, level=event.level,
                   message=event.message, type=event.type, data=event.data)


def event_id(seq: int) -> str:
    return f"ftevent-{seq}"


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
