"""End-to-end: `dpo`, the command-line client, run as a subprocess against a real service (an API process
and a worker process on the embedded defaults), as a user would run it."""
from __future__ import annotations

import io
import json
import os
import re
import secrets
import stat
import subprocess
import sys

import pytest

from rich.console import Console

from dpo_client import transfer
from dpo_client.api import Api
from dpo_client.config import Target
from dpo_client.preflight import basis as render_basis
from tests.service.processes import REPO, free_port, start_service

pytestmark = pytest.mark.slow
TRAIN = ["--set", "max_length=64", "--set", "max_prompt_length=32", "--set", "micro_batch_size=4",
         "--set", "learning_rate=1e-3"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("cli"), "cli-" + secrets.token_hex(8))
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """The client's config directory (XDG_CONFIG_HOME): empty until a test logs in."""
    return tmp_path_factory.mktemp("cli-home")


def dpo(*args: str, home, env: dict | None = None, stdin: str | None = None, timeout: float = 240,
        ok: bool = True) -> subprocess.CompletedProcess:
    """Run `dpo ARGS...` (python -m dpo_client) with no DPO_* variable but those in `env`."""
    out = subprocess.run([sys.executable, "-m", "dpo_client", *args], check=False, cwd=REPO, env=_env(home, env),
                         input=stdin, capture_output=True, text=True, timeout=timeout)
    if ok:
        assert out.returncode == 0, f"dpo {' '.join(args)} exited {out.returncode}\n{out.stdout}\n{out.stderr}"
    return out


