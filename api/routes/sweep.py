"""/v1/admin/sweep: one pass of the orphan sweep now (service.sweep), for the admin."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api.deps import SettingsDep, StorageDep, get_admin
from api.schemas.sweep import SweepPublic
from service.sweep import sweep

router = APIRouter(prefix="/admin/sweep", tags=["admin"], dependencies=[Depends(get_admin)])


@router.post("", response_model=SweepPublic)
def sweep_now(request: Request, storage: StorageDep, settings: SettingsDep,
              dry_run: Annotated[bool, Query(description="list what would be removed; remove nothing")] = False,
              ) -> SweepPublic:
    """Remove the stored objects no row names that are older than DPO_SWEEP_MIN_AGE_S; the report lists them."""
    return SweepPublic.of(sweep(request.app.state.sessionmaker, storage, settings.sweep_min_age_s, dry_run=dry_run))
