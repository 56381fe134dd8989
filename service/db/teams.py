"""Teams and their API keys.

A key is `dpo-sk-` + 43 characters of `secrets.token_urlsafe(32)` (256 random bits). Only its SHA-256
is stored: with that much entropy a fast hash is as safe as a slow one, and it lets a request find
its key by an indexed lookup. A revoked key stops working on the next request: every request looks
its key up, nothing is cached.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from sqlalchemy import Row, and_, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.db.jobs import ACTIVE, JOB_FIELDS
from service.db.locks import lock_team
from service.db.models import DEFAULT_TEAM_ID, ApiKey, Job, Team, is_id, new_id, now
from service.errors import Conflict, InvalidInput, NotFound

KEY_PREFIX = "dpo-sk-"
HINT_CHARS = len(KEY_PREFIX) + 4


@dataclass(frozen=True)
class NewKey:
    row: ApiKey
    key: str  # the only time the plain key exists on the service side


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def team_for_key(session: Session, presented: str) -> tuple[str, str] | None:
    """(key id, team id) of a live key, or None."""
    found = key_and_job(session, presented, None)
    return found[:2] if found else None


_KEYS, _TEAMS, _JOBS = ApiKey.__table__, Team.__table__, Job.__table__
# A live key and, when its team has it, one job: the status route's two lookups in one round trip.
_KEY_AND_JOB = (
    select(_KEYS.c.id.label("key_id"), _KEYS.c.team_id.label("key_team_id"), _KEYS.c.key_hash, *JOB_FIELDS)
    .select_from(_KEYS)
    .join(_TEAMS, _TEAMS.c.id == _KEYS.c.team_id)
    .outerjoin(_JOBS, and_(_JOBS.c.id == bindparam("job_id"), _JOBS.c.team_id == _KEYS.c.team_id))
    .where(_KEYS.c.key_hash == bindparam("key_hash"), _KEYS.c.revoked_at.is_(None), _TEAMS.c.deleted_at.is_(None))
)


def key_and_job(session: Session, presented: str, job_id: str | None) -> tuple[str, str, Row | None] | None:
    """(key id, team id, job) for a live key, the job `job_id` of the key's team as a row of
    service.db.jobs.JOB_FIELDS (None: that team has no such job, or `job_id` is None), in one query.
    None: not a live key. The stored hash is compared in constant time."""
    digest = hash_key(presented)
    row = session.execute(_KEY_AND_JOB, {"key_hash": digest, "job_id": job_id}).one_or_none()
    if row is None or not hmac.compare_digest(row.key_hash, digest):
        return None
    return row.key_id, row.key_team_id, row if row.id is not None else None


def get_team(session: Session, team_id: str) -> Team:
    team = session.get(Team, team_id) if is_id(team_id, "team") else None
    if team is None or team.deleted_at is not None:
        raise NotFound(f"no team {team_id!r}", param="team_id")
    return team


def create_team(session: Session, name: str, max_running_jobs: int | None, max_queued_jobs: int | None,
                max_storage_bytes: int | None = None) -> Team:
    _name_is_free(session, name)
    team = Team(id=new_id("team"), name=name, max_running_jobs=max_running_jobs,
                max_queued_jobs=max_queued_jobs, max_storage_bytes=max_storage_bytes, created_at=now())
    session.add(team)
    return team


def update_team(session: Session, team: Team, changes: dict) -> Team:
    """Set the fields in `changes` (a limit set to None: removed); a name cannot be removed."""
    if "name" in changes and changes["name"] is None:
        raise InvalidInput("name: a team needs a name", param="name")
    if "name" in changes and changes["name"] != team.name:
        _name_is_free(session, changes["name"], team.id)
    for field, value in changes.items():
        setattr(team, field, value)
    return team


def commit_named(session: Session, name: str) -> None:
    """Commit a team created or renamed `name`; Conflict (name_taken) when another request took the name
    meanwhile (the unique index kept one)."""
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict(f"a team named {name!r} (in some case) exists already; team names are unique whatever "
                       "their case", param="name", code="name_taken") from None


def delete_team(session: Session, team: Team) -> None:
    """Delete a team with no unfinished jobs: its keys stop working; its files, jobs and usage stay for the admin."""
    if team.id == DEFAULT_TEAM_ID:
        raise Conflict("the default team holds the admin key's own files and jobs; it cannot be deleted",
                       param="team_id")
    lock_team(session, team.id)  # no job of the team is created while we look
    unfinished = session.scalar(select(func.count()).select_from(Job).where(
        Job.team_id == team.id, Job.status.in_([s.value for s in ACTIVE])))
    if unfinished:
        raise Conflict(f"team {team.id} has {unfinished} unfinished jobs; cancel them first", param="team_id")
    stamp = now()
    session.execute(update(ApiKey).where(ApiKey.team_id == team.id, ApiKey.revoked_at.is_(None))
                    .values(revoked_at=stamp).execution_options(synchronize_session=False))
    team.deleted_at = stamp


def create_key(session: Session, team: Team, name: str | None) -> NewKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), team_id=team.id, name=name, key_hash=hash_key(key), hint=key[:HINT_CHARS],
                 created_at=now())
    session.add(row)
    return NewKey(row=row, key=key)


def get_key(session: Session, team: Team, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id) if is_id(key_id, "key") else None
    if row is None or row.team_id != team.id:
        raise NotFound(f"no key {key_id!r} of team {team.id}", param="key_id")
    return row


def revoke_key(session: Session, row: ApiKey) -> None:
    if row.revoked_at is None:
        row.revoked_at = now()


def _name_is_free(session: Session, name: str, team_id: str | None = None) -> None:
    """Names are unique whatever their case (the index uq_teams_lower_name_live enforces it under races too;
    this check only names the team that has it)."""
    taken = session.execute(select(Team.id, Team.name).where(
        func.lower(Team.name) == name.lower(), Team.deleted_at.is_(None), Team.id != (team_id or ""))).first()
    if taken:
        raise Conflict(f"a team named {taken.name!r} exists already ({taken.id}); team names are unique whatever "
                       "their case", param="name", code="name_taken")
