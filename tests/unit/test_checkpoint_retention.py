"""Unit: which checkpoints save_total_limit keeps: the latest N, plus those named (the best by eval)."""
from __future__ import annotations

import json

from dpo_core.checkpoint import best_by_eval, list_checkpoints, prune


def _checkpoints(root, steps):
    for step in steps:
        (root / f"checkpoint-{step}").mkdir()
        (root / f"checkpoint-{step}" / "state.json").write_text(json.dumps({"step": step}))


def test_prune_keeps_the_latest_and_the_steps_named(tmp_path):
    _checkpoints(tmp_path, [2, 4, 6, 8, 10])
    assert prune(str(tmp_path), 2, also={4}) == [2, 6]
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 8, 10]
    assert prune(str(tmp_path), None) == [] and len(list_checkpoints(str(tmp_path))) == 3


def test_the_best_by_eval_is_the_lowest_finite_loss_measured_at_a_checkpoint_step():
    losses = {0: 0.1, 2: 0.5, 4: 0.3, 5: 0.2, 6: float("nan"), 8: 0.3}
    assert best_by_eval([2, 4, 6, 8], losses) == 8  # 0 and 5 are no checkpoint's; a tie goes to the latest
    assert best_by_eval([2, 6], {6: float("nan")}) is None
    assert best_by_eval([], losses) is None


def test_the_best_by_eval_of_a_metric_to_maximise_is_the_highest():
    accuracies = {2: 0.5, 4: 0.9, 6: 0.7, 8: float("nan")}
    assert best_by_eval([2, 4, 6, 8], accuracies, mode="max") == 4
    assert best_by_eval([2, 4, 6, 8], accuracies, mode="min") == 2
