"""File objects, shaped like the OpenAI API's, plus our `rows`, `format` and `warnings`."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.db.models import File


class FileWarning(BaseModel):
    """Valid rows that are probably a mistake; the file is stored and trains as it is (dpo_core.data.DataWarning)."""

    code: str = Field(description="identical_pair: chosen equals rejected | unknown_fields: keys that are ignored")
    count: int = Field(description="rows concerned")
    lines: list[int] = Field(description="the first of them (1-based line numbers), at most 10")
    fields: list[str] | None = Field(None, description="unknown_fields: the ignored keys found, at most 20")
    message: str


class FilePublic(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None
    rows: int = Field(description="preference rows in the file")
    format: str = Field(description="text | conversational | openai | unpaired")
    warnings: list[FileWarning] = Field(default_factory=list,
                                        description="what the upload's checks found in valid rows")

    @classmethod
    def of(cls, row: File) -> FilePublic:
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                   purpose=row.purpose, status=row.status, rows=row.rows, format=row.format,
                   warnings=row.warnings or [])
