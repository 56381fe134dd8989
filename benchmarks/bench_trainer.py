"""dpo_core against TRL's DPOTrainer: tokens/s, peak memory and the loss curve, on one model and one data order.

    .venv/bin/python benchmarks/bench_trainer.py --quick             # smoke test, about two minutes
    .venv/bin/python benchmarks/bench_trainer.py                     # the default setting (see docs/performance.md)
    .venv/bin/python benchmarks/bench_trainer.py --reference-mode precomputed --precision bf16

Both contenders train the bench-20m Llama (32k vocabulary) on the same pairs, in the same order, with the
same batch size (no accumulation), max_length, learning rate, beta, steps and precision; everything else
is each trainer's default (TRL's DPOConfig turns gradient checkpointing on; --checkpointing-rows adds
each with the other's setting). Every contender is a fresh process, so peak resident memory (VmHWM)
belongs to one contender. By default the processes of a round are alive together and take their steps
in turn (TRL step 1, ours step 1, ..., TRL step 2, ...), so load from other users of the machine falls on
all of them alike; --sequential runs them one after another instead. Tokens are the non-padding tokens of
the chosen and rejected sequences, counted from the data the same way for both; only the steps are timed,
and the first (warm-up) step is left out. A reference model pass is part of every step in `model` mode; in
`precomputed` mode its one-off pass is reported too ("incl. ref precompute", over all steps).

Throughput is given per wall-clock second, as the median over steps of each step's tokens/s, and per CPU
second of the process. Ratios are medians over repeats of ours / TRL within the same round; "paired
steps" is the median over every step k >= 2 of every round of TRL's time for step k over ours (the same
batch, run back to back in lockstep): the steadiest figure on a busy machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

import machine  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
import workload  # noqa: E402
from contenders import Job  # noqa: E402


@dataclass
class Contender:
    label: str
    contender: str  # "trl" | "dpo_core"
    precision: str
    reference_mode: str
    ours: dict
    trl: dict | None = None
    pythonpath: str | None = None  # import dpo_core from this checkout instead of this repo (A/B of a patch)


@dataclass
class Workload:
    model: str
    original_file: str  # what dpo_core reads; it orders the rows itself
    ordered_file: str  # the same rows in dpo_core's training order, for TRL to read front to back
    step_tokens: list  # non-padding tokens of each step, counted from the data
    step_lengths: list  # the length of every sequence of each step (chosen and rejected), for FLOP counts


def prepare(work_dir: Path, max_length: int, batch_size: int, steps: int, seed: int,
            build_model=workload.build_model) -> Workload:
    """Model, data, and the training order dpo_core will use, replayed for TRL."""
    from dpo_core.batching import epoch_order, row_length
    from dpo_core.data import read_jsonl
    from dpo_core.tokenizer_loading import load_tokenizer
    from dpo_core.tokenize import tokenize

    model = build_model(work_dir, max_length)
    rows = workload.make_rows(steps * batch_size, max_length, seed=seed)
    original = workload.write_jsonl(work_dir / f"pairs-{max_length}-{len(rows)}.jsonl", rows)
    tokenized = tokenize(read_jsonl(original), load_tokenizer(model), max_length=max_length, max_prompt_length=None)
    if len(tokenized.rows) != len(rows):
        raise SystemExit(f"{len(rows) - len(tokenized.rows)} rows do not fit max_length={max_length}; fix the generator")
    # dpo_core's defaults: seed 42, length-grouped batches. One epoch holds exactly `steps` batches.
    order = epoch_order([row_length(r) for r in tokenized.rows], batch_size, 42, 0, True)
    ordered_rows = [rows[i] for batch in order for i in batch]
    ordered = workload.write_jsonl(work_dir / f"pairs-{max_length}-{len(rows)}-ordered.jsonl", ordered_rows)
    step_tokens = [sum(workload.pair_tokens(rows[i], max_length) for i in batch) for batch in order]
    step_lengths = [[n for i in batch for n in workload.sequence_tokens(rows[i], max_length)] for batch in order]
    return Workload(model, original, ordered, step_tokens, step_lengths)


class Child:
    """One contender's training process. With `baton`, it runs its steps only when handed turns."""

    def __init__(self, c: Contender, w: Workload, args, work_dir: Path, tag: str, baton: bool):
        self.c, self.w, self.tag = c, w, tag
        self.out = work_dir / "runs" / tag
        shutil.rmtree(self.out, ignore_errors=True)  # dpo_core appends to metrics.jsonl: start clean
        job = Job(
            contender=c.contender,
            model=w.model,
            train_file=w.ordered_file if c.contender == "trl" else w.original_file,
            output_dir=str(self.out),
            max_length=args.max_length,
            batch_size=args.batch_size,
            steps=args.steps,
            learning_rate=args.learning_rate,
            beta=args.beta,
            precision=c.precision,
            reference_mode=c.reference_mode,
            device=getattr(args, "device", "cpu"),
            ours=c.ours,
            trl=c.trl or {},
        )
        # Keep an inherited PYTHONPATH last: wheels installed beside the system's packages.
        path = ":".join(x for x in (c.pythonpath, str(REPO), os.environ.get("PYTHONPATH")) if x)
        env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.log = work_dir / "logs" / f"{tag}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.stdout = self.log.with_suffix(".out")
        fds = ()
        if baton:
            go_r, self.go = os.pipe()
            self.done, done_w = os.pipe()
            env["BENCH_BATON"], fds = f"{go_r},{done_w}", (go_r, done_w)
        self.load_before = os.getloadavg()[0]
        with self.log.open("w") as err, self.stdout.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "contenders.py"), json.dumps(asdict(job))],
                stdout=out, stderr=err, env=env, cwd=c.pythonpath or REPO, pass_fds=fds,
            )
        for fd in fds:
            os.close(fd)  # the child's ends

    def expect(self, byte: bytes) -> None:
        got = os.read(self.done, 1)
        if got != byte:
            self.proc.wait()
            raise SystemExit(f"{self.c.label} failed (exit {self.proc.returncode}); see {self.log}")

    def turn(self) -> None:
        """Let the child run one step and wait until it has."""
        os.write(self.go, b"g")
        self.expect(b"d")

    def finish(self) -> dict:
        code = self.proc.wait()
        lines = [line for line in self.stdout.read_text().splitlines() if line.startswith("RESULT ")]
        if code or not lines:
            raise SystemExit(f"{self.c.label} failed (exit {code}); see {self.log}")
        r = json.loads(lines[-1].removeprefix("RESULT "))
        r.update(label=self.c.label, load_before=self.load_before, load_after=os.getloadavg()[0])
        r.update(_figures(r, self.w.step_tokens))
        if self.c.contender == "dpo_core":
            r["own_num_tokens"] = _own_tokens(self.out)
        return r


