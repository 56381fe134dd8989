"""What a benchmark ran on, in one line, printed first by each benchmark.

The figures move with the machine: the same code gives different ratios to TRL on CPUs with different
matrix rates, and a VM that stalls puts its stalls into the service's latency tail. A figure without
its machine cannot be compared, so the benchmarks say which one they ran on (docs/performance.md).
"""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The CPU features the trainers' speed turns on: AVX-512 for fp32 products, AVX512-BF16 and AMX for bf16.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu() -> str:
    """Model name, family/model/stepping and the FLAGS present, from /proc/cpuinfo (Linux)."""
    fields = _cpuinfo()
    if not fields:
        return platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    have = [f for f in FLAGS if f in flags]
    return (f"{fields.get('model name', '?')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')} "
            f"stepping {fields.get('stepping', '?')}; {' '.join(have) or 'none of ' + '/'.join(FLAGS)})")


def describe(with_torch: bool = True) -> str:
    """One line: CPU, cores usable, memory, load, Python, torch (its version and threads) and the checkout."""
    parts = [f"cpu: {cpu()}", f"{_usable_cores()} cores usable", f"{_memory_gib()} GiB",
             f"load {_load()}", f"python {platform.python_version()}"]
    if with_torch:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    parts.append(f"git {_git()}")
    return "machine: " + ", ".join(parts)


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]  # every core repeats the same fields
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if k.strip()}


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0


def _memory_gib() -> str:
    try:
        kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    except (OSError, StopIteration, ValueError):
        return "?"
    return f"{kib / 2**20:.0f}"


def _load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _git() -> str:
    """The checkout's commit, with `+changes` when the working tree differs from it."""
    def run(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = run("rev-parse", "--short", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head or '?'}{' +changes' if dirty else ''}"


if __name__ == "__main__":
    print(describe())
