"""Where a dpo_core training step spends its time: torch.profiler over a few steps of the benchmark workload.

    .venv/bin/python benchmarks/profile_step.py                       # bench-20m on this CPU, fp32
    python benchmarks/profile_step.py --gpu-model --precision bf16     # the 0.5B model of bench_gpu.py on a GPU

Trains dpo_core on the same model and data as bench_trainer.py (or bench_gpu.py with --gpu-model), lets
`--skip` steps warm up, profiles the next `--profile` steps and prints the operators that took the most
time (CUDA time on a GPU, CPU time otherwise), plus the wall time of each profiled step.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_trainer as bt  # noqa: E402


class Profiled:
    """dpo_core callbacks that run torch.profiler over steps skip+1 .. skip+count."""

    def __init__(self, skip: int, count: int):
        import torch

        from dpo_core import Callbacks

        self.skip, self.count, self.step, self.times = skip, count, 0, []
        cuda = torch.cuda.is_available()
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.prof = torch.profiler.profile(activities=activities)
        outer = self

        class CB(Callbacks):
            def should_stop(self):
                outer.begin()
                return False

            def on_step(self, step, total_steps):
                outer.end()

        self.callbacks = CB()

    def _sync(self):
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def begin(self):
        self._sync()
        if self.step == self.skip:
            self.prof.start()
        self.t = time.perf_counter()

    def end(self):
        self._sync()
        self.step += 1
        if self.skip < self.step <= self.skip + self.count:
            self.times.append(time.perf_counter() - self.t)
        if self.step == self.skip + self.count:
            self.prof.stop()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu-model", action="store_true", help="the ~0.5B model of bench_gpu.py instead of bench-20m")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip", type=int, default=2)
    p.add_argument("--profile", type=int, default=3)
    p.add_argument("--rows", type=int, default=30, help="operators to print")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="extra TrainingSpec fields")
    p.add_argument("--work-dir", default=str(HERE.parent / ".dpo-data" / "profile"))
    args = p.parse_args(argv)

    import torch

    from dpo_core import train
    from dpo_core.spec import TrainingSpec, apply_overrides

    build = workload_model(args.gpu_model)
    steps = args.skip + args.profile
    w = bt.prepare(Path(args.work_dir), args.max_length, args.batch_size, steps, seed=0, build_model=build)
    extra = apply_overrides({}, args.set)  # as dpo-train --set: nested keys, 1e-4 a number
    spec = TrainingSpec(model=w.model, train_file=w.original_file, output_dir=str(Path(args.work_dir) / "run"),
                        max_length=args.max_length, max_prompt_length=None, batch_size=args.batch_size,
                        max_steps=steps, learning_rate=5e-6, loss={"type": "sigmoid", "beta": 0.1},
                        precision=args.precision, logging_steps=1, **extra)
    profiled = Profiled(args.skip, args.profile)
    train(spec, profiled.callbacks)
    key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(profiled.prof.key_averages().table(sort_by=key, row_limit=args.rows))
    tokens = w.step_tokens[args.skip:]
    print("profiled steps:", " ".join(f"{t:.3f} s ({n / t:,.0f} tok/s)" for t, n in zip(profiled.times, tokens)))


def workload_model(gpu: bool):
    if gpu:
        import bench_gpu

        return bench_gpu.build_model
    import workload

    return workload.build_model


if __name__ == "__main__":
    main()
