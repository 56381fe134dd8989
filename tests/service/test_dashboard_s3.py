"""The dashboard's download on an object store, in a real browser (Playwright driving Debian's chromium):
an API and a worker whose store is a real S3 server (SeaweedFS), a bucket with no CORS rule. The job page's
Download asks the API for a download link and lets the browser save the presigned URL's answer: the tar
arrives whole (the same bytes as the content route serves), the page stays on the job, and neither the API
key nor a script's fetch ever reaches the store. The job's result file (metrics.jsonl) downloads the same way. A screenshot of the job view goes to the test's temporary
directory.
"""
from __future__ import annotations

import io
import secrets
import tarfile
import uuid

import httpx
import pytest

from tests.service.processes import start_service
from tests.service.support import make_team
from tests.service.test_dashboard import Page, browser, expect, sign_in  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.slow
FAST = {"learning_rate": 1e-3, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32, "logging_steps": 1}


@pytest.fixture(scope="module")
def service(tmp_path_factory, s3_server):
    env = {"DPO_STORAGE_URL": f"s3://{s3_server.bucket}/{uuid.uuid4().hex}",
           "DPO_S3_ENDPOINT_URL": s3_server.endpoint, "DPO_PRESIGN_TTL_S": "600"}
    svc = start_service(tmp_path_factory.mktemp("dashboard-s3"), "web-s3-" + secrets.token_hex(8), env)
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def finished_job(service, task_files, tiny_model) -> tuple[dict, str]:
    """(team, job id): a team's tiny job, two steps, ended with its final model in the store."""
    with service.client() as c:
        team = make_team(c, "web-s3")
    headers = {"Authorization": f"Bearer {team['key']}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as c:
        with task_files[0].open("rb") as f:
            file_id = c.post("/v1/files", files={"file": (task_files[0].name, f)},
                             data={"purpose": "fine-tune"}).json()["id"]
        r = c.post("/v1/fine_tuning/jobs", json={
            "model": tiny_model, "training_file": file_id, "training": {**FAST, "max_steps": 2},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
    assert r.status_code == 200, r.text
    job = service.wait_for_job(r.json()["id"], stall_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    return team, job["id"]


def bucket_cors(s3_server):
    """The bucket's CORS rules as the store reports them; None when it has none."""
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    try:
        return client.get_bucket_cors(Bucket=s3_server.bucket)["CORSRules"]
    except ClientError as err:
        assert err.response["Error"]["Code"] == "NoSuchCORSConfiguration", err.response
        return None


def test_a_checkpoint_downloads_from_the_store_through_the_job_page(service, finished_job, s3_server, browser,
                                                                    tmp_path):
    team, job_id = finished_job
    assert bucket_cors(s3_server) is None  # a cross-origin fetch() of the store would be refused
    with service.client() as c:
        final = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
        content = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{final}/content"
        redirect = c.get(content)
        assert redirect.status_code == 307 and redirect.headers["location"].startswith(s3_server.endpoint)
        served = httpx.get(redirect.headers["location"], timeout=60).content  # the bytes the API sends users to

    tab = Page(browser, service, tmp_path)
    page = tab.page
    sign_in(tab, team["key"])
    tab.go(f"#/jobs/{job_id}")
    # The ended job's events replayed, and the checkpoint list they refresh drawn for the last time.
    page.wait_for_selector("#stream-state[data-state=ended]")
    page.wait_for_load_state("networkidle")
    button = page.locator(f"[data-checkpoint={final}] [data-download]")
    expect(button).to_be_visible()
    with page.expect_download() as download:
        button.click()
    assert download.value.url.startswith(s3_server.endpoint + "/")  # straight from the store
    saved = tmp_path / "final.tar"
    download.value.save_as(saved)
    assert saved.read_bytes() == served
    with tarfile.open(fileobj=io.BytesIO(served)) as tar:
        names = tar.getnames()
    assert f"{final}/config.json" in names and f"{final}/model.safetensors" in names, names
    expect(button).to_have_attribute("data-via", "link")
    expect(button).to_have_text("Download started")
    assert page.url.endswith(f"#/jobs/{job_id}")  # the page stayed on the job
    tab.shot("job-s3-download")
    download_the_result_file(tab, service, job_id, s3_server, tmp_path)

    asked = [u for u in tab.requested if u.endswith(f"{content}/url")]
    assert len(asked) == 1, tab.requested
    assert not [u for u in tab.requested if u.endswith(content)]  # no fetch()+blob of the whole tar
    assert not [u for u in tab.requested if team["key"] in u]
    assert tab.errors == [], tab.errors
    tab.context.close()


def download_the_result_file(tab: Page, service, job_id: str, s3_server, tmp_path) -> None:
    """The result file's Download saves the store's presigned URL too: the bytes its content route sends to."""
    with service.client() as c:
        (file_id,) = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["result_files"]
        redirect = c.get(f"/v1/files/{file_id}/content")
        assert redirect.status_code == 307, redirect.text
        served = httpx.get(redirect.headers["location"], timeout=60).content
    button = tab.page.locator(f"[data-result-file={file_id}] [data-download]")
    with tab.page.expect_download() as download:
        button.click()
    assert download.value.url.startswith(s3_server.endpoint + "/")
    download.value.save_as(tmp_path / "metrics.jsonl")
    assert (tmp_path / "metrics.jsonl").read_bytes() == served and served.startswith(b"{")
    expect(button).to_have_attribute("data-via", "link")
    assert not [u for u in tab.requested if u.endswith(f"/v1/files/{file_id}/content")]
