"""Integration: hostile and broken input through the real app, on SQLite and on PostgreSQL (which, unlike
SQLite, refuses NUL bytes and out-of-range integers, so a check missing at the edge would be a 500 there).
Every request gets a 4xx with a message that names the problem, never a 500, and leaves nothing
behind: no file row, no job row, no stray bytes in the data directory."""
from __future__ import annotations

import codecs
import json
import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.support import API_KEY, as_key, fresh_postgres, make_settings, make_team

GOOD = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
TRAINING = {"max_length": 64, "max_prompt_length": 32}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def api(request, tmp_path_factory, model_dirs):
    data_dir = tmp_path_factory.mktemp("hostile") / "data"
    models = data_dir / "models" / "tiny"
    models.mkdir(parents=True)
    (models / "config.json").write_text("{}")
    overrides = dict(max_upload_bytes=64 * 1024, max_line_bytes=4096, max_request_bytes=32 * 1024,
                     model_dirs=[data_dir / "models"])
    if request.param == "sqlite":
        with TestClient(create_app(make_settings(data_dir, **overrides)), headers=as_key(API_KEY)) as c:
            yield c
        return
    with fresh_postgres() as url, TestClient(create_app(make_settings(data_dir, database_url=url, **overrides)),
                                             headers=as_key(API_KEY)) as c:
        yield c


