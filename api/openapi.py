"""The OpenAPI schema as the service really answers: FastAPI documents a 422 for invalid requests, but
every error here is the OpenAI-shaped body (api.schemas.common.ErrorBody) with the status codes of
api.main.HTTP_ERRORS, and that is what the schema says (and what the schemathesis tests check)."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.schemas.common import ErrorBody

# Status codes any /v1 operation may answer with the error body, and why.
V1_ERRORS = {
    "400": "invalid request (the message names each bad parameter)",
    "401": "missing, wrong or revoked API key",
    "403": "a team key on an admin route",
    "404": "no such object, or one of another team",
    "409": "the object's state does not allow it, or an Idempotency-Key reused for another request",
    "413": "request body or upload over its limit",
    "429": "the team is at its max_queued_jobs",
    "503": "storage or a backing service failed; nothing was stored",
}
HEALTH_ERRORS = {"400": "invalid request", "413": "request body over its limit"}
METRICS_ERRORS = {**HEALTH_ERRORS, "401": "missing or wrong key", "403": "a team key (only the admin key or "
                  "DPO_METRICS_TOKEN may read it)", "503": "the database cannot answer just now"}


def openapi_with_errors(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    body = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components["ErrorBody"] = body
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        errors = V1_ERRORS if path.startswith("/v1/") else METRICS_ERRORS if path == "/metrics" else HEALTH_ERRORS
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status, why in errors.items():
                responses.setdefault(status, {"description": why, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
    app.openapi_schema = schema
    return schema