def run_one(c: Contender, w: Workload, args, work_dir: Path, tag: str) -> dict:
    """Train one contender alone in a fresh process; return its RESULT record plus derived figures."""
    return Child(c, w, args, work_dir, tag, baton=False).finish()


def run_lockstep(plan: list[Contender], w: Workload, args, work_dir: Path, rep: int) -> list[dict]:
    """Every contender in its own process, all alive at once, taking training steps in turn."""
    entries = [(c, w, args, f"{c.label.replace(' ', '-')}-{rep}") for c in plan]
    return lockstep(entries, args.steps, work_dir)


def lockstep(entries: list[tuple], steps: int, work_dir: Path) -> list[dict]:
    """Run (contender, workload, settings, tag) entries as processes that take their steps in turn.

    Set-up runs one process at a time (a reference precompute is timed without a neighbour); then
    step k of every process runs before step k+1 of any, so a burst of outside load hits all alike.
    """
    children = []
    try:
        for c, w, args, tag in entries:
            children.append(Child(c, w, args, work_dir, tag, baton=True))
            children[-1].expect(b"r")
        for _ in range(steps):
            for child in children:
                child.turn()
        return [child.finish() for child in children]
    finally:
        # After finish() every child has exited. On a failure, closing the pipes makes a waiting child quit.
        for child in children:
            os.close(child.go)
            os.close(child.done)
        for child in children:
            try:
                child.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.proc.terminate()
                child.proc.wait()


def _figures(r: dict, step_tokens: list) -> dict:
    """tokens/s over steps 2..N (wall and CPU), and over all steps with any reference precompute added."""
    if len(r["wall"]) != len(step_tokens):
        raise SystemExit(f"{r['label']}: {len(r['wall'])} steps timed, expected {len(step_tokens)}")
    steady = sum(step_tokens[1:])
    wall, cpu = r["wall"][-1] - r["wall"][0], r["cpu"][-1] - r["cpu"][0]
    return {
        "tokens_per_s": steady / wall,
        "tokens_per_cpu_s": steady / cpu,
        "tokens_per_s_with_precompute": sum(step_tokens) / (r["wall"][-1] + r["precompute_s"]),
        "step_s_median": statistics.median(b - a for a, b in zip(r["wall"], r["wall"][1:])),
        # Robust to a neighbour's burst of work: the median over steps 2..N of that step's tokens/s.
        "tokens_per_s_median_step": statistics.median(
            n / (b - a) for n, a, b in zip(step_tokens[1:], r["wall"], r["wall"][1:])
        ),
    }


