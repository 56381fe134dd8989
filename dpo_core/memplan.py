"""A run's memory plan: the micro batch and the number of checkpointed decoder layers that fit its budget.

The budget is spec.max_memory, else 90% of the device (`device_budget`). The bytes of a choice come from
dpo_core.estimate.micro_batch_memory, the model pre-flight shows too. The rule (`plan`):

1. The run must fit the budget (its predicted peak within PLAN_PERCENT of it: `room`),
   and recompute as little as it can: the fewest checkpointed layers first, then the largest micro batch
   at that count.
2. But a micro batch is not cut below what keeps the device busy (`busy_rows`: on CUDA about BUSY_TOKENS
   tokens, or the whole batch when it is smaller; on a CPU one row) while checkpointing more layers would
   keep it there: a GPU running half-empty matrices loses more than the recompute (a third of a forward
   per checkpointed layer's share) costs.
3. When even every layer checkpointed does not keep a busy micro batch, the largest micro batch that fits
   wins (the device is under-used either way), at the fewest layers that fit it.

A setting the user gave is kept: an explicit micro_batch_size (the plan then only chooses layers), and
gradient_checkpointing true (every layer) or false (none; the plan then only chooses the micro batch).
When no allowed choice fits, `plan` raises a TrainingError that says the predicted bytes, the budget and
what to change.

Torch-free except `device_budget` (the API's pre-flight plans for a GPU type's memory).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dpo_core.errors import TrainingError
from dpo_core.estimate import GIB, ModelFacts, micro_batch_memory, shape_of_report
from dpo_core.spec import TrainingSpec

BUDGET_SHARE = 0.9  # of the device's memory, when max_memory is not set
# The plan's predicted peak stays within this share of the budget. The rest is headroom for what the memory
# model does not count (the allocator's fragmentation and caching, kernels' temporary buffers, the Python
# heap): the estimate has come out up to 5% below a CPU run's peak RSS (docs/performance.md, Estimates
# against runs). In percent, so that the share of a budget is exact integer arithmetic.
PLAN_PERCENT = 90
BUSY_TOKENS = 8192  # tokens of a micro batch that keep a GPU's matrix units busy (rows x padded width)


@dataclass(frozen=True)
class Workload:
    """What the plan needs of the data: the padded tokens one row puts in a micro batch (sequences a row x
    the longest sequence, rounded up to the batch width multiple), the share of them the LM head scores, and
    the padded width of a sequence (what a padded batch's attention mask grows with). A packed layout (no
    padding) would pass its real tokens a row."""

    tokens_per_row: int
    completion_share: float = 1.0
    width: int = 0


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    checkpointed_layers: int  # the first this many decoder layers (dpo_core.models.checkpoint_layers)
    layers: int
    predicted_bytes: int  # micro_batch_memory's total for this choice
    budget_bytes: int
    tokens_per_micro_batch: int

    def info(self) -> dict:
        """The plan as TrainResult.memory_plan and the memory_plan warning's data report it."""
        return asdict(self)

    def message(self) -> str:
        return (f"memory plan: micro batch {self.micro_batch}, {self.checkpointed_layers} of {self.layers} "
                f"layers checkpointed, predicted peak {self.predicted_bytes / GIB:.2f} GiB of a "
                f"{self.budget_bytes / GIB:.2f} GiB budget")


