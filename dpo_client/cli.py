"""`dpo`: the command-line client of dpo-service (typer + rich), over the REST API only.

Read commands take `--json` to print the API's JSON instead of a table. Errors are one line on stderr and
a non-zero exit status (dpo_client.errors lists them); `jobs watch` exits 0 only when the job succeeds.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape as esc
from rich.text import Text

from dpo_client import config, render
from dpo_client.api import Api
from dpo_client.config import Target
from dpo_client.errors import EXIT_INTERRUPTED, JOB_EXIT, ClientError
from dpo_client.preflight import preflight_view
from dpo_client.request import job_body, model_name, read_config, split_config
from dpo_client.stream import follow_events
from dpo_client.transfer import download, upload
from dpo_client.watch import watch

app = typer.Typer(name="dpo", help="Train with DPO on a dpo-service: files, jobs, the pool and your usage.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
files_app = typer.Typer(help="Upload and list preference data files.", no_args_is_help=True)
jobs_app = typer.Typer(help="Create, follow, download and cancel fine-tuning jobs.", no_args_is_help=True)
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")

# Piped elsewhere, lines and tables are as wide as they need (never cut at 80 columns, nor an id shortened).
PIPED_WIDTH = 1000
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else PIPED_WIDTH)
err = Console(stderr=True, highlight=False, soft_wrap=True)  # progress bars: stdout stays the answer, e.g. --json

Json = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]
Limit = Annotated[int | None, typer.Option(min=1, help="At most this many (default: all, page by page).")]
JobId = Annotated[str, typer.Argument(metavar="JOB_ID", help="ftjob-...")]


def _api() -> Api:
    return Api(config.target())


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _as_list(items: list[dict], more: bool) -> dict:
    """Pages joined into one list object, shaped as the API's."""
    return {"object": "list", "data": items, "has_more": more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}


# --- login -----------------------------------------------------------------------------------------------

