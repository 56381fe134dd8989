"""/v1/pool: the workers (idle, busy, lost, stopped) and the queue depth per team and per GPU type."""
from __future__ import annotations

import time

from fastapi import APIRouter

from api.deps import CurrentPrincipal, SessionDep, SettingsDep
from api.pool import pool_view
from api.schemas.pool import PoolPublic

router = APIRouter(tags=["pool"])


@router.get("/pool", response_model=PoolPublic)
def get_pool(session: SessionDep, settings: SettingsDep, principal: CurrentPrincipal) -> PoolPublic:
    """The pool now. A team key sees every worker but only its own team's jobs and queue."""
    return pool_view(session, settings, principal, time.time())
