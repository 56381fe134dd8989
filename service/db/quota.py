"""Storage per team: the bytes it keeps (uploads, checkpoints, result files) against its limit.

What a team stores is a sum over rows (`files.bytes`, and `checkpoints.bytes` recorded when each
checkpoint was written), never a walk of the disk. Its limit is its own `max_storage_bytes`, else the
service's DPO_TEAM_STORAGE_BYTES, else none. The limit is checked where a request adds bytes: an upload
that would pass it is refused, and so is a new job while the team is at or over it (a job writes
checkpoints and a final model). A running job is never stopped for it: its checkpoints may take the team
past the limit, and the team's next upload or job is then refused until it deletes something.
"""
from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.db.locks import lock_team
from service.db.models import Checkpoint, File, Job, Team
from service.errors import QuotaExceeded
from service.settings import Settings

CODE = "storage_quota_exceeded"
_FREE_SPACE = ("delete files (DELETE /v1/files/{file_id}), checkpoints (DELETE /v1/fine_tuning/jobs/{job_id}/"
               "checkpoints/{checkpoint_id}) or ended jobs (DELETE /v1/fine_tuning/jobs/{job_id}) it no longer "
               "needs, or ask the admin to raise its max_storage_bytes")


def bytes_used(session: Session, team_ids: Iterable[str]) -> dict[str, int]:
    """Bytes each team stores: its files (uploads and result files) and its jobs' checkpoints and final models."""
    ids = list(team_ids)
    used = dict.fromkeys(ids, 0)
    files = select(File.team_id, func.sum(File.bytes)).where(File.team_id.in_(ids)).group_by(File.team_id)
    checkpoints = (select(Job.team_id, func.sum(Checkpoint.bytes)).join(Job, Job.id == Checkpoint.job_id)
                   .where(Job.team_id.in_(ids)).group_by(Job.team_id))
    for stmt in (files, checkpoints):
        for team_id, total in session.execute(stmt):
            used[team_id] += int(total or 0)
    return used


def storage_limit(team: Team, settings: Settings) -> int | None:
    """The team's limit in bytes: its own, else the service's default; None: no limit."""
    return team.max_storage_bytes if team.max_storage_bytes is not None else settings.team_storage_bytes


def refuse_upload_over_quota(session: Session, team_id: str, new_bytes: int, settings: Settings) -> None:
    """QuotaExceeded (429) if storing `new_bytes` more would take the team past its limit.

    With a limit, the team's row stays locked until the transaction ends, so two uploads at once cannot
    both squeeze under it: commit right after storing the upload."""
    team = session.get(Team, team_id)
    if team is None or storage_limit(team, settings) is None:
        return
    team = lock_team(session, team_id)
    limit, used = storage_limit(team, settings), bytes_used(session, [team_id])[team_id]
    if used + new_bytes > limit:
        raise QuotaExceeded(f"team {team.name} stores {used} bytes; this upload of {new_bytes} bytes would take it "
                            f"past its storage limit of {limit} bytes. To make room, {_FREE_SPACE}",
                            param="file", code=CODE)


def refuse_job_over_quota(session: Session, team: Team, settings: Settings) -> None:
    """QuotaExceeded (429) if the team (locked by the caller) is at or over its limit."""
    limit = storage_limit(team, settings)
    if limit is None:
        return
    used = bytes_used(session, [team.id])[team.id]
    if used >= limit:
        raise QuotaExceeded(f"team {team.name} stores {used} bytes, at or over its storage limit of {limit} "
                            f"bytes, and a job writes checkpoints and a model. To make room, {_FREE_SPACE}",
                            param=None, code=CODE)
