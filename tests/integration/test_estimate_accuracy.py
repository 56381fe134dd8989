"""Integration: the estimate against real CPU runs. One run calibrates the time; a run of another model
size must then take within ±25% of the estimated seconds, and peak within ±20% of the estimated memory
(its process's peak RSS, as a CPU worker measures it). Each training runs in a process of its own, as a
worker's job does.

The two runs step in turn, on one thread each, so that load from other processes slows both alike, and
`make test` runs `timing` tests alone after the parallel run.
"""
from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from dpo_core import estimate
from dpo_core.spec import TrainingSpec

REPO = Path(__file__).resolve().parents[2]
# Two Llamas on the toy tokenizer padded to 8,000 words: the model's fp32 state (weights, reference,
# gradients, AdamW: 16 bytes a parameter) is about 40% of the smaller run's peak RSS, over half the
# larger's; each run takes seconds. One width, two depths: a CPU thread's FLOP rate also moves with the
# matrices' widths (docs/performance.md, Known limits), which no FLOPs count captures.
SMALL = dict(hidden_size=768, num_layers=2, num_heads=12, intermediate_size=2048)  # 26.5M parameters
LARGE = dict(hidden_size=768, num_layers=6, num_heads=12, intermediate_size=2048)  # 54.8M parameters
VOCAB = 8000
TIME_MARGIN, MEMORY_MARGIN = 0.25, 0.20

# A training process that takes each step when told to: it says "ready" and waits for a line on stdin.
TRAIN = r"""
import json, sys
from dataclasses import asdict
import dpo_core
from dpo_core.spec import TrainingSpec

class Lockstep(dpo_core.Callbacks):
    def should_stop(self):
        print("ready", flush=True)
        sys.stdin.readline()
        return False

result = dpo_core.train(TrainingSpec.model_validate_json(sys.argv[1]), Lockstep())
print(json.dumps(asdict(result)), flush=True)
"""


@dataclass
class Run:
    spec: TrainingSpec
    facts: estimate.ModelFacts
    result: object


def _rows(path: Path, n: int, seed: int = 0) -> None:
    """Preference rows of number words: a 40-word prompt, 24-word completions (about 67 tokens a sequence)."""
    from dpo_core.toy import NUMBER_WORDS

    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(NUMBER_WORDS) for _ in range(k))  # noqa: E731
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": f"sort : {words(40)}", "chosen": " " + words(24),
                                "rejected": " " + words(24)}) + "\n")


def data_report(spec: TrainingSpec) -> dict:
    """The FileReport fields the estimate reads, from the rows as the trainer tokenizes them."""
    from dpo_core.data import read_jsonl
    from dpo_core.tokenizer_loading import load_tokenizer
    from dpo_core.tokenize import tokenize

    rows = tokenize(read_jsonl(spec.train_file), load_tokenizer(spec.model), max_length=spec.max_length,
                    max_prompt_length=spec.max_prompt_length).rows
    lengths = {part: [len(getattr(r, f"{part}_ids")) for r in rows] for part in ("prompt", "chosen", "rejected")}
    summary = estimate.epoch_summary(rows)
    return {"training_file": {
        "rows_used": len(rows), "tokens": {"total": summary["tokens"], "longest_sequence": summary["longest_sequence"]},
        "lengths": {part: {"p50": int(statistics.median(v))} for part, v in lengths.items()},
    }}


def _spec(tmp: Path, name: str, shape: dict, steps: int) -> TrainingSpec:
    from dpo_core.toy import build_model

    model = build_model(tmp / name, vocab_size=VOCAB, **shape)
    return TrainingSpec(model=model, train_file=str(tmp / "train.jsonl"), output_dir=str(tmp / f"out-{name}"),
                        batch_size=4, max_steps=steps, max_length=128, device="cpu", logging_steps=steps)


def _start(spec: TrainingSpec) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    log = Path(spec.output_dir).with_suffix(".log").open("w")
    return subprocess.Popen([sys.executable, "-c", TRAIN, spec.model_dump_json()], cwd=REPO, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)


def _step(proc: subprocess.Popen) -> None:
    """Let `proc` take one step, once it is ready for it."""
    line = proc.stdout.readline()
    assert line == "ready\n", f"the training process said {line!r} (exit code {proc.poll()})"
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _result(proc: subprocess.Popen):
    from dpo_core.trainer import TrainResult

    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"the training process failed (exit code {proc.returncode}); see its .log"
    return TrainResult(**json.loads(out.strip().splitlines()[-1]))


def train_in_lockstep(specs: list[TrainingSpec]) -> list[Run]:
    """Train each spec in a process of its own, one step at a time in turn (spread evenly by their step
    counts), one thread each: a neighbour loading the machine slows them alike, and none slows another."""
    procs = [_start(spec) for spec in specs]
    order = sorted(((i + 0.5) / spec.max_steps, k) for k, spec in enumerate(specs) for i in range(spec.max_steps))
    taken = [0] * len(specs)
    results = {}
    for _, k in order:
        _step(procs[k])
        taken[k] += 1
        if taken[k] == specs[k].max_steps:  # its last step: let it finish before the others go on
            results[k] = _result(procs[k])
    return [Run(spec, estimate.model_facts(spec.model), results[k]) for k, spec in enumerate(specs)]


@pytest.mark.timing
@pytest.mark.slow
def test_after_one_calibrating_run_the_estimate_of_another_size_holds(tmp_path):
    _rows(tmp_path / "train.jsonl", 64)
    small, large = train_in_lockstep([_spec(tmp_path, "small", SMALL, steps=12),
                                      _spec(tmp_path, "large", LARGE, steps=5)])
    report = data_report(large.spec)
    calibration = [{**estimate.measured(small.spec, small.result, "cpu", 1, small.facts), "job_id": "ftjob-small"}]
    plan = estimate.training_plan(large.spec, large.facts, report)
    assert (plan["steps"], plan["tokens"]) == (large.result.global_step, large.result.trained_tokens)
    assert plan["parameters"] == large.result.parameters
    guess = estimate.seconds(plan, calibration, "cpu")
    assert (guess["basis"], guess["calibrated_by"]) == ("calibrated", ["ftjob-small"])
    peak = estimate.memory(large.spec, large.facts, report, "cpu")["total"]
    time_error = guess["seconds"] / large.result.train_seconds - 1
    memory_error = peak / large.result.peak_memory_bytes - 1
    print(f"time: estimated {guess['seconds']:.2f} s, took {large.result.train_seconds:.2f} s ({time_error:+.1%}); "
          f"memory: estimated {peak / 2**20:,.0f} MiB, peak RSS {large.result.peak_memory_bytes / 2**20:,.0f} MiB "
          f"({memory_error:+.1%})")
    assert abs(time_error) <= TIME_MARGIN
    assert abs(memory_error) <= MEMORY_MARGIN