@pytest.fixture(scope="module")
def file_id(api) -> str:
    r = api.post("/v1/files", files={"file": ("ok.jsonl", GOOD * 4)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def stored(api) -> tuple[int, int, list[str]]:
    """Rows of files and jobs, and the files in the data directory (to see that nothing was left)."""
    data_dir = api.app.state.settings.data_dir
    on_disk = sorted(p.name for p in (data_dir / "files").iterdir()) if (data_dir / "files").exists() else []
    files = len(api.get("/v1/files", params={"limit": 100}).json()["data"])
    jobs = len(api.get("/v1/fine_tuning/jobs", params={"limit": 100}).json()["data"])
    return files, jobs, on_disk


def refused(r, status: int, *words: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    for word in words:
        assert word in error["message"] or word == error.get("code") or word == error.get("param"), (word, error)
    return error


UPLOADS = {
    "non-UTF-8": (b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}\n', ["UTF-8", "line 1"]),
    "UTF-16": (codecs.BOM_UTF16_LE + GOOD.decode().encode("utf-16-le"), ["UTF-16"]),
    "not JSON": (GOOD + b"this is not json\n{broken\n", ["line 2", "line 3", "not valid JSON"]),
    "a JSON array": (b'[1, 2, 3]\n', ["must be a JSON object"]),
    "deeply nested": (b"[" * 2000 + b"]" * 2000 + b"\n", ["line 1", "nested too deeply"]),
    "empty": (b"", ["holds no rows"]),
    "blank lines only": (b"\n \n\t\n", ["holds no rows"]),
    "a very long line": (GOOD + b'{"prompt": "' + b"x" * 5000 + b'", "chosen": " a", "rejected": " b"}\n',
                         ["line 2", "4096 bytes", "DPO_MAX_LINE_BYTES"]),
    "wrong field types": (b'{"prompt": 1, "chosen": [], "rejected": {"a": 1}}\n', ["line 1", "prompt"]),
    "a missing field": (b'{"prompt": "p", "chosen": " a"}\n', ["rejected"]),
    "NUL bytes": (b'{"prompt": "p\\u0000", "chosen": " a\x00", "rejected": " b"}\n', ["line 1"]),
    "a lone surrogate in a quoted value": (b'{"prompt": "p", "completion": " a", "label": "\\ud800"}\n',
                                          ["line 1", "label"]),
    "a lone surrogate in a key": (GOOD + b'{"prompt": "p", "chosen": " a", "rejected": " b", "\\udc00": 1}\n',
                                  ["line 2", "surrogate"]),
    "a line over the limit after a bad one": (b"{bad\n" + GOOD + b'{"prompt": "' + b"x" * 5000 + b'"}\n',
                                              ["line 3", "DPO_MAX_LINE_BYTES"]),
}


@pytest.mark.parametrize("case", list(UPLOADS))
def test_bad_uploads_are_400_and_store_nothing(api, file_id, case):
    data, words = UPLOADS[case]
    before = stored(api)
    r = api.post("/v1/files", files={"file": ("bad.jsonl", data)}, data={"purpose": "fine-tune"})
    refused(r, 400, "invalid_file", *words)
    assert stored(api) == before


def test_uploads_over_the_limit_are_413_whether_announced_or_streamed(api, file_id):
    before = stored(api)
    big = GOOD * (64 * 1024 // len(GOOD) + 10)
    r = api.post("/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    refused(r, 413, "file_too_large", "DPO_MAX_UPLOAD_BYTES")

    def chunks():  # no Content-Length: counted as it arrives, refused past the limit
        boundary = b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"s.jsonl\"\r\n\r\n"
        yield boundary
        for _ in range(200):
            yield GOOD * 50

    r = api.post("/v1/files", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=x"})
    refused(r, 413, "file_too_large")
    r = api.post("/v1/fine_tuning/jobs", content=b'{"model": "' + b"m" * 40_000 + b'"}',
                 headers={"Content-Type": "application/json"})
    refused(r, 413, "request_too_large", "DPO_MAX_REQUEST_BYTES")
    assert stored(api) == before


def test_file_names_and_ids_cannot_climb_out(api, file_id):
    weird = "..\\..\\etc/..%2fpasswd\x00\n\x1b[31m.jsonl"
    r = api.post("/v1/files", files={"file": (weird, GOOD)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    made = r.json()
    assert "/" not in made["filename"] and "\\" not in made["filename"] and made["filename"].isprintable()
    data_dir = api.app.state.settings.data_dir
    assert (data_dir / "files" / f"{made['id']}.jsonl").is_file()
    assert api.delete(f"/v1/files/{made['id']}").status_code == 200
    for path in ("/v1/files/..%2F..%2Fapi_key", "/v1/files/file-..%2F..%2Fdpo.sqlite/content",
                 "/v1/files/file-%00", "/v1/fine_tuning/jobs/ftjob-%2e%2e", "/v1/fine_tuning/jobs/%00/events",
                 f"/v1/files/{'file-' + 'a' * 10_000}", "/v1/admin/teams/team-%00/keys"):
        refused(api.get(path), 404)
    for params in ({"after": "../../x"}, {"after": "file-\x00"}, {"purpose": "fine\x00tune"}):
        assert api.get("/v1/files", params=params).status_code in (400, 404)
    refused(api.get("/v1/fine_tuning/jobs", params={"after": "ftjob-\x00"}), 400, "after")


def create(api, file_id, **change):
    body = {"model": "owner/tiny-model", "training_file": file_id, "training": dict(TRAINING), **change}
    # json.dumps, not the client's encoder: it writes NaN and Infinity as a hostile client would.
    return api.post("/v1/fine_tuning/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})


JOBS = {
    "path traversal in the file id": ({"training_file": "../files/file-x.jsonl"}, "training_file"),
    "a NUL in the file id": ({"training_file": "file-\x00"}, "training_file"),
    "a model outside the model dirs": ({"model": "/etc"}, "model"),
    "a model climbing out": ({"model": "{models}/../../api_key"}, "model"),
    "a relative model path": ({"model": "./models/tiny"}, "model"),
    "a home-directory model": ({"model": "~/.ssh"}, "model"),
    "an unknown local model": ({"model": "{models}/nope"}, "model"),
    "a hub id with three parts": ({"model": "a/b/c"}, "model"),
    "a model with NUL": ({"model": "owner/model\x00"}, "model"),
    "a reference model outside": ({"training": {**TRAINING, "reference_model": "/etc/passwd"}},
                                  "training.reference_model"),
    "a negative beta": ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}},
                        "method.dpo.hyperparameters.beta"),
    "a zero batch size": ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 0}}}},
                          "method.dpo.hyperparameters.batch_size"),
    "a huge batch size": ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 10**30}}}},
                          "method.dpo.hyperparameters.batch_size"),
    "zero epochs": ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 0}}}},
                    "method.dpo.hyperparameters.n_epochs"),
    "a negative learning rate multiplier": (
        {"method": {"type": "dpo", "dpo": {"hyperparameters": {"learning_rate_multiplier": -2}}}},
        "method.dpo.hyperparameters.learning_rate_multiplier"),
    "a seed past 64 bits": ({"seed": 2**70}, "seed"),
    "a negative seed": ({"seed": -1}, "seed"),
    "a huge max_steps": ({"training": {**TRAINING, "max_steps": 10**20}}, "training.max_steps"),
    "an infinite learning rate": ({"training": {**TRAINING, "learning_rate": float("inf")}},
                                  "training.learning_rate"),
    "dropout of one": ({"training": {**TRAINING, "lora": {"dropout": 1.0}}}, "training.lora.dropout"),
    "a string for a number": ({"training": {**TRAINING, "warmup_steps": "ten"}}, "training.warmup_steps"),
    "training that is a list": ({"training": [1, 2]}, "training"),
    "metadata with a number": ({"metadata": {"a": 1}}, "metadata.a"),
    "too many gpus": ({"gpus": 10_000}, "gpus"),
    "a priority out of range": ({"priority": 101}, "priority"),
    "a suffix with control characters": ({"suffix": "a\x07b"}, "suffix"),
    "max_attempts of zero": ({"max_attempts": 0}, "max_attempts"),
    "a server path in training": ({"training": {**TRAINING, "output_dir": "/tmp/x"}}, "training.output_dir"),
}


