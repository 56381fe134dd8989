"""dpo-train's console output: a bar on a terminal, log lines otherwise, a summary at the end."""
from __future__ import annotations

import io

from dpo_core.progress import ConsoleCallbacks
from dpo_core.trainer import TrainResult

METRICS = {"step": 5, "loss": 0.5, "rewards/accuracies": 0.75, "tokens_per_s": 1234.0}


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def _drive(stream):
    cb = ConsoleCallbacks(stream)
    cb.on_start({"total_steps": 10, "num_train_rows": 80})
    for step in range(1, 6):
        cb.on_step(step, 10)
    cb.on_log(METRICS)
    cb.on_eval({"step": 5, "eval_loss": 0.4, "eval_rewards/accuracies": 0.9})
    cb.close(TrainResult("out", "out/final", 10, 999, False, METRICS, {"eval_loss": 0.3}))
    return stream.getvalue()


def test_plain_log_lines_when_not_a_terminal():
    text = _drive(io.StringIO())
    assert "step 5/10 loss 0.5000 acc 0.75 1234 tok/s eta" in text
    assert "eval at step 5: eval_loss 0.4000 eval_acc 0.900" in text
    assert "done in" in text and "out/final" in text


def test_progress_bar_on_a_terminal():
    text = _drive(FakeTTY())
    assert "5/10" in text and "loss 0.5000 acc 0.75 1234 tok/s" in text
    assert "done in" in text
