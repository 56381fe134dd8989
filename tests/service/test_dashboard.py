"""The web dashboard in a real browser: Playwright driving Debian's chromium against a real API process and
a real worker. A team signs in by pasting its key, uploads its data, checks the job (a bad value first: the
error shows under its field; then the pre-flight report) and starts it through the form, watches the charts
gain points while the job runs (its estimate beside the measured run once it ends), downloads a checkpoint
(fetched with the key: the local store has no download link; test_dashboard_s3 downloads one from a store),
and pauses, resumes and cancels a second job (no Delete until it has ended). An ended job's view shows its
samples, downloads its result files and deletes what it keeps after an inline confirm. Screenshots of each view go to the test's temporary directory;
with DPO_UPDATE_SCREENSHOTS=1 the job view is also written to docs/dashboard.png (README).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from tests.service.processes import REPO, start_service
from tests.service.support import make_team

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}


def chromium_path() -> str:
    """Debian's chromium; without it the test is skipped, except in CI, where it must run."""
    path = os.environ.get("DPO_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if Path(path).is_file():
        return path
    if os.environ.get("CI") == "true" or os.environ.get("DPO_TEST_REQUIRE_SERVICES") == "1":
        pytest.fail(f"chromium not found at {path}; install it (apt-get install chromium): CI must run the browser test")
    pytest.skip("chromium not found: apt-get install chromium to run the browser test")


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("dashboard"), "web-" + secrets.token_hex(8))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def team(service) -> dict:
    with service.client() as c:
        return make_team(c, "web")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A browser tab on the dashboard that records every URL it requests and every script error."""

    def __init__(self, browser, service, shots: Path):
        self.context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
        self.page = self.context.new_page()
        self.page.set_default_timeout(30_000)
        self.url, self.shots, self.n = service.url, shots, 0
        self.requested: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requested.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        # A refused request is logged as an error too (the admin probe's 403, the bad form's 400): not counted.
        self.page.on("console", lambda m: self.errors.append(m.text)
                     if m.type == "error" and not m.text.startswith("Failed to load resource") else None)

    def go(self, hash_: str) -> None:
        self.page.evaluate(f"location.hash = {json.dumps(hash_)}")

    def shot(self, name: str) -> Path:
        self.n += 1
        path = self.shots / f"{self.n:02d}-{name}.png"
        self.page.screenshot(path=path)
        return path

    def status(self) -> str:
        return self.page.locator("main h1 .badge").inner_text()


def sign_in(tab: Page, key: str) -> None:
    tab.page.goto(tab.url + "/")
    tab.page.fill("#key", key)
    tab.page.click("form.sign-in button[type=submit]")
    tab.page.wait_for_selector("#jobs-list table")


def fill_job_form(page, model: str) -> None:
    page.fill("#model", model)
    for field, value in {"#beta": "0.1", "#learning-rate": "1e-3", "#batch-size": "8", "#max-steps": "16",
                         "#max-length": "64"}.items():
        page.fill(field, value)
    page.click("details summary")  # More settings
    for field, value in {"#micro-batch-size": "4", "#max-prompt-length": "32", "#logging-steps": "1",
                         "#eval-steps": "8", "#save-steps": "8"}.items():
        page.fill(field, value)


def check_the_job(tab: Page) -> None:
    """Check: the pre-flight report shows above the buttons, with the counts the API gave; nothing is queued."""
    page = tab.page
    with page.expect_response("**/v1/fine_tuning/jobs/preflight") as answer:
        page.click("#check-job")
    report = answer.value.json()
    expect(page.locator("#preflight")).to_be_visible()
    assert page.locator("#preflight h2").inner_text().endswith(f"{report['id']} · nothing queued")
    training = report["data"]["training_file"]
    rows = page.locator("#preflight tbody tr").evaluate_all(
        "rows => Object.fromEntries(rows.map(r => [r.cells[0].innerText, [...r.cells].slice(1).map(c => c.innerText)]))"
    )
    assert rows["Rows"] == ["128", "32"] and rows["Tokens, one epoch"][0] == f"{training['tokens']['total']:,}"
    codes = page.locator(".preflight-warning").evaluate_all("ws => ws.map(w => w.dataset.code)")
    assert codes == [w["code"] for w in report["warnings"]]
    gpu_types = page.locator("#preflight-estimate tr[data-gpu-type]").evaluate_all(
        "rows => rows.map(r => r.dataset.gpuType)")
    assert gpu_types == [g["gpu_type"] for g in report["estimate"]["by_gpu_type"]] and gpu_types
    expect(page.locator("#preflight-queue")).to_contain_text(f"Position {report['queue']['position']}")
    tab.shot("new-job-check")
    page.fill("#max-steps", "16")  # any change marks the report as stale until checked again
    expect(page.locator("#preflight.stale .stale-note")).to_be_visible()


def watch_chart_grow(tab: Page, timeout_s: float = 240) -> list[tuple[str, int]]:
    """(status, points on the loss chart) as the page shows them, sampled until the job has finished."""
    samples, deadline, shot = [], time.monotonic() + timeout_s, False
    while time.monotonic() < deadline:
        points = int(tab.page.get_attribute("[data-chart=loss]", "data-points"))
        status = tab.status()
        samples.append((status, points))
        if status == "running" and points >= 4 and not shot:
            shot = bool(tab.shot("job-running"))
        if status in ("succeeded", "failed", "cancelled"):
            return samples
        time.sleep(0.1)
    raise AssertionError(f"the job did not finish within {timeout_s}s: {samples[-5:]}")


def loss_points(service, job_id: str) -> int:
    """The steps with a training loss plus those with an evaluation loss, as the API lists the job's events."""
    with service.client() as c:
        events = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    metrics = [e["data"] for e in events if e["type"] == "metrics"]
    return len({m["step"] for m in metrics if "loss" in m}) + len({m["step"] for m in metrics if "eval_loss" in m})


