"""Integration: /v1/files and auth through the real app on SQLite (no worker needed)."""
from __future__ import annotations

from fastapi.testclient import TestClient

from api.main import create_app
from tests.service.support import make_settings, upload


def test_every_v1_route_needs_the_key(client):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}):
        r = client.get("/v1/files", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200


def test_upload_validates_and_stores(client, task_files, settings):
    train, _ = task_files
    f = upload(client, train)
    assert f["id"].startswith("file-") and f["object"] == "file"
    assert (f["rows"], f["format"], f["bytes"], f["filename"], f["status"]) == (
        128, "text", train.stat().st_size, "train.jsonl", "processed")
    assert client.get(f"/v1/files/{f['id']}").json() == f
    assert client.get(f"/v1/files/{f['id']}/content").content == train.read_bytes()


def test_bad_lines_are_named_in_a_400(client):
    data = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\nnot json\n{"prompt": "p", "chosen": " a"}\n'
    r = client.post("/v1/files", files={"file": ("bad.jsonl", data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "file" and err["code"] == "invalid_file"
    assert "line 2" in err["message"] and "line 3" in err["message"] and "rejected" in err["message"]
    assert [p["line"] for p in err["problems"]] == [2, 3]
    assert client.get("/v1/files").json()["data"] == []  # nothing half-stored


def test_an_integer_past_the_conversion_limit_is_a_bad_line_not_a_500(client, settings):
    good = b'{"prompt": "p", "chosen": " a", "rejected": " b"}\n'
    huge = b'{"prompt": "p", "chosen": " a", "rejected": " b", "x": 1' + b"0" * 5000 + b"}\n"
    r = client.post("/v1/files", files={"file": ("big.jsonl", good + huge + good)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"]) == ("invalid_file", "file")
    assert err["problems"] == [{"line": 2, "field": None, "message": err["problems"][0]["message"]}]
    assert "5001 digits" in err["problems"][0]["message"]
    assert client.get("/v1/files").json()["data"] == []
    assert list((settings.data_dir / "files").iterdir()) == []


def test_wrong_purpose_and_missing_file_part(client, task_files):
    r = client.post("/v1/files", files={"file": ("t.jsonl", task_files[0].read_bytes())}, data={"purpose": "batch"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "purpose"
    r = client.post("/v1/files", data={"purpose": "fine-tune"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"


def test_upload_over_the_size_limit_is_413(tmp_path, task_files):
    settings = make_settings(tmp_path / "data", max_upload_bytes=100)
    with TestClient(create_app(settings), headers={"Authorization": "Bearer test-admin-key"}) as c:
        r = c.post("/v1/files", files={"file": ("t.jsonl", task_files[0].read_bytes())}, data={"purpose": "fine-tune"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "file_too_large"


def test_list_pages_with_a_cursor(client, task_files):
    ids = [upload(client, task_files[1])["id"] for _ in range(5)]
    seen, after = [], None
    while True:
        page = client.get("/v1/files", params={"limit": 2, **({"after": after} if after else {})}).json()
        seen += [f["id"] for f in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert sorted(seen) == sorted(ids) and len(seen) == 5
    r = client.get("/v1/files", params={"after": "file-nope"})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "after")  # as every list answers a bad cursor


def test_delete(client, task_files, settings):
    f = upload(client, task_files[1])
    r = client.delete(f"/v1/files/{f['id']}")
    assert r.json() == {"id": f["id"], "object": "file", "deleted": True}
    assert client.get(f"/v1/files/{f['id']}").status_code == 404
    assert not list((settings.data_dir / "files").iterdir())


def test_any_file_name_is_kept_for_display_only(client, task_files, settings):
    name = 'données "x"\n.jsonl'
    r = client.post("/v1/files", files={"file": (f"../../etc/{name}", task_files[1].read_bytes())},
                    data={"purpose": "fine-tune"})
    assert r.status_code == 200
    f = r.json()
    assert "/" not in f["filename"] and f["filename"].startswith("donn")
    r = client.get(f"/v1/files/{f['id']}/content")
    assert r.status_code == 200 and r.content == task_files[1].read_bytes()
    assert [p.name for p in (settings.data_dir / "files").iterdir()] == [f"{f['id']}.jsonl"]


def test_an_upload_the_disk_cannot_hold_is_503_and_leaves_nothing(client, task_files, settings, monkeypatch):
    import errno

    from service.artifacts import LocalStorage

    real = LocalStorage.put_stream

    def full(self, key, chunks):
        def until_full():  # half the lines reach the disk, then a write fails as on a full disk
            for i, chunk in enumerate(chunks):
                if i == 64:
                    raise OSError(errno.ENOSPC, "No space left on device")
                yield chunk
        return real(self, key, until_full())

    monkeypatch.setattr(LocalStorage, "put_stream", full)
    r = client.post("/v1/files", files={"file": ("t.jsonl", task_files[0].read_bytes())}, data={"purpose": "fine-tune"})
    monkeypatch.undo()
    assert r.status_code == 503 and r.json()["error"]["code"] == "storage_error"
    message = r.json()["error"]["message"]
    assert "No space left on device" in message
    assert client.get("/v1/files").json()["data"] == []
    assert list((settings.data_dir / "files").iterdir()) == []
