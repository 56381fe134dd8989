"""Diagnostics: a run watches its own metrics for the known ways a preference run goes wrong.

Each detector is a pure function of the records so far (train records as metrics.jsonl holds them,
evaluation records `eval_`-prefixed) that returns its evidence (steps and values) when its pattern
holds, else None. `Diagnostics` feeds them and lets each code fire once per run: a run that stays in a
bad state warns once, never at every log. docs/training.md (Diagnostics) gives each one's source.

Imports no torch: the thresholds are tested on hand-made sequences of records.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Callable

# rewards_both_falling: chosen and rejected rewards both trending down over this many logs. Fewer is
# noise of the batches; the pattern (likelihood displacement) is a trend over a stretch of training.
FALLING_LOGS = 5
# The share of steps between those logs that must go down: one noisy batch may lift a falling series.
FALLING_SHARE = 0.75
# accuracy_saturated: training reward accuracy at or above this...
SATURATED_ACCURACY = 0.98
# ...in each of this many logs in a row (one batch of easy pairs can score 1.0 by chance)...
SATURATED_LOGS = 3
# ...within this fraction of the run's steps ("early": most of the run is still to come)...
SATURATED_EARLY = 0.5
# ...while the margins keep growing across those logs, to at least this: a margin of 1 is a loss below 0.31
# on every pair, so the pairs are told apart already and the model is pushing them further apart for its
# own sake (rewards overfit; beta too high or too many epochs). Below it, an easy task's accuracy of 1
# with small margins is just the sign of the rewards being right.
SATURATED_MARGIN = 1.0
# eval_gap: evaluations in a row whose eval_loss rose; one rise can be the noise of a small validation set.
GAP_EVALS = 3
# grad_norm_spike: a log's gradient norm (before clipping) at least this many times the median of the
# logs before it. Norms wander by a factor of 2-3 in a healthy run; 10x is a batch or a step gone wrong.
SPIKE_FACTOR = 10.0
# Logs needed before a spike can be told from the first steps' settling norms, and how many are looked back at.
SPIKE_HISTORY = 5
SPIKE_WINDOW = 20
# loss_flat: logs after the warm-up to look at...
FLAT_LOGS = 5
# ...in which the loss never got this fraction below its first post-warm-up value. A learning run drops
# its loss by several percent within a handful of logs; a learning rate far too low (or a frozen
# model) leaves the sigmoid loss at ln 2 to the fourth digit.
FLAT_MIN_DROP = 0.01
# length_drift: the latest sampling steps after step 0 (training.samples) to look at: each of them must
# be on the same side of the reference's mean completion length (step 0), a drift that lasts...
DRIFT_SAMPLES = 4
# ...by at least this fraction of the reference's mean length, and at least this many tokens: greedy
# answers to a few prompts move by a token or two as the weights change; answers half as long again (or
# half as short) at every sample are the policy learning a length bias (longer chosen answers in the
# data, or a reward won by length).
DRIFT_CHANGE = 0.5
DRIFT_MIN_TOKENS = 4


@dataclass(frozen=True)
class Diagnostic:
    code: str
    step: int
    message: str  # what was seen and what to try
    data: dict[str, Any]  # the evidence: steps and values


def _values(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float) and math.isfinite(r[key])]


def _falling(values: list[float]) -> bool:
    downs = sum(b < a for a, b in zip(values, values[1:]))
    return values[-1] < values[0] and downs >= FALLING_SHARE * (len(values) - 1)


def _rounded(values: list[float]) -> list[float]:
    return [round(v, 6) for v in values]


def rewards_both_falling(train: list[dict], evals: list[dict], total_steps: int, warmup: int) -> dict | None:
    chosen = _values(train, "rewards/chosen")[-FALLING_LOGS:]
    rejected = _values(train, "rewards/rejected")[-FALLING_LOGS:]
    if len(chosen) < FALLING_LOGS or [s for s, _ in chosen] != [s for s, _ in rejected]:
        return None
    c, r = [v for _, v in chosen], [v for _, v in rejected]
    if c[-1] < 0 and _falling(c) and _falling(r):
        return {"steps": [s for s, _ in chosen], "rewards/chosen": _rounded(c), "rewards/rejected": _rounded(r)}
    return None


def accuracy_saturated(train: list[dict], evals: list[dict], total_steps: int, warmup: int) -> dict | None:
    acc = _values(train, "rewards/accuracies")[-SATURATED_LOGS:]
    margins = _values(train, "rewards/margins")[-SATURATED_LOGS:]
    if len(acc) < SATURATED_LOGS or [s for s, _ in acc] != [s for s, _ in margins]:
        return None
    m = [v for _, v in margins]
    early = acc[-1][0] <= SATURATED_EARLY * total_steps
    growing = all(b > a for a, b in zip(m, m[1:])) and m[-1] >= SATURATED_MARGIN
    if early and growing and all(v >= SATURATED_ACCURACY for _, v in acc):
        return {"steps": [s for s, _ in acc], "rewards/accuracies": _rounded([v for _, v in acc]),
                "rewards/margins": _rounded(m), "total_steps": total_steps}
    return None


def eval_gap(train: list[dict], evals: list[dict], total_steps: int, warmup: int) -> dict | None:
    recent = [(s, v) for s, v in _values(evals, "eval_loss") if s > 0][-GAP_EVALS:]
    losses = _values(train, "loss")
    train_at = [next((v for s2, v in reversed(losses) if s2 <= s), None) for s, _ in recent]
    if len(recent) < GAP_EVALS or None in train_at:
        return None
    e = [v for _, v in recent]
    if all(b > a for a, b in zip(e, e[1:])) and train_at[-1] < train_at[0]:
        return {"steps": [s for s, _ in recent], "eval_loss": _rounded(e), "loss": _rounded(train_at)}
    return None


def grad_norm_spike(train: list[dict], evals: list[dict], total_steps: int, warmup: int) -> dict | None:
    norms = _values(train, "grad_norm")
    if len(norms) <= SPIKE_HISTORY:
        return None
    step, now = norms[-1]
    median = statistics.median(v for _, v in norms[-1 - SPIKE_WINDOW:-1])
    if median > 0 and now >= SPIKE_FACTOR * median:
        return {"step": step, "grad_norm": round(now, 6), "median_before": round(median, 6)}
    return None


def loss_flat(train: list[dict], evals: list[dict], total_steps: int, warmup: int) -> dict | None:
    after = [(s, v) for s, v in _values(train, "loss") if s > warmup][:FLAT_LOGS]
    if len(after) < FLAT_LOGS or after[0][1] <= 0 or _values(train, "loss")[-1][0] != after[-1][0]:
        return None  # checked once, at the log that completes the window
    first, lowest = after[0][1], min(v for _, v in after)
    if lowest > first * (1 - FLAT_MIN_DROP):
        return {"steps": [s for s, _ in after], "loss": _rounded([v for _, v in after]), "warmup_steps": warmup}
    return None


def length_drift(samples: list[dict]) -> dict | None:
    recent = [(s, v) for s, v in _values(samples, "samples/length") if s > 0][-DRIFT_SAMPLES:]
    reference = _values(samples, "samples/reference_length")
    if len(recent) < DRIFT_SAMPLES or not reference:
        return None
    start = reference[-1][1]
    changes = [v - start for _, v in recent]
    least = max(DRIFT_CHANGE * start, DRIFT_MIN_TOKENS)
    if all(c >= least for c in changes) or all(c <= -least for c in changes):
        return {"steps": [0, *(s for s, _ in recent)], "samples/length": _rounded([start, *(v for _, v in recent)]),
                "direction": "longer" if changes[0] > 0 else "shorter"}
    return None


Detector = Callable[[list[dict], list[dict], int, int], dict | None]
TRAIN_DETECTORS: dict[str, Detector] = {
    "rewards_both_falling": rewards_both_falling,
    "accuracy_saturated": accuracy_saturated,
    "grad_norm_spike": grad_norm_spike,
    "loss_flat": loss_flat,
}
EVAL_DETECTORS: dict[str, Detector] = {"eval_gap": eval_gap}
CODES = (*TRAIN_DETECTORS, *EVAL_DETECTORS, "length_drift")


def _message(code: str, ev: dict, spec) -> str:
    """What was seen, then what to try, in the spec's own terms."""
    lr, beta = f"{spec.learning_rate:g}", f"{spec.loss.beta:g}"
    if code == "rewards_both_falling":
        return (f"chosen and rejected rewards both fell over steps {ev['steps'][0]}-{ev['steps'][-1]} (chosen "
                f"{ev['rewards/chosen'][0]:.4g} -> {ev['rewards/chosen'][-1]:.4g}): the chosen answers are getting "
                f"less likely too (likelihood displacement). Add an SFT term (loss.sft_weight, e.g. 0.2) or "
                f"lower learning_rate (now {lr})")
    if code == "accuracy_saturated":
        tip = "" if spec.validation_file else ", or add a validation file to see whether it generalizes"
        return (f"training reward accuracy reached {ev['rewards/accuracies'][-1]:.3g} by step {ev['steps'][-1]} of "
                f"{ev['total_steps']} while margins kept growing ({ev['rewards/margins'][0]:.4g} -> "
                f"{ev['rewards/margins'][-1]:.4g}): the rewards are overfitting. Try a lower loss.beta (now {beta}) "
                f"or fewer epochs{tip}")
    if code == "eval_gap":
        return (f"eval_loss rose at each of the evaluations at steps {ev['steps']} ({ev['eval_loss'][0]:.4g} -> "
                f"{ev['eval_loss'][-1]:.4g}) while the training loss fell: the model is overfitting its training "
                f"pairs. Use early_stopping (or load_best_at_end), fewer epochs, or a lower learning_rate (now {lr})")
    if code == "grad_norm_spike":
        times = ev["grad_norm"] / ev["median_before"]
        return (f"the gradient norm at step {ev['step']} was {ev['grad_norm']:.4g}, {times:.0f}x the median before it"
                f" ({ev['median_before']:.4g}). Look for outlier rows, lower learning_rate "
                f"(now {lr}), add warmup_steps, or lower max_grad_norm")
    if code == "length_drift":
        first, now = ev["samples/length"][0], ev["samples/length"][-1]
        fix = ("Check whether the chosen answers are longer than the rejected ones in the data; try a higher loss.beta "
               f"(now {beta}), a lower learning_rate (now {lr}), or the length-normalized simpo loss"
               if ev["direction"] == "longer" else
               f"Check whether the rejected answers are the longer ones in the data; try an SFT term "
               f"(loss.sft_weight, e.g. 0.2) or a lower learning_rate (now {lr})")
        return (f"the policy's sample answers stayed {ev['direction']} than the reference's at steps "
                f"{ev['steps'][1]}-{ev['steps'][-1]}: "
                f"{first:.3g} tokens on average for the reference (step 0), {now:.3g} now. {fix}")
    return (f"the loss did not fall after the warm-up (steps {ev['steps'][0]}-{ev['steps'][-1]}: "
            f"{ev['loss'][0]:.4g} -> {ev['loss'][-1]:.4g}): the run is not learning. Raise learning_rate "
            f"(now {lr}), check warmup_steps and the learning-rate schedule, or check that the pairs differ")