@app.command()
def login(url: Annotated[str, typer.Argument(help="The service, e.g. http://127.0.0.1:8000")],
          key: Annotated[str | None, typer.Option(help="The API key (default: asked for, or read from stdin).")]
          = None) -> None:
    """Check a key against the service and store both for later commands (mode 0600)."""
    url = config.normalize_url(url)
    if key is None:
        key = typer.prompt("API key", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise ClientError("no API key given: pass --key, type it at the prompt, or pipe it on stdin")
    api = Api(Target(url, key, "given to `dpo login`"))
    usage = api.get("/v1/usage")
    path = config.save(url, key)
    out.print(f"Logged in to {esc(url)} as team [bold]{esc(usage['team'])}[/] ({usage['team_id']}); stored in "
              f"{esc(str(path))}")
    for name in (config.URL_ENV, config.KEY_ENV):
        if os.environ.get(name):
            err.print(f"note: {name} is set in this shell and overrides the stored login")


@app.command()
def logout() -> None:
    """Forget the stored login."""
    out.print(f"Removed {config.config_path()}" if config.forget() else "No stored login", markup=False)


# --- files -----------------------------------------------------------------------------------------------

@files_app.command("upload")
def files_upload(path: Annotated[Path, typer.Argument(metavar="FILE", help="JSONL preference data")],
                 as_json: Json = False) -> None:
    """Upload a JSONL file (validated by the service as it arrives) and print its summary."""
    uploaded = _upload(_api(), path, quiet=as_json)
    if as_json:
        _print_json(uploaded)


def _upload(api: Api, path: Path, quiet: bool = False) -> dict:
    if not path.is_file():
        raise ClientError(f"{path}: no such file")
    uploaded = upload(api, path, err)
    if not quiet:
        out.print(f"Uploaded {esc(path.name)}: [bold]{uploaded['id']}[/] ({uploaded.get('rows')} rows, "
                  f"{uploaded.get('format')} format, {render.size(uploaded['bytes'])})")
        for warning in uploaded.get("warnings") or []:
            out.print(f"  [yellow]warning[/] ({warning['code']}): {esc(warning['message'])}")
    return uploaded


@files_app.command("list")
def files_list(limit: Limit = None, purpose: Annotated[str | None, typer.Option(help="e.g. fine-tune")] = None,
               as_json: Json = False) -> None:
    """The team's files, newest first."""
    items, more = _api().pages("/v1/files", limit, purpose=purpose)
    if as_json:
        return _print_json(_as_list(items, more))
    out.print(render.files_table(items))


# --- jobs ------------------------------------------------------------------------------------------------

@jobs_app.command("create")
def jobs_create(
    model: Annotated[str | None, typer.Option(help="Hub id, or a model directory under the service's "
                                                 "DPO_MODEL_DIRS (default: the config's `model`).")] = None,
    train: Annotated[str | None, typer.Option(help="A local JSONL file (uploaded first) or a file id "
                                                 "(default: the config's `train_file`).")] = None,
    validation: Annotated[str | None, typer.Option(help="Held-out data: a local file or a file id.")] = None,
    config_file: Annotated[Path | None, typer.Option("--config", help="A dpo-train YAML or JSON config.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="Override a config key, "
                                                      "e.g. --set loss.beta=0.2 --set lora.r=16.")] = None,
    suffix: Annotated[str | None, typer.Option(help="A label for the job (up to 64 characters).")] = None,
    priority: Annotated[int | None, typer.Option(help="-100..100: higher starts first among the team's jobs.")]
    = None,
    gpu_type: Annotated[str | None, typer.Option(help="Run only on workers of this GPU type.")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs the job needs on one worker.")] = None,
    follow: Annotated[bool, typer.Option("--watch", help="Then watch it until it ends (as `dpo jobs watch`).")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Create nothing: print the service's pre-flight report "
                                                            "(the data as the trainer sees it, warnings, time and "
                                                            "memory per GPU type, queue position).")] = False,
    as_json: Json = False,
) -> None:
    """Create a fine-tuning job (with --dry-run, only check it); local data files are uploaded first."""
    if dry_run and follow:
        raise ClientError("--dry-run creates no job to watch: leave out --watch, or --dry-run to create the job")
    api = _api()
    files, training, dropped = split_config(read_config(config_file, sets or []))
    for key in dropped:
        err.print(f"note: {key} in the config is left out: the service keeps a job's outputs itself", markup=False)
    model, train = model or files.get("model"), train or files.get("train_file")
    if not model or not train:
        raise ClientError("a job needs a model and training data: pass --model and --train (or set model and "
                          "train_file in --config)")
    validation = validation or files.get("validation_file")
    body = job_body(model_name(model), _file_id(api, train, as_json), validation and _file_id(api, validation, as_json),
                    training, suffix, priority, gpu_type, gpus)
    if dry_run:
        report = api.post("/v1/fine_tuning/jobs/preflight", json=body)
        return _print_json(report) if as_json else out.print(preflight_view(report))
    job = api.post("/v1/fine_tuning/jobs", json=body)
    if as_json:
        _print_json(job)
    else:
        out.print(f"Created job [bold]{job['id']}[/] ({render.job_status(job)}); follow it with "
                  f"`dpo jobs watch {job['id']}`")
    if follow:
        _watch(api, job["id"])


def _file_id(api: Api, value: str, quiet: bool) -> str:
    """A file id as it is; a local file uploaded, and its new id."""
    path = Path(value).expanduser()
    if path.is_file():
        return _upload(api, path, quiet)["id"]
    if value.startswith("file-"):
        return value
    raise ClientError(f"{value}: no such file here, and not a file id (file-...)")


@jobs_app.command("watch")
def jobs_watch(job_id: JobId) -> None:
    """Follow a job live until it ends: exit 0 if it succeeded, 3 if it failed, 4 if it was cancelled,
    5 if it was paused."""
    _watch(_api(), job_id)


def _watch(api: Api, job_id: str) -> None:
    try:
        job = watch(api, job_id, out)
    except KeyboardInterrupt:
        err.print(f"Stopped watching; the job goes on (`dpo jobs watch {job_id}` to follow it again)", markup=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    took = render.duration(job["finished_at"] - job["started_at"]) if job.get("started_at") else "-"
    if job["status"] == "succeeded":
        out.print(f"[green]Job {job_id} succeeded[/] in {took}: final model {job['fine_tuned_model']} "
                  f"(`dpo jobs download {job_id}`)")
    elif job["status"] == "failed":
        error = job.get("error") or {}
        err.print(f"[red]Job {job_id} failed[/]: {esc(str(error.get('message')))} ({error.get('code')})")
    elif job["status"] == "paused":
        err.print(f"[yellow]Job {job_id} was paused[/] at step {job['progress']['step'] or 0} "
                  f"(`dpo jobs resume {job_id}` to go on from there)")
    else:
        err.print(f"[yellow]Job {job_id} was cancelled[/]")
    raise typer.Exit(JOB_EXIT[job["status"]])


@jobs_app.command("list")
def jobs_list(limit: Limit = None, status: Annotated[str | None, typer.Option(
        help="Only jobs with this status: queued, running, paused, succeeded, failed or cancelled.")] = None,
        as_json: Json = False) -> None:
    """The team's jobs (the admin key: every team's), newest first."""
    items, more = _api().pages("/v1/fine_tuning/jobs", limit, status=status)
    if as_json:
        return _print_json(_as_list(items, more))
    out.print(render.jobs_table(items))


@jobs_app.command("show")
def jobs_show(job_id: JobId, as_json: Json = False) -> None:
    """One job: status, progress, metrics, error, estimate and actual, checkpoints."""
    api = _api()
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}")
    if as_json:
        return _print_json(job)
    checkpoints, _ = api.pages(f"/v1/fine_tuning/jobs/{job_id}/checkpoints")
    out.print(render.job_details(job))
    if checkpoints:
        out.print(render.checkpoints_table(checkpoints))


@jobs_app.command("events")
def jobs_events(job_id: JobId, follow: Annotated[bool, typer.Option("--follow", "-f", help=(
                    "Then print new events as they happen, until the job ends."))] = False,
                limit: Annotated[int | None, typer.Option(min=1, help="Only the latest this many.")] = None,
                as_json: Json = False) -> None:
    """A job's events, oldest first (with --json --follow: one JSON object per line)."""
    api = _api()
    if limit is not None:
        items, more = api.pages(f"/v1/fine_tuning/jobs/{job_id}/events", limit)
        items.reverse()
    else:
        items, more = api.pages(f"/v1/fine_tuning/jobs/{job_id}/events", order="asc")
    if as_json and not follow:
        return _print_json(_as_list(items, more))
    for event in items:
        _print_event(event, as_json)
    if follow:
        for event in follow_events(api, job_id, after=items[-1]["id"] if items else None):
            _print_event(event, as_json)


def _print_event(event: dict, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    else:
        style = {"warn": "yellow", "error": "red"}.get(event["level"], "")
        out.print(Text(f"{render.clock(event['created_at'])} {event['message']}", style=style))


@jobs_app.command("cancel")
def jobs_cancel(job_id: JobId, as_json: Json = False) -> None:
    """Cancel a job: a queued one at once, a running one at its next step."""
    job = _api().post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    if as_json:
        return _print_json(job)
    if job["status"] == "cancelled":
        out.print(f"Cancelled {job_id}", markup=False)
    else:
        out.print(f"Cancelling {job_id}: it stops at its next step (`dpo jobs watch {job_id}` to see it end)",
                  markup=False)


@jobs_app.command("pause")
def jobs_pause(job_id: JobId, as_json: Json = False) -> None:
    """Pause a job and free its worker: a queued one at once, a running one after a checkpoint at its next step."""
    job = _api().post(f"/v1/fine_tuning/jobs/{job_id}/pause")
    if as_json:
        return _print_json(job)
    if job["status"] == "paused":
        out.print(f"Paused {job_id} (`dpo jobs resume {job_id}` to go on)", markup=False)
    else:
        out.print(f"Pausing {job_id}: it checkpoints at its next step (`dpo jobs watch {job_id}` to see it pause)",
                  markup=False)


@jobs_app.command("resume")
def jobs_resume(job_id: JobId, as_json: Json = False) -> None:
    """Queue a paused job again; it goes on from the checkpoint its pause left."""
    job = _api().post(f"/v1/fine_tuning/jobs/{job_id}/resume")
    if as_json:
        return _print_json(job)
    out.print(f"Resumed {job_id}: queued again (`dpo jobs watch {job_id}` to follow it)", markup=False)


@jobs_app.command("delete")
def jobs_delete(job_id: JobId, as_json: Json = False) -> None:
    """Delete what an ended job keeps: checkpoints, final model, result files, events and samples."""
    answer = _api().request("DELETE", f"/v1/fine_tuning/jobs/{job_id}").json()
    if as_json:
        return _print_json(answer)
    out.print(f"Deleted the checkpoints, final model, result files and events of {job_id}", markup=False)


@jobs_app.command("download")
def jobs_download(job_id: JobId,
                  checkpoint: Annotated[str | None, typer.Option(help="ftckpt-... (default: the final model)")]
                  = None,
                  step: Annotated[int | None, typer.Option(help="The checkpoint saved at this step.")] = None,
                  output: Annotated[Path, typer.Option("--output", "-o", help="Directory to extract into.")]
                  = Path(".")) -> None:
    """Download a checkpoint (default: the final model) and extract it as a directory transformers loads."""
    api = _api()
    checkpoint_id = checkpoint or _pick_checkpoint(api, job_id, step)
    path = download(api, job_id, checkpoint_id, output, err)
    out.print(f"Extracted {checkpoint_id} to {path}; load it with:", markup=False)
    out.print("  from transformers import AutoModelForCausalLM")
    out.print(f"  model = AutoModelForCausalLM.from_pretrained({json.dumps(str(path))})", markup=False)


def _pick_checkpoint(api: Api, job_id: str, step: int | None) -> str:
    if step is None:
        job = api.get(f"/v1/fine_tuning/jobs/{job_id}")
        if not job.get("fine_tuned_model"):
            raise ClientError(f"job {job_id} has no final model ({job['status']}); pass --checkpoint or --step to "
                              f"download one of its checkpoints (`dpo jobs show {job_id}` lists them)")
        return job["fine_tuned_model"]
    checkpoints, _ = api.pages(f"/v1/fine_tuning/jobs/{job_id}/checkpoints")
    at_step = sorted((c for c in checkpoints if c["step_number"] == step), key=lambda c: not c["final"])
    if not at_step:
        steps = ", ".join(str(s) for s in sorted({c["step_number"] for c in checkpoints})) or "none"
        raise ClientError(f"job {job_id} has no checkpoint at step {step} (its steps: {steps})", "not_found")
    return at_step[0]["id"]  # the final model when it was saved at that step too


# --- pool and usage --------------------------------------------------------------------------------------

@app.command()
def pool(as_json: Json = False) -> None:
    """The workers (idle, busy, lost) and the queues."""
    data = _api().get("/v1/pool")
    if as_json:
        return _print_json(data)
    out.print(render.pool_view(data))


@app.command()
def usage(since: Annotated[float | None, typer.Option(help="Unix seconds (default: the beginning).")] = None,
          until: Annotated[float | None, typer.Option(help="Unix seconds (default: now).")] = None,
          as_json: Json = False) -> None:
    """Your team's GPU-seconds, jobs, trained tokens and storage."""
    data = _api().get("/v1/usage", since=since, until=until)
    if as_json:
        return _print_json(data)
    out.print(render.usage_view(data))


def main() -> None:
    """The `dpo` command: an error the user can act on is one line on stderr, never a traceback."""
    try:
        app(prog_name="dpo")
    except ClientError as error:
        err.print(error.line(), markup=False, highlight=False, soft_wrap=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