def dpo_started(*args: str, home, env: dict) -> subprocess.Popen:
    """`dpo ARGS...` started in the background; its output kept."""
    return subprocess.Popen([sys.executable, "-m", "dpo_client", *args], cwd=REPO, env=_env(home, env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _env(home, env: dict | None) -> dict:
    base = {k: v for k, v in os.environ.items() if not k.startswith("DPO_")}
    return {**base, "PYTHONPATH": str(REPO), "XDG_CONFIG_HOME": str(home), **(env or {})}


def one_line_error(out: subprocess.CompletedProcess) -> str:
    """A user error: a non-zero exit, one line on stderr, no traceback."""
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo: "), out.stderr
    return lines[0]


def job_ids(home, env: dict) -> list[str]:
    return [j["id"] for j in json.loads(dpo("jobs", "list", "--json", home=home, env=env).stdout)["data"]]


@pytest.fixture(scope="module")
def env(service):
    return {"DPO_BASE_URL": service.url, "DPO_API_KEY": service.key}


def test_login_stores_the_key_privately_and_the_environment_overrides_it(service, home, tmp_path):
    out = dpo("login", service.url, home=home, stdin=service.key + "\n")
    assert "team default" in out.stdout
    config = home / "dpo" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"base_url": service.url, "api_key": service.key}
    assert dpo("usage", "--json", home=home).stdout  # the stored login is used
    refused = one_line_error(dpo("usage", home=home, env={"DPO_API_KEY": "not-the-key"}, ok=False))
    assert f"the API at {service.url} refused the key (DPO_API_KEY)" in refused and "(invalid_api_key)" in refused
    # A stored key is never sent to another URL.
    other = f"http://127.0.0.1:{free_port()}"
    assert "no API key for" in one_line_error(dpo("usage", home=home, env={"DPO_BASE_URL": other}, ok=False))
    # A wrong key is refused at login, and the stored one stays.
    assert "refused the key" in one_line_error(dpo("login", service.url, "--key", "wrong", home=home, ok=False))
    assert json.loads(config.read_text())["api_key"] == service.key


def test_an_unreachable_url_and_a_bad_request_are_one_line_errors(home, env, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}"
    line = one_line_error(dpo("jobs", "list", home=tmp_path, env={"DPO_BASE_URL": nowhere, "DPO_API_KEY": "k"},
                              ok=False))
    assert f"cannot reach the API at {nowhere}" in line
    line = one_line_error(dpo("jobs", "create", "--model", "m", "--train", "file-0123456789abcdef01234567",
                              home=home, env=env, ok=False))
    assert line.endswith("(invalid_file)") and "file-0123456789abcdef01234567" in line
    assert one_line_error(dpo("jobs", "show", "ftjob-nope", home=home, env=env, ok=False)).endswith("(not_found)")


def test_upload_prints_the_summary_and_list_pages(service, home, env, task_files, tmp_path):
    data = tmp_path / "pairs.jsonl"
    same = json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"})
    data.write_text(task_files[1].read_text() + same + "\n")
    out = dpo("files", "upload", str(data), home=home, env=env)
    assert "33 rows" in out.stdout and "warning (identical_pair)" in out.stdout
    uploaded = json.loads(dpo("files", "upload", str(task_files[1]), "--json", home=home, env=env).stdout)
    assert uploaded["rows"] == 32 and uploaded["warnings"] == []
    listed = json.loads(dpo("files", "list", "--json", "--limit", "1", home=home, env=env).stdout)
    assert [f["id"] for f in listed["data"]] == [uploaded["id"]] and listed["has_more"]
    assert uploaded["id"] in dpo("files", "list", home=home, env=env).stdout


def test_a_job_from_a_config_runs_watched_to_the_end_and_downloads(service, home, env, tiny_model, task_files,
                                                                   tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"model: {tiny_model}\ntrain_file: {service.upload(task_files[0])}\noutput_dir: runs/x\n"
                    "loss:\n  beta: 0.1\nbatch_size: 8\nmax_steps: 4\neval_steps: 2\nsave_steps: 2\nlogging_steps: 1\n")
    args = ("jobs", "create", "--config", str(spec), "--validation", service.upload(task_files[1]),
            "--set", "loss.beta=0.2", *TRAIN)
    checked = json.loads(dpo(*args, "--dry-run", "--json", home=home, env=env).stdout)
    made = dpo(*args, "--json", home=home, env=env)
    assert "output_dir in the config is left out" in made.stderr
    job_id = json.loads(made.stdout)["id"]
    assert json.loads(made.stdout)["estimate"]["preflight_id"] == checked["id"]  # the same request: its estimate
    follower = dpo_started("jobs", "events", job_id, "--follow", "--json", home=home, env=env)
    try:
        out = dpo("jobs", "watch", job_id, home=home, env=env)
        followed, _ = follower.communicate(timeout=60)
    finally:
        follower.kill()
    assert "evaluation at step 2: loss" in out.stdout and "Checkpoint saved at step 2" in out.stdout
    assert "4/4 steps" in out.stdout and f"Job {job_id} succeeded" in out.stdout

    job = json.loads(dpo("jobs", "show", job_id, "--json", home=home, env=env).stdout)
    assert job["status"] == "succeeded" and job["hyperparameters"]["beta"] == 0.2
    assert job["model"] == tiny_model and job["training"]["max_steps"] == 4
    shown = dpo("jobs", "show", job_id, home=home, env=env).stdout
    assert job["fine_tuned_model"] in shown and "succeeded" in shown
    assert f"tokens on {job['estimate']['gpu_type']} ({checked['id']})" in shown
    measured = r"^actual +\S+ \(([+-]\d+% vs estimate|[\d.]+x the estimate)\) of training, .* peak memory \(rss\)"
    assert re.search(measured, shown, re.MULTILINE), shown
    listed = json.loads(dpo("jobs", "list", "--json", home=home, env=env).stdout)
    assert job_id in [j["id"] for j in listed["data"]]
    events = json.loads(dpo("jobs", "events", job_id, "--json", home=home, env=env).stdout)["data"]
    assert events[0]["data"]["code"] == "created" and events[-1]["data"]["status"] == "succeeded"
    # Followed live while the job ran: every event, once each, in order; the stream ended with the job.
    assert follower.returncode == 0
    assert [json.loads(line)["id"] for line in followed.splitlines()] == [e["id"] for e in events]

    out = dpo("jobs", "download", job_id, "-o", str(tmp_path / "models"), home=home, env=env)
    model_dir = tmp_path / "models" / job["fine_tuned_model"]
    assert f'from_pretrained("{model_dir}")' in out.stdout
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir)
    dpo("jobs", "download", job_id, "--step", "2", "-o", str(tmp_path / "models"), home=home, env=env)
    assert len(list((tmp_path / "models").glob("ftckpt-*/config.json"))) == 2
    # On a terminal the bar knows the total (the service sends Content-Length): a percentage, done at 100%.
    screen = io.StringIO()
    transfer.download(Api(Target(service.url, service.key, "test")), job_id, job["fine_tuned_model"],
                      tmp_path / "again", Console(file=screen, force_terminal=True, width=160))
    assert "100%" in screen.getvalue()


def test_a_dry_run_prints_the_preflight_report_and_queues_nothing(service, home, env, tiny_model, task_files,
                                                                   tmp_path):
    jobs_before = job_ids(home, env)
    data = tmp_path / "pairs.jsonl"  # the task, and a pair whose chosen equals its rejected: a warning
    data.write_text(task_files[0].read_text() + json.dumps({"prompt": "p", "chosen": " a", "rejected": " a"}) + "\n")
    train = service.upload(data)
    args = ("jobs", "create", "--model", tiny_model, "--train", train, "--validation", str(task_files[1]), *TRAIN,
            "--set", "max_steps=4", "--dry-run")
    report = json.loads(dpo(*args, "--json", home=home, env=env).stdout)
    assert report["object"] == "fine_tuning.preflight" and report["model"] == tiny_model
    training, validation = report["data"]["training_file"], report["data"]["validation_file"]
    assert training["rows"] == 129 and validation["rows"] == 32 and report["estimate"]["steps"] == 4
    assert [(w["code"], w["lines"]) for w in report["warnings"]] == [("identical_pairs", [129])]

    shown = dpo(*args, home=home, env=env).stdout
    assert f"Pre-flight {report['id']}" not in shown  # each dry run is a report of its own
    assert "Pre-flight ftpre-" in shown and "nothing was queued" in shown
    rows = {line.split("  ")[0]: line.split()[-2:] for line in shown.splitlines() if line and line[0] != " "}
    assert rows["rows"] == ["129", "32"]
    assert rows["tokens, one epoch"] == [f"{training['tokens']['total']:,}", f"{validation['tokens']['total']:,}"]
    prompt = training["lengths"]["prompt"]
    assert f"{prompt['p50']} / {prompt['p90']} / {prompt['p99']} / {prompt['max']}" in shown
    assert "identical_pairs  1 in training_file, line(s) 129" in shown and report["warnings"][0]["message"] in shown
    for gpu in report["estimate"]["by_gpu_type"]:
        assert any(line.startswith(gpu["gpu_type"]) and render_basis(gpu) in line for line in shown.splitlines())
    assert f"position {report['queue']['position']}" in shown

    line = one_line_error(dpo(*args, "--set", "loss.beta=-1", home=home, env=env, ok=False))
    assert "training.loss.beta" in line
    assert job_ids(home, env) == jobs_before, "a dry run queued a job"


