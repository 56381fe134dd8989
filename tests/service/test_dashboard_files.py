"""The dashboard as the API serves it (in process): the page and every file it loads, their security
headers, the vendored libraries with their licences, and the error body its forms read. The page in a
real browser is tests/service/test_dashboard.py."""
from __future__ import annotations

import re
from pathlib import Path

from api.routes.dashboard import STATIC
from tests.service.support import upload

VENDORED = {"uplot/uPlot.iife.min.js": "uPlot (v1.6.32)", "js-yaml/js-yaml.esm.min.js": "js-yaml 5.5.0"}


def test_the_page_is_served_with_a_strict_policy_and_never_cached(client):
    r = client.get("/", headers={"Authorization": ""})  # the page itself needs no key
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(part.strip().split(" ", 1) for part in r.headers["content-security-policy"].split(";"))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["connect-src"] == "'self'"
    assert csp["frame-ancestors"] == "'none'" and "unsafe" not in r.headers["content-security-policy"]
    assert r.headers["cache-control"] == "no-store" and r.headers["x-content-type-options"] == "nosniff"
    assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), "an inline script would be refused by the policy"
    assert " style=" not in r.text


def test_every_file_the_page_and_its_modules_load_is_served(client):
    page = client.get("/").text
    wanted = set(re.findall(r'(?:src|href)="(/static/[^"]+)"', page))
    for module in STATIC.rglob("*.js"):
        if "vendor" in module.parts:
            continue
        for target in re.findall(r'^import .* from "(\.[^"]+)";', module.read_text(), re.M):
            wanted.add("/static/" + str((module.parent / target).resolve().relative_to(STATIC)))
    assert "/static/vendor/uplot/uPlot.iife.min.js" in wanted and "/static/js/views/job.js" in wanted
    for path in sorted(wanted):
        r = client.get(path, headers={"Authorization": ""})
        assert r.status_code == 200, path
        kind = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}[Path(path).suffix]
        assert kind in r.headers["content-type"], (path, r.headers["content-type"])
        assert r.headers["cache-control"] == "no-cache" and "etag" in r.headers


def test_vendored_libraries_carry_their_licence_and_version():
    notes = (STATIC / "vendor" / "README.md").read_text()
    for path, header in VENDORED.items():
        code = (STATIC / "vendor" / path).read_text()
        assert header in code[:200], path
        assert (STATIC / "vendor" / path.split("/")[0] / "LICENSE").read_text().startswith(("MIT", "The MIT", "(The MIT"))
        assert header.split()[-1].strip("v()") in notes


def test_a_missing_static_file_is_a_404_error_body(client):
    r = client.get("/static/js/nope.js")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_bad_job_request_lists_each_problem_by_parameter(client, task_files):
    """The dashboard's form shows each problem under its field from error.problems."""
    train = upload(client, task_files[0])["id"]
    r = client.post("/v1/fine_tuning/jobs", json={"model": "org/m", "training_file": train,
                                                  "training": {"loss": {"beta": -1}, "lora": {"r": 0}}})
    assert r.status_code == 400
    error = r.json()["error"]
    assert {p["param"] for p in error["problems"]} == {"training.loss.beta", "training.lora.r"}
    assert error["param"] == error["problems"][0]["param"] and all(p["message"] for p in error["problems"])
    r = client.post("/v1/fine_tuning/jobs", json={"model": "org/m", "training_file": train, "priority": 1000})
    assert r.status_code == 400 and r.json()["error"]["problems"][0]["param"] == "priority"