def workload_of_report(spec: TrainingSpec, data_report: dict, device: str) -> Workload:
    """A pre-flight data report's workload: two sequences a pair (or one unpaired row) of the longest train or
    validation sequence, padded as the trainer pads on `device` (64 on a GPU, 1 on a CPU, unless
    pad_to_multiple_of), the completion share at the training file's medians. A shared prompt's one row a pair
    is not known before the model loads: the report plans for two rows, the larger layout."""
    shape = shape_of_report(data_report["training_file"], spec.loss.unpaired)
    files = [data_report["training_file"], data_report.get("validation_file") or {}]
    longest = max(f.get("tokens", {}).get("longest_sequence", 0) for f in files)
    multiple = spec.pad_to_multiple_of or (1 if device == "cpu" else 64)
    width = min(-(-longest // multiple) * multiple, max(spec.max_length, longest))
    return Workload(shape.sequences_per_row * width, shape.completion_share, width)


def busy_rows(device: str, workload: Workload, most: int) -> int:
    """The smallest micro batch that keeps the device busy (rule 2): on CUDA BUSY_TOKENS tokens or `most`
    rows, whichever is fewer; on a CPU, whose throughput hardly depends on the micro batch, one row."""
    if device == "cpu":
        return 1
    return min(most, max(1, math.ceil(BUSY_TOKENS / max(workload.tokens_per_row, 1))))


def rows_per_process(spec: TrainingSpec, world: int) -> int:
    """The most rows one process takes in a step: its share of the batch (dpo_core.distributed.shard)."""
    return math.ceil(spec.batch_size / max(world, 1))


def plan(spec: TrainingSpec, facts: ModelFacts, device: str, budget: int, workload: Workload,
         world: int = 1) -> MemoryPlan:
    """The micro batch and checkpointed layers of the run (the rules in the module docstring); `world`
    processes share each step's rows, and under FSDP its weights, gradients and optimizer states."""
    most = rows_per_process(spec, world)
    sizes = [min(spec.micro_batch_size, most)] if spec.micro_batch_size else list(range(most, 0, -1))
    layers = {True: [facts.layers], False: [0]}.get(spec.gradient_checkpointing, range(facts.layers + 1))

    def cost(rows: int, k: int) -> int:
        return micro_batch_memory(spec, facts, device, rows * workload.tokens_per_row, workload.completion_share,
                                  k, world, workload.width)["total"]

    def made(rows: int, k: int) -> MemoryPlan:
        return MemoryPlan(rows, k, facts.layers, cost(rows, k), budget, rows * workload.tokens_per_row)

    busy, room = busy_rows(device, workload, most), room_bytes(budget)
    for k in layers:  # rules 1 and 2: the fewest layers that keep a busy micro batch
        rows = _largest([r for r in sizes if r >= busy], lambda r: cost(r, k) <= room)
        if rows is not None:
            return made(rows, k)
    # Rule 3: the largest micro batch any layer count fits, at the fewest layers (max keeps the first of ties).
    found = [(rows, -k) for k in layers if (rows := _largest(sizes, lambda r: cost(r, k) <= room))]
    if found:
        rows, k = max(found)
        return made(rows, -k)
    least = min((made(sizes[-1], k) for k in layers), key=lambda p: p.predicted_bytes)
    raise TrainingError(_nothing_fits(spec, least, device), code="memory_budget")


def room_bytes(budget: int) -> int:
    """What a plan's predicted peak may take of `budget`: PLAN_PERCENT of it."""
    return budget * PLAN_PERCENT // 100


def _largest(sizes: list[int], fits) -> int | None:
    """The first of `sizes` (largest first) that fits, or None. Memory grows with rows: the ones that fit are
    a tail of the list, found by bisection."""
    low, high = 0, len(sizes)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if fits(sizes[mid]) else (mid + 1, high)
    return sizes[low] if low < len(sizes) else None


def _nothing_fits(spec: TrainingSpec, least: MemoryPlan, device: str) -> str:
    """What the smallest allowed choice would take, against the budget, and what to change."""
    kept = []
    if spec.micro_batch_size:
        kept.append(f"micro_batch_size {spec.micro_batch_size} (unset it to let the plan lower it)")
    if spec.gradient_checkpointing is not True and spec.gradient_checkpointing != "auto":
        kept.append("gradient_checkpointing false (set it to auto or true)")
    changes = ["raise max_memory if the device has more room", f"lower max_length ({spec.max_length})"]
    if spec.lora is None:
        changes.append("train LoRA adapters (lora)")
    if spec.precision == "fp32":
        changes.append("use precision bf16")
    if spec.loss.needs_reference and spec.reference_mode == "model" and spec.lora is None:
        changes.append("use reference_mode: precomputed")
    if device == "cuda" and spec.distributed != "fsdp":
        changes.append("shard the model over several GPUs (distributed: fsdp)")
    given = f" with {' and '.join(kept)}" if kept else ""
    return (f"the run does not fit its memory budget: micro batch {least.micro_batch} with "
            f"{least.checkpointed_layers} of {least.layers} layers checkpointed{given} needs about "
            f"{least.predicted_bytes / GIB:.2f} GiB ({least.predicted_bytes:,} bytes), over the "
            f"{PLAN_PERCENT}% of the {least.budget_bytes / GIB:.2f} GiB ({least.budget_bytes:,} bytes) budget that a "
            "plan may fill; "
            + "; or ".join(changes))


# ---------------------------------------------------------------- the budget


def budget_bytes(spec: TrainingSpec, device_total: int) -> int:
    """spec.max_memory, else BUDGET_SHARE of `device_total` (the memory of the device the run gets)."""
    return spec.max_memory_bytes or int(BUDGET_SHARE * device_total)


def device_budget(spec: TrainingSpec, device) -> int:
    """The run's budget on `device` (a torch.device): spec.max_memory, else BUDGET_SHARE of a CUDA device's
    total memory, or of the memory this process may use on a CPU (`cpu_memory_bytes`)."""
    if spec.max_memory is not None:
        return spec.max_memory_bytes
    if device.type == "cuda":
        import torch

        return budget_bytes(spec, torch.cuda.get_device_properties(device).total_memory)
    return budget_bytes(spec, cpu_memory_bytes())


def cpu_memory_bytes() -> int:
    """The memory this process may use: its cgroup's limit (v2 memory.max, v1 memory.limit_in_bytes) when one is
    set, below the machine's MemTotal."""
    total = _meminfo_total()
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():  # "max" (v2) means no limit; v1 writes a huge number instead
            return min(int(text), total)
    return total


def _meminfo_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


# glibc's mallopt parameter M_MMAP_THRESHOLD, and the value it starts at.
M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES = -3, 128 << 10


def return_freed_memory() -> bool:
    """Have glibc give large freed blocks back to the system at once, so that a CPU run's resident memory
    follows its live tensors. By default glibc raises its mmap threshold to the size of each large block
    freed, after which blocks of that size come from the heap, where the freed activations of one micro
    batch stay resident under the next one's: up to half the activations again (a 2-micro-batch step of the
    memory test in tests/integration/test_memplan_runs.py peaked 15% over the plan). Setting the threshold
    fixes it (mallopt). It costs time: every large tensor is a fresh mapping, faulted in page by page (that
    test's run, 8k tokens a micro batch through 64-wide layers, stepped 1.2-2.3x slower; wider layers do more
    work per byte). Calling malloc_trim after each micro batch instead cost nothing there but left the peak
    3-5% over the plan. False where there is no glibc."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (musl, macOS)
        return False
