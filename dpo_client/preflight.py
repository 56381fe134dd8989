"""How `dpo jobs create --dry-run` shows a pre-flight report (POST /v1/fine_tuning/jobs/preflight): the data
as the trainer will see it, the warnings, the estimate per GPU type and the queue. `--json` skips this and
prints the API's JSON."""
from __future__ import annotations

import re
import time

from rich.console import Group
from rich.table import Table
from rich.text import Text

from dpo_client.render import duration, seconds, size, table, when

FILES = (("training_file", "training"), ("validation_file", "validation"))
LINES_SHOWN = 10  # the API lists at most 10 line numbers per warning


def preflight_view(report: dict) -> Group:
    data = report.get("data") or {}
    files = [(label, data[key]) for key, label in FILES if data.get(key)]
    parts: list = [Text(f"Pre-flight {report.get('id', '')} for {report.get('model', '')}: nothing was queued",
                        style="bold"), "", _heading("Data, tokenized as the trainer will"), data_table(files), "",
                   *warnings_view(report.get("warnings") or [])]
    if report.get("estimate"):
        parts += ["", *estimate_view(report["estimate"])]
    if report.get("queue"):
        parts += ["", _heading("Queue"), Text(queue_line(report["queue"]))]
    return Group(*parts)


def _heading(title: str) -> Text:
    return Text(title, style="bold underline")


def data_table(files: list[tuple[str, dict]]) -> Table:
    """A row per finding, a column per file (narrow enough for any terminal); a finding no file has is left out
    (groups, the overlap with training, the length bias of unpaired data)."""
    parts = list(dict.fromkeys(part for _, f in files for part in f["lengths"]))  # prompt, chosen, rejected
    rows = [("rows", lambda f: f["rows"]), ("used", lambda f: f["rows_used"]),
            ("dropped (cannot fit)", lambda f: f["rows_dropped"]),
            ("truncated", lambda f: f"{f['rows_truncated']} ({f['truncated_tokens']:,} tokens cut)"),
            ("tokens, one epoch", lambda f: f"{f['tokens']['total']:,}"),
            ("longest sequence", lambda f: f["tokens"]["longest_sequence"]),
            *((f"{part} p50/p90/p99/max", lambda f, part=part: _percentiles(f["lengths"].get(part))) for part in parts),
            ("duplicate pairs", lambda f: f["duplicate_pairs"]), ("chosen = rejected", lambda f: f["identical_pairs"]),
            ("chosen longer", lambda f: _bias(f.get("length_bias"))),
            ("groups", lambda f: ", ".join(f"{k} {n}" for k, n in (f.get("groups") or {}).items()) or None),
            ("prompts also in training", lambda f: f.get("overlap_with_training"))]
    cells = [(name, [cell(f) for _, f in files]) for name, cell in rows]
    return table("", *(label for label, _ in files),
                 rows=((name, *values) for name, values in cells if any(v is not None for v in values)))


def _bias(bias: dict | None) -> str | None:
    """The share of pairs whose chosen is longer, and by how many tokens on average; unpaired data has none."""
    if not bias:
        return None
    return f"{bias['chosen_longer_share']:.0%} (mean {bias['mean_difference_tokens']:+.1f} tokens)"


def _percentiles(p: dict | None) -> str | None:
    """Tokens before truncation."""
    return p and f"{p['p50']} / {p['p90']} / {p['p99']} / {p['max']}"


def warnings_view(warnings: list[dict]) -> list:
    if not warnings:
        return [Text("No warnings", style="green")]
    out: list = [Text(f"Warnings ({len(warnings)})", style="bold yellow")]
    for w in warnings:
        line = Text("  ! ", style="yellow")
        line.append(w["code"], style="bold yellow")
        line.append(f"  {w['count']} in {w['param']}")
        if w.get("lines"):
            more = ", ..." if w["count"] > len(w["lines"]) else ""
            line.append(f", line(s) {', '.join(str(n) for n in w['lines'][:LINES_SHOWN])}{more}")
        out += [line, Text(f"    {w['message']}")]
    return out


