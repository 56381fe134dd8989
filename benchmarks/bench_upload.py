"""Upload memory: the API process's peak RSS while it takes one large JSONL upload, against its RSS before.

    .venv/bin/python benchmarks/bench_upload.py                 # a 500 MB file, about a minute
    .venv/bin/python benchmarks/bench_upload.py --size-mb 20    # quick

It starts `dpo-service api` alone on loopback with the embedded defaults (SQLite, a data directory of
its own), as the service tests start it (tests/service/processes.py), and talks HTTP only. One small
upload goes first (the first request's one-off costs are not the upload's); then the generated file of
--size-mb, preference rows of a few hundred bytes and one line of --long-line-kb, which the client
streams from disk. The API's RSS is sampled from /proc (psutil) every 2 ms while the upload runs, and
the kernel's own high-water mark (VmHWM, reset before the upload) is read after it where Linux allows.
The service's bound: 64 MiB plus twice the longest line, whatever the file's size.
"""
from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from pathlib import Path

import httpx
import machine  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.service.processes import PeakRss, start_api  # noqa: E402  (after the path above)

MIB = 1 << 20
BOUND_BASE = 64 * MIB


def write_jsonl(path: Path, size: int, long_line: int) -> tuple[int, int]:
    """About `size` bytes of text preference rows, one of them `long_line` bytes long; (rows, longest line)."""
    words = "the of and a to in is you that it he was for on are as with his they at be this have from".split()
    rows = []
    for i in range(2000):
        text = " ".join(words[(i * 7 + j) % len(words)] for j in range(20 + i % 60))
        rows.append(json.dumps({"prompt": f"Question {i}: {text}?", "chosen": f" {text}.", "rejected": f" {i}."}))
    block = ("\n".join(rows) + "\n").encode()
    pad = long_line - len(json.dumps({"prompt": "", "chosen": " a", "rejected": " b"}))
    long_row = (json.dumps({"prompt": "x" * pad, "chosen": " a", "rejected": " b"}) + "\n").encode()
    written, count = 0, 0
    with path.open("wb") as out:
        out.write(long_row)
        written, count = len(long_row), 1
        while written < size:
            out.write(block)
            written, count = written + len(block), count + len(rows)
    return count, max(len(long_row) - 1, max(len(r) for r in rows))


def upload(client: httpx.Client, path: Path) -> httpx.Response:
    with path.open("rb") as f:  # httpx reads it in chunks: the client does not hold the file either
        return client.post("/v1/files", files={"file": (path.name, f, "application/jsonl")},
                           data={"purpose": "fine-tune"})


def measure(root: Path, size: int, long_line: int) -> dict:
    data = root / "upload.jsonl"
    rows, longest = write_jsonl(data, size, long_line)
    warm = root / "warm.jsonl"
    write_jsonl(warm, 1, 100)
    service = start_api(root / "service", "bench-" + secrets.token_hex(8))
    try:
        pid = service.procs["api"].pid
        started = PeakRss(pid).process.memory_info().rss
        with service.client(timeout=3600) as client:
            if (r := upload(client, warm)).status_code != 200:
                raise SystemExit(f"the warm-up upload failed: {r.status_code} {r.text[:300]}")
            with PeakRss(pid) as rss:
                t = time.perf_counter()
                r = upload(client, data)
                seconds = time.perf_counter() - t
        if r.status_code != 200:
            raise SystemExit(f"the upload failed: {r.status_code} {r.text[:300]}\n{service.logs()}")
        stored = r.json()
    finally:
        service.stop()
    assert stored["bytes"] == data.stat().st_size and stored["rows"] == rows, stored
    return {"bytes": stored["bytes"], "rows": rows, "longest_line": longest, "seconds": seconds,
            "rss_started": started, "rss_before": rss.before, "rss_peak_sampled": rss.sampled, "rss_hwm": rss.hwm,
            "growth": rss.growth, "bound": BOUND_BASE + 2 * longest}


def report(m: dict) -> str:
    hwm = f"kernel high-water mark {m['rss_hwm'] / MIB:.1f} MiB" if m["rss_hwm"] else "no high-water mark (clear_refs)"
    within = "within" if m["growth"] < m["bound"] else "OVER"
    return "\n".join([
        f"upload: {m['bytes'] / 1e6:.1f} MB, {m['rows']:,} rows, longest line {m['longest_line']:,} bytes, "
        f"in {m['seconds']:.1f} s ({m['bytes'] / 1e6 / m['seconds']:.1f} MB/s)",
        f"API RSS: {m['rss_started'] / MIB:.1f} MiB after start-up, {m['rss_before'] / MIB:.1f} MiB before the upload; "
        f"peak during it {m['rss_peak_sampled'] / MIB:.1f} MiB sampled, {hwm}",
        f"growth: {m['growth'] / MIB:.1f} MiB, {within} the bound of 64 MiB + 2 x longest line = "
        f"{m['bound'] / MIB:.1f} MiB",
    ])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size-mb", type=float, default=500.0, help="the upload's size, in MB (10^6 bytes)")
    p.add_argument("--long-line-kb", type=int, default=1024, help="the longest line's length, in KiB")
    p.add_argument("--work-dir", type=Path, help="where the file and the service's data go (default: a temp dir)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    described = machine.describe(with_torch=False)
    print(described, flush=True)
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="dpo-bench-upload-"))
    root.mkdir(parents=True, exist_ok=True)
    figures = measure(root, int(args.size_mb * 1e6), args.long_line_kb * 1024)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps({"machine": described, **figures}, indent=1))


if __name__ == "__main__":
    main()