@dataclass
class Diagnostics:
    """Feeds the detectors with a run's records; each code fires at most once per run."""

    spec: Any  # the TrainingSpec: its values go into the suggested fixes
    total_steps: int
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)  # training.samples summaries: mean completion lengths
    fired: set[str] = field(default_factory=set)

    def on_train(self, record: dict) -> list[Diagnostic]:
        self.train.append(record)
        return self._check(TRAIN_DETECTORS, record)

    def on_eval(self, record: dict) -> list[Diagnostic]:
        self.evals.append(record)
        return self._check(EVAL_DETECTORS, record)

    def on_samples(self, summary: dict) -> list[Diagnostic]:
        self.samples.append(summary)
        return self._check({"length_drift": lambda *_: length_drift(self.samples)}, summary)

    def replay(self, records: list[dict]) -> None:
        """A resumed run: take in the records written before its checkpoint, marking as fired what
        fired then, so that nothing already warned about is warned about again."""
        for record in records:
            if "samples/length" in record:
                self.on_samples(record)
            elif any(k.startswith("eval_") for k in record):
                self.on_eval(record)
            else:
                self.on_train(record)

    def _check(self, detectors: dict[str, Detector], record: dict) -> list[Diagnostic]:
        found = []
        for code, detect in detectors.items():
            if code in self.fired:
                continue
            evidence = detect(self.train, self.evals, self.total_steps, self.spec.warmup_steps)
            if evidence is not None:
                self.fired.add(code)
                found.append(Diagnostic(code, record["step"], _message(code, evidence, self.spec), evidence))
        return found
