"""Who is calling: the admin key (DPO_API_KEY, or generated into the data directory at first start) or
a team's key (stored hashed in the database, see service.db.teams); and what the caller may see: another
team's object is "not found" (never "forbidden": no leak of what exists)."""
from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from service.db.models import DEFAULT_TEAM_ID, File, Job, is_id
from service.db.teams import hash_key, team_for_key
from service.errors import NotFound
from service.settings import Settings

KEY_FILE = "api_key"


@dataclass(frozen=True)
class Principal:
    """Who is calling. The admin sees every team's objects and creates its own in the default team;
    a team's key sees only its team's objects."""

    key_id: str
    team_id: str
    is_admin: bool = False

    def may_see(self, team_id: str) -> bool:
        return self.is_admin or team_id == self.team_id


ADMIN = Principal(key_id="admin", team_id=DEFAULT_TEAM_ID, is_admin=True)


def admin_key(settings: Settings) -> tuple[str, bool]:
    """The admin key and whether it was generated just now (so the caller prints it once)."""
    if settings.api_key is not None:
        return settings.api_key.get_secret_value(), False
    path = settings.data_dir / KEY_FILE
    if path.exists():
        return path.read_text().strip(), False
    return _generate(path)


def _generate(path: Path) -> tuple[str, bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    key = "dpo-" + secrets.token_urlsafe(32)
    try:
        # O_EXCL: when API and worker start together only one of them writes the key.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip(), False
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
    return key, True


def authenticate(presented: str, admin: str) -> Principal | None:
    """ADMIN if the presented key is the admin key, else None (a team key is team_principal's to check).
    Compared in constant time, as SHA-256 digests, so not even the admin key's length shows in the timing."""
    return ADMIN if hmac.compare_digest(hash_key(presented), hash_key(admin)) else None


def team_principal(session: Session, presented: str) -> Principal | None:
    """The team key's principal, or None (not a live team key)."""
    found = team_for_key(session, presented)
    return Principal(key_id=found[0], team_id=found[1]) if found else None


def load_job(session: Session, principal: Principal, job_id: str) -> Job:
    """The job if it exists and the caller may see it; otherwise NotFound."""
    job = session.get(Job, job_id) if is_id(job_id, "ftjob") else None
    if job is None or not principal.may_see(job.team_id):
        raise no_job(job_id)
    return job


def no_job(job_id: str) -> NotFound:
    return NotFound(f"no fine-tuning job {job_id!r}", param="fine_tuning_job_id")


def load_file(session: Session, principal: Principal, file_id: str, param: str = "file_id") -> File:
    """The file if it exists and the caller may see it; otherwise NotFound."""
    file = session.get(File, file_id) if is_id(file_id, "file") else None
    if file is None or not principal.may_see(file.team_id):
        raise NotFound(f"no file {file_id!r}", param=param)
    return file
