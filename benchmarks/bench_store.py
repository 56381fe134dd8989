"""Checkpoints in an object store: what a background upload costs the training, and what resuming from the
store costs against resuming from local disk.

    .venv/bin/python benchmarks/bench_store.py                # bench-20m, 48 steps, a checkpoint every 8
    .venv/bin/python benchmarks/bench_store.py --quick        # smoke test: a 1.6M-parameter model, a minute
    .venv/bin/python benchmarks/bench_store.py --endpoint http://host:8333 --bucket b   # a store of yours
                                                              # (credentials: the AWS_* variables)

Without --endpoint it starts SeaweedFS (`weed server -s3`, tests/s3server.py) on loopback, on this same
machine, reniced to --store-nice: a real deployment's store runs elsewhere and takes no CPU from the
worker; here it shares the worker's cores.

1. Upload overlap. dpo_core trains with a checkpoint every --save-steps steps, published as the worker
   does it (worker.publisher: staged by hard links, uploaded by one niced background process, at most two
   pending). Each step's time is the trainer's own step (from just before it to just after it); the upload
   process is busy from a checkpoint's hand-over until its answer comes back. Steps that lie in a busy
   window for at least half their time are "with an upload", steps that touch none are "quiet" (partial
   overlaps and the first step are counted, not used); the figure is the ratio of their medians. The
   pause a checkpoint costs the training (torch.save, then staging) is reported on its own.
2. Resume. The last checkpoint, published in the S3 store and in a local store (file://, hard links), is
   fetched to a fresh directory (Storage.fetch_dir) and dpo_core starts a run that resumes from it, until
   it is ready for its first step (model, optimizer state and data loaded): --repeats times each,
   alternating, medians reported.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import machine, workload  # noqa: E402

TRAIN_CPU = 0  # --pin: the training's core
MID_SHAPE = dict(hidden_size=256, num_layers=2, num_heads=4, intermediate_size=704)  # --quick, with a 4k vocabulary


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a small model and few steps (the test's smoke run)")
    p.add_argument("--steps", type=int, default=None, help="default: 48 (--quick: 16)")
    p.add_argument("--save-steps", type=int, default=None, help="default: 8 (--quick: 4)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=None, help="resume measurements per store (default 3, --quick 1)")
    p.add_argument("--upload-cap", type=int, default=None, help="DPO_UPLOAD_MAX_BYTES_PER_S (default: none)")
    p.add_argument("--store-nice", type=int, default=10, help="niceness of the weed server the bench starts")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for the training (default: torch's, every core): fewer leave the upload a "
                   "core, as a GPU worker's CPU does")
    p.add_argument("--pin", action="store_true",
                   help="partition the cores: the training on CPU 0 with one torch thread, the upload process and "
                   "the store the bench starts on the others, as on a GPU worker (whose training loop leaves its "
                   "other cores free) with its store on another machine")
    p.add_argument("--endpoint", help="an S3 endpoint to use instead of starting weed")
    p.add_argument("--bucket", default="dpo-bench")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.store_pid = None  # the weed server's, when the bench starts one
    args.steps = args.steps or (16 if args.quick else 48)
    args.save_steps = args.save_steps or (4 if args.quick else 8)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.pin:
        args.threads = 1
        os.sched_setaffinity(0, {TRAIN_CPU})  # before anything starts: the upload process inherits it
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    described = machine.describe()
    print(described, flush=True)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="dpo-bench-store-"))
    work.mkdir(parents=True, exist_ok=True)
    with _store_server(args, work) as (endpoint, where):
        settings = _settings(args, work, endpoint)
        record = {"machine": described, "uptime": _uptime(), "store": where, "torch_threads": _threads(),
                  "pinned": args.pin, **measure(args, work, settings)}
    print(report(record))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    return record


class _store_server:
    """The S3 endpoint: --endpoint, or a weed server started here (and killed at the end)."""

    def __init__(self, args, work: Path):
        self.args, self.work, self.proc = args, work, None

    def __enter__(self) -> tuple[str, str]:
        if self.args.endpoint:
            return self.args.endpoint, f"S3 at {self.args.endpoint}"
        from tests import s3server

        self.proc, server = s3server.start(self.work / "weed")
        os.environ.update(server.env())  # boto3's credentials, here and in the upload process
        self.args.bucket = server.bucket
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, self.args.store_nice)
        if self.args.pin:
            _move_off_training(self.proc.pid)
        self.args.store_pid = self.proc.pid
        return server.endpoint, f"SeaweedFS on this machine (weed server -s3, nice {self.args.store_nice})"

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            from tests import s3server

            s3server.stop(self.proc)


def _settings(args, work: Path, endpoint: str):
    from service.settings import Settings

    return Settings(data_dir=work / "data", storage_url=f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:12]}",
                    s3_endpoint_url=endpoint, upload_max_bytes_per_s=args.upload_cap)


def measure(args, work: Path, settings) -> dict:
    model = _model(args, work)
    rows = workload.make_rows(args.steps * args.batch_size, args.max_length)
    train_file = workload.write_jsonl(work / "train.jsonl", rows)
    overlap = upload_overlap(args, work, settings, model, train_file)
    resume = resume_times(args, work, settings, model, train_file, overlap.pop("last_checkpoint"))
    return {"model": Path(model).name, "steps": args.steps, "save_steps": args.save_steps,
            "batch_size": args.batch_size, "max_length": args.max_length, "upload_cap": args.upload_cap,
            **overlap, "resume": resume}


def _model(args, work: Path) -> str:
    if not args.quick:
        return workload.build_model(work, args.max_length)
    from dpo_core.toy import build_model

    out = work / "mid-1.6m"
    if (out / "config.json").is_file():
        return str(out)
    return build_model(out, vocab_size=workload.VOCAB // 8, seed=0, **MID_SHAPE)


def _spec(args, model: str, train_file: str, output_dir: Path, **overrides):
    from dpo_core import parse_spec

    base = dict(model=model, train_file=train_file, output_dir=str(output_dir), max_steps=args.steps,
                save_steps=args.save_steps, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                max_length=args.max_length, logging_steps=1, learning_rate=1e-4, save_total_limit=2)
    return parse_spec({**base, **overrides})


def upload_overlap(args, work: Path, settings, model: str, train_file: str) -> dict:
    """Train with checkpoints published in the background; each step's time and the upload windows."""
    from dpo_core import Callbacks, train
    from service.artifacts import make_storage
    from worker.publisher import Publisher

    output = work / "run"
    shutil.rmtree(output, ignore_errors=True)
    storage = make_storage(settings)
    done_at: dict[int, float] = {}
    publisher = Publisher(storage, "bench", output, work / "publish", on_done=lambda task: None,
                          new_id=lambda: f"ftckpt-{uuid.uuid4().hex[:24]}",
                          store_factory=functools.partial(make_storage, settings))
    _stamp_answers(publisher, done_at)
    if args.pin:
        _move_off_training(publisher.backend.proc.pid)
    steps: list[tuple[int, float, float]] = []  # (step, start, end)
    submitted: dict[int, float] = {}  # task id -> when the training handed it over
    pauses: list[tuple[float, float]] = []  # (torch.save, staging and hand-over) per checkpoint

    class Timed(Callbacks):
        started = ended = 0.0

        def should_stop(self) -> bool:  # called just before each step
            self.started = time.perf_counter()
            return False

        def on_step(self, step: int, total_steps: int) -> None:
            self.ended = time.perf_counter()
            steps.append((step, self.started, self.ended))
            publisher.poll()  # as the worker's recorder does after every step

        def on_checkpoint(self, step: int, path: str) -> None:
            began, before = time.perf_counter(), publisher._count
            publisher.checkpoint(step, path)
            now = time.perf_counter()
            for task_id in range(before + 1, publisher._count + 1):
                submitted[task_id] = began
            pauses.append((began - self.ended, now - began))

    store_cpu = _cpu_seconds(args.store_pid)
    try:
        train(_spec(args, model, train_file, output), Timed())
        publisher.drain()
        upload_cpu = _cpu_seconds(publisher.backend.proc.pid)
    finally:
        publisher.close()
    if store_cpu is not None:
        store_cpu = _cpu_seconds(args.store_pid) - store_cpu
    busy = [(submitted[t], done_at[t]) for t in sorted(submitted)]
    classes = _classify(steps, busy)
    upload_s = _upload_seconds(busy)
    # The resume measurement starts from the checkpoint before the last: the run's own spec then has steps left.
    last = max(s for s in (int(p.name.split("-")[1]) for p in output.glob("checkpoint-*")) if s < args.steps)
    ckpt_dir = output / f"checkpoint-{last}"
    return {
        "checkpoint_bytes": sum(f.stat().st_size for f in ckpt_dir.rglob("*") if f.is_file()),
        "step_counts": {k: len(v) for k, v in classes.items()},
        "median_step_s": {k: statistics.median(v) if v else None for k, v in classes.items()},
        "ratio": (statistics.median(classes["upload"]) / statistics.median(classes["quiet"])
                  if classes["upload"] and classes["quiet"] else None),
        "upload_s": upload_s,
        "save_s": [round(a, 4) for a, _ in pauses], "handover_s": [round(b, 4) for _, b in pauses],
        # CPU seconds over the whole run: the upload process's (the worker's own cost), and the store server's
        # when it runs on this machine (a deployment's store takes none of the worker's CPU).
        "upload_cpu_s": upload_cpu, "store_cpu_s": store_cpu,
        "last_checkpoint": {"step": last, "dir": str(ckpt_dir), "key": f"jobs/bench/checkpoint-{last}"},
    }