def submit_unservable_job(service, key: str, like: str) -> str:
    """A job like job `like` that asks for a GPU type no worker has: it waits in the queue until cancelled."""
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=service.url, headers=headers, timeout=30) as c:
        done = c.get(f"/v1/fine_tuning/jobs/{like}").json()
        r = c.post("/v1/fine_tuning/jobs", json={"model": done["model"], "training_file": done["training_file"],
                                                  "gpu_type": "h100"})
    assert r.status_code == 200, r.text
    return r.json()["id"]


# Runs in the page: the dashboard's own stream reader (api/static/js/sse.js) against the real API, with the
# first connection cut mid-message after `budget` bytes (the rest of the page's fetches go through).
RESUME_AFTER_A_CUT = """async ([jobId, budget]) => {
  const { followEvents, SseParser } = await import("/static/js/sse.js");
  const parsed = [];
  const parser = new SseParser((m) => parsed.push(m));
  parser.feed(": keep-alive\\r\\n\\r\\nid: a\\r\\nevent: metrics\\r\\ndata: {\\"x\\"");
  parser.feed(":1}\\r\\n\\r\\nid: b\\ndata: one\\ndata: two\\n\\n");
  const realFetch = window.fetch, sentIds = [];
  window.fetch = async (url, init) => {
    if (!String(url).includes("stream=true")) return realFetch(url, init);
    sentIds.push(init.headers["Last-Event-ID"] || null);
    const response = await realFetch(url, init);
    if (sentIds.length > 1) return response;
    const reader = response.body.getReader();
    let sent = 0;
    const cut = new ReadableStream({ async pull(c) {
      const { done, value } = await reader.read();
      if (done) return c.close();
      if (sent + value.length < budget) { sent += value.length; return c.enqueue(value); }
      c.enqueue(value.slice(0, budget - sent));
      reader.cancel();
      c.error(new TypeError("connection reset"));
    } });
    return new Response(cut, { status: response.status, headers: response.headers });
  };
  const received = [];
  try {
    await followEvents(jobId, { signal: new AbortController().signal, onEvent: (e) => received.push(e.id) });
  } finally {
    window.fetch = realFetch;
  }
  return { parsed, sentIds, received };
}"""


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=30_000)  # a loaded machine: uploads and jobs take their time
    return playwright_expect(locator)


