"""`dpo jobs watch`: a job as it runs, in one live view.

Two sources feed it: the job's event stream (dpo_client.stream), read on a thread of its own, gives the
training metrics, every evaluation, checkpoint and status change as they happen; the job object, read
about once a second, gives what changes without an event (the queue position and its reason, the step,
the estimated finish). Evaluations, checkpoints and status changes are printed as lines above the bar.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console, Group
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn
from rich.text import Text

from dpo_client.api import Api
from dpo_client.errors import ClientError, Unreachable
from dpo_client.render import clock, duration, eval_summary, train_summary
from dpo_client.stream import TERMINAL, follow_events

POLL_S = 1.0
# Once the job object says it has ended, how long to wait for the stream's last events before giving up
# on them (the stream ends by itself right after the final event).
DRAIN_S = 10.0
STYLE = {"warn": "yellow", "error": "bold red"}


@dataclass
class View:
    """What the live view shows: the latest job object and training metrics, and a note on trouble."""

    job: dict
    metrics: dict = field(default_factory=dict)
    note: str = ""

    def progress(self) -> tuple[int | None, int | None]:
        p = self.job.get("progress") or {}
        step = max(p.get("step") or 0, self.metrics.get("step") or 0)
        total = p.get("total_steps") or self.metrics.get("total_steps")
        return step, total

    def description(self) -> str:
        status = self.job["status"]
        if status == "queued":
            position = self.job.get("queue_position")
            return "starting" if position == 0 else f"queued #{position}" if position else "queued"
        if status == "running" and (self.job.get("cancel_requested") or self.job.get("pause_requested")):
            return "cancelling" if self.job.get("cancel_requested") else "pausing"
        return status

    def steps(self) -> str:
        step, total = self.progress()
        return f"{step}/{total} steps •" if total else ""

    def times(self) -> str:
        """Time since the job started (waiting: since it was made), and the time left."""
        now, job = time.time(), self.job
        if not job.get("started_at"):
            return f"waiting {duration(now - job['created_at'])}"
        text = duration((job.get("finished_at") or now) - job["started_at"])
        if job["status"] == "running" and job.get("estimated_finish"):
            text += f" • ETA {duration(max(job['estimated_finish'] - now, 0))}"
        return text

    def details(self) -> Text:
        """The line under the bar: the latest metrics, why the job waits, a lost connection."""
        reason = self.job.get("queue_reason") if self.job["status"] == "queued" else None
        parts = [p for p in (train_summary(self.metrics), reason, self.note) if p]
        return Text("  " + " • ".join(parts), style="dim") if parts else Text("")


MARKS = {"succeeded": ("✓", "green"), "failed": ("✗", "red"), "cancelled": ("-", "yellow"),
         "paused": ("‖", "yellow")}


class _Mark(SpinnerColumn):
    """A spinner while the job is on its way; how it ended, once it has."""

    def render(self, task) -> Text:
        mark = MARKS.get(task.fields.get("status"))
        return Text(*mark) if mark else super().render(task)


class _LiveProgress(Progress):
    """The bar, with a line of details under it (why the job waits, a lost connection)."""

    details: Text = Text("")

    def get_renderables(self):
        yield Group(self.make_tasks_table(self.tasks), self.details)


def watch(api: Api, job_id: str, console: Console) -> dict:
    """Show job `job_id` live until it ends; the job object at its end."""
    view = View(api.get(f"/v1/fine_tuning/jobs/{job_id}"))
    console.print(f"Watching [bold]{job_id}[/] ({escape(view.job['model'])}); Ctrl-C stops watching, not the job")
    events: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(api, job_id, events), daemon=True, name="dpo-events").start()
    # One line of at most about 75 columns, so that it fits an 80-column terminal; metrics go under it.
    columns = (_Mark(), TextColumn("[bold]{task.description:<10}"), BarColumn(bar_width=24),
               TextColumn("{task.fields[steps]}"), TextColumn("{task.fields[times]}"))
    with _LiveProgress(*columns, console=console, refresh_per_second=4) as bar:
        task = bar.add_task("", total=None, steps="", times="", status="")
        _draw(view, bar, task)
        _loop(api, job_id, view, events, bar, task, console)
    return view.job


def _loop(api: Api, job_id: str, view: View, events: queue.Queue, bar: _LiveProgress, task, console) -> None:
    stream_open, next_poll, ended_at = True, 0.0, None
    while stream_open or ended_at is None or time.monotonic() - ended_at < DRAIN_S:
        try:
            kind, item = events.get(timeout=max(0.05, next_poll - time.monotonic()))
            if kind == "event":
                _on_event(item, view, console)
            elif kind == "retry":
                view.note = item
            elif kind == "end":
                stream_open = False
            else:
                raise item
        except queue.Empty:
            pass
        if time.monotonic() >= next_poll or not stream_open:
            _poll(api, job_id, view)
            next_poll = time.monotonic() + POLL_S
            if view.job["status"] in TERMINAL and ended_at is None:
                ended_at = time.monotonic()
            if view.job["status"] == "paused":  # nothing more happens until someone resumes it
                _draw(view, bar, task)
                return
        _draw(view, bar, task)
        if not stream_open and view.job["status"] in TERMINAL:
            return


def _poll(api: Api, job_id: str, view: View) -> None:
    try:
        view.job, view.note = api.get(f"/v1/fine_tuning/jobs/{job_id}"), ""
    except Unreachable:
        view.note = f"the API at {api.url} does not answer; trying again"
    except ClientError as err:
        if err.status is None or err.status < 500:
            raise
        view.note = f"the API answered {err.status}; trying again"


def _on_event(event: dict, view: View, console: Console) -> None:
    view.note = ""
    data = event.get("data") or {}
    if event["type"] == "metrics":
        if any(k.startswith("eval_") for k in data):
            console.print(f"{clock(event['created_at'])} evaluation at step {data.get('step')}: {eval_summary(data)}",
                          markup=False)
        else:
            view.metrics = data
        return
    console.print(Text(f"{clock(event['created_at'])} {event['message']}", style=STYLE.get(event["level"], "")))


def _draw(view: View, bar: _LiveProgress, task) -> None:
    step, total = view.progress()
    bar.update(task, description=view.description(), completed=step or 0, total=total, steps=view.steps(),
               times=view.times(), status=view.job["status"])
    bar.details = view.details()


def _pump(api: Api, job_id: str, events: queue.Queue) -> None:
    """The stream reader's thread: hands every event, lost connection and the end to the view."""
    def retrying(err: Exception, wait_s: float) -> None:
        if isinstance(err, Unreachable):
            why = f"the API at {api.url} does not answer"
        elif isinstance(err, ClientError):
            why = f"the API answered {err.status}"
        else:
            why = "the event stream was cut"
        events.put(("retry", f"{why}; reconnecting in {wait_s:.1f}s"))

    try:
        for event in follow_events(api, job_id, on_retry=retrying):
            events.put(("event", event))
        events.put(("end", None))
    except Exception as err:  # noqa: BLE001 - handed to the main thread, which raises it there
        events.put(("error", err))
