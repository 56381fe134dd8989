"""Diagnostics and early stopping on hand-made metric records: each threshold, each side of it."""
from __future__ import annotations

import pytest

from dpo_core import diagnostics as dg
from dpo_core.diagnostics import Diagnostics
from dpo_core.early_stopping import Best
from dpo_core.errors import TrainingError
from dpo_core.spec import parse_spec

SPEC = parse_spec({"model": "m", "train_file": "t.jsonl", "learning_rate": 1e-3})


def _train(**series) -> list[dict]:
    """Train records at steps 1, 2, ... with `series` as {key: [values]}."""
    n = len(next(iter(series.values())))
    return [{"step": i + 1, **{k.replace("rewards_", "rewards/"): v[i] for k, v in series.items()}} for i in range(n)]


def test_rewards_both_falling_needs_both_series_falling_and_chosen_below_zero():
    falling = dict(rewards_chosen=[0.0, -0.1, -0.2, -0.15, -0.4], rewards_rejected=[0.0, -0.2, -0.4, -0.6, -0.9])
    found = dg.rewards_both_falling(_train(**falling), [], 100, 0)
    assert found["steps"] == [1, 2, 3, 4, 5] and found["rewards/chosen"][-1] == -0.4
    assert dg.rewards_both_falling(_train(**falling)[:4], [], 100, 0) is None  # too few logs
    rising_chosen = {**falling, "rewards_chosen": [0.0, 0.1, 0.2, 0.3, 0.4]}
    assert dg.rewards_both_falling(_train(**rising_chosen), [], 100, 0) is None
    noisy = {**falling, "rewards_chosen": [0.0, 0.1, -0.1, 0.05, -0.1]}  # 2 of 4 steps down: not a trend
    assert dg.rewards_both_falling(_train(**noisy), [], 100, 0) is None


def test_accuracy_saturated_needs_early_high_accuracy_and_large_growing_margins():
    records = _train(rewards_accuracies=[0.9, 0.99, 1.0, 1.0], rewards_margins=[0.5, 0.8, 1.2, 1.6])
    assert dg.accuracy_saturated(records, [], 8, 0)["steps"] == [2, 3, 4]
    assert dg.accuracy_saturated(records, [], 7, 0) is None  # step 4 is past half of 7 steps
    small = _train(rewards_accuracies=[1.0] * 4, rewards_margins=[0.1, 0.2, 0.3, 0.4])
    assert dg.accuracy_saturated(small, [], 100, 0) is None  # right, not overfit
    flat = _train(rewards_accuracies=[1.0] * 4, rewards_margins=[1.5, 1.6, 1.6, 1.7])
    assert dg.accuracy_saturated(flat, [], 100, 0) is None