def _stamp_answers(publisher, done_at: dict[int, float]) -> None:
    """Note when each upload's answer arrives from the upload process (the training thread only sees it at
    its next poll): at the answers queue's own _put, since its reader thread holds the bound put already."""
    answers = publisher.backend.answers
    put = answers._put

    def stamped(item) -> None:
        if item is not None:
            done_at[item[0]] = time.perf_counter()
        put(item)

    answers._put = stamped


def _classify(steps: list[tuple[int, float, float]], busy: list[tuple[float, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"upload": [], "quiet": [], "partial": []}
    for step, start, end in steps[1:]:  # the first step warms up
        overlap = sum(max(0.0, min(end, b) - max(start, a)) for a, b in busy)
        share = overlap / max(end - start, 1e-9)
        out["upload" if share >= 0.5 else "quiet" if share == 0 else "partial"].append(end - start)
    return out


def _upload_seconds(busy: list[tuple[float, float]]) -> list[float]:
    """Each task's own time in the upload process: from its hand-over, or the previous task's end if later."""
    out, previous_end = [], 0.0
    for submitted, done in busy:
        out.append(round(done - max(submitted, previous_end), 3))
        previous_end = done
    return out


def resume_times(args, work: Path, settings, model: str, train_file: str, last: dict) -> dict:
    """Fetch the last checkpoint from each store into a fresh directory and start a run that resumes from
    it, until its first step would begin."""
    from service.artifacts import LocalStorage, make_storage

    stores = {"s3": make_storage(settings), "local": LocalStorage(work / "local-store")}
    stores["local"].publish_dir(Path(last["dir"]), last["key"], "bench")  # the S3 copy is the publisher's
    times: dict[str, dict[str, list[float]]] = {name: {"fetch_s": [], "ready_s": []} for name in stores}
    _ready(args, model, train_file, work / "warm", None)  # imports and first-use costs, in neither figure
    for i in range(args.repeats):
        for name, store in stores.items():
            output = work / f"resume-{name}-{i}"
            shutil.rmtree(output, ignore_errors=True)
            began = time.perf_counter()
            store.fetch_dir(last["key"], output / f"checkpoint-{last['step']}")
            fetched = time.perf_counter()
            times[name]["fetch_s"].append(round(fetched - began, 4))
            times[name]["ready_s"].append(round(_ready(args, model, train_file, output, last["step"]), 4))
            shutil.rmtree(output, ignore_errors=True)
    return {name: {**t, "total_s": round(statistics.median(a + b for a, b in zip(t["fetch_s"], t["ready_s"])), 4)}
            for name, t in times.items()}


def _ready(args, model: str, train_file: str, output: Path, step: int | None) -> float:
    """Seconds from train() to the moment its first step would start (then it stops)."""
    from dpo_core import Callbacks, train

    class StopAtFirstStep(Callbacks):
        at = None

        def should_stop(self) -> bool:
            self.at = self.at or time.perf_counter()
            return True

    stop = StopAtFirstStep()
    began = time.perf_counter()
    train(_spec(args, model, train_file, output, resume_from="auto" if step else None), stop)
    if stop.at is None:
        raise SystemExit("the resumed run never reached a step")
    return stop.at - began


def _move_off_training(pid: int) -> None:
    """Every thread of process `pid` onto the cores other than the training's (threads it starts later
    inherit it)."""
    others = (os.sched_getaffinity(pid) | set(range(os.cpu_count() or 1))) - {TRAIN_CPU}
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), others)


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a live process (Linux /proc); None without one."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def report(r: dict) -> str:
    med, n = r["median_step_s"], r["step_counts"]
    ratio = f"{r['ratio']:.3f}x" if r["ratio"] is not None else "n/a (a class is empty)"
    lines = [
        f"store: {r['store']}; model {r['model']}, checkpoint {r['checkpoint_bytes'] / 1e6:.1f} MB every "
        f"{r['save_steps']} steps, {r['steps']} steps, batch {r['batch_size']} x {r['max_length']} tokens, "
        f"{r['torch_threads']} torch threads{' on a core of their own' if r.get('pinned') else ''}; load average "
        f"{r['uptime']}",
        f"uploads: {', '.join(f'{s:.2f}' for s in r['upload_s'])} s each; a checkpoint pauses the training "
        f"{statistics.median(r['save_s']):.3f} s (torch.save) + {statistics.median(r['handover_s']):.3f} s "
        f"(staging) at the median; CPU seconds in all: upload process {_cpu(r['upload_cpu_s'])}, store server "
        f"{_cpu(r['store_cpu_s'])}",
        f"step time: {_s(med['upload'])} with an upload running ({n['upload']} steps), {_s(med['quiet'])} with "
        f"none ({n['quiet']} steps), {n['partial']} partly: {ratio}",
    ]
    for name in ("local", "s3"):
        t = r["resume"][name]
        lines.append(f"resume from {name}: fetch {statistics.median(t['fetch_s']):.3f} s + ready to train "
                     f"{statistics.median(t['ready_s']):.3f} s = {t['total_s']:.3f} s (median of {len(t['fetch_s'])})")
    return "\n".join(lines)


def _cpu(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.0f} ms"


if __name__ == "__main__":
    main()
