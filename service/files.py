"""The files a team keeps: an upload is validated by dpo_core's reader as it is stored, and kept only if
it is valid and within the team's storage limit; a file is deleted only while no unfinished job uses it."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.orm import Session

from dpo_core.data import DataError, DataSummary, Validator
from service import downloads
from service.artifacts import CHUNK, Storage, delete_with_artifact, upload_key
from service.db.jobs import ACTIVE
from service.db.locks import lock_files
from service.db.models import File, Job, new_id, now
from service.db.quota import refuse_upload_over_quota
from service.errors import Conflict, InvalidInput, NotFound, StorageFailed, TooLarge
from service.settings import Settings

PURPOSES = ("fine-tune",)
SHOWN_PROBLEMS = 10


def upload(session: Session, storage: Storage, settings: Settings, team_id: str, stream: BinaryIO,
           filename: str | None, size: int | None, purpose: str) -> File:
    """Store an upload of `size` bytes (None: not known up front) for the team and commit its row.
    InvalidInput for a bad purpose or bad data, TooLarge past DPO_MAX_UPLOAD_BYTES, QuotaExceeded past
    the team's storage limit; any refusal leaves nothing stored."""
    if purpose not in PURPOSES:
        raise InvalidInput(f"purpose must be one of {', '.join(PURPOSES)}", param="purpose")
    if size is not None and size > settings.max_upload_bytes:
        raise _too_large(settings)
    filename = _safe_name(filename)
    if size is not None:  # refuse a team already at its limit before storing anything
        refuse_upload_over_quota(session, team_id, size, settings)
        session.rollback()  # the lock is taken again, for good, once the size is final
    file_id = new_id("file")
    key = upload_key(file_id)
    summary, size = _store_valid(storage, key, stream, filename, settings)
    row = File(id=file_id, team_id=team_id, filename=filename, purpose=purpose, bytes=size,
               format=summary.format, rows=summary.rows, warnings=[w.as_dict() for w in summary.warnings],
               status="processed", storage_key=key, created_at=now())
    try:
        # Here the upload is valid, its bytes are stored and its size is final (row.bytes), and no row is
        # written yet: a check that refuses it raises here, and the stored bytes go with it.
        refuse_upload_over_quota(session, team_id, size, settings)
        session.add(row)
        session.commit()
    except BaseException:
        session.rollback()
        storage.delete(key)
        raise
    return row


def delete(session: Session, storage: Storage, file: File) -> None:
    """Delete a file that no unfinished job uses (Conflict file_in_use while one does); commits."""
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


def contents(storage: Storage, file: File) -> tuple[int, Callable[[int, int], Iterator[bytes]]]:
    """The file's length and a reader of its bytes from `start` to `end` (inclusive); NotFound
    (artifact_missing) when they are gone from storage, StorageFailed when the store cannot answer."""
    key = file.storage_key
    with reading(file):
        size = storage.size(key)
    return size, lambda start, end: storage.read_range(key, start, end)


def presigned(storage: Storage, settings: Settings, file: File, method: str = "GET") -> str | None:
    """A presigned URL of the file's bytes for `method`, or None when the API streams them (service.downloads)."""
    with reading(file):
        return downloads.presigned_url(storage, settings, file.storage_key, file.filename, method=method)


def link(storage: Storage, settings: Settings, file: File) -> downloads.DownloadLink:
    """A link to the file's bytes that needs no API key (service.downloads.link)."""
    with reading(file):
        return downloads.link(storage, settings, file.storage_key, file.filename, "file_id")


def reading(file: File):
    """Store errors while reading the file, as the API answers them (service.downloads.reading)."""
    return downloads.reading(NotFound(f"the bytes of file {file.id} are gone from storage (removed by hand?)",
                                      param="file_id", code="artifact_missing"), f"file {file.id}")


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
