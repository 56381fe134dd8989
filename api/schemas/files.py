"""File objects, shaped like the OpenAI API's, plus our `rows` and `format`."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from api.store.models import File


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

    @classmethod
    def of(cls, row: File) -> FilePublic:
        return cls(id=row.id, bytes=row.bytes, created_at=row.created_at, filename=row.filename,
                   purpose=row.purpose, status=row.status, rows=row.rows, format=row.format)
