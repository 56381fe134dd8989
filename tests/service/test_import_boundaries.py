"""The packages' boundaries: api -> service <- worker, and dpo_core on its own.

Every module's imports are read from its source (top-level and inside functions), and two probes import
the real thing in a fresh interpreter: the API app loads no torch, transformers or worker/; the service
core loads no FastAPI, Celery or torch.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.service.processes import REPO

# What each package must never import (a package of this repository, or a third-party one).
FORBIDDEN = {
    "api": {"worker", "torch", "transformers", "peft"},
    "worker": {"api"},
    "service": {"api", "worker", "fastapi", "starlette", "celery", "torch", "transformers", "peft"},
    "dpo_core": {"api", "service", "worker", "fastapi", "starlette", "celery", "sqlalchemy"},
    # The client talks HTTP only; it reads a --config with dpo_core.spec (torch-free, see CLIENT_PROBE).
    "dpo_client": {"api", "service", "worker", "fastapi", "starlette", "celery", "sqlalchemy", "torch",
                   "transformers", "peft"},
}


def imported(source: str, module: str) -> set[str]:
    """Top-level names of every module `source` (the module `module`) imports, wherever the import is."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = module.split(".")[: -node.level]
                names.add(".".join([*base, node.module] if node.module else base))
            else:
                names.add(node.module)
    return {name.split(".")[0] for name in names if name}


def violations(package: str) -> list[str]:
    found = []
    for path in sorted((REPO / package).rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for name in sorted(imported(path.read_text(), module) & FORBIDDEN[package]):
            found.append(f"{path.relative_to(REPO)} imports {name}")
    return found


def test_the_scan_sees_imports_inside_functions_and_relative_ones():
    source = "import os\nfrom .routes import x\ndef f():\n    from worker.runner import JobRunner\n    import torch.nn\n"
    assert imported(source, "api.main") == {"os", "api", "worker", "torch"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_across_its_boundary(package):
    assert (REPO / package / "__init__.py").is_file()
    assert violations(package) == []


API_PROBE = r"""
import json, sys, tempfile
from pathlib import Path
import api.main, service.cli
from fastapi.testclient import TestClient
from service.settings import Settings

data = Path(tempfile.mkdtemp())
settings = Settings(data_dir=data, api_key="k", database_url=None, broker_url=None)
with TestClient(api.main.create_app(settings), headers={"Authorization": "Bearer k"}) as c:
    row = b'{"prompt": "sort : n1 n2", "chosen": " n1 n2", "rejected": " n2 n1"}\n'
    f = c.post("/v1/files", files={"file": ("t.jsonl", row * 4)}, data={"purpose": "fine-tune"}).json()
    job = c.post("/v1/fine_tuning/jobs", json={"model": "m", "training_file": f["id"],
                 "training": {"max_length": 64, "max_prompt_length": 32}}).json()
    c.get(f"/v1/fine_tuning/jobs/{job['id']}/events")
print(json.dumps({"status": job["status"], "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "worker"))}))
"""

SERVICE_PROBE = r"""
import importlib, json, pkgutil, sys
import service

names = sorted(m.name for m in pkgutil.walk_packages(service.__path__, "service."))
for name in names:
    importlib.import_module(name)
print(json.dumps({"imported": names, "loaded": sorted(m for m in sys.modules if m.split(".")[0] in
                  ("fastapi", "starlette", "celery", "torch", "transformers", "peft", "api", "worker"))}))
"""


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_api_imports_no_torch_transformers_or_worker():
    assert _probe(API_PROBE) == {"status": "queued", "loaded": []}


def test_the_service_core_imports_no_fastapi_celery_or_torch():
    result = _probe(SERVICE_PROBE)
    assert {"service.db.models", "service.scheduler", "service.broker", "service.cli"} <= set(result["imported"])
    assert result["loaded"] == []


CLIENT_PROBE = r"""
import json, sys, tempfile
from pathlib import Path
import dpo_client.cli
from dpo_client.request import read_config

path = Path(tempfile.mkdtemp()) / "spec.yaml"
path.write_text("model: m\nlearning_rate: 1e-4\nloss: {beta: 0.2}\n")
config = read_config(path, ["lora.r=16"])
print(json.dumps({"config": config, "loaded": sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in
                  ("torch", "transformers", "peft", "fastapi", "sqlalchemy", "celery", "api", "service", "worker")})}))
"""


def test_the_client_reads_a_config_with_dpo_core_spec_only_and_loads_no_torch():
    used = {node.module for path in (REPO / "dpo_client").rglob("*.py")
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dpo_core")}
    assert used == {"dpo_core.spec"}
    assert _probe(CLIENT_PROBE) == {"config": {"model": "m", "learning_rate": 1e-4, "loss": {"beta": 0.2},
                                               "lora": {"r": 16}}, "loaded": []}
