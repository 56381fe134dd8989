"""`make demo`: the whole product in one command, over REST, on the embedded defaults.

Builds a tiny local model and a synthetic preference task (sort five number words ascending), starts
`dpo-service up`, uploads the data, runs a DPO job while `dpo jobs watch` shows its progress, downloads
the final model, prints held-out metrics before and after training and one held-out prompt's answers by
the reference (step 0) and the trained model side by side. Stops the service and exits 0 on
success. Torch is only used by the child processes: this one talks HTTP.
"""
from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx

SHOWN = (("eval_loss", "loss"), ("eval_rewards/accuracies", "reward accuracy"),
         ("eval_rewards/margins", "reward margin"), ("eval_logps/chosen", "log p(sorted)"),
         ("eval_logps/rejected", "log p(reversed)"))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    data_dir = Path(args.data_dir).resolve()
    model_dir, task_dir = _prepare(data_dir)
    key, port = "demo-" + secrets.token_urlsafe(16), args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    service = _start_service(data_dir, key, port)
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as api:
            _wait_ready(api, service, data_dir)
            print(f"Dashboard: {url}/ (sign in there with the demo's key: {key})")
            job = _submit(api, model_dir, task_dir, args.steps)
            job = _watch(api, job["id"], url, key)
            if job["status"] != "succeeded":
                print(f"\nThe job ended {job['status']}: {job['error']}", file=sys.stderr)
                return 1
            _download(api, job, data_dir / "downloads")
            learned = _report(api, job["id"])
            _side_by_side(api, job["id"])
            return learned
    finally:
        _stop(service)


def _prepare(data_dir: Path) -> tuple[Path, Path]:
    """The tiny model (in the data dir's models/) and the synthetic task, built once."""
    model_dir, task_dir = data_dir / "models" / "tiny-llama", data_dir / "demo-task"
    if not (model_dir / "config.json").exists():
        print(f"Building a tiny random Llama in {model_dir}")
        _run_toy("model", str(model_dir))
    if not (task_dir / "eval.jsonl").exists():
        print(f"Writing the synthetic 'sort the numbers' preference task to {task_dir}")
        _run_toy("data", str(task_dir), "--n-train", "512", "--n-eval", "64")
    return model_dir, task_dir


def _run_toy(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "dpo_core.toy", *args], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})


def _start_service(data_dir: Path, key: str, port: int) -> subprocess.Popen:
    log = data_dir / "service.log"
    print(f"Starting dpo-service (API + worker) on port {port}; its log: {log}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    env.update(DPO_API_KEY=key, DPO_METRICS_EVENT_INTERVAL_S="1", HF_HUB_OFFLINE="1")
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "up", "--data-dir", str(data_dir), "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )


def _wait_ready(api: httpx.Client, service: subprocess.Popen, data_dir: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.poll() is not None:
            raise SystemExit(f"dpo-service exited early; see {data_dir / 'service.log'}")
        try:
            if api.get("/readyz").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"dpo-service was not ready after {timeout_s:.0f}s; see {data_dir / 'service.log'}")


def _upload(api: httpx.Client, path: Path) -> str:
    r = api.post("/v1/files", files={"file": (path.name, path.read_bytes())}, data={"purpose": "fine-tune"})
    r.raise_for_status()
    f = r.json()
    print(f"  uploaded {path.name}: {f['id']} ({f['rows']} {f['format']} rows)")
    return f["id"]


def _submit(api: httpx.Client, model_dir: Path, task_dir: Path, steps: int) -> dict:
    print("Uploading the preference data")
    train_id, eval_id = _upload(api, task_dir / "train.jsonl"), _upload(api, task_dir / "eval.jsonl")
    body = {
        "model": str(model_dir),
        "training_file": train_id,
        "validation_file": eval_id,
        "suffix": "demo",
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "batch_size": 8}}},
        # Our extension: any TrainingSpec field. A tiny model learns fast at a large learning rate; the SFT
        # term on the sorted answers (RPO) teaches it to write them, not only to prefer them.
        "training": {"loss": {"sft_weight": 1.0}, "learning_rate": 1e-3, "max_steps": steps, "max_length": 64, "max_prompt_length": 32,
                     "logging_steps": 4, "eval_on_start": True, "eval_steps": max(steps // 4, 1),
                     "save_steps": max(steps // 2, 1), "samples": {"num_prompts": 2, "max_new_tokens": 8}},
    }
    r = api.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    job = r.json()
    print(f"Created DPO job {job['id']} ({steps} steps)")
    return job


def _watch(api: httpx.Client, job_id: str, url: str, key: str) -> dict:
    """Show the job with the `dpo` client's live view until it ends; the job at its end."""
    print(f"Following it with `dpo jobs watch {job_id}`:")
    env = {**os.environ, "DPO_BASE_URL": url, "DPO_API_KEY": key}
    subprocess.run([sys.executable, "-m", "dpo_client", "jobs", "watch", job_id], env=env, check=False)
    return api.get(f"/v1/fine_tuning/jobs/{job_id}").json()


def _download(api: httpx.Client, job: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = job["fine_tuned_model"]
    tar_path = out_dir / f"{ckpt}.tar"
    with api.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/checkpoints/{ckpt}/content") as r:
        r.raise_for_status()
        with tar_path.open("wb") as f:
            for chunk in r.iter_bytes():
                f.write(chunk)
    with tarfile.open(tar_path) as tar:
        tar.extractall(out_dir, filter="data")
    assert (out_dir / ckpt / "config.json").exists()
    print(f"\nDownloaded the final model ({tar_path.stat().st_size:,} bytes) and extracted it to {out_dir / ckpt}")
    print(f"  load it with transformers.AutoModelForCausalLM.from_pretrained({str(out_dir / ckpt)!r})")


def _report(api: httpx.Client, job_id: str) -> int:
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"order": "asc", "limit": 100}).json()["data"]
    evals = [e["data"] for e in events if e["type"] == "metrics" and "eval_loss" in (e["data"] or {})]
    before, after = evals[0], evals[-1]
    print(f"\nHeld-out preference pairs, before (step {before['step']}) and after (step {after['step']}) training:")
    print(f"  {'metric':<18}{'before':>10}{'after':>10}")
    for key, label in SHOWN:
        print(f"  {label:<18}{before[key]:>10.3f}{after[key]:>10.3f}")
    learned = after["eval_loss"] < before["eval_loss"] and after["eval_rewards/accuracies"] > 0.5
    print("\nThe model learned to prefer sorted answers." if learned else "\nThe model did not learn; see above.")
    return 0 if learned else 1


def _side_by_side(api: httpx.Client, job_id: str) -> None:
    """One held-out prompt's answers: the reference's (step 0) beside the trained model's (the last samples)."""
    samples = api.get(f"/v1/fine_tuning/jobs/{job_id}/samples").json()
    first = samples["data"][0]
    columns = [[f"{who}", repr(c["text"]), f"{c['tokens']} tokens, reward {c['reward']:+.3f}"]
               for who, c in (("reference (step 0)", first["reference"]), (f"trained (step {samples['step']})",
                                                                         first["policy"]))]
    width = max(map(len, columns[0])) + 4
    print(f"\nPrompt: {first['prompt']!r}  (GET /v1/fine_tuning/jobs/{job_id}/samples)")
    for left, right in zip(*columns):
        print(f"  {left:<{width}}{right}")


def _stop(service: subprocess.Popen) -> None:
    if service.poll() is None:
        print("Stopping dpo-service")
        os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=".dpo-data/demo")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    parser.add_argument("--steps", type=int, default=256, help="optimizer steps of the demo job (4 epochs)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
