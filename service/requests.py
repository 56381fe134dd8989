"""A job request as the service takes it (`POST /v1/fine_tuning/jobs`): the OpenAI fields plus ours
(`training`, `priority`, `gpu_type`, `gpus`, `max_attempts`). service.jobspec builds a TrainingSpec from
it; api.schemas.jobs holds the responses."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from dpo_core.spec import SERVER_PATH_FIELDS, Beta, Epochs, Rows

# Text the database keeps: no NUL or other control characters (PostgreSQL refuses NUL in text).
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


INT64 = 2**63 - 1
# Scales training.learning_rate; the product must be in learning_rate's own range too (service.jobspec).
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
