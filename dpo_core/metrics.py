"""Running sums of per-row metrics, turned into the means that are logged.

Means are over rows (pairs, or KTO sequences), not over micro-batches, so a step's numbers do
not depend on how it was split for gradient accumulation.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from dpo_core.layout import METRICS_FILE
from dpo_core.losses import LossOutput


class MetricSums:
    def __init__(self):
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def add(self, name: str, total: float, count: float) -> None:
        entry = self._sums[name]
        entry[0] += float(total)
        entry[1] += float(count)

    def add_mean(self, name: str, values: torch.Tensor) -> None:
        if values.numel():
            self.add(name, values.detach().float().sum().item(), values.numel())

    def state(self) -> dict[str, tuple[float, float]]:
        return {k: (s, n) for k, (s, n) in self._sums.items()}

    def merge(self, states: list[dict[str, tuple[float, float]]]) -> None:
        """Replace these sums by the total of every rank's (this rank's included)."""
        self._sums.clear()
        for state in states:
            for name, (total, count) in state.items():
                self.add(name, total, count)

    def means(self, prefix: str = "") -> dict[str, float]:
        return {prefix + k: s / n for k, (s, n) in self._sums.items() if n}

    def clear(self) -> None:
        self._sums.clear()


def add_loss_metrics(sums: MetricSums, out: LossOutput, policy_c, policy_r, groups_c: list, paired: bool) -> None:
    """Record the TRL-named reward and log-prob metrics of one micro-batch, overall and per group."""
    sums.add_mean("rewards/chosen", out.chosen_rewards)
    sums.add_mean("rewards/rejected", out.rejected_rewards)
    sums.add_mean("logps/chosen", policy_c)
    sums.add_mean("logps/rejected", policy_r)
    for name, value in out.metrics.items():
        sums.add_mean(name, value.reshape(-1))
    if not paired:
        return
    correct = (out.chosen_rewards > out.rejected_rewards).float()
    margins = out.chosen_rewards - out.rejected_rewards
    sums.add_mean("rewards/accuracies", correct)
    sums.add_mean("rewards/margins", margins)
    for group in {g for g in groups_c if g is not None}:
        pick = torch.tensor([g == group for g in groups_c], device=correct.device)
        sums.add_mean(f"rewards/accuracies/{group}", correct[pick])
        sums.add_mean(f"rewards/margins/{group}", margins[pick])
        sums.add_mean(f"loss/{group}", out.losses.detach()[pick])


class MetricsFile:
    """metrics.jsonl in the output directory: one JSON object per logged step or evaluation."""

    def __init__(self, output_dir: str):
        self.path = Path(output_dir) / METRICS_FILE

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a crashed run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def records(self) -> list[dict]:
        """Every record written so far, in order."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def eval_values(self, metric: str = "eval_loss") -> dict[int, float]:
        """step -> `metric` of every evaluation recorded (the latest, if a step has several)."""
        return {r["step"]: r[metric] for r in self.records() if metric in r and "step" in r}

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
