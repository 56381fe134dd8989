"""/v1/files: upload preference data (validated by dpo_core's reader as it is stored), list, fetch, delete."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, UploadFile
from fastapi import File as FileField
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from api.deps import CurrentPrincipal, FileDep, SessionDep, SettingsDep, StorageDep, load_file
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.files import FilePublic
from dpo_core.data import DataError, DataSummary, Validator
from service.artifacts import CHUNK, Storage, delete_with_artifact, iter_file
from service.db.jobs import ACTIVE
from service.db.locks import lock_files
from service.db.models import File, Job, new_id, now
from service.db.quota import refuse_upload_over_quota
from service.errors import Conflict, InvalidInput, NotFound, StorageFailed, TooLarge
from service.requests import PRINTABLE
from service.settings import Settings

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
    """Upload a JSONL preference file; it is validated as it is stored, and kept only if it is valid."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    if file.size is not None and file.size > settings.max_upload_bytes:
        raise _too_large(settings)
    filename = _safe_name(file.filename)
    if file.size is not None:  # refuse a team already at its limit before storing anything
        refuse_upload_over_quota(session, principal.team_id, file.size, settings)
        session.rollback()  # the lock is taken again, for good, once the size is final
    file_id = new_id("file")
    key = f"files/{file_id}.jsonl"
    summary, size = _store_valid(storage, key, file.file, filename, settings)
    row = File(id=file_id, team_id=principal.team_id, filename=filename, purpose=purpose, bytes=size,
               format=summary.format, rows=summary.rows, warnings=[w.as_dict() for w in summary.warnings],
               status="processed", storage_key=key, created_at=now())
    try:
        # Here the upload is valid, its bytes are stored and its size is final (row.bytes), and no row is
        # written yet: a check that refuses it raises here, and the stored bytes go with it.
        refuse_upload_over_quota(session, principal.team_id, size, settings)
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    return FilePublic.of(row)


def _store_valid(storage: Storage, key: str, upload: BinaryIO, filename: str, settings: Settings
                 ) -> tuple[DataSummary, int]:
    """Validate the upload line by line as its bytes go to storage: memory holds one line at a time, whatever
    the file's size. Any refusal (a bad line, a line or file over its limit, a full disk) leaves nothing
    stored. Returns dpo_core's summary of the file and its size."""
    check = Validator(filename, max_errors=SHOWN_PROBLEMS, keep_rows=False)
    try:
        size = storage.put_stream(key, check.passing(_lines(upload, filename, settings)))
    except DataError as err:
        raise _invalid_file(err, filename) from None
    except OSError as err:
        raise StorageFailed(f"could not store the upload: {err.strerror or type(err).__name__}; nothing was "
                            "stored, try again later", param="file") from None
    return check.finish(), size


def _lines(upload: BinaryIO, filename: str, settings: Settings) -> Iterator[bytes]:
    """The upload's lines, each with its newline. A line longer than DPO_MAX_LINE_BYTES is refused before it is
    parsed (and never held whole); the upload is refused once it passes DPO_MAX_UPLOAD_BYTES."""
    limit, size, lineno = settings.max_line_bytes, 0, 0
    while line := upload.readline(limit + 1):
        lineno += 1
        size += len(line)
        if size > settings.max_upload_bytes:
            raise _too_large(settings)
        if len(line) > limit and not line.endswith(b"\n"):
            length = len(line) + _rest_of_line(upload)
            raise InvalidInput(f"{filename} is not valid preference data: line {lineno} is {length} bytes long, "
                               f"over the limit of {limit} bytes per line (DPO_MAX_LINE_BYTES)",
                               param="file", code="invalid_file",
                               problems=[{"line": lineno, "field": None, "message": f"longer than {limit} bytes"}])
        yield line


def _rest_of_line(upload: BinaryIO) -> int:
    """Read past the rest of the current line, a chunk at a time; its length without the newline."""
    rest = 0
    while chunk := upload.readline(CHUNK):
        if chunk.endswith(b"\n"):
            return rest + len(chunk) - 1
        rest += len(chunk)
    return rest


def _too_large(settings: Settings) -> TooLarge:
    return TooLarge(f"the file is larger than the limit of {settings.max_upload_bytes} bytes "
                    "(DPO_MAX_UPLOAD_BYTES); split it or ask the operator to raise the limit", param="file")


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
    delete_with_artifact(session, storage, file)
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
