"""dpo_core at max_length 512 and 2048: tokens/s and peak memory, to check that both scale with length.

    .venv/bin/python benchmarks/bench_scaling.py                  # 512 vs 2048, batch 8 pairs, fp32
    .venv/bin/python benchmarks/bench_scaling.py --quick          # 128 vs 512, batch 2, 4 steps

The data at each length are bench_trainer's, with prompt and completion lengths scaled with max_length,
so a step at 2048 holds about four times the tokens of a step at 512. Each length trains in its own
process and the processes take their steps in turn (see bench_trainer.py for how time, tokens and
memory are measured). Memory is
given as the whole process's peak (VmHWM) and as the part above the resident size at the first step
(the model, its reference copy and the imports are there already; what is added is per-step working memory).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import bench_trainer as bt


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--reference-mode", choices=["model", "precomputed"], default="model")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=None, help="dpo_core logprob_chunk_size (default: its own)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--sequential", action="store_true", help="one length after another instead of alternating steps")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--work-dir", default=str(bt.REPO / ".dpo-data" / "bench"))
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.steps, args.batch_size, args.repeats = [128, 512], 4, 2, 1
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    print(bt.machine.describe(), flush=True)
    work_dir = Path(args.work_dir)
    ours = {"gradient_checkpointing": args.gradient_checkpointing}
    if args.chunk_size:
        ours["logprob_chunk_size"] = args.chunk_size
    contender = bt.Contender("dpo_core", "dpo_core", args.precision, args.reference_mode, ours)
    settings = {}
    for length in args.lengths:
        s = argparse.Namespace(max_length=length, batch_size=args.batch_size, steps=args.steps, learning_rate=5e-6, beta=0.1)
        settings[length] = (s, bt.prepare(work_dir, length, args.batch_size, args.steps, seed=0))
    results = {length: [] for length in args.lengths}
    for rep in range(args.repeats):
        started = time.perf_counter()
        entries = [(contender, w, s, f"scaling-{length}-{rep}") for length, (s, w) in settings.items()]
        if args.sequential:
            rows = [bt.run_one(c, w, s, work_dir, tag) for c, w, s, tag in entries]
        else:
            rows = bt.lockstep(entries, args.steps, work_dir)
        for length, r in zip(settings, rows):
            results[length].append(r)
            print(f"  [{rep}] max_length {length:5d}: {r['tokens_per_s']:7,.0f} tok/s  {bt._mib(r['peak_rss']):>6} MiB",
                  flush=True)
        print(f"  round {rep} took {time.perf_counter() - started:.0f} s", flush=True)
    print()
    print(report(results, settings))


def report(results: dict, settings: dict) -> str:
    base = min(results)
    med = lambda runs, key: statistics.median(r[key] for r in runs)  # noqa: E731
    lines = [
        "| max_length | tokens/step | tokens/s (wall) | median-step tokens/s | tokens/CPU-s | peak RSS MiB "
        "| RSS above step 1 MiB | tokens/s vs shortest | working memory vs shortest |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for length, runs in results.items():
        tokens = statistics.mean(settings[length][1].step_tokens)
        work = med([{"w": r["peak_rss"] - r["rss_at_start"]} for r in runs], "w")
        base_work = med([{"w": r["peak_rss"] - r["rss_at_start"]} for r in results[base]], "w")
        lines.append(
            f"| {length} | {tokens:,.0f} | {med(runs, 'tokens_per_s'):,.0f} | {med(runs, 'tokens_per_s_median_step'):,.0f} "
            f"| {med(runs, 'tokens_per_cpu_s'):,.0f} | {bt._mib(med(runs, 'peak_rss'))} | {bt._mib(work)} "
            f"| {med(runs, 'tokens_per_s_median_step') / med(results[base], 'tokens_per_s_median_step'):.2f} "
            f"| {work / max(base_work, 1):.2f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
