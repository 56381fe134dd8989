"""The service's domain errors, one named exception per kind of failure.

Routes and the service core raise these; api.main turns them into HTTP responses (status code and the
OpenAI-style body `{"error": {"message", "type", "param", "code"}}`) at the edge, and nowhere else.
Each kind is a class of its own (a docstring and a code, like dpo_core.errors'), so that code raises
and catches it by name.
"""
from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base class: a message for the user, the request parameter at fault and a stable code."""

    code = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, **extra: Any):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.code
        self.extra = extra


class InvalidInput(ServiceError):
    """The request is malformed or names values the service cannot accept."""

    code = "invalid_value"


class NotFound(ServiceError):
    """No such object (or not one the caller may see)."""

    code = "not_found"


class Conflict(ServiceError):
    """The object's state does not allow the operation (cancel a finished job, delete a file in use)."""

    code = "conflict"


class Unauthenticated(ServiceError):
    """Missing or wrong API key."""

    code = "invalid_api_key"


class TooLarge(ServiceError):
    """An upload exceeds DPO_MAX_UPLOAD_BYTES."""

    code = "file_too_large"


class Unavailable(ServiceError):
    """A backing service (database, broker) cannot be reached."""

    code = "service_unavailable"


class Forbidden(ServiceError):
    """The caller is known but the route is not theirs (a team key on an admin route)."""

    code = "permission_denied"


class QuotaExceeded(ServiceError):
    """A team is at one of its limits (max_queued_jobs)."""

    code = "quota_exceeded"


class StorageFailed(ServiceError):
    """Artifact storage could not write (a full disk, an I/O error); nothing was stored."""

    code = "storage_error"


class LeaseLost(ServiceError):
    """A run's write names a lease its job no longer holds: another run owns the job now, or it ended.
    Raised to the stale run (never to an HTTP client), which then stops without writing anything."""

    code = "lease_lost"
