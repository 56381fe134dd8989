"""How `dpo` shows the API's objects to people: tables, times, sizes and metrics. `--json` skips all of
this and prints the API's own JSON."""
from __future__ import annotations

import time
from collections.abc import Iterable

from rich.table import Table
from rich.text import Text

# (metric, label, format) of the few numbers shown beside a bar or on one line.
TRAIN_SHOWN = (("loss", "loss", ".4f"), ("rewards/accuracies", "acc", ".2f"), ("rewards/margins", "margin", ".3f"))
EVAL_SHOWN = (("eval_loss", "loss", ".4f"), ("eval_rewards/accuracies", "reward accuracy", ".2f"),
              ("eval_rewards/margins", "margin", ".3f"))


def clock(ts: float | None) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) if ts else "-"


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}h{m:02d}m{s % 60:02d}s" if h else f"{m}m{s % 60:02d}s" if m else f"{s}s"


def seconds(value: float | None) -> str:
    """A training time, estimated or measured: under 10 s to two digits (0.011s, 4.5s), so that a tiny run
    compares with its estimate; longer ones as durations."""
    return f"{value:.2g}s" if value is not None and value < 10 else duration(value)


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def number(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _metrics(record: dict | None, shown) -> str:
    record = record or {}
    return " • ".join(f"{label} {record[key]:{spec}}" for key, label, spec in shown
                      if isinstance(record.get(key), int | float))


def train_summary(record: dict | None) -> str:
    return _metrics(record, TRAIN_SHOWN)


def eval_summary(record: dict | None) -> str:
    return _metrics(record, EVAL_SHOWN)


def table(*headers: str, rows: Iterable[Iterable]) -> Table:
    out = Table(*headers, box=None, header_style="bold", pad_edge=False)
    for row in rows:
        out.add_row(*(Text("-" if cell is None else str(cell)) for cell in row))  # text, never markup
    return out


def job_step(job: dict) -> str:
    p = job.get("progress") or {}
    if p.get("total_steps"):
        return f"{p.get('step') or 0}/{p['total_steps']}"
    return "-"


def job_status(job: dict) -> str:
    if job["status"] == "queued" and job.get("queue_position") is not None:
        return f"queued #{job['queue_position']}" if job["queue_position"] else "starting"
    return job["status"]


def jobs_table(jobs: list[dict]) -> Table:
    return table("ID", "STATUS", "MODEL", "CREATED", "STEP", "DURATION", rows=(
        (j["id"], job_status(j), j["model"], when(j["created_at"]), job_step(j),
         duration((j.get("finished_at") or time.time()) - j["started_at"]) if j.get("started_at") else None)
        for j in jobs))


def files_table(files: list[dict]) -> Table:
    return table("ID", "FILENAME", "PURPOSE", "ROWS", "FORMAT", "SIZE", "CREATED", "WARNINGS", rows=(
        (f["id"], f["filename"], f["purpose"], f.get("rows"), f.get("format"), size(f["bytes"]), when(f["created_at"]),
         sum(w["count"] for w in f.get("warnings") or []) or None) for f in files))


def checkpoints_table(checkpoints: list[dict]) -> Table:
    return table("CHECKPOINT", "STEP", "FINAL", "CREATED", "METRICS", rows=(
        (c["id"], c["step_number"], "yes" if c["final"] else "", when(c["created_at"]),
         eval_summary(c.get("metrics")) or train_summary(c.get("metrics"))) for c in checkpoints))


def _fields(pairs: Iterable[tuple[str, object]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for name, value in pairs:
        if value not in (None, "", []):
            grid.add_row(name, Text(str(value)))
    return grid


def job_details(job: dict) -> Table:
    p, error, spec = job.get("progress") or {}, job.get("error") or {}, job.get("training") or {}
    loss = spec.get("loss") or {}
    hp = ", ".join(f"{k} {number(v)}" for k, v in (("loss", loss.get("type")), ("beta", loss.get("beta")),
                   ("learning_rate", spec.get("learning_rate")), ("batch_size", spec.get("batch_size")),
                   ("epochs", spec.get("num_epochs")), ("max_steps", spec.get("max_steps"))) if v is not None)
    return _fields([
        ("id", job["id"]), ("status", job_status(job)), ("waiting", job.get("queue_reason")),
        ("model", job["model"]), ("training file", job["training_file"]),
        ("validation file", job.get("validation_file")), ("training", hp), ("created", when(job["created_at"])),
        ("started", when(job.get("started_at")) if job.get("started_at") else None),
        ("finished", when(job.get("finished_at")) if job.get("finished_at") else None),
        ("estimated finish", when(job.get("estimated_finish")) if job["status"] == "running" else None),
        ("step", job_step(job) if p.get("total_steps") else None), ("worker", job.get("worker")),
        ("metrics", train_summary(job.get("metrics"))), ("evaluation", eval_summary(job.get("eval_metrics"))),
        ("error", f"{error.get('message')} ({error.get('code')})" if error else None),
        ("final model", job.get("fine_tuned_model")),
        ("estimate", estimate_line(job.get("estimate"))),
        ("actual", actual_line(job.get("actual"), job.get("estimate"))),
    ])


def estimate_line(estimate: dict | None) -> str | None:
    """What the pre-flight just before the job's creation expected of it."""
    if not estimate:
        return None
    return (f"{seconds(estimate.get('seconds'))} of training, {size(estimate.get('peak_memory_bytes'))} peak memory, "
            f"{estimate.get('steps')} steps, {estimate.get('tokens') or 0:,} tokens on {estimate.get('gpu_type')} "
            f"({estimate.get('preflight_id')})")


def actual_line(actual: dict | None, estimate: dict | None) -> str | None:
    """What the run measured, beside the estimate when there is one (+10% = took or used 10% more)."""
    if not actual:
        return None
    estimate = estimate or {}
    took = _versus(actual.get("train_seconds"), estimate.get("seconds"))
    peak = _versus(actual.get("peak_memory_bytes"), estimate.get("peak_memory_bytes"))
    return (f"{seconds(actual.get('train_seconds'))}{took} of training, {size(actual.get('peak_memory_bytes'))}{peak} "
            f"peak memory ({actual.get('memory_kind')}), {actual.get('steps')} steps, {actual.get('tokens') or 0:,} "
            f"tokens at {number(actual.get('tokens_per_s'))} tokens/s")


def _versus(actual: float | None, expected: float | None) -> str:
    """How far the run was from the estimate: +10% within a factor of two, else the factor (`3.5x`)."""
    if not actual or not expected:
        return ""
    ratio = actual / expected
    return f" ({ratio - 1:+.0%} vs estimate)" if 0.5 <= ratio <= 2 else f" ({ratio:.3g}x the estimate)"


def pool_view(pool: dict) -> Table:
    workers = table("WORKER", "STATE", "GPU", "JOB", "HOST", "LAST SEEN", rows=(
        (w["name"], w["state"], f"{w['gpus']} x {w['gpu_type']}", w.get("job"), w.get("hostname"),
         f"{duration(w.get('seconds_since_heartbeat'))} ago") for w in pool["workers"]))
    queues = table("TEAM", "QUEUED", "RUNNING", rows=((t["team"], t["queued"], t["running"]) for t in pool["by_team"]))
    grid = Table.grid(padding=(1, 0))
    grid.add_row(workers if pool["workers"] else "No workers in the pool")
    grid.add_row(f"{pool['queued']} job(s) queued")
    if pool["by_team"]:
        grid.add_row(queues)
    return grid


def usage_view(usage: dict) -> Table:
    jobs = usage.get("jobs") or {}
    limit = usage.get("storage_limit_bytes")
    return _fields([
        ("team", f"{usage['team']} ({usage['team_id']})"),
        ("since", when(usage.get("since")) if usage.get("since") else "the beginning"),
        ("GPU time", f"{duration(usage['gpu_seconds'])} ({usage['gpu_seconds']:.0f} GPU-seconds)"),
        ("trained tokens", f"{usage.get('trained_tokens') or 0:,}"),
        ("jobs", ", ".join(f"{n} {k}" for k, n in jobs.items() if k != "total" and n) or "none"),
        ("last day", f"{usage.get('fair_share_gpu_seconds', 0):.0f} GPU-seconds (ranks the team for a free worker)"),
        ("storage", f"{size(usage.get('storage_bytes'))}" + (f" of {size(limit)}" if limit else " (no limit)")),
    ])