def test_a_team_trains_watches_downloads_and_cancels_in_the_browser(service, team, browser, task_files, tiny_model,
                                                                    tmp_path):
    tab = Page(browser, service, tmp_path)
    page = tab.page
    response = httpx.get(service.url + "/")
    assert response.status_code == 200 and "script-src 'self'" in response.headers["content-security-policy"]
    assert "unsafe-inline" not in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"

    sign_in(tab, team["key"])
    assert page.locator("#who-name").inner_text() == "team web"
    assert not page.locator("[data-nav=teams]").is_visible()  # the admin's view only
    tab.go("#/new")
    page.set_input_files("#training-file-upload", str(task_files[0]))
    expect(page.locator("#training-file")).to_have_value(re.compile("^file-"))
    page.set_input_files("#validation-file-upload", str(task_files[1]))
    expect(page.locator("#validation-file")).to_have_value(re.compile("^file-"))
    assert "128 rows" in page.locator("#training-file-status").inner_text()

    fill_job_form(page, tiny_model)
    page.fill("#beta", "-1")
    page.fill("#lora-r", "0")
    page.click("#check-job")  # the pre-flight check names the same problems as a submission
    expect(page.locator("#error-beta")).to_contain_text("greater than")
    assert page.locator("#preflight").is_hidden()
    page.click("#submit-job")
    page.wait_for_selector("#error-beta:not(:empty)")
    assert "greater than" in page.locator("#error-beta").inner_text()
    assert page.get_attribute("#lora-r", "aria-invalid") == "true"
    assert page.locator("#error-lora-r").inner_text() != ""
    tab.shot("new-job-errors")
    page.fill("#beta", "0.1")
    page.fill("#lora-r", "")
    page.click("#tab-yaml")  # the settings so far, as the YAML a dpo-train spec holds
    assert "max_steps: 16" in page.input_value("#yaml") and "beta: 0.1" in page.input_value("#yaml")
    page.fill("#yaml", "loss: [sigmoid\n")
    page.click("#submit-job")
    expect(page.locator("#error-yaml")).to_contain_text("not valid YAML")
    page.click("#tab-form")
    check_the_job(tab)
    page.click("#submit-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[-1]

    samples = watch_chart_grow(tab)
    running = [points for status, points in samples if status == "running"]
    assert len({p for p in running if p > 0}) >= 2, f"the loss chart did not gain points while it ran: {samples}"
    assert samples[-1][0] == "succeeded", service.logs()
    page.wait_for_selector("#stream-state[data-state=ended]")
    expect(page.locator("#estimate")).to_contain_text("peak")  # kept from the check just before the job
    # Measured, and compared with the estimate.
    expect(page.locator("#actual")).to_contain_text(re.compile(r"\(([+-]\d+%|[\d.]+× the estimate)\) · .* peak \(rss\)"))
    assert int(page.get_attribute("[data-chart=loss]", "data-points")) == loss_points(service, job_id)
    page.wait_for_selector("[data-checkpoint] [data-download]")
    assert page.locator("#samples").is_hidden()  # a spec without `samples` makes none
    expect(page.locator("[data-result-file] [data-download]")).to_have_count(1)  # metrics.jsonl
    readme_shot = tab.shot("job")
    if os.environ.get("DPO_UPDATE_SCREENSHOTS") == "1":
        shutil.copyfile(readme_shot, REPO / "docs" / "dashboard.png")

    with service.client() as c:
        final = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["fine_tuned_model"]
        listed = c.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    resumed = page.evaluate(RESUME_AFTER_A_CUT, [job_id, 1500])
    assert resumed["parsed"] == [{"id": "a", "event": "metrics", "data": '{"x":1}'},
                                 {"id": "b", "event": "message", "data": "one\ntwo"}]
    ids = [e["id"] for e in listed]
    assert resumed["received"] == ids, "the stream lost or repeated events over a reconnect"
    cut_after = resumed["sentIds"][1]
    assert resumed["sentIds"][0] is None and cut_after in ids[:-1], resumed["sentIds"]  # resumed mid-job
    with page.expect_download() as download:
        page.click(f"[data-checkpoint={final}] [data-download]")
    # The local store has no download link to give (409): fetched with the key, saved from memory.
    expect(page.locator(f"[data-checkpoint={final}] [data-download]")).to_have_attribute("data-via", "fetched")
    saved = tmp_path / "final.tar"
    download.value.save_as(saved)
    with tarfile.open(saved) as tar:
        names = tar.getnames()
        assert f"{final}/config.json" in names and f"{final}/model.safetensors" in names, names
        tar.extractall(tmp_path / "final", filter="data")
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "final" / final).num_parameters() > 0

    waiting = submit_unservable_job(service, team["key"], job_id)
    tab.go(f"#/jobs/{waiting}")
    with service.client() as c:
        reason = c.get(f"/v1/fine_tuning/jobs/{waiting}").json()["queue_reason"]
    expect(page.locator(".summary")).to_contain_text(reason)  # why it waits, as the API says it
    assert page.locator("#delete").count() == 0  # only an ended job's files can be deleted
    page.click("#pause")
    page.wait_for_selector("main h1 .badge-paused")
    tab.shot("paused")
    page.click("#resume")
    page.wait_for_selector("main h1 .badge-queued")
    page.once("dialog", lambda d: d.accept())
    page.click("#cancel")
    page.wait_for_selector("main h1 .badge-cancelled")
    tab.shot("cancelled")

    tab.go("#/jobs?status=cancelled")
    page.wait_for_selector(f"#jobs-list tr[data-job='{waiting}']")
    assert page.locator("#jobs-list tr[data-job]").evaluate_all("rows => rows.map(r => r.dataset.status)") == ["cancelled"]
    assert [u for u in tab.requested if "/v1/fine_tuning/jobs?status=cancelled" in u]  # filtered by the API
    tab.shot("jobs")
    tab.go("#/pool")
    page.wait_for_selector("#pool table")
    assert page.locator("#pool .badge-idle, #pool .badge-busy").count() == 1
    tab.shot("pool")
    tab.go("#/usage")
    page.wait_for_selector("#usage-chart canvas")
    assert page.get_attribute("#usage-chart", "data-bars") == "28"  # 7 days of 6-hour bars
    (bucketed,) = [u for u in tab.requested if "/v1/usage?" in u]  # one request draws every bar
    assert "bucket=21600" in bucketed
    tab.shot("usage")

    key = team["key"]
    assert not [u for u in tab.requested if key in u], "the key appeared in a URL the page requested"
    assert key not in page.evaluate("JSON.stringify(Object.entries(localStorage))")
    assert page.evaluate("sessionStorage.getItem('dpo.key')") == key
    assert tab.errors == [], tab.errors

    page.click("#sign-out")  # the admin key also sees the teams and their keys
    assert page.evaluate("sessionStorage.getItem('dpo.key')") is None
    sign_in(tab, service.key)
    tab.go("#/teams")
    page.get_by_role("button", name="web").click()
    expect(page.locator("#keys")).to_contain_text("web-ci")
    tab.shot("teams")
    assert not [u for u in tab.requested if service.key in u or key in u]
    assert tab.errors == [], tab.errors
    tab.context.close()


