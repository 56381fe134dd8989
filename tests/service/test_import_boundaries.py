"""The API process stays light: importing and using it loads no torch, no transformers, no worker/."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.service.processes import REPO

PROBE = r"""
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


def test_the_api_imports_no_torch_transformers_or_worker():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"status": "queued", "loaded": []}
