"""/v1/files: upload preference data (validated by dpo_core's reader as it is stored), list, fetch, delete."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileField
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import CurrentPrincipal, FileDep, SessionDep, SettingsDep, StorageDep, load_file
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.files import FilePublic
from service import files
from service.artifacts import iter_file
from service.db.models import File
from service.errors import InvalidInput, NotFound
from service.requests import PRINTABLE

router = APIRouter(prefix="/files", tags=["files"])


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


@router.get("/{file_id}/content", response_class=StreamingResponse)
def file_content(file: FileDep, storage: StorageDep) -> StreamingResponse:
    """The file's bytes as uploaded."""
    try:
        handle = storage.open(file.storage_key)
    except FileNotFoundError:
        raise NotFound(f"the bytes of file {file.id} are gone from storage (removed by hand?)", param="file_id",
                       code="artifact_missing") from None
    return StreamingResponse(iter_file(handle), media_type="application/jsonl",
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(file.filename)}"})


@router.delete("/{file_id}", response_model=DeletedPublic)
def delete_file(file: FileDep, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete a file that no unfinished job uses (409 file_in_use while one does)."""
    files.delete(session, storage, file)
    return DeletedPublic(id=file.id, object="file")
