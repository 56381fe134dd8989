"""/v1/files: upload preference data (validated at once by dpo_core's reader), list, fetch, delete."""
from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileField
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import CurrentPrincipal, FileDep, SessionDep, SettingsDep, StorageDep, load_file
from api.errors import Conflict, InvalidInput, NotFound, StorageFailed, TooLarge
from api.pagination import After, Limit, page
from api.schemas.common import PRINTABLE, DeletedPublic, ListPublic
from api.schemas.files import FilePublic
from api.storage import Storage, iter_file
from api.store.jobs import ACTIVE
from api.store.locks import lock_files
from api.store.models import File, Job, new_id, now
from api.store.quota import refuse_upload_over_quota
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
        raise TooLarge(f"the file is larger than the limit of {settings.max_upload_bytes} bytes "
                       "(DPO_MAX_UPLOAD_BYTES); split it or ask the operator to raise the limit", param="file")
    filename = _safe_name(file.filename)
    _refuse_long_lines(data, filename, settings.max_line_bytes)
    try:
        parsed = read_jsonl_bytes(data, filename)
    except DataError as err:
        raise _invalid_file(err, filename) from None
    refuse_upload_over_quota(session, principal.team_id, len(data), settings)
    file_id = new_id("file")
    key = f"files/{file_id}.jsonl"
    row = File(id=file_id, team_id=principal.team_id, filename=filename, purpose=purpose, bytes=len(data),
               format=parsed.format, rows=len(parsed.rows), status="processed", storage_key=key, created_at=now())
    _store(storage, session, key, data, row)
    return FilePublic.of(row)


def _store(storage: Storage, session, key: str, data: bytes, row: File) -> None:
    """The bytes, then the row; if either fails, neither stays (nothing half-written)."""
    try:
        storage.put(key, data)
    except OSError as err:
        raise StorageFailed(f"could not store the upload: {err.strerror or type(err).__name__}; nothing was "
                            "stored, try again later", param="file") from None
    try:
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise


def _refuse_long_lines(data: bytes, filename: str, limit: int) -> None:
    """A line longer than DPO_MAX_LINE_BYTES is refused before it is parsed."""
    start, line = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > limit:
            raise InvalidInput(f"{filename} is not valid preference data: line {line} is {end - start} bytes long, "
                               f"over the limit of {limit} bytes per line (DPO_MAX_LINE_BYTES)",
                               param="file", code="invalid_file",
                               problems=[{"line": line, "field": None, "message": f"longer than {limit} bytes"}])
        start, line = end + 1, line + 1


@router.get("", response_model=ListPublic[FilePublic])
def list_files(session: SessionDep, principal: CurrentPrincipal, after: After = None, limit: Limit = 20,
               purpose: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
               ) -> ListPublic[FilePublic]:
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
    if not lock_files(session, [file.id]):  # held until commit: no job is created on it meanwhile
        raise NotFound(f"no file {file.id!r}: it was deleted meanwhile", param="file_id")
    in_use = session.scalar(
        select(Job.id).where(
            (Job.training_file == file.id) | (Job.validation_file == file.id),
            Job.status.in_([s.value for s in ACTIVE]),
        ).limit(1)
    )
    if in_use:
        raise Conflict(f"file {file.id} is used by job {in_use}, which has not finished; cancel the job or wait "
                       "until it ends, then delete the file", param="file_id", code="file_in_use")
    session.delete(file)
    session.commit()
    storage.delete(file.storage_key)
    return DeletedPublic(id=file.id, object="file")


def _safe_name(name: str | None) -> str:
    # Only ever displayed, never used as a path; still keep it short, printable and without directories.
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:255] if base not in ("", ".", "..") else "upload.jsonl"


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