def test_an_ended_jobs_view_warnings_samples_result_files_and_delete(service, team, browser, task_files, tiny_model,
                                                                     tmp_path):
    """A learning rate far too high makes both rewards fall: the diagnostic's warning is listed in the job's
    summary and drawn at its step on every chart. The same job's samples show reference beside policy at each
    sampling step, its result files download, and Delete (after its inline confirm) removes what it keeps."""
    headers = {"Authorization": f"Bearer {team['key']}"}
    with service.client() as c:
        with task_files[0].open("rb") as f:
            file_id = c.post("/v1/files", headers=headers, files={"file": (task_files[0].name, f)},
                             data={"purpose": "fine-tune"}).json()["id"]
        r = c.post("/v1/fine_tuning/jobs", headers=headers, json={
            "model": tiny_model, "training_file": file_id,
            "training": {"learning_rate": 5e-2, "micro_batch_size": 4, "max_length": 64, "max_prompt_length": 32,
                         "logging_steps": 1, "max_steps": 12, "report_to": ["tensorboard"],
                         "samples": {"num_prompts": 2, "max_new_tokens": 8, "max_share": 1.0}},
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"batch_size": 8}}}})
        assert r.status_code == 200, r.text
        job_id = r.json()["id"]
    job = service.wait_for_job(job_id, stall_s=120)
    assert job["status"] == "succeeded", f"{job['error']}\n{service.logs()}"
    warned = next(w for w in job["warnings"] if w["code"] == "rewards_both_falling")

    tab = Page(browser, service, tmp_path)
    sign_in(tab, team["key"])
    tab.go(f"#/jobs/{job_id}")
    page = tab.page
    expect(page.locator("#warnings [data-code=rewards_both_falling]")).to_have_text(
        f"rewards_both_falling (step {warned['step']})")
    assert page.locator("#warnings [data-code=rewards_both_falling]").get_attribute("title") == warned["message"]
    charts = page.locator(".chart")
    expect(charts.first).to_have_attribute("data-marks", str(len(job["warnings"])))
    assert charts.evaluate_all("cs => cs.map(c => c.dataset.marks)") == [str(len(job["warnings"]))] * charts.count()
    tab.shot("job-warnings")
    show_samples(tab, service, job_id)
    download_result_files(tab, job, tmp_path)
    delete_the_job(tab, service, job_id)
    assert tab.errors == [], tab.errors


