"""What an install weighs and what the API costs to run from it: the virtual environment's size on disk,
whether torch is in it, and for `dpo-service api` started from it (SQLite, the embedded broker, loopback)
the seconds to the first 200 on /healthz and on /readyz and its RSS after start-up, after one request,
and after a pre-flight (which loads a tokenizer).

    python3 -m venv /tmp/api && /tmp/api/bin/pip install .                      # the API's install
    python3 -m venv /tmp/worker && /tmp/worker/bin/pip install torch==2.13.0 \\
        --index-url https://download.pytorch.org/whl/cpu && /tmp/worker/bin/pip install ".[worker]"
    .venv/bin/python benchmarks/bench_footprint.py /tmp/api /tmp/worker --runs 3

The pre-flight uses a tiny model built here (dpo_core.toy, so this script runs from a venv with torch).
The figures are medians over --runs starts; each start has a fresh data directory.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import machine  # benchmarks/ is on sys.path when run as a script

KEY = "footprint-" + "k" * 32
ROW = b'{"prompt": "sort : n2 n1", "chosen": " n1 n2", "rejected": " n2 n1"}\n'


def venv_size_mib(venv: Path) -> float:
    out = subprocess.run(["du", "-sk", str(venv)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0]) / 1024


def has_torch(venv: Path) -> bool:
    code = "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)"
    return subprocess.run([str(venv / "bin" / "python"), "-c", code], cwd="/").returncode == 0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, t0: float, proc: subprocess.Popen, timeout_s: float = 120) -> float:
    """Seconds from t0 to the first 200 from `url`, polled every 20 ms."""
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"dpo-service api exited {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise SystemExit(f"{url} did not answer 200 within {timeout_s:.0f} s")


def one_start(venv: Path, model: Path, work: Path) -> dict[str, float]:
    data, port = Path(tempfile.mkdtemp(dir=work)), free_port()
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {KEY}"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPO_", "PYTHON"))}
    env.update(DPO_API_KEY=KEY, DPO_MODEL_DIRS=str(model.parent), HF_HUB_OFFLINE="1")
    t0 = time.monotonic()
    # From / so that nothing of the checkout is importable: the install alone runs.
    proc = subprocess.Popen([str(venv / "bin" / "dpo-service"), "api", "--host", "127.0.0.1", "--port", str(port),
                             "--data-dir", str(data)], cwd="/", env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        healthz = wait_for(f"{url}/healthz", t0, proc)
        readyz = wait_for(f"{url}/readyz", t0, proc)
        time.sleep(1)  # the start-up's background threads settle
        started = rss_mib(proc.pid)
        httpx.get(f"{url}/v1/fine_tuning/jobs", headers=auth).raise_for_status()
        one_request = rss_mib(proc.pid)
        f = httpx.post(f"{url}/v1/files", headers=auth, files={"file": ("t.jsonl", ROW * 8)},
                       data={"purpose": "fine-tune"}).json()
        httpx.post(f"{url}/v1/fine_tuning/jobs/preflight", headers=auth, timeout=120, json={
            "model": str(model), "training_file": f["id"],
            "training": {"max_length": 64, "max_prompt_length": 32}}).raise_for_status()
        preflight = rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(data, ignore_errors=True)
    return {"healthz_s": healthz, "readyz_s": readyz, "rss_started_mib": started,
            "rss_one_request_mib": one_request, "rss_preflight_mib": preflight}


def measure(venv: Path, runs: int, model: Path, work: Path, size: bool) -> dict:
    starts = [one_start(venv, model, work) for _ in range(runs)]
    record = {key: round(statistics.median(s[key] for s in starts), 2) for key in starts[0]}
    return {"venv": str(venv), "torch": has_torch(venv),
            "venv_mib": round(venv_size_mib(venv)) if size else None, **record, "starts": starts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("venvs", nargs="+", type=Path, help="virtual environments with dpo-service installed")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-size", action="store_true", help="skip du (slow on a large venv)")
    parser.add_argument("--json", type=Path, help="also write the records here")
    args = parser.parse_args()
    print(machine.describe(with_torch=False), flush=True)
    from dpo_core.toy import build_model

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(build_model(Path(tmp) / "models" / "tiny", seed=0))
        records = [measure(v.resolve(), args.runs, model, Path(tmp), not args.no_size) for v in args.venvs]
    print(f"{'venv':<28} {'torch':>5} {'MiB':>6} {'/healthz s':>10} {'/readyz s':>9} "
          f"{'RSS start':>9} {'1 request':>9} {'pre-flight':>10}")
    for r in records:
        print(f"{r['venv']:<28} {'yes' if r['torch'] else 'no':>5} {r['venv_mib'] or '-':>6} {r['healthz_s']:>10} "
              f"{r['readyz_s']:>9} {r['rss_started_mib']:>9} {r['rss_one_request_mib']:>9} {r['rss_preflight_mib']:>10}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    sys.exit(main())