def estimate_view(estimate: dict) -> list:
    flops, memory = estimate.get("flops") or {}, estimate.get("memory") or {}
    params = f"{estimate['parameters']:,} parameters ({estimate['trainable_parameters']:,} trainable)"
    lines = [_heading("Estimate"),
             Text(f"{estimate['steps']} steps, {estimate['epochs']:.3g} epoch(s), {estimate['tokens']:,} tokens; "
                  f"{params}"),
             Text(f"FLOPs {_flops(flops.get('total'))} (policy forward and backward {_flops(flops.get('policy'))}, "
                  f"reference forward {_flops(flops.get('reference'))})")]
    if memory:
        breakdown = ", ".join(f"{k} {size(v)}" for k, v in (memory.get("breakdown") or {}).items() if k != "total")
        layers = memory.get("checkpointed_layers")
        planned = "" if memory.get("planned", True) else " (no memory plan: device memory not reported)"
        ckpt = f", {layers} of {memory.get('layers')} layers checkpointed" if layers else ""
        lines.append(Text(f"Memory on {memory['device']}: {size(memory['total'])} at micro batch "
                          f"{memory['micro_batch_size']}{ckpt}{planned}, {memory['precision']} ({breakdown}); each "
                          "GPU type's peak and plan are in the table"))
    if estimate.get("by_gpu_type"):
        lines += ["", gpu_table(estimate["by_gpu_type"])]
    else:
        lines.append(Text("No workers in the pool to estimate a time for", style="yellow"))
    return lines


def _flops(value: float | None) -> str:
    return "-" if value is None else re.sub(r"e\+0*", "e", f"{value:.3g}")  # 2.26e9, not 2.26e+09


def gpu_table(rows: list[dict]) -> Table:
    """A row per GPU type: the job's peak beside one device's memory, whether it fits, the time and its basis."""
    return table("GPU TYPE", "WORKERS", "GPUS", "PEAK", "MEMORY", "FITS", "PLAN", "LARGEST MICRO BATCH", "TIME",
                 "BASIS", rows=(_gpu_row(r) for r in rows))


def _gpu_row(r: dict) -> tuple:
    memory = size(r["memory_bytes"]) if r.get("memory_bytes") else "unknown"
    fits = {True: "yes", False: "NO", None: "unknown"}[r.get("fits")]
    plan = r.get("plan")
    planned = (f"micro batch {plan['micro_batch_size']}, {plan['checkpointed_layers']}/{plan['layers']} layers "
               "checkpointed") if plan else "-"
    return (r["gpu_type"], r["workers"], r["gpus"], size(r.get("peak_memory_bytes")), memory, fits, planned,
            r.get("largest_micro_batch_size"), seconds(r["seconds"]), basis(r))


def basis(row: dict) -> str:
    """Where a time comes from: the jobs that calibrated it (and the MFU they reached), or the FLOPs model and
    the MFU it assumes."""
    if row["basis"] == "calibrated":
        jobs = list(row.get("calibrated_by") or [])
        if row.get("other_jobs"):
            jobs.append(f"{row['other_jobs']} job(s) of other teams")
        mfu = f" ({row['mfu']:.0%} MFU)" if row.get("mfu") else ""
        return "calibrated by " + (", ".join(jobs) or "past jobs") + mfu
    mfu, rate = row.get("mfu"), row.get("flops_per_s")
    if mfu is not None:
        return f"FLOPs model at {mfu:.0%} MFU"
    return f"FLOPs model at {rate / 1e9:,.0f} GFLOP/s" if rate else "FLOPs model"


def queue_line(queue: dict) -> str:
    ahead = f"position {queue['position']}" + (f", {queue['jobs_ahead']} job(s) ahead"
                                               if queue.get("jobs_ahead") is not None else "")
    start = queue.get("estimated_start_in_s")
    if start is None:
        when_ = "no start estimate"
    elif start <= 0:
        when_ = "would start now"
    else:
        at = queue.get("estimated_start_at") or time.time() + start
        when_ = f"would start in about {duration(start)} (at {when(at)})"
    return f"{ahead}; {when_}" + (f"; {queue['reason']}" if queue.get("reason") else "")
