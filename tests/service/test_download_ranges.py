"""Integration: downloads resume. A file's or a checkpoint's content is streamed with Accept-Ranges and its
exact length; one Range gets 206 with Content-Range, a range past the end 416, several ranges (or
If-Range) the whole body; the parts put together are the whole, and the tar extracts. With the local
store and with a real S3 server (DPO_STORAGE_PRESIGN=0); with presigning on, the API answers 307 to a
presigned URL that serves the same bytes, ranges included, and POST …/content/url hands that URL out as
JSON (409 download_link_unavailable where the API streams the bytes itself)."""
from __future__ import annotations

import io
import tarfile
import time

import httpx
import pytest

from service.artifacts import make_storage
from service.db import jobs
from tests.service.support import API_KEY, sessions_for, store_settings, upload
from tests.service.test_symlinks import create

FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": bytes(range(256)) * 300,
         "sub/tokenizer.json": b"{}" * 700}


@pytest.fixture(params=["local", "s3"])
def settings(request, tmp_path):
    return store_settings(request, tmp_path / "data", storage_presign=request.param == "s3-presigned")


@pytest.fixture
def checkpoint(client, settings, task_files, tmp_path) -> dict:
    """A checkpoint published through the store, as the worker publishes one."""
    train_id = upload(client, task_files[0])["id"]
    job_id = create(client, "owner/model", train_id).json()["id"]
    src = tmp_path / "ckpt"
    for name, data in FILES.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    key = f"jobs/{job_id}/checkpoint-1"
    with sessions_for(settings).begin() as s:
        ckpt_id = jobs.add_checkpoint(s, job_id, 1, key, None, size=sum(map(len, FILES.values()))).id
    make_storage(settings).publish_dir(src, key, ckpt_id)
    (found,) = client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    return found


def _ranges_of(client, url: str, whole: bytes) -> None:
    size = len(whole)
    for header, first, last in (("bytes=0-99", 0, 99), (f"bytes={size - 10}-", size - 10, size - 1),
                                ("bytes=-700", size - 700, size - 1), (f"bytes=5-{size + 50}", 5, size - 1)):
        r = client.get(url, headers={"Range": header})
        assert r.status_code == 206, (header, r.text[:200])
        assert r.headers["content-range"] == f"bytes {first}-{last}/{size}", header
        assert int(r.headers["content-length"]) == last - first + 1 == len(r.content), header
        assert r.content == whole[first:last + 1], header
    for header in ("bytes=0-1,5-9", "bytes=9-5", "lines=1-2"):  # not taken: the whole body
        r = client.get(url, headers={"Range": header})
        assert (r.status_code, r.content) == (200, whole), header
    r = client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"abc"'})
    assert (r.status_code, r.content) == (200, whole)
    for header in (f"bytes={size}-", f"bytes={size + 1}-{size + 9}", "bytes=-0"):
        r = client.get(url, headers={"Range": header})
        assert r.status_code == 416, header
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"
    # A download cut off halfway goes on from where it stopped.
    half = size // 2
    head = client.get(url, headers={"Range": f"bytes=0-{half - 1}"}).content
    tail = client.get(url, headers={"Range": f"bytes={len(head)}-"}).content
    assert head + tail == whole


def test_a_file_download_resumes(client, task_files):
    file_id = upload(client, task_files[0])["id"]
    url = f"/v1/files/{file_id}/content"
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["accept-ranges"] == "bytes"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.content == task_files[0].read_bytes()
    _ranges_of(client, url, r.content)


def test_a_checkpoint_download_resumes(client, checkpoint):
    url = checkpoint["download_url"]
    r = client.get(url)
    assert r.status_code == 200
    assert r.headers["accept-ranges"] == "bytes" and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content)
    assert _tar_files(r.content) == {f"{checkpoint['id']}/{name}": data for name, data in FILES.items()}
    _ranges_of(client, url, r.content)


