"""The pre-flight report (POST /v1/fine_tuning/jobs/preflight): service.preflight makes it, docs/api.md
describes every field. The per-file data reports are dpo_core.preflight's, passed through as they are."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class DataWarningPublic(BaseModel):
    code: str
    param: str = Field(description="the request parameter it is about (training_file, validation_file, training.*)")
    count: int
    lines: list[int] = Field(description="the first lines of the file it concerns (1-based)")
    message: str = Field(description="what it is and what to do")


class PreflightData(BaseModel):
    training_file: dict[str, Any] = Field(description="rows, rows_used, rows_dropped, rows_truncated, "
                                          "truncated_tokens, lengths, tokens, duplicates, length_bias, groups")
    validation_file: dict[str, Any] | None


class GpuTypeEstimate(BaseModel):
    gpu_type: str
    workers: int = Field(description="live workers of this type that could run the job")
    gpus: int = Field(description="GPUs per worker")
    memory_bytes: int | None = Field(description="memory of one device (a CPU worker: its RAM); null: not reported")
    peak_memory_bytes: int = Field(description="the run's expected peak on one device of this type")
    fits: bool | None = Field(description="whether the run's memory plan fits its budget and the device's memory; "
                              "null: memory not reported")
    largest_micro_batch_size: int | None = Field(description="the largest micro_batch_size that fits the budget, "
                                                 "at the plan's checkpointed layers")
    plan: dict[str, Any] | None = Field(
        None, description="the memory plan the trainer would make on this type (docs/training.md, Memory): "
        "micro_batch_size, checkpointed_layers, layers, predicted_bytes, budget_bytes (max_memory, else 90% of the "
        "device), recompute_flops; null: none (see plan_note)")
    plan_note: str | None = Field(None, description="why there is no plan: the device's memory is not reported, "
                                  "or nothing fits (what to change)")
    seconds: float = Field(description="expected training time")
    basis: Literal["calibrated", "flops_model"]
    calibrated_by: list[str] = Field(description="the caller's earlier jobs whose measured throughput calibrated it")
    other_jobs: int = Field(description="other teams' jobs that also calibrated it")
    mfu: float | None = Field(description="the FLOPs model's assumed (or the calibration's achieved) model FLOPs "
                              "utilization of the GPU type's stated peak; null on a CPU, which has no stated peak")
    flops_per_s: float = Field(description="the FLOPs per second per device the time assumes: the FLOPs model's "
                               "stated rate, or what the calibrating jobs achieved")


class MemoryEstimate(BaseModel):
    micro_batch_size: int = Field(description="the memory plan's on the likely GPU type, else the spec's")
    checkpointed_layers: int = Field(description="decoder layers recomputed in backward: the plan's, else the "
                                     "spec's (auto without a plan: none)")
    layers: int
    planned: bool = Field(description="whether these follow a memory plan for a known device memory")
    precision: str
    device: Literal["cpu", "cuda"]
    breakdown: dict[str, int] = Field(description="bytes: weights, gradients, optimizer, reference, activations, "
                                      "runtime")
    total: int


class Estimate(BaseModel):
    steps: int
    epochs: float
    tokens: int = Field(description="non-padding tokens the whole run trains on")
    parameters: int
    trainable_parameters: int
    flops: dict[str, float] = Field(description="policy (forward and backward, with the recompute), reference "
                                    "(forward), total, recompute (of the checkpointed layers)")
    memory: MemoryEstimate
    by_gpu_type: list[GpuTypeEstimate]


class QueueForecast(BaseModel):
    position: int = Field(description="its place in the team's queue if submitted now (1: next)")
    jobs_ahead: int | None = Field(description="jobs of all teams expected to start before it")
    estimated_start_at: int | None
    estimated_start_in_s: float | None
    reason: str


class PreflightPublic(BaseModel):
    object: Literal["fine_tuning.preflight"] = "fine_tuning.preflight"
    id: str = Field(description="a job created from the same request within the hour keeps this estimate")
    created_at: int
    model: str
    data: PreflightData
    warnings: list[DataWarningPublic]
    estimate: Estimate
    queue: QueueForecast
