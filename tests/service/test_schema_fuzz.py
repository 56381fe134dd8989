"""Fuzzing: schemathesis generates requests (valid and invalid) from our OpenAPI schema for every
operation and sends them to the app in this process, with the admin key, on SQLite. No answer may be a
5xx, and every answer must match the schema: a documented status code, a documented content type, a
body of the documented shape (including the error body). A bounded number of examples per operation
keeps it to well under a minute."""
from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.main import create_app
from tests.service.support import API_KEY, as_key, make_settings

# Not negative_data_rejection: like most HTTP APIs we ignore unknown query parameters rather than refuse them.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


# The schema is read at collection time; the app that answers is built (with its database) per module.
SCHEMA = create_app(make_settings(Path("/nonexistent/schema-only"))).openapi()
schema = schemathesis.openapi.from_dict(SCHEMA)
schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    """One in-process client for every call (its lifespan: the database made once)."""
    app = create_app(make_settings(tmp_path_factory.mktemp("fuzz") / "data", max_upload_bytes=256 * 1024))
    with asgi.get_client(app) as c:
        yield c


@pytest.fixture(scope="module")
def file_id(client) -> str:
    row = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
    r = client.post(f"http://{asgi.HOST}/v1/files", files={"file": ("t.jsonl", row * 4)},
                    data={"purpose": "fine-tune"}, headers=as_key(API_KEY))
    assert r.status_code == 200, r.text
    return r.json()["id"]


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=list(HealthCheck))
def test_no_server_error_and_every_answer_matches_the_schema(case, client, file_id):
    if case.method == "POST" and case.path == "/v1/fine_tuning/jobs" and isinstance(case.body, dict):
        # A real file, a plain model and a small valid `training`, so the fuzzed rest of the body (seed,
        # suffix, metadata, method, priority, gpus, ...) gets past them to the spec and the database.
        case.body.update(training_file=file_id, model="owner/model",
                         training={"max_length": 64, "max_prompt_length": 32})
    case.call_and_validate(session=client, base_url=f"http://{asgi.HOST}", headers=as_key(API_KEY), checks=CHECKS)
