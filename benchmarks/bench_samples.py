"""What training.samples costs: the share of a job's time spent generating and scoring samples.

    .venv/bin/python benchmarks/bench_samples.py                 # the default setting (docs/performance.md)
    .venv/bin/python benchmarks/bench_samples.py --steps 4 --eval-steps 2 --max-length 96   # smoke test

Trains the bench-20m Llama (benchmarks/workload.py: the model and pairs bench_trainer.py uses) with
`samples` at its defaults (4 prompts, 32 new tokens, greedy, at each evaluation, max_share 0.1) and an evaluation every
`--eval-steps` steps, and prints the seconds the samples took (their summaries' samples/seconds: step 0's
reference completions, the reward model's loading if any, each later step's generation and scoring) over
the whole train() call's wall time.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks import machine, workload  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--eval-steps", type=int, default=10, help="an evaluation (and samples) every this many steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-share", type=float, default=None, help="samples.max_share (default: its default, 0.1)")
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default="/tmp/bench-samples")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    described = machine.describe()
    print(described, flush=True)
    record = {"machine": described, **run(args)}
    print(f"steps {args.steps}, evaluation and samples every {args.eval_steps}, batch {args.batch_size}, "
          f"max_length {args.max_length}: job {record['job_s']:.2f} s, samples {record['samples_s']:.2f} s "
          f"at steps {record['sample_steps']}: {100 * record['share']:.2f}% of the job's time")
    if args.json:
        Path(args.json).write_text(json.dumps(record))
    return record


def run(args) -> dict:
    from dpo_core import Callbacks, parse_spec, train

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model = workload.build_model(work, args.max_length)
    rows = workload.make_rows(args.steps * args.batch_size + 16, args.max_length)
    train_file = workload.write_jsonl(work / "train.jsonl", rows[16:])
    eval_file = workload.write_jsonl(work / "eval.jsonl", rows[:16])
    seen: list[dict] = []

    class Summaries(Callbacks):
        def on_samples(self, step, records, summary):
            seen.append(summary)

    spec = parse_spec(dict(model=model, train_file=train_file, validation_file=eval_file,
                           output_dir=str(work / "run"), max_steps=args.steps, eval_steps=args.eval_steps,
                           batch_size=args.batch_size, max_length=args.max_length, device=args.device,
                           samples={} if args.max_share is None else {"max_share": args.max_share}))
    started = time.perf_counter()
    train(spec, Summaries())
    job_s = time.perf_counter() - started
    samples_s = sum(s["samples/seconds"] for s in seen)
    return {"job_s": job_s, "samples_s": samples_s, "share": samples_s / job_s,
            "sample_steps": [s["step"] for s in seen], "samples": seen}


if __name__ == "__main__":
    main()