def test_eval_gap_needs_rising_eval_loss_while_the_training_loss_falls():
    train = _train(loss=[0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    evals = [{"step": s, "eval_loss": v} for s, v in ((0, 0.69), (2, 0.6), (4, 0.65), (6, 0.7))]
    expected = {"steps": [2, 4, 6], "eval_loss": [0.6, 0.65, 0.7], "loss": [0.6, 0.4, 0.2]}
    assert dg.eval_gap(train, evals, 6, 0) == expected
    assert dg.eval_gap(train, evals[:3], 6, 0) is None  # the step-0 baseline does not count
    rising_train = _train(loss=[0.7, 0.6, 0.7, 0.7, 0.7, 0.8])
    assert dg.eval_gap(rising_train, evals, 6, 0) is None


def test_grad_norm_spike_is_ten_times_the_median_before_it():
    calm = [1.0, 1.2, 0.8, 1.1, 0.9]
    assert dg.grad_norm_spike(_train(grad_norm=[*calm, 10.0]), [], 100, 0)["step"] == 6
    assert dg.grad_norm_spike(_train(grad_norm=[*calm, 9.0]), [], 100, 0) is None
    assert dg.grad_norm_spike(_train(grad_norm=[1.0, 1.0, 1.0, 1.0, 50.0]), [], 100, 0) is None  # too early


def test_loss_flat_looks_at_the_first_logs_after_the_warm_up():
    flat = _train(loss=[0.9, 0.6931, 0.6931, 0.6930, 0.6932, 0.6929])
    assert dg.loss_flat(flat, [], 100, warmup=1)["steps"] == [2, 3, 4, 5, 6]
    assert dg.loss_flat(flat, [], 100, warmup=0) is None  # from 0.9 it fell
    learning = _train(loss=[0.6931, 0.69, 0.68, 0.675, 0.67])
    assert dg.loss_flat(learning, [], 100, 0) is None


def test_each_code_fires_once_with_its_evidence_and_a_fix():
    diag = Diagnostics(SPEC, total_steps=100)
    fired = []
    for i, norm in enumerate([1.0] * 5 + [20.0, 1.0, 30.0, 40.0]):
        fired += diag.on_train({"step": i + 1, "grad_norm": norm, "loss": 0.6 - 0.05 * i})
    assert [(d.code, d.step) for d in fired] == [("grad_norm_spike", 6)]
    (d,) = fired
    assert d.data == {"step": 6, "grad_norm": 20.0, "median_before": 1.0}
    assert "learning_rate (now 0.001)" in d.message and "20x" in d.message


def test_a_resumed_run_does_not_warn_again_of_what_fired_before_its_checkpoint():
    records = [{"step": i + 1, "grad_norm": n} for i, n in enumerate([1.0] * 5 + [20.0])]
    diag = Diagnostics(SPEC, total_steps=100)
    diag.replay(records)
    assert diag.fired == {"grad_norm_spike"}
    assert diag.on_train({"step": 7, "grad_norm": 50.0}) == []


def test_best_follows_the_metric_and_counts_evaluations_without_improvement():
    best = Best("eval_loss", "min", min_delta=0.01, patience=2)
    assert not best.observe({"step": 0, "eval_loss": 0.1})  # before training: a baseline only
    assert best.observe({"step": 2, "eval_loss": 0.6}) and best.step == 2
    assert not best.observe({"step": 4, "eval_loss": 0.595})  # not by more than min_delta
    assert best.observe({"step": 6, "eval_loss": 0.5}) and best.stale == 0
    assert not best.observe({"step": 8, "eval_loss": float("nan")}) and not best.should_stop
    assert not best.observe({"step": 10, "eval_loss": 0.7}) and best.should_stop and best.step == 6
    up = Best("eval_rewards/accuracies", "max")
    assert up.observe({"step": 2, "eval_rewards/accuracies": 0.5, "eval_loss": 1})
    assert not up.observe({"step": 4, "eval_rewards/accuracies": 0.4, "eval_loss": 1}) and not up.should_stop
    with pytest.raises(TrainingError, match="eval_rewards/accuracies"):
        Best("eval_nope", "max").observe({"step": 2, "eval_loss": 0.5, "eval_rewards/accuracies": 1.0})


def _sampled(lengths: list[float], reference: float = 6.0) -> list[dict]:
    return [{"step": 3 * i, "samples/length": v, "samples/reference_length": reference} for i, v in enumerate(lengths)]


def test_length_drift_fires_on_answers_that_stay_much_longer_or_shorter():
    from dpo_core.diagnostics import length_drift

    grown = length_drift(_sampled([6.0, 12.0, 14.0, 13.0, 15.0]))
    assert grown == {"steps": [0, 3, 6, 9, 12], "samples/length": [6.0, 12.0, 14.0, 13.0, 15.0], "direction": "longer"}
    assert length_drift(_sampled([20.0, 8.0, 9.0, 6.0, 7.0], reference=20.0))["direction"] == "shorter"


def test_length_drift_stays_quiet_on_noise_a_lone_jump_or_too_few_samples():
    from dpo_core.diagnostics import length_drift

    assert length_drift(_sampled([6.0, 7.0, 8.0, 6.0, 7.0])) is None  # within a token or two
    assert length_drift(_sampled([6.0, 20.0, 6.0, 7.0, 6.0])) is None  # one sample far off, the rest back
    assert length_drift(_sampled([6.0, 20.0, 20.0, 20.0])) is None  # three samples after step 0: too few