@pytest.mark.parametrize("case", list(JOBS))
def test_bad_job_requests_are_400_naming_the_parameter_and_store_nothing(api, file_id, case):
    change, param = JOBS[case]
    models = str(api.app.state.settings.model_dirs[0])
    change = json.loads(json.dumps(change).replace("{models}", models))
    before = stored(api)
    r = create(api, file_id, **change)
    error = refused(r, 400)
    assert error["param"] == param, error
    assert stored(api) == before


def hp(**values) -> dict:
    return {"method": {"type": "dpo", "dpo": {"hyperparameters": values}}}


# Absurd but finite numbers (they ran and "succeeded" with NaN weights, or failed on the worker as
# internal_error), booleans for numbers, and a device that is no device.
ABSURD = {
    "beta 1e300": (hp(beta=1e300), "method.dpo.hyperparameters.beta"),
    "loss.beta 1e300": ({"training": {**TRAINING, "loss": {"beta": 1e300}}}, "training.loss.beta"),
    "learning_rate 1e200": ({"training": {**TRAINING, "learning_rate": 1e200}}, "training.learning_rate"),
    "learning_rate_multiplier 1e40": (hp(learning_rate_multiplier=1e40),
                                      "method.dpo.hyperparameters.learning_rate_multiplier"),
    "a multiplier that takes the learning rate past 0.1": (
        {**hp(learning_rate_multiplier=1000), "training": {**TRAINING, "learning_rate": 1e-3}},
        "method.dpo.hyperparameters.learning_rate_multiplier"),
    "lora.r 1e17": ({"training": {**TRAINING, "lora": {"r": 1e17}}}, "training.lora.r"),
    "n_epochs 1e30": (hp(n_epochs=1e30), "method.dpo.hyperparameters.n_epochs"),
    "num_epochs 1e30": ({"training": {**TRAINING, "num_epochs": 1e30}}, "training.num_epochs"),
    "a shell command for a device": ({"training": {**TRAINING, "device": "cuda:99; rm -rf /"}}, "training.device"),
    "another GPU than the worker's": ({"training": {**TRAINING, "device": "cuda:1"}}, "training.device"),
    "beta true": (hp(beta=True), "method.dpo.hyperparameters.beta"),
    "loss.beta true": ({"training": {**TRAINING, "loss": {"beta": True}}}, "training.loss.beta"),
    "batch_size true": (hp(batch_size=True), "method.dpo.hyperparameters.batch_size"),
    "a string for a batch size": (hp(batch_size="8"), "method.dpo.hyperparameters.batch_size"),
    "gpus true": ({"gpus": True}, "gpus"),
    "seed 1.5": ({"seed": 1.5}, "seed"),
    "a group beta of 0": ({"training": {**TRAINING, "loss": {"beta_by_group": {"a": 0}}}},
                          "training.loss.beta_by_group.a.beta"),
    "a group beta of -1": ({"training": {**TRAINING, "loss": {"beta_by_group": {"a": -1}}}},
                           "training.loss.beta_by_group.a.beta"),
    "a max_length past 131072": ({"training": {"max_length": 10**6}}, "training.max_length"),
}


@pytest.mark.parametrize("case", list(ABSURD))
def test_absurd_numbers_are_400_invalid_value_naming_the_parameter(api, file_id, case):
    change, param = ABSURD[case]
    before = stored(api)
    error = refused(create(api, file_id, **change), 400)
    assert (error["param"], error["code"]) == (param, "invalid_value"), error
    assert stored(api) == before


def _ends(end: int) -> dict:
    """A request with every number (the job's, the hyperparameters, `training`'s) at one end of its range
    (0: low, -1: high). The multiplier is left out: at its top it takes the top learning rate past 0.1."""
    from api.ranges import request_ranges

    body: dict = {"training": {}, **hp()}
    for param, f, _, _ in request_ranges():
        if not f.numeric or param.endswith("learning_rate_multiplier") or "<group>" in param:
            continue
        *parents, leaf = param.split(".")
        node = body
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = [s for s in f.samples() if s != "auto"][end]
    return body


@pytest.mark.parametrize("end", [0, -1], ids=["low", "high"])
def test_every_number_at_an_end_of_its_range_is_accepted(api, file_id, end):
    body = {"model": "owner/tiny-model", "training_file": file_id, "validation_file": file_id, **_ends(end)}
    r = api.post("/v1/fine_tuning/jobs", json=body)
    assert r.status_code == 200, r.text
    job = r.json()
    hyper = body["method"]["dpo"]["hyperparameters"]
    assert (job["training"]["loss"]["beta"], job["gpus"], job["priority"]) == (
        hyper["beta"], body["gpus"], body["priority"])
    assert job["training"]["lora"]["r"] == body["training"]["lora"]["r"]
    api.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")


