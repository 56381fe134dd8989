"""Teams and their API keys (admin routes). A key's secret appears once, in KeyCreatedPublic."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.db.models import ApiKey, Team
from service.requests import PRINTABLE

NAME = r"^[A-Za-z0-9][A-Za-z0-9 ._-]*$"  # letters, digits, space, '.', '_' and '-'
MAX_BYTES = (1 << 63) - 1  # what the database's BIGINT holds
STORAGE = ("bytes of uploads, checkpoints and result files the team may keep (an upload past it, or a job "
           "while at it, gets 429); null: the service's DPO_TEAM_STORAGE_BYTES, if set")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeamCreate(_Strict):
    name: str = Field(min_length=1, max_length=128, pattern=NAME)
    max_running_jobs: int | None = Field(None, ge=0, le=1_000_000,
                                         description="jobs of the team running at once; null: no limit")
    max_queued_jobs: int | None = Field(None, ge=0, le=1_000_000,
                                        description="jobs of the team waiting at once (more get 429); null: no limit")
    max_storage_bytes: int | None = Field(None, ge=0, le=MAX_BYTES, description=STORAGE)


class TeamUpdate(_Strict):
    """Only the fields given change; null removes a limit."""

    name: str | None = Field(None, min_length=1, max_length=128, pattern=NAME)
    max_running_jobs: int | None = Field(None, ge=0, le=1_000_000)
    max_queued_jobs: int | None = Field(None, ge=0, le=1_000_000)
    max_storage_bytes: int | None = Field(None, ge=0, le=MAX_BYTES, description=STORAGE)


class TeamPublic(BaseModel):
    id: str
    object: Literal["team"] = "team"
    name: str
    max_running_jobs: int | None
    max_queued_jobs: int | None
    max_storage_bytes: int | None = Field(description=STORAGE)
    created_at: int

    @classmethod
    def of(cls, team: Team) -> TeamPublic:
        return cls(id=team.id, name=team.name, max_running_jobs=team.max_running_jobs,
                   max_queued_jobs=team.max_queued_jobs, max_storage_bytes=team.max_storage_bytes,
                   created_at=team.created_at)


class KeyCreate(_Strict):
    name: str | None = Field(None, max_length=128, pattern=PRINTABLE,
                             description="a label, e.g. who or what uses the key")


class KeyPublic(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    team_id: str
    name: str | None
    hint: str = Field(description="the key's first characters")
    created_at: int
    revoked_at: int | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyPublic:
        return cls(id=key.id, team_id=key.team_id, name=key.name, hint=key.hint + "...", created_at=key.created_at,
                   revoked_at=key.revoked_at)


class KeyCreatedPublic(KeyPublic):
    key: str = Field(description="the secret; shown only in this response, stored only as a hash")
