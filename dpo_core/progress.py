"""What `dpo-train` shows while it runs: a progress bar on a terminal, plain log lines otherwise."""
from __future__ import annotations

import sys
import time

from dpo_core.callbacks import Callbacks


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _summary_fields(metrics: dict) -> str:
    parts = [f"loss {metrics['loss']:.4f}"] if "loss" in metrics else []
    if "rewards/accuracies" in metrics:
        parts.append(f"acc {metrics['rewards/accuracies']:.2f}")
    if "tokens_per_s" in metrics:
        parts.append(f"{metrics['tokens_per_s']:.0f} tok/s")
    return " ".join(parts)


class ConsoleCallbacks(Callbacks):
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None
        self.total = 0
        self.started = time.perf_counter()

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def on_start(self, info):
        self.total, self.started = info["total_steps"], time.perf_counter()
        resumed = f", resumed at step {info['resumed_from_step']}" if info.get("resumed_from") else ""
        plan = (f", micro batch {info['micro_batch_size']}, {info['checkpointed_layers']} of {info['layers']} layers "
                "checkpointed") if info.get("micro_batch_size") else ""
        self._print(f"training {info['num_train_rows']} rows for {self.total} steps{resumed}{plan}")
        if self.tty and self.total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=info.get("resumed_from_step") or 0, file=self.stream, unit="step")

    def on_step(self, step, total_steps):
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def on_log(self, metrics):
        if self.bar is not None:
            self.bar.set_postfix_str(_summary_fields(metrics))
            return
        rate = (time.perf_counter() - self.started) / max(metrics["step"], 1)
        eta = _fmt_duration(rate * (self.total - metrics["step"]))
        self._print(f"step {metrics['step']}/{self.total} {_summary_fields(metrics)} eta {eta}")

    def on_eval(self, metrics):
        acc = metrics.get("eval_rewards/accuracies")
        acc_text = f" eval_acc {acc:.3f}" if acc is not None else ""
        self._print(f"eval at step {metrics['step']}: eval_loss {metrics['eval_loss']:.4f}{acc_text}")

    def on_checkpoint(self, step, path):
        self._print(f"checkpoint {path}")

    def on_warning(self, message, *, code=None, data=None):
        self._print(f"warning{f' ({code})' if code else ''}: {message}")

    def close(self, result) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        took = _fmt_duration(time.perf_counter() - self.started)
        lines = [f"done in {took}: {result.global_step} steps, {result.trained_tokens} tokens"]
        if result.metrics:
            lines.append(f"  last train: {_summary_fields(result.metrics)}")
        if result.eval_metrics:
            acc = result.eval_metrics.get("eval_rewards/accuracies")
            lines.append(f"  eval: loss {result.eval_metrics['eval_loss']:.4f}" + (f" acc {acc:.3f}" if acc is not None else ""))
        if result.final_dir:
            lines.append(f"  model: {result.final_dir}")
        if result.stopped:
            lines.append("  stopped early on request")
        if result.early_stopped_at_step is not None:
            lines.append(f"  early stopping ended the run at step {result.early_stopped_at_step}")
        if result.best_step is not None:
            lines.append(f"  the model holds the best evaluation's weights, from step {result.best_step}")
        self._print("\n".join(lines))
