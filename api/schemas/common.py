"""Shapes shared by every resource: the error body and cursor-paginated lists."""
from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel, Field

T = TypeVar("T")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    problems: list[dict] | None = Field(None, description="every problem found: the bad lines of an uploaded file "
                                        "(invalid_file: line, field, message), or the bad parameters of a request "
                                        "(invalid_value: param, message)")
    error_id: str | None = Field(None, description="an internal error's id, under which the service log holds its cause")


class ErrorBody(BaseModel):
    error: ErrorDetail


class ListPublic(BaseModel, Generic[T]):
    """A page of a list. Pass the last item's id as `after` to get the next page while `has_more`."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def page(cls, items: list[T], limit: int) -> ListPublic[T]:
        """Build a page from up to limit + 1 items (the extra one only says that more exist)."""
        data = items[:limit]
        ids = [getattr(item, "id") for item in data]
        return cls(data=data, has_more=len(items) > limit, first_id=ids[0] if ids else None,
                   last_id=ids[-1] if ids else None)


class DeletedPublic(BaseModel):
    id: str
    object: str
    deleted: bool = True


class DownloadLinkPublic(BaseModel):
    """A URL that serves a download without the API key (a browser can navigate to it), until expires_at."""

    object: Literal["download_link"] = "download_link"
    url: str = Field(description="GET it, with no Authorization header; it answers Range requests")
    expires_at: int = Field(description="Unix seconds after which the URL is refused; ask for a new one")
