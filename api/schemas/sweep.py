"""The orphan sweep's report (POST /v1/admin/sweep)."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.sweep import SweepReport


class SweptObject(BaseModel):
    key: str
    bytes: int
    modified_at: int = Field(description="Unix seconds")


class SweepPublic(BaseModel):
    object: Literal["storage.sweep"] = "storage.sweep"
    dry_run: bool = Field(description="true: nothing was removed; `removed` is what a sweep would remove")
    removed: list[SweptObject]
    bytes: int = Field(description="the bytes of `removed`")
    failed: list[str] = Field(description="keys the store refused to remove (tried again at the next sweep)")

    @classmethod
    def of(cls, report: SweepReport) -> SweepPublic:
        return cls(dry_run=report.dry_run, bytes=report.bytes, failed=report.failed,
                   removed=[SweptObject(key=o.key, bytes=o.size, modified_at=int(o.modified)) for o in report.removed])
