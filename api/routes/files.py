"""/v1/files: upload preference data (validated by dpo_core's reader as it is stored), list, fetch, delete."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, Response, UploadFile
from fastapi import File as FileField
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import select

from api import byte_ranges
from api.deps import (
    CurrentPrincipal,
    FileDep,
    IfRangeHeader,
    RangeHeader,
    SessionDep,
    SettingsDep,
    StorageDep,
    load_file,
)
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, DownloadLinkPublic, ListPublic
from api.schemas.files import FilePublic
from service import files
from service.db.models import File
from service.errors import InvalidInput, NotFound
from service.requests import PRINTABLE

router = APIRouter(prefix="/files", tags=["files"])
_CONTENT = {307: {"description": "with an object store: the presigned URL of the bytes (Location)"},
            **byte_ranges.RESPONSES}


@router.post("", response_model=FilePublic)
def upload_file(
    file: Annotated[UploadFile, FileField(description="JSONL preference data")],
    purpose: Annotated[str, Form(description="fine-tune")],
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
) -> FilePublic:
    """Upload a JSONL preference file; it is validated as it is stored, and kept only if it is valid."""
    row = files.upload(session, storage, settings, principal.team_id, file.file, file.filename, file.size, purpose)
    return FilePublic.of(row)


@router.get("", response_model=ListPublic[FilePublic])
def list_files(session: SessionDep, principal: CurrentPrincipal, after: After = None, limit: Limit = 20,
               purpose: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
               ) -> ListPublic[FilePublic]:
    """List the team's files (the admin: every team's), newest first."""
    anchor = None
    if after:
        try:
            last = load_file(session, principal, after, param="after")
        except NotFound:
            raise InvalidInput(f"no file {after!r} to page after", param="after") from None
        anchor = (last.created_at, last.id)
    stmt = select(File) if principal.is_admin else select(File).where(File.team_id == principal.team_id)
    if purpose:
        stmt = stmt.where(File.purpose == purpose)
    rows = page(session, stmt, (File.created_at, File.id), anchor, limit)
    return ListPublic[FilePublic].page([FilePublic.of(r) for r in rows], limit)


@router.get("/{file_id}", response_model=FilePublic)
def retrieve_file(file: FileDep) -> FilePublic:
    """One file's metadata."""
    return FilePublic.of(file)


@router.head("/{file_id}/content", response_class=Response, responses=byte_ranges.head_responses(_CONTENT))
@router.get("/{file_id}/content", response_class=StreamingResponse, responses=_CONTENT)
def file_content(request: Request, file: FileDep, storage: StorageDep, settings: SettingsDep,
                 range_: RangeHeader = None, if_range: IfRangeHeader = None) -> Response:
    """The file's bytes as uploaded: a redirect to the object store, or streamed (with Range requests).
    HEAD answers the same status and headers without the body (its redirect is presigned for HEAD)."""
    if url := files.presigned(storage, settings, file, request.method):
        return RedirectResponse(url, status_code=307)
    size, read = files.contents(storage, file)
    with files.reading(file):
        return byte_ranges.respond(size, read, range_, if_range, "application/jsonl",
                                   {"Content-Disposition": f"attachment; filename*=UTF-8''{quote(file.filename)}"},
                                   head=request.method == "HEAD")


@router.post("/{file_id}/content/url", response_model=DownloadLinkPublic,
             responses={409: {"description": "download_link_unavailable: the API streams the content itself"}})
def file_content_url(file: FileDep, storage: StorageDep, settings: SettingsDep) -> DownloadLinkPublic:
    """A short-lived URL of the file's bytes that needs no API key (a presigned URL of the object store)."""
    link = files.link(storage, settings, file)
    return DownloadLinkPublic(url=link.url, expires_at=link.expires_at)


@router.delete("/{file_id}", response_model=DeletedPublic)
def delete_file(file: FileDep, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete a file that no unfinished job uses (409 file_in_use while one does)."""
    files.delete(session, storage, file)
    return DeletedPublic(id=file.id, object="file")
