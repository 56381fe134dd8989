"""/v1/admin/teams: the admin's teams and their API keys (the admin key only)."""
from __future__ import annotations

from fastapi import APIRouter, Depends
from sqlalchemy import select

from api.deps import SessionDep, get_admin
from api.pagination import After, Limit, page
from api.schemas.common import DeletedPublic, ListPublic
from api.schemas.teams import KeyCreate, KeyCreatedPublic, KeyPublic, TeamCreate, TeamPublic, TeamUpdate
from service.db import teams
from service.db.models import ApiKey, Team, is_id
from service.errors import InvalidInput

router = APIRouter(prefix="/admin/teams", tags=["admin"], dependencies=[Depends(get_admin)])


@router.post("", response_model=TeamPublic)
def create_team(req: TeamCreate, session: SessionDep) -> TeamPublic:
    """Create a team with its limits."""
    team = teams.create_team(session, req.name, req.max_running_jobs, req.max_queued_jobs, req.max_storage_bytes)
    teams.commit_named(session, req.name)
    return TeamPublic.of(team)


@router.get("", response_model=ListPublic[TeamPublic])
def list_teams(session: SessionDep, after: After = None, limit: Limit = 20) -> ListPublic[TeamPublic]:
    """Every team, newest first."""
    anchor = None
    if after:
        last = session.get(Team, after) if is_id(after, "team") else None
        if last is None:
            raise InvalidInput(f"no team {after!r} to page after", param="after")
        anchor = (last.created_at, last.id)
    rows = page(session, select(Team).where(Team.deleted_at.is_(None)), (Team.created_at, Team.id), anchor, limit)
    return ListPublic[TeamPublic].page([TeamPublic.of(t) for t in rows], limit)


@router.get("/{team_id}", response_model=TeamPublic)
def retrieve_team(team_id: str, session: SessionDep) -> TeamPublic:
    """One team."""
    return TeamPublic.of(teams.get_team(session, team_id))


@router.patch("/{team_id}", response_model=TeamPublic)
def update_team(team_id: str, req: TeamUpdate, session: SessionDep) -> TeamPublic:
    """Rename a team or change its limits; fields left out stay, null removes a limit (max_storage_bytes:
    back to the service's default). Lower limits apply to what starts next: nothing running is stopped."""
    changes = req.model_dump(exclude_unset=True)
    team = teams.update_team(session, teams.get_team(session, team_id), changes)
    teams.commit_named(session, team.name)
    return TeamPublic.of(team)


@router.delete("/{team_id}", response_model=DeletedPublic)
def delete_team(team_id: str, session: SessionDep) -> DeletedPublic:
    """Delete a team without unfinished jobs: its keys stop working at once; its files, jobs and usage
    stay visible to the admin."""
    teams.delete_team(session, teams.get_team(session, team_id))
    session.commit()
    return DeletedPublic(id=team_id, object="team")


@router.post("/{team_id}/keys", response_model=KeyCreatedPublic)
def create_key(team_id: str, session: SessionDep, req: KeyCreate | None = None) -> KeyCreatedPublic:
    """A new key for the team. The key is in this response only; the service keeps its hash."""
    new = teams.create_key(session, teams.get_team(session, team_id), req.name if req else None)
    session.commit()
    return KeyCreatedPublic(**KeyPublic.of(new.row).model_dump(), key=new.key)


@router.get("/{team_id}/keys", response_model=ListPublic[KeyPublic])
def list_keys(team_id: str, session: SessionDep) -> ListPublic[KeyPublic]:
    """The team's keys, revoked ones included, newest first (never the secrets)."""
    team = teams.get_team(session, team_id)
    rows = list(session.scalars(select(ApiKey).where(ApiKey.team_id == team.id)
                                .order_by(ApiKey.created_at.desc(), ApiKey.id.desc())))
    return ListPublic[KeyPublic].page([KeyPublic.of(k) for k in rows], max(len(rows), 1))


@router.delete("/{team_id}/keys/{key_id}", response_model=KeyPublic)
def revoke_key(team_id: str, key_id: str, session: SessionDep) -> KeyPublic:
    """Revoke a key: the next request with it gets 401."""
    key = teams.get_key(session, teams.get_team(session, team_id), key_id)
    teams.revoke_key(session, key)
    session.commit()
    return KeyPublic.of(key)
