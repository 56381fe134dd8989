"""`pip install dpo-service` (no extra) runs the API and the `dpo` client: the real `dpo-service api`
process (SQLite, the embedded broker) and `dpo` run in a Python that finds none of the packages the
API's install leaves out: torch, peft, accelerate and every other installed distribution outside the
dependency closure of pyproject's core `dependencies`. They are hidden as an uninstalled package is
(`import` raises ModuleNotFoundError, `importlib.util.find_spec` answers None, importlib.metadata does not
list it), so transformers sees the torch-less install it would see there."""
from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import secrets
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.service.processes import REPO, new_service

pytestmark = pytest.mark.slow

# Every fresh virtual environment has these, whatever is installed into it.
VENV_BASE = {"pip", "setuptools", "wheel"}

HIDE = r'''
import importlib.machinery, os, sys

HIDDEN = frozenset(os.environ["API_ONLY_HIDDEN_MODULES"].split(","))
HIDDEN_DISTS = frozenset(os.environ["API_ONLY_HIDDEN_DISTS"].split(","))


def _dist_name(dist):
    return (dist.metadata["Name"] or "").lower().replace("_", "-").replace(".", "-")


class Hide:
    """sys.meta_path's PathFinder, less the hidden packages' modules and distributions."""

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def find_distributions(self, *args, **kwargs):
        return (d for d in self.inner.find_distributions(*args, **kwargs) if _dist_name(d) not in HIDDEN_DISTS)

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [Hide(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def _installed(name: str):
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None  # an optional dependency for another platform (uvloop on Windows) or an unused extra


def closure(requirements: list[str]) -> set[str]:
    """Canonical names of the installed distributions that `requirements` bring, transitively, with the
    extras each one asks for."""
    seen: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in requirements]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        for wanted in ("", *req.extras):
            if (name, wanted) in seen or (dist := _installed(name)) is None:
                continue
            seen.add((name, wanted))
            todo.extend((Requirement(r), wanted) for r in dist.requires or [])
    return {name for name, _ in seen}


def core_requirements() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def hidden() -> tuple[set[str], set[str]]:
    """(top-level modules, distributions) installed here that the core install would not bring."""
    keep = closure(core_requirements()) | VENV_BASE | {"dpo-service"}
    dists = {canonicalize_name(d.metadata["Name"]) for d in metadata.distributions()} - keep
    modules = {module for module, owners in metadata.packages_distributions().items()
               if owners and all(canonicalize_name(o) in dists for o in owners)}
    return modules, dists


@pytest.fixture(scope="module")
def blocked_env(tmp_path_factory) -> dict[str, str]:
    """PYTHONPATH and variables for a process that sees only the API's install."""
    modules, dists = hidden()
    assert {"torch", "peft", "accelerate"} <= modules  # the worker's, installed here by [test]
    site = tmp_path_factory.mktemp("api-only-site")
    (site / "sitecustomize.py").write_text(HIDE)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
            "API_ONLY_HIDDEN_MODULES": ",".join(sorted(modules)), "API_ONLY_HIDDEN_DISTS": ",".join(sorted(dists))}


@pytest.fixture(scope="module")
def service(tmp_path_factory, blocked_env):
    svc = new_service(tmp_path_factory.mktemp("api-only"), "api-only-" + secrets.token_hex(8), blocked_env)
    svc.start_api()
    try:
        svc.wait_ready()
    except BaseException:
        svc.stop()
        raise
    yield svc
    svc.stop()


def test_the_core_dependencies_leave_training_to_the_worker_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(r).name) for r in project["dependencies"]}
    worker = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["worker"]}
    assert not core & {"torch", "peft", "accelerate"}
    assert {"torch", "peft", "accelerate"} <= worker
    # Installed here, the core's closure has no torch either (no dependency of it pulls torch in).
    assert not closure(project["dependencies"]) & {"torch", "peft", "accelerate"}
    assert "dpo-service[worker]" in project["optional-dependencies"]["test"]  # the suite trains


def test_the_hidden_packages_are_absent_as_uninstalled_ones_are(blocked_env):
    code = ("import importlib.util, importlib.metadata as m, json\n"
            "try:\n    import torch\n    imported = True\nexcept ModuleNotFoundError:\n    imported = False\n"
            "names = {d.metadata['Name'].lower() for d in m.distributions()}\n"
            "print(json.dumps([imported, importlib.util.find_spec('peft') is None, 'torch' in names,"
            " importlib.util.find_spec('transformers') is not None]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **blocked_env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [False, True, False, True]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_api_validates_runs_a_preflight_and_queues_a_job(service, tiny_model, tmp_path):
    text = _jsonl(tmp_path / "text.jsonl",
                  [{"prompt": f"sort : n{i} n{i + 1}", "chosen": f" n{i} n{i + 1}", "rejected": f" n{i + 1} n{i}"}
                   for i in range(12)])
    chat = _jsonl(tmp_path / "chat.jsonl",
                  [{"prompt": [{"role": "user", "content": f"sort : n{i + 1} n{i}"}],
                    "chosen": [{"role": "assistant", "content": f"n{i} n{i + 1}"}],
                    "rejected": [{"role": "assistant", "content": f"n{i + 1} n{i}"}]} for i in range(12)])
    file_ids = [service.upload(text), service.upload(chat)]
    body = {"model": tiny_model, "training": {"max_length": 64, "max_prompt_length": 32}}
    with service.client() as c:
        for file_id in file_ids:  # text, then a chat template rendered with jinja2
            r = c.post("/v1/fine_tuning/jobs/preflight", json={**body, "training_file": file_id})
            assert r.status_code == 200, r.text + service.logs()
            tokens = r.json()["data"]["training_file"]["tokens"]
            assert r.json()["data"]["training_file"]["rows_used"] == 12 and tokens["total"] > 0
        r = c.post("/v1/fine_tuning/jobs", json={**body, "training_file": file_ids[0]})
        assert r.status_code == 200, r.text
        job = r.json()
        assert job["status"] == "queued"  # no worker here: it waits for one
        assert {f["id"] for f in c.get("/v1/files").json()["data"]} == set(file_ids)
        assert [j["id"] for j in c.get("/v1/fine_tuning/jobs").json()["data"]] == [job["id"]]
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints").json()["data"] == []
        assert c.get(f"/v1/fine_tuning/jobs/{job['id']}/events").status_code == 200
        assert c.get("/v1/pool").json()["workers"] == []
        assert c.get(f"/v1/files/{file_ids[1]}/content").content == chat.read_bytes()
        assert c.get("/metrics").status_code == 200 and c.get("/").status_code == 200
    assert service.procs["api"].poll() is None


def _dpo(*args: str, env: dict, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dpo_client", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**{k: v for k, v in os.environ.items() if not k.startswith("DPO_")},
                                            **env, "XDG_CONFIG_HOME": str(home)})


def test_the_dpo_client_runs_without_torch(service, blocked_env, tiny_model, tmp_path):
    env = {**blocked_env, "DPO_BASE_URL": service.url, "DPO_API_KEY": service.key}
    data = _jsonl(tmp_path / "client.jsonl", [{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}] * 4)
    out = _dpo("files", "upload", str(data), "--json", env=env, home=tmp_path)
    assert out.returncode == 0, out.stderr
    file_id = json.loads(out.stdout)["id"]
    out = _dpo("files", "list", "--json", env=env, home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert file_id in {f["id"] for f in json.loads(out.stdout)["data"]}
    out = _dpo("jobs", "create", "--model", tiny_model, "--train", file_id, "--set", "max_length=64",
               "--set", "max_prompt_length=32", "--set", "loss.beta=0.2", "--dry-run", env=env, home=tmp_path)
    assert out.returncode == 0 and "nothing was queued" in out.stdout and "56 tokens" in out.stdout, out.stderr
    for args in (("jobs", "list"), ("pool",)):
        out = _dpo(*args, env=env, home=tmp_path)
        assert out.returncode == 0, out.stderr


def test_a_worker_without_the_worker_extra_says_what_to_install(blocked_env, tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DPO_")}, **blocked_env,
           "DPO_DATA_DIR": str(tmp_path / "data")}
    for command in ("worker", "up"):
        out = subprocess.run([sys.executable, "-m", "service.cli", command], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "pip install 'dpo-service[worker]'" in out.stderr, out.stderr