def test_only_max_length_set_is_a_valid_job_with_a_prompt_length_that_follows(api, file_id):
    for length, prompt in ((512, 256), (384, 192)):
        r = create(api, file_id, training={"max_length": length})
        assert r.status_code == 200, r.text
        assert (r.json()["training"]["max_length"], r.json()["training"]["max_prompt_length"]) == (length, prompt)
        api.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")


def test_unpaired_rows_for_a_paired_loss_are_refused_at_submission(api, file_id):
    row = b'{"prompt": "sort : n2 n1", "completion": " n1 n2", "label": true}\n'
    unpaired = api.post("/v1/files", files={"file": ("u.jsonl", row * 4)}, data={"purpose": "fine-tune"}).json()["id"]
    before = stored(api)
    error = refused(create(api, unpaired), 400)
    assert (error["param"], error["code"]) == ("training_file", "invalid_value")
    assert stored(api) == before
    r = create(api, unpaired, training={**TRAINING, "loss": {"type": "kto"}})
    assert r.status_code == 200, r.text
    api.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")
    api.delete(f"/v1/files/{unpaired}")


def test_non_json_bodies_and_wrong_types_are_400(api, file_id):
    for body, ctype in ((b"{not json", "application/json"), (b"NaN", "application/json"),
                        (b'"a string"', "application/json"), (b"\xff\xfe", "application/json"),
                        (b"model=x", "application/x-www-form-urlencoded")):
        refused(api.post("/v1/fine_tuning/jobs", content=body, headers={"Content-Type": ctype}), 400)
    refused(api.post("/v1/admin/teams", json={"name": "../etc"}), 400, "name")
    refused(api.post("/v1/admin/teams", json={"name": "ok", "max_running_jobs": "many"}), 400, "max_running_jobs")
    refused(api.get("/v1/usage", params={"since": "inf"}), 400, "since")
    refused(api.get("/v1/fine_tuning/jobs", params={"limit": 10**30}), 400, "limit")


def test_a_local_model_under_the_model_dirs_and_a_hub_id_are_accepted(api, file_id):
    models = api.app.state.settings.model_dirs[0]
    for model in (str(models / "tiny"), "owner/tiny-model", "gpt2"):
        r = create(api, file_id, model=model)
        assert r.status_code == 200, r.text
        api.post(f"/v1/fine_tuning/jobs/{r.json()['id']}/cancel")
    outside = models.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text("{}")
    link = models / "link"
    if not link.exists():
        os.symlink(outside, link)
    error = refused(create(api, file_id, model=str(link)), 400, "model", "DPO_MODEL_DIRS")
    assert error["code"] == "invalid_model"


def test_idempotency_key_returns_the_same_job_for_a_retry(api, file_id):
    before = stored(api)
    first = api.post("/v1/fine_tuning/jobs", json={"model": "owner/m", "training_file": file_id,
                                                    "training": TRAINING}, headers={"Idempotency-Key": "retry-1"})
    again = api.post("/v1/fine_tuning/jobs", json={"model": "owner/m", "training_file": file_id,
                                                    "training": TRAINING}, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    assert stored(api)[1] == before[1] + 1
    other = api.post("/v1/fine_tuning/jobs", json={"model": "owner/other", "training_file": file_id,
                                                    "training": TRAINING}, headers={"Idempotency-Key": "retry-1"})
    error = refused(other, 409, "idempotency_key_reused")
    assert first.json()["id"] in error["message"]
    # Keys belong to a team: another team's same key makes its own job.
    team = make_team(api, f"idem-{os.getpid()}")
    theirs = api.post("/v1/files", files={"file": ("t.jsonl", GOOD)}, data={"purpose": "fine-tune"},
                      headers=as_key(team["key"])).json()["id"]
    r = api.post("/v1/fine_tuning/jobs", json={"model": "owner/m", "training_file": theirs, "training": TRAINING},
                 headers={"Idempotency-Key": "retry-1", **as_key(team["key"])})
    assert r.status_code == 200 and r.json()["id"] != first.json()["id"]
    for bad in ("", "x" * 300, "with space", "nul\x01"):
        assert api.post("/v1/fine_tuning/jobs", json={"model": "owner/m", "training_file": file_id},
                        headers={"Idempotency-Key": bad}).status_code == 400
    for job_id in (first.json()["id"], r.json()["id"]):
        api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")


def test_nothing_is_left_in_the_data_dir_but_what_was_accepted(api, file_id):
    data_dir: Path = api.app.state.settings.data_dir
    leftovers = [p for p in (data_dir / "files").iterdir() if p.name.startswith(".") or ".tmp" in p.name]
    assert leftovers == []
