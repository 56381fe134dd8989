"""FastAPI dependencies: settings, database session, storage, the dispatcher, the caller, and objects
from the path loaded as the caller may see them (service.auth: another team's object is "not found",
404, never 403)."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import Row
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.dispatcher import Dispatcher
from service.artifacts import Storage
from service.auth import (
    Principal,
    authenticate,
    load_file,
    load_job,
    no_job,
    team_principal,
)
from service.db.engine import read_with_retry
from service.db.jobs import job_row
from service.db.models import File, Job, is_id
from service.db.teams import key_and_job
from service.errors import Forbidden, Unauthenticated
from service.settings import Settings

T = TypeVar("T")

# Dependencies that only read app state are `async def`: FastAPI runs a sync dependency in a worker
# thread, and each such hop costs a thread hand-off and a turn at the GIL on every request.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    # Making a session does no I/O (it connects on first use), so only closing it takes a thread.
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


async def get_storage(request: Request) -> Storage:
    return request.app.state.storage


async def get_dispatcher(request: Request) -> Dispatcher:
    return request.app.state.dispatcher


_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <DPO_API_KEY or a team key>")


@dataclass(frozen=True)
class Caller:
    """The key a request presents, as far as the request alone tells: `admin` is the admin's principal
    (compared in memory); otherwise `key` is a team key not yet looked up."""

    key: str
    admin: Principal | None

    def principal(self, session: Session) -> Principal:
        """The principal; 401 when the key is no live team key (a revoked key fails on its next request)."""
        found = self.admin or team_principal(session, self.key)
        if found is None:
            raise _bad_key()
        return found

    def job(self, session: Session, job_id: str) -> tuple[Principal, Row]:
        """The principal and job `job_id` as a row (service.db.jobs.JOB_FIELDS), for a team key in one
        query. 401 as `principal`; then 404 when there is no such job or the caller may not see it."""
        wanted = job_id if is_id(job_id, "ftjob") else None
        if self.admin:
            principal, job = self.admin, job_row(session, wanted) if wanted else None
        elif (found := key_and_job(session, self.key, wanted)) is None:
            raise _bad_key()
        else:
            principal, job = Principal(key_id=found[0], team_id=found[1]), found[2]
        if job is None:
            raise no_job(job_id)
        return principal, job


def _bad_key() -> Unauthenticated:
    return Unauthenticated("incorrect API key provided (or revoked)")


async def get_caller(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> Caller:
    """The presented key, from `Authorization: Bearer <key>`; 401 without one. No I/O: a team key is
    checked by get_principal, or by `read` / `read_job` in the same thread hop as the route's own reads."""
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthenticated("missing API key: send 'Authorization: Bearer <key>'")
    key = credentials.credentials
    return Caller(key, authenticate(key, request.app.state.admin_key))


async def get_principal(request: Request, caller: Annotated[Caller, Depends(get_caller)]) -> Principal:
    """The caller's principal; 401 without a valid key. A team key is looked up in a thread (sync driver)."""
    return caller.admin or await run_in_threadpool(read_with_retry, request.app.state.reads, caller.principal)


async def read(request: Request, caller: Caller, fn: Callable[..., T], *args) -> T:
    """`fn(session, principal, *args)` on a read session (service.db.engine.make_read_sessionmaker), with the
    caller's key checked on that session first, all in one worker thread. For the routes clients poll:
    as a sync route with SessionDep, JobDep and a team key, the status route would take five thread hops
    (key, job, route, response check, session close), each a turn at the GIL among every request in flight."""
    return await run_in_threadpool(read_with_retry, request.app.state.reads, _as_principal, caller, fn, *args)


def _as_principal(session: Session, caller: Caller, fn: Callable[..., T], *args) -> T:
    return fn(session, caller.principal(session), *args)


async def read_job(request: Request, caller: Caller, job_id: str, fn: Callable[..., T], *args) -> T:
    """As `read`, for a route about one job: `fn(session, principal, job, *args)`, with the job as a row
    (Caller.job). With a team key, the key and the job are one query: one round trip and no ORM objects
    for the request clients poll most."""
    return await run_in_threadpool(read_with_retry, request.app.state.reads, _with_job, caller, job_id, fn, *args)


def _with_job(session: Session, caller: Caller, job_id: str, fn: Callable[..., T], *args) -> T:
    return fn(session, *caller.job(session, job_id), *args)


async def get_admin(principal: Annotated[Principal, Depends(get_principal)]) -> Principal:
    """The caller, who must hold the admin key."""
    if not principal.is_admin:
        raise Forbidden("this route needs the admin key (DPO_API_KEY); team keys cannot use it")
    return principal


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DispatcherDep = Annotated[Dispatcher, Depends(get_dispatcher)]
CurrentCaller = Annotated[Caller, Depends(get_caller)]
CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def job_from_path(fine_tuning_job_id: str, session: SessionDep, principal: CurrentPrincipal) -> Job:
    return load_job(session, principal, fine_tuning_job_id)


def file_from_path(file_id: str, session: SessionDep, principal: CurrentPrincipal) -> File:
    return load_file(session, principal, file_id)


# The request headers of a download that resumes (api.byte_ranges).
RangeHeader = Annotated[str | None, Header(alias="Range", max_length=200, description=(
    "one range of bytes: `bytes=a-b`, `bytes=a-` or `bytes=-n` (206); several ranges get the whole body"))]
IfRangeHeader = Annotated[str | None, Header(alias="If-Range", max_length=200, description=(
    "with Range: the whole body is sent (these bodies carry no validator to match)"))]

JobDep = Annotated[Job, Depends(job_from_path)]
FileDep = Annotated[File, Depends(file_from_path)]