def test_watch_exits_non_zero_for_a_cancelled_and_a_failed_job(service, home, env, task_files):
    # No worker has an a100: the job waits, with its place and reason, until it is cancelled.
    made = dpo("jobs", "create", "--model", "some/model", "--train", str(task_files[0]), "--gpu-type", "a100",
               *TRAIN, "--json", home=home, env=env)
    job_id = json.loads(made.stdout)["id"]
    shown = dpo("jobs", "show", job_id, home=home, env=env).stdout
    assert "queued #1" in shown and "no live worker can serve it" in shown
    watcher = dpo_started("jobs", "watch", job_id, home=home, env=env)
    try:
        assert "Cancelled" in dpo("jobs", "cancel", job_id, home=home, env=env).stdout
        stdout, stderr = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 4, stdout + stderr
    assert f"Job {job_id} was cancelled" in stderr
    cancelled = json.loads(dpo("jobs", "list", "--status", "cancelled", "--json", home=home, env=env).stdout)
    assert job_id in [j["id"] for j in cancelled["data"]] and {j["status"] for j in cancelled["data"]} == {"cancelled"}
    running = json.loads(dpo("jobs", "list", "--status", "running", "--json", home=home, env=env).stdout)
    assert job_id not in [j["id"] for j in running["data"]]
    assert "status" in one_line_error(dpo("jobs", "list", "--status", "done", home=home, env=env, ok=False))

    out = dpo("jobs", "create", "--model", "no-such-org/missing-model", "--train", str(task_files[0]), *TRAIN,
              "--set", "max_steps=2", "--watch", home=home, env=env, ok=False)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "failed" in out.stderr and "(model_not_found)" in out.stderr


def test_pause_ends_a_watch_with_5_and_resume_queues_the_job_again(service, home, env, task_files):
    # No worker has an a100: the job waits until it is paused, and again once resumed.
    made = dpo("jobs", "create", "--model", "some/model", "--train", str(task_files[0]), "--gpu-type", "a100",
               *TRAIN, "--json", home=home, env=env)
    job_id = json.loads(made.stdout)["id"]
    watcher = dpo_started("jobs", "watch", job_id, home=home, env=env)
    try:
        assert f"Paused {job_id}" in dpo("jobs", "pause", job_id, home=home, env=env).stdout
        stdout, stderr = watcher.communicate(timeout=60)
    finally:
        watcher.kill()
    assert watcher.returncode == 5, stdout + stderr
    assert f"Job {job_id} was paused" in stderr and f"dpo jobs resume {job_id}" in stderr
    paused = json.loads(dpo("jobs", "list", "--status", "paused", "--json", home=home, env=env).stdout)
    assert [j["id"] for j in paused["data"]] == [job_id]
    assert f"Resumed {job_id}" in dpo("jobs", "resume", job_id, home=home, env=env).stdout
    assert "(job_not_paused)" in one_line_error(dpo("jobs", "resume", job_id, home=home, env=env, ok=False))
    assert "(job_not_finished)" in one_line_error(dpo("jobs", "delete", job_id, home=home, env=env, ok=False))
    assert json.loads(dpo("jobs", "cancel", job_id, "--json", home=home, env=env).stdout)["status"] == "cancelled"
    assert f"Deleted the checkpoints, final model, result files and events of {job_id}" in dpo(
        "jobs", "delete", job_id, home=home, env=env).stdout
    assert json.loads(dpo("jobs", "events", job_id, "--json", home=home, env=env).stdout)["data"] == []


def test_pool_and_usage(service, home, env):
    pool = json.loads(dpo("pool", "--json", home=home, env=env).stdout)
    assert [w["name"] for w in pool["workers"]] == ["worker"]
    assert "worker" in dpo("pool", home=home, env=env).stdout
    usage = json.loads(dpo("usage", "--json", home=home, env=env).stdout)
    assert usage["team"] == "default"
    assert "GPU time" in dpo("usage", home=home, env=env).stdout