def test_a_checkpoint_whose_files_are_gone_is_a_404_before_any_byte(client, settings, checkpoint):
    make_storage(settings).delete(f"jobs/{checkpoint['fine_tuning_job_id']}/checkpoint-1")
    for headers in ({}, {"Range": "bytes=10-"}):
        r = client.get(checkpoint["download_url"], headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"


def _tar_files(blob: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


@pytest.mark.parametrize("settings", ["s3-presigned"], indirect=True)
def test_with_an_object_store_downloads_redirect_to_a_presigned_url(client, settings, task_files, checkpoint):
    file_id = upload(client, task_files[0])["id"]
    for url, name, whole in ((f"/v1/files/{file_id}/content", task_files[0].name, task_files[0].read_bytes()),
                             (checkpoint["download_url"], f"{checkpoint['id']}.tar", None)):
        r = client.get(url, follow_redirects=False)
        assert r.status_code == 307, r.text
        target = r.headers["location"]
        assert target.startswith(settings.s3_endpoint_url) and "Signature" in target
        got = httpx.get(target)  # no API key: the URL itself is the permission
        assert got.status_code == 200, got.text
        assert name in got.headers["content-disposition"]
        if whole is None:
            whole = got.content
            assert _tar_files(whole) == {f"{checkpoint['id']}/{n}": data for n, data in FILES.items()}
        assert got.content == whole
        part = httpx.get(target, headers={"Range": "bytes=10-19"})
        assert (part.status_code, part.content) == (206, whole[10:20])
        assert httpx.get(target.replace("Signature=", "Signature=0")).status_code == 403
    # A checkpoint whose files are gone is the API's 404, not a URL to nothing.
    make_storage(settings).delete(f"jobs/{checkpoint['fine_tuning_job_id']}/checkpoint-1")
    r = client.get(checkpoint["download_url"])
    assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"


@pytest.mark.parametrize("settings", ["local", "s3", "s3-presigned"], indirect=True)
def test_a_download_link_is_the_presigned_url_or_a_409_where_the_api_streams(client, settings, task_files,
                                                                               checkpoint):
    file_id = upload(client, task_files[0])["id"]
    content = {f"/v1/files/{file_id}/content": "file_id", checkpoint["download_url"]: "checkpoint_id"}
    linked = settings.storage_presign and make_storage(settings).remote
    for url, param in content.items():
        asked = time.time()
        r = client.post(f"{url}/url")
        if not linked:
            assert r.status_code == 409, r.text
            assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("download_link_unavailable", param)
            continue
        assert r.status_code == 200, r.text
        link = r.json()
        assert asked + settings.presign_ttl_s - 5 <= link["expires_at"] <= time.time() + settings.presign_ttl_s
        got = httpx.get(link["url"])  # no API key
        redirected = httpx.get(client.get(url, follow_redirects=False).headers["location"])
        assert got.status_code == 200 and got.content == redirected.content and got.content
        assert "attachment" in got.headers["content-disposition"]
    if linked:  # gone: the API's 404, not a link to nothing
        make_storage(settings).delete(f"jobs/{checkpoint['fine_tuning_job_id']}/checkpoint-1")
        r = client.post(f"{checkpoint['download_url']}/url")
        assert r.status_code == 404 and r.json()["error"]["code"] == "artifact_missing"


@pytest.mark.parametrize("settings", ["s3-presigned"], indirect=True)
def test_dpo_jobs_download_follows_the_redirect_without_the_api_key(client, settings, checkpoint, tmp_path):
    from rich.console import Console

    from dpo_client.api import Api
    from dpo_client.config import Target
    from dpo_client.transfer import download

    seen = []
    store = httpx.HTTPTransport()

    class Recorded(httpx.BaseTransport):  # the store's side: what reached it
        def handle_request(self, request):
            seen.append(request)
            return store.handle_request(request)

    class ThisApp(httpx.BaseTransport):  # the API's side: this app, in this process
        def handle_request(self, request):
            answer = client.request(request.method, str(request.url), headers=request.headers,
                                    content=request.read(), follow_redirects=False)
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)

    api = Api(Target("http://testserver", API_KEY, "test"))
    api.http = httpx.Client(base_url="http://testserver", headers=api.http.headers,
                            mounts={"http://testserver": ThisApp(), "all://": Recorded()})
    path = download(api, checkpoint["fine_tuning_job_id"], checkpoint["id"], tmp_path / "out", Console())
    assert {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()} == FILES
    assert seen and all(str(r.url).startswith(settings.s3_endpoint_url) for r in seen)
    assert not any("authorization" in r.headers for r in seen)  # the API key stays with the API


def _head_matches_get(client, url: str) -> None:
    """HEAD answers GET's status and headers, ranges included, with no body."""
    for headers in ({}, {"Range": "bytes=10-19"}, {"Range": "bytes=-5"}):
        got, head = client.get(url, headers=headers), client.head(url, headers=headers)
        assert head.status_code == got.status_code in (200, 206), headers
        assert head.content == b""
        assert dict(head.headers) == dict(got.headers), headers
    size = int(client.get(url).headers["content-length"])
    r = client.head(url, headers={"Range": f"bytes={size}-"})
    assert (r.status_code, r.headers["content-range"]) == (416, f"bytes */{size}")


def test_head_tells_a_file_download_s_size_and_ranges(client, task_files):
    url = f"/v1/files/{upload(client, task_files[0])['id']}/content"
    r = client.head(url)
    assert r.status_code == 200 and r.content == b""
    assert int(r.headers["content-length"]) == task_files[0].stat().st_size
    assert r.headers["accept-ranges"] == "bytes" and "attachment" in r.headers["content-disposition"]
    _head_matches_get(client, url)


def test_head_tells_a_checkpoint_download_s_size_and_ranges(client, settings, checkpoint):
    url = checkpoint["download_url"]
    r = client.head(url)
    assert (r.status_code, r.headers["content-type"]) == (200, "application/x-tar")
    assert int(r.headers["content-length"]) == len(client.get(url).content)
    _head_matches_get(client, url)
    make_storage(settings).delete(f"jobs/{checkpoint['fine_tuning_job_id']}/checkpoint-1")
    assert client.head(url).status_code == 404


@pytest.mark.parametrize("settings", ["s3-presigned"], indirect=True)
def test_head_with_an_object_store_redirects_to_a_url_presigned_for_head(client, settings, task_files, checkpoint):
    file_id = upload(client, task_files[0])["id"]
    for url in (f"/v1/files/{file_id}/content", checkpoint["download_url"]):
        size = len(httpx.get(client.get(url, follow_redirects=False).headers["location"]).content)
        r = client.head(url, follow_redirects=False)
        assert r.status_code == 307, r.text
        target = r.headers["location"]
        head = httpx.head(target)  # no API key; S3 signs the method, so a GET's URL would refuse this
        assert head.status_code == 200, head.headers
        assert int(head.headers["content-length"]) == size and head.headers["accept-ranges"] == "bytes"
        assert "attachment" in head.headers["content-disposition"]
        assert httpx.get(target).status_code == 403  # and this URL serves HEAD only