def _own_tokens(out: Path) -> int | None:
    """dpo_core's own num_tokens at the last step: a cross-check of the count made from the data."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return next((r["num_tokens"] for r in reversed(records) if "num_tokens" in r), None)


def row_contender(row: str, precision: str, reference_mode: str, ours: dict) -> Contender:
    """A dpo_core contender from --row 'LABEL:FIELD=VALUE,...' (values read as YAML)."""
    label, _, fields = row.partition(":")
    extra = {k: yaml.safe_load(v) for k, v in (f.split("=", 1) for f in fields.split(",") if f)}
    return Contender(label, "dpo_core", precision, reference_mode, {**ours, **extra})


def contenders(args) -> list[Contender]:
    ours = {"logprob_chunk_size": args.chunk_size} if args.chunk_size else {}
    main = [
        Contender("TRL", "trl", args.precision, args.reference_mode, {}),
        Contender("dpo_core", "dpo_core", args.precision, args.reference_mode, ours),
    ]
    if args.skip_trl:
        main = main[1:]
    for path in args.candidate or []:
        main.append(Contender(f"dpo_core@{Path(path).name}", "dpo_core", args.precision, args.reference_mode, ours,
                              pythonpath=str(Path(path).resolve())))
    main += [row_contender(row, args.precision, args.reference_mode, ours) for row in args.row or []]
    if args.checkpointing_rows:
        # TRL's DPOConfig turns gradient checkpointing on by default, dpo_core's spec leaves it off:
        # these rows compare each with the other's setting.
        main += [
            Contender("TRL no grad-ckpt", "trl", args.precision, args.reference_mode, {}, {"gradient_checkpointing": False}),
            Contender("dpo_core grad-ckpt", "dpo_core", args.precision, args.reference_mode, {**ours, "gradient_checkpointing": True}),
        ]
    if args.no_extra_rows:
        return main
    extra = []
    if args.reference_mode != "precomputed":
        extra.append(Contender("dpo_core precomputed", "dpo_core", args.precision, "precomputed", ours))
    if args.precision != "bf16":
        extra.append(Contender("dpo_core bf16", "dpo_core", "bf16", args.reference_mode, ours))
    return main + extra


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def report(results: list[dict], order: list[str], args) -> str:
    """The markdown table and the loss comparison."""
    by = {label: [r for r in results if r["label"] == label] for label in order}
    trl = by[order[0]]  # the baseline: TRL, or the first dpo_core row with --skip-trl
    lines = [
        "| contender | tokens/s (wall) | median-step tokens/s | tokens/CPU-s | incl. ref precompute | peak RSS MiB "
        f"| × {order[0]} tokens/s | × median-step | × paired steps | × CPU | RSS / {order[0]} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, runs in by.items():
        ratio = statistics.median(r["tokens_per_s"] / t["tokens_per_s"] for r, t in zip(runs, trl))
        step_ratio = statistics.median(
            r["tokens_per_s_median_step"] / t["tokens_per_s_median_step"] for r, t in zip(runs, trl)
        )
        paired = statistics.median(x for r, t in zip(runs, trl) for x in _paired_step_ratios(r, t))
        cpu_ratio = statistics.median(r["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for r, t in zip(runs, trl))
        rss = statistics.median(r["peak_rss"] for r in runs)
        rss_ratio = statistics.median(r["peak_rss"] / t["peak_rss"] for r, t in zip(runs, trl))
        lines.append(
            f"| {label} | {statistics.median(r['tokens_per_s'] for r in runs):,.0f} "
            f"| {statistics.median(r['tokens_per_s_median_step'] for r in runs):,.0f} "
            f"| {statistics.median(r['tokens_per_cpu_s'] for r in runs):,.0f} "
            f"| {statistics.median(r['tokens_per_s_with_precompute'] for r in runs):,.0f} "
            f"| {_mib(rss)} | {ratio:.2f} | {step_ratio:.2f} | {paired:.2f} | {cpu_ratio:.2f} | {rss_ratio:.2f} |"
        )
    lines += ["", "Each run (wall tokens/s, median step s, peak RSS MiB, load average before/after):"]
    for r in results:
        lines.append(
            f"  {r['label']:<22} {r['tokens_per_s']:8,.0f} tok/s  {r['step_s_median']:6.2f} s/step  "
            f"{_mib(r['peak_rss']):>6} MiB  load {r['load_before']:.1f}/{r['load_after']:.1f}"
            + (f"  own num_tokens {r['own_num_tokens']}" if "own_num_tokens" in r else "")
        )
    lines += ["", _loss_table(by, args)]
    return "\n".join(lines)


def _durations(r: dict) -> list[float]:
    wall = [0.0, *r["wall"]]
    return [b - a for a, b in zip(wall, wall[1:])]


def _paired_step_ratios(r: dict, base: dict) -> list[float]:
    """base step time / this step time, step by step (2..N): both trained the same batch at step k, and in
    lockstep they ran one right after the other, under the same outside load."""
    return [b / x for x, b in zip(_durations(r)[1:], _durations(base)[1:])]


def _loss_table(by: dict, args) -> str:
    n = min(20, args.steps)
    base = next(iter(by))
    trl = by[base][0]["losses"][:n]
    out = [f"Loss over the first {n} steps, first repeat (max |diff| vs {base}):"]
    for label, runs in by.items():
        losses = runs[0]["losses"][:n]
        diff = max(abs(a - b) for a, b in zip(losses, trl))
        out.append(f"  {label:<22} max |Δ| = {diff:.2e}   " + " ".join(f"{x:.5f}" for x in losses))
    return "\n".join(out)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    """The settings both contenders share (bench_gpu.py uses them too)."""
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="preference pairs per step (no accumulation)")
    p.add_argument("--learning-rate", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_workload_args(p)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reference-mode", choices=["model", "precomputed"], default="model", help="for both contenders")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds of every contender")
    p.add_argument("--chunk-size", type=int, default=None, help="dpo_core logprob_chunk_size (default: its own)")
    p.add_argument("--no-extra-rows", action="store_true", help="skip dpo_core precomputed / bf16 rows")
    p.add_argument("--checkpointing-rows", action="store_true",
                   help="add TRL without gradient checkpointing (its default is on) and dpo_core with it (default off)")
    p.add_argument("--sequential", action="store_true",
                   help="run contenders one after another instead of alternating their steps (lockstep)")
    p.add_argument("--skip-trl", action="store_true", help="dpo_core rows only; ratios are to the first of them")
    p.add_argument("--candidate", action="append", metavar="PATH",
                   help="also run dpo_core imported from PATH (a checkout with a patch), e.g. to A/B a change")
    p.add_argument("--row", action="append", metavar="LABEL:FIELD=VALUE,...",
                   help="also run dpo_core with these TrainingSpec fields, e.g. 'shared prompt:share_prompt=true'")
    p.add_argument("--quick", action="store_true", help="smoke test: max_length 128, batch 4, 6 steps, 1 repeat")
    p.add_argument("--work-dir", default=str(REPO / ".dpo-data" / "bench"))
    p.add_argument("--json", default=None, help="also write every run's record here")
    args = p.parse_args(argv)
    if args.quick:
        args.max_length, args.batch_size, args.steps, args.repeats = 128, 4, 6, 1
    if args.steps < 2:
        p.error("--steps must be at least 2: the first step is warm-up and is not timed")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    work_dir = Path(args.work_dir)
    w = prepare(work_dir, args.max_length, args.batch_size, args.steps, seed=0)
    plan = contenders(args)
    described = machine.describe()
    print(described, flush=True)
    print(f"{len(plan)} contenders x {args.repeats} repeats; {sum(w.step_tokens):,} tokens in {args.steps} steps; "
          f"max_length {args.max_length}, batch {args.batch_size} pairs, {args.precision}, reference {args.reference_mode}",
          flush=True)
    results = []
    for rep in range(args.repeats):
        started = time.perf_counter()
        if args.sequential:
            rows = [run_one(c, w, args, work_dir, tag=f"{c.label.replace(' ', '-')}-{rep}") for c in plan]
        else:
            rows = run_lockstep(plan, w, args, work_dir, rep)
        results += rows
        for r in rows:
            print(f"  [{rep}] {r['label']:<22} {r['tokens_per_s']:8,.0f} tok/s  {_mib(r['peak_rss']):>6} MiB", flush=True)
        print(f"  round {rep} took {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(report(results, [c.label for c in plan], args))
    if args.json:
        record = {"machine": described, "args": vars(args), "step_tokens": w.step_tokens, "runs": results}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