def show_samples(tab: Page, service, job_id: str) -> None:
    """The latest sampling step's completions beside the reference's, as the API gives them, as text; step 0
    picked from the selector shows the reference's on both sides."""
    page = tab.page
    with service.client() as c:
        latest = c.get(f"/v1/fine_tuning/jobs/{job_id}/samples").json()
    assert latest["steps"][0] == 0 and latest["step"] == latest["steps"][-1] > 0, latest["steps"]
    expect(page.locator("#samples")).to_have_attribute("data-step", str(latest["step"]))
    assert page.get_attribute("#samples", "data-steps") == ",".join(map(str, latest["steps"]))
    blocks = page.locator("#samples-list .sample")
    assert blocks.count() == len(latest["data"]) == 2
    shown = blocks.evaluate_all("""bs => bs.map(b => [...b.querySelectorAll('pre')].map(p => p.textContent))""")
    assert shown == [[p["prompt"], p["reference"]["text"], p["policy"]["text"]] for p in latest["data"]]
    assert page.locator("#samples-list pre *").count() == 0  # model output never becomes markup
    expect(page.locator("#samples-summary")).to_contain_text("mean length")
    first = latest["data"][0]
    expect(page.locator("#samples-list [data-prompt='0'] [data-who=policy] .k")).to_contain_text(
        f"{first['policy']['tokens']} tokens")
    page.locator("#samples").scroll_into_view_if_needed()
    tab.shot("job-samples")
    page.select_option("#samples-step", "0")
    expect(page.locator("#samples")).to_have_attribute("data-step", "0")
    policy = page.locator("#samples-list [data-who=policy] pre").all_text_contents()
    assert policy == [p["reference"]["text"] for p in latest["data"]]


def download_result_files(tab: Page, job: dict, tmp_path: Path) -> None:
    """Each of the job's result files (metrics.jsonl, the TensorBoard tar) downloads from its button."""
    page = tab.page
    rows = page.locator("[data-result-file]")
    expect(rows).to_have_count(len(job["result_files"]))
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.resultFile)") == job["result_files"]
    saved = {}
    for file_id in job["result_files"]:
        with page.expect_download() as download:
            page.click(f"[data-result-file={file_id}] [data-download]")
        expect(page.locator(f"[data-result-file={file_id}] [data-download]")).to_have_attribute("data-via", "fetched")
        name = download.value.suggested_filename
        download.value.save_as(tmp_path / name)
        saved[name.removeprefix(job["id"] + "-")] = tmp_path / name
    page.locator("#result-files").scroll_into_view_if_needed()
    tab.shot("job-result-files")
    assert sorted(saved) == ["metrics.jsonl", "tensorboard.tar"], sorted(saved)
    records = [json.loads(line) for line in saved["metrics.jsonl"].read_text().splitlines()]
    assert max(r["step"] for r in records if "loss" in r) == job["progress"]["step"]
    with tarfile.open(saved["tensorboard.tar"]) as tar:
        assert any(n.startswith("tensorboard/") and "tfevents" in n for n in tar.getnames())


def delete_the_job(tab: Page, service, job_id: str) -> None:
    """Delete asks inline first (Keep leaves everything); confirmed, the jobs list says what went, the API
    lists the job with no checkpoints left, and its page shows its files as deleted."""
    page = tab.page
    page.evaluate("window.scrollTo(0, 0)")
    page.click("#delete")
    expect(page.locator("#delete-confirm-text")).to_contain_text("result files")
    tab.shot("job-delete-confirm")
    page.click("#delete-keep")
    expect(page.locator("#delete")).to_be_visible()
    with service.client() as c:
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"]
    page.click("#delete")
    page.click("#delete-confirm")
    page.wait_for_url(re.compile(r"#/jobs$"))
    expect(page.locator("#notice")).to_contain_text(job_id)
    page.wait_for_selector(f"#jobs-list tr[data-job='{job_id}']")  # still listed, with its usage
    tab.shot("jobs-after-delete")
    with service.client() as c:
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints").json()["data"] == []
        assert c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded"
    tab.go(f"#/jobs/{job_id}")  # the job's page again: its files listed as deleted, no samples
    expect(page.locator("[data-result-file]").first).to_contain_text("deleted")
    expect(page.locator("#samples-list")).to_contain_text("deleted with the job's files")
    assert page.locator("[data-download]").count() == 0
