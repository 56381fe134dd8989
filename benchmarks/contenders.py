"""One benchmark contender, run in a fresh process so that its peak memory is its own.

    python benchmarks/contenders.py '<json job>'     (bench_trainer.py starts it; not meant for people)

The job names the contender ("trl" or "dpo_core"), the model, the data file (already in training
order) and the shared hyperparameters. The process trains, then prints one line `RESULT <json>`:
how long each optimizer step took (wall clock and process CPU time), the loss of each step, the
seconds spent precomputing reference log-probs, and resident memory (VmHWM: the peak over the
whole process, model loading included). Only the steps are timed, so loading is left out; tokens
are counted by the caller, from the data.

Lockstep: with BENCH_BATON="<go fd>,<done fd>" in the environment, the process writes "r" once it is
ready to take its first step, then before every step waits for a byte on <go fd> and after it writes
"d" to <done fd>. bench_trainer.py uses this to alternate contenders step by step, so that they share
the same background load on a busy machine; time spent waiting is not counted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import psutil


@dataclass
class Job:
    contender: str  # "trl" | "dpo_core"
    model: str
    train_file: str
    output_dir: str
    max_length: int
    batch_size: int
    steps: int
    learning_rate: float
    beta: float
    precision: str  # "fp32" | "bf16"
    reference_mode: str  # "model" | "precomputed"
    seed: int = 42
    device: str = "cpu"  # "cuda" for the GPU comparison (bench_gpu.py)
    ours: dict = field(default_factory=dict)  # extra TrainingSpec fields for dpo_core (chunk size, ...)
    # Extra DPOConfig fields for TRL (gradient_checkpointing, ...); "peft_config" holds a LoraConfig's fields
    # instead, for DPOTrainer (dpo_core takes its LoRA as the `lora` field in `ours`).
    trl: dict = field(default_factory=dict)


class Baton:
    """Turn-taking with the parent (see the module docstring); does nothing without BENCH_BATON."""

    def __init__(self):
        fds = os.environ.get("BENCH_BATON")
        self.go, self.done = (int(x) for x in fds.split(",")) if fds else (None, None)
        self.ready = False

    def wait(self) -> None:
        if self.go is None:
            return
        if not self.ready:
            os.write(self.done, b"r")
            self.ready = True
        if os.read(self.go, 1) != b"g":
            raise SystemExit("the benchmark parent went away")

    def release(self) -> None:
        if self.done is not None:
            os.write(self.done, b"d")


@dataclass
class Clock:
    """Cumulative step time (wall clock and CPU) at the end of each step; filled by the trainers' callbacks."""

    wall: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    rss_at_start: int = 0
    precompute_s: float = 0.0

    def __post_init__(self):
        self._baton, self._begin = Baton(), None

    def step_begins(self) -> None:
        _sync()
        self._baton.wait()
        if not self.wall:
            self.rss_at_start = psutil.Process().memory_info().rss
        self._begin = (time.perf_counter(), time.process_time())

    def step_done(self) -> None:
        _sync()  # a GPU step is over when its kernels are, not when Python has queued them
        wall, cpu = time.perf_counter() - self._begin[0], time.process_time() - self._begin[1]
        self.wall.append((self.wall[-1] if self.wall else 0.0) + wall)
        self.cpu.append((self.cpu[-1] if self.cpu else 0.0) + cpu)
        self._baton.release()


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn, clock: Clock):
    """Wrap `fn` so the seconds it takes are added to clock.precompute_s (instrumentation only)."""

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            clock.precompute_s += time.perf_counter() - t

    return wrapper


def _tolerant_dataset_hashing() -> None:
    """datasets names its cache by hashing objects with dill, which can raise PicklingError on pyarrow's
    MonthDayNano type (under Python 3.12.3) and would stop TRL before its first step. A random hash
    there only means no cache reuse; the data and the training are the same."""
    import pickle

    from datasets.fingerprint import Hasher, generate_random_fingerprint

    strict = Hasher.hash.__func__

    def hash_or_random(cls, value):
        try:
            return strict(cls, value)
        except pickle.PicklingError:
            return generate_random_fingerprint()

    Hasher.hash = classmethod(hash_or_random)


def run_trl(job: Job, clock: Clock) -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.step_begins()

        def on_step_end(self, args, state, control, **kw):
            clock.step_done()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                clock.losses.append(float(logs["loss"]))

    _tolerant_dataset_hashing()
    # Counted as reference work: TRL precomputes inside DPOTrainer.__init__.
    DPOTrainer._precompute_ref_logps = _timed(DPOTrainer._precompute_ref_logps, clock)
    rows = [json.loads(line) for line in open(job.train_file)]
    extra = dict(job.trl)
    lora = extra.pop("peft_config", None)
    args = DPOConfig(
        output_dir=job.output_dir,
        per_device_train_batch_size=job.batch_size,
        gradient_accumulation_steps=1,
        max_length=job.max_length,
        learning_rate=job.learning_rate,
        beta=job.beta,
        max_steps=job.steps,
        bf16=job.precision == "bf16",
        precompute_ref_log_probs=job.reference_mode == "precomputed",
        use_cpu=job.device == "cpu",
        seed=job.seed,
        # Same data order as dpo_core: the file is already in its order, so read it front to back.
        train_sampling_strategy="sequential",
        # Not hyperparameters: per-step losses for the comparison, no checkpoints, no progress bar.
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **extra,
    )
    trainer = DPOTrainer(
        model=job.model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(job.model),
        callbacks=[Timer()],
        peft_config=_lora_config(lora) if lora else None,
    )
    trainer.train()


def _lora_config(fields: dict):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", **fields)


def run_dpo_core(job: Job, clock: Clock) -> None:
    from dpo_core import Callbacks, train
    from dpo_core import reference
    from dpo_core.spec import TrainingSpec

    class Timer(Callbacks):
        def should_stop(self):  # dpo_core asks this once before every step
            clock.step_begins()
            return False

        def on_step(self, step, total_steps):
            clock.step_done()

        def on_log(self, metrics):
            clock.losses.append(float(metrics["loss"]))

    reference.PrecomputedReference.compute = classmethod(_timed(reference.PrecomputedReference.compute.__func__, clock))
    spec = TrainingSpec(
        model=job.model,
        train_file=job.train_file,
        output_dir=job.output_dir,
        max_length=job.max_length,
        max_prompt_length=None,  # as TRL 1.16, which has none: the same tokens
        batch_size=job.batch_size,
        max_steps=job.steps,
        learning_rate=job.learning_rate,
        loss={"type": "sigmoid", "beta": job.beta},
        precision=job.precision,
        reference_mode=job.reference_mode,
        seed=job.seed,
        device=job.device,
        logging_steps=1,
        **job.ours,
    )
    train(spec, Timer())


def _peak_rss() -> int:
    """This process's own peak RSS: VmHWM, as ru_maxrss carries the benchmark process's peak over the exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def main() -> None:
    job = Job(**json.loads(sys.argv[1]))
    import torch

    clock = Clock()
    rss_after_imports = psutil.Process().memory_info().rss
    {"trl": run_trl, "dpo_core": run_dpo_core}[job.contender](job, clock)
    result = {k: v for k, v in asdict(clock).items() if not k.startswith("_")}
    result.update(
        contender=job.contender,
        threads=torch.get_num_threads(),
        rss_after_imports=rss_after_imports,
        peak_rss=_peak_rss(),
        peak_gpu=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
        code=sys.modules["dpo_core"].__file__ if "dpo_core" in sys.modules else sys.modules["trl"].__file__,
    )
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
