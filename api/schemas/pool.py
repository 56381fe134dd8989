"""The pool view (`GET /v1/pool`) and usage reports (`GET /v1/usage`, `GET /v1/admin/usage`)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class WorkerPublic(BaseModel):
    id: str
    object: Literal["pool.worker"] = "pool.worker"
    name: str
    hostname: str
    gpu_type: str
    gpus: int
    state: Literal["idle", "busy", "lost", "stopped"] = Field(
        description="busy: a job is dispatched to it or runs on it; lost: no heartbeat for lost_after_s")
    job: str | None = Field(description="the job it is busy with (another team's job shows as null)")
    registered_at: int
    last_heartbeat_at: float
    seconds_since_heartbeat: float
    integrations: list[str] | None = Field(
        description="the trackers of training.report_to it can import (tensorboard, mlflow, wandb); null: it "
        "did not say")


class TeamQueue(BaseModel):
    team_id: str
    team: str
    queued: int = Field(description="jobs waiting (queued, or handed to a worker)")
    running: int


class GpuTypeQueue(BaseModel):
    gpu_type: str = Field(description="what the jobs ask for; 'any' for jobs that name no gpu_type")
    queued: int
    running: int
    idle_workers: int = Field(description="live idle workers that can serve these jobs")
    busy_workers: int


class PoolPublic(BaseModel):
    object: Literal["pool"] = "pool"
    at: float
    lost_after_s: float
    workers: list[WorkerPublic]
    queued: int = Field(description="all waiting jobs (a team key: its own)")
    by_team: list[TeamQueue] = Field(description="queue depth per team (a team key sees only its own)")
    by_gpu_type: list[GpuTypeQueue]


class JobCounts(BaseModel):
    total: int = 0
    queued: int = 0
    running: int = 0
    paused: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0


class UsageBucket(BaseModel):
    start: float = Field(description="Unix seconds; the bucket is [start, end)")
    end: float
    gpu_seconds: float = Field(description="GPUs x seconds of the team's runs inside the bucket")


class UsagePublic(BaseModel):
    object: Literal["usage"] = "usage"
    team_id: str
    team: str
    since: float | None = Field(description="start of the range (null: from the beginning)")
    until: float
    gpu_seconds: float = Field(description="GPUs x seconds of the team's runs inside the range")
    jobs: JobCounts = Field(description="jobs created in the range, by status")
    trained_tokens: int = Field(description="tokens trained by the jobs created in the range")
    fair_share_gpu_seconds: float = Field(description="GPU-seconds over the scheduler's window, what ranks teams")
    fair_share_window_s: float
    storage_bytes: int = Field(0, description="bytes the team stores now (uploads, result files, checkpoints and "
                               "final models), whatever since and until")
    storage_limit_bytes: int | None = Field(None, description="its storage limit (null: none); an upload past it, or a "
                                            "job while at it, gets 429 storage_quota_exceeded")
    buckets: list[UsageBucket] | None = Field(None, description="with `bucket`: gpu_seconds per bucket of that many "
                                              "seconds from since to until, oldest first; they sum to gpu_seconds")


class UsageListPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[UsagePublic]
