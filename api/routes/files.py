"""/v1/files: upload preference data (validated at once by dpo_core's reader), list, fetch, delete."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, UploadFile
from fastapi import File as FileField
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import CurrentPrincipal, FileDep, SessionDep, SettingsDep, StorageDep, load_file
from api.errors import Conflict, InvalidInput, TooLarge
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.files import FilePublic
from api.storage import iter_file
from api.store.jobs import ACTIVE
from api.store.models import File, Job, new_id, now
from dpo_core.data import DataError, read_jsonl_bytes

router = APIRouter(prefix="/files", tags=["files"])
PURPOSES = ("fine-tune",)
SHOWN_PROBLEMS = 10


@router.post("", response_model=FilePublic)
def upload_file(
    file: Annotated[UploadFile, FileField(description="JSONL preference data")],
    purpose: Annotated[str, Form(description="fine-tune")],
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    principal: CurrentPrincipal,
) -> FilePublic:
    """Upload a JSONL preference file; it is validated before it is stored."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    data = file.file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise TooLarge(f"the file is larger than the limit of {settings.max_upload_bytes} bytes", param="file")
    filename = _safe_name(file.filename)
    try:
        parsed = read_jsonl_bytes(data, filename)
    except DataError as err:
        raise _invalid_file(err, filename) from None
    file_id = new_id("file")
    key = f"files/{file_id}.jsonl"
    storage.put(key, data)
    row = File(id=file_id, team_id=principal.team_id, filename=filename, purpose=purpose, bytes=len(data),
               format=parsed.format, rows=len(parsed.rows), status="processed", storage_key=key, created_at=now())
    session.add(row)
    session.commit()
    return FilePublic.of(row)


@router.get("", response_model=ListPublic[FilePublic])
def list_files(session: SessionDep, principal: CurrentPrincipal, after: After = None, limit: Limit = 20,
               purpose: str | None = None) -> ListPublic[FilePublic]:
    """List the team's files (the admin: every team's), newest first."""
    anchor = None
    if after:
        last = load_file(session, principal, after, param="after")
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
    return StreamingResponse(iter_file(storage.open(file.storage_key)), media_type="application/jsonl",
                             headers={"Content-Disposition": f"attachment; filename*=UTF-8''{quote(file.filename)}"})


@router.delete("/{file_id}", response_model=DeletedPublic)
def delete_file(file: FileDep, session: SessionDep, storage: StorageDep) -> DeletedPublic:
    """Delete a file that no unfinished job uses."""
    in_use = session.scalar(
        select(Job.id).where(
            (Job.training_file == file.id) | (Job.validation_file == file.id),
            Job.status.in_([s.value for s in ACTIVE]),
        ).limit(1)
    )
    if in_use:
        raise Conflict(f"file {file.id} is used by job {in_use}, which has not finished", param="file_id")
    session.delete(file)
    session.commit()
    storage.delete(file.storage_key)
    return DeletedPublic(id=file.id, object="file")


def _safe_name(name: str | None) -> str:
    # Only ever displayed, never used as a path; still keep it short and without directories.
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    return base[:255] or "upload.jsonl"


def _invalid_file(err: DataError, filename: str) -> InvalidInput:
    shown = err.problems[:SHOWN_PROBLEMS]
    lines = "; ".join(
        f"line {p.line}: {p.field + ': ' if p.field else ''}{p.message}" if p.line else p.message for p in shown
    )
    more = f" (and {err.total - len(shown)} more)" if err.total > len(shown) else ""
    return InvalidInput(
        f"{filename} is not valid preference data: {lines}{more}",
        param="file",
        code="invalid_file",
        problems=[{"line": p.line, "field": p.field, "message": p.message} for p in shown],
    )
