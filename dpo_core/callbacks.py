"""The hooks a caller (the CLI, the service's worker) gets from a training run.

Subclass `Callbacks` and override what you need; every hook has a no-op default.
The trainer keeps no module-level state: all state lives on the objects passed in.
"""
from __future__ import annotations

from typing import Any


class Callbacks:
    def on_start(self, info: dict[str, Any]) -> None:
        """Called once before the first step: total_steps, num_train_rows, num_eval_rows, train_rows_dropped,
        train_rows_truncated, eval_rows_dropped, eval_rows_truncated, resumed_from_step, world_size,
        reference_cache (`hit`: the reference log-probs were read from spec.reference_cache, `stored`: computed
        and written there, None: neither), and the memory plan (dpo_core.memplan): micro_batch_size,
        checkpointed_layers, layers, predicted_memory_bytes, memory_budget_bytes. A plan that asks more than
        the spec did also comes as on_warning code memory_plan."""

    def on_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step; cheap, for progress bars."""

    def on_log(self, metrics: dict[str, Any]) -> None:
        """Called every `logging_steps` with the record written to metrics.jsonl."""

    def on_eval(self, metrics: dict[str, Any]) -> None:
        """Called after each evaluation with the `eval_`-prefixed record."""

    def on_samples(self, step: int, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Called at step 0 and at each sampling step (training.samples) with one record per prompt:
        {prompt, reference: {text, tokens, reward[, score]}, policy: {...}}, rewards under the current
        policy; and the summary written to metrics.jsonl (step, samples/length, samples/reference_length,
        samples/win_rate with a reward model)."""

    def on_checkpoint(self, step: int, path: str) -> None:
        """Called after checkpoint-<step>/ was written (atomically) and is complete."""

    def on_warning(self, message: str, *, code: str | None = None, data: dict[str, Any] | None = None) -> None:
        """Called for problems the run survives, such as rows skipped as too long. A diagnostic of the
        run's metrics (dpo_core.diagnostics) also has a stable `code` and its evidence in `data`
        (the step, and the steps and values seen)."""

    def on_end(self, result) -> None:
        """Called once when the run returns (finished, or stopped on request) with its TrainResult."""

    def on_error(self, error: Exception) -> None:
        """Called once when the run fails after its set-up (diverged, a failed checkpoint, ...), just
        before the error propagates; on_end is not called then."""

    def should_stop(self) -> bool:
        """Checked before every optimizer step; returning True stops the run cleanly (cancellation)."""
        return False

    def checkpoint_on_stop(self) -> bool:
        """Asked once should_stop() said True: write a checkpoint first? (yes for preemption, so the
        job resumes where it stopped; no for a cancel)."""
        return False
