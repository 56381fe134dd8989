"""Early stopping and the best evaluation: which step's weights the final model should be.

`Best` follows the evaluations of a run by one metric (TrainingSpec.best_metric). An evaluation improves
on the best only by more than min_delta; `patience` evaluations in a row without an improvement end the
run (training.early_stopping). The evaluation before the first step (eval_on_start) is not a candidate:
no training has happened, and its weights are the starting model's. Imports no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from dpo_core.errors import TrainingError


@dataclass
class Best:
    metric: str
    mode: str  # "min" or "max"
    min_delta: float = 0.0
    patience: int | None = None  # None: follow the best only, never stop
    step: int | None = None  # the best evaluation's step
    value: float | None = None
    record: dict | None = None  # the best evaluation's whole record
    stale: int = 0  # evaluations since the best without an improvement

    @classmethod
    def of(cls, spec) -> Best:
        metric, mode = spec.best_metric
        found = spec.early_stopping
        return cls(metric, mode, found.min_delta if found else 0.0, found.patience if found else None)

    def observe(self, record: dict) -> bool:
        """Take in an evaluation record; True when it is the new best."""
        if self.metric not in record:
            known = ", ".join(sorted(k for k in record if k.startswith("eval_")))
            raise TrainingError(f"early_stopping.metric {self.metric!r} is not in this run's evaluation records; "
                                f"choose one of: {known}")
        if record.get("step", 0) == 0:
            return False
        value = record[self.metric]
        if math.isfinite(value) and self._improves(value):
            self.step, self.value, self.record, self.stale = record["step"], value, record, 0
            return True
        self.stale += 1
        return False

    def _improves(self, value: float) -> bool:
        if self.value is None:
            return True
        return value < self.value - self.min_delta if self.mode == "min" else value > self.value + self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.stale >= self.patience
