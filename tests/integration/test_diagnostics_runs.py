"""Diagnostics, early stopping and load_best_at_end on the tiny model: each diagnostic provoked by the
run that shows it, none on a healthy run; the final model is the best evaluation's weights."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_core import Callbacks, parse_spec, train
from dpo_core.batching import epoch_order
from dpo_core.toy import NUMBER_WORDS

SEED = 42


class Warnings(Callbacks):
    def __init__(self):
        self.seen: list[tuple[str | None, dict | None]] = []

    def on_warning(self, message, *, code=None, data=None):
        self.seen.append((code, data))

    @property
    def codes(self) -> list[str]:
        return [code for code, _ in self.seen if code]


def _spec(tiny_model, train_file, out, **overrides):
    base = dict(model=tiny_model, train_file=str(train_file), output_dir=str(out), learning_rate=1e-3, batch_size=8,
                max_steps=8, logging_steps=1, max_length=64, max_prompt_length=32, seed=SEED)
    return parse_spec({**base, **overrides})


@pytest.fixture(scope="module")
def flipped(synthetic, tmp_path_factory) -> str:
    """The held-out pairs with chosen and rejected swapped: the better the model learns the task, the
    higher its loss on these, while its training loss falls."""
    rows = [json.loads(line) for line in Path(synthetic[1]).read_text().splitlines()]
    path = tmp_path_factory.mktemp("flipped") / "flipped.jsonl"
    path.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def outlier_step(tmp_path_factory) -> tuple[str, int]:
    """Pairs that differ in one word (or not at all), except the rows step 8 trains on: 100-word
    completions that differ throughout, whose gradient is far larger."""
    rng, n, batch, step = random.Random(0), 96, 8, 8
    outliers = set(epoch_order([1] * n, batch, SEED, 0, group_by_length=False)[step - 1])
    rows = []
    for i in range(n):
        words = rng.sample(NUMBER_WORDS, 5)
        if i in outliers:
            chosen, rejected = ([rng.choice(NUMBER_WORDS) for _ in range(100)] for _ in range(2))
        else:  # one pair in eight differs, in its last word: a small gradient
            chosen, rejected = words, words[:4] + [NUMBER_WORDS[(NUMBER_WORDS.index(words[4]) + (i % 8 == 0)) % 20]]
        rows.append({"prompt": "sort : " + " ".join(words), "chosen": " " + " ".join(chosen),
                     "rejected": " " + " ".join(rejected)})
    path = tmp_path_factory.mktemp("outliers") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), step


def test_a_healthy_run_raises_no_diagnostic(tiny_model, synthetic, tmp_path):
    warnings = Warnings()
    train(_spec(tiny_model, synthetic[0], tmp_path, validation_file=synthetic[1], eval_steps=4, max_steps=12,
                logging_steps=2), warnings)
    assert warnings.codes == []


def test_a_learning_rate_far_too_high_makes_both_rewards_fall_and_the_eval_gap_open(tiny_model, synthetic, flipped,
                                                                                   tmp_path):
    warnings = Warnings()
    train(_spec(tiny_model, synthetic[0], tmp_path, learning_rate=5e-2, validation_file=flipped, eval_steps=2,
                max_steps=6), warnings)
    found = dict(warnings.seen)
    assert {"rewards_both_falling", "eval_gap"} <= set(found), warnings.seen
    falling = found["rewards_both_falling"]
    assert falling["rewards/chosen"][-1] < falling["rewards/chosen"][0] < 0.01 and len(falling["steps"]) == 5
    assert found["eval_gap"]["steps"] == [2, 4, 6]
    assert len(warnings.codes) == len(set(warnings.codes)), "each diagnostic fires once"


def test_a_high_beta_saturates_the_accuracy_early(tiny_model, synthetic, tmp_path):
    warnings = Warnings()
    train(_spec(tiny_model, synthetic[0], tmp_path, loss={"beta": 1.0}, max_steps=12), warnings)
    assert "accuracy_saturated" in warnings.codes, warnings.seen
    evidence = dict(warnings.seen)["accuracy_saturated"]
    assert min(evidence["rewards/accuracies"]) >= 0.98 and evidence["rewards/margins"][-1] >= 1.0


def test_outlier_rows_spike_the_gradient_norm_and_a_tiny_learning_rate_leaves_the_loss_flat(tiny_model, outlier_step,
                                                                                          tmp_path):
    path, step = outlier_step
    warnings = Warnings()
    train(_spec(tiny_model, path, tmp_path, learning_rate=1e-6, max_length=128, group_by_length=False,
                max_steps=step), warnings)
    found = dict(warnings.seen)
    assert found["grad_norm_spike"]["step"] == step and found["grad_norm_spike"]["grad_norm"] > 10 * \
        found["grad_norm_spike"]["median_before"]
    assert found["loss_flat"]["steps"] == [1, 2, 3, 4, 5]


def _weights(directory: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(directory / name)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_ends_the_run_and_makes_the_final_model_of_the_best_checkpoint(tiny_model, synthetic, flipped,
                                                                                     tmp_path):
    spec = _spec(tiny_model, synthetic[0], tmp_path, validation_file=flipped, eval_steps=2, max_steps=40,
                 logging_steps=2, save_steps=4, save_total_limit=1, eval_on_start=True,
                 early_stopping={"metric": "eval_loss", "patience": 2})
    result = train(spec)
    evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4, 6], "stops after two evaluations without improvement"
    assert result.early_stopped_at_step == result.global_step == 6 and result.best_step == 2
    assert not result.stopped and result.final_dir is not None
    # The best evaluation's checkpoint was written when it was made, and pruning keeps it beside the latest.
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    final = _weights(Path(result.final_dir))
    assert _same(final, _weights(tmp_path / "checkpoint-2"))
    assert not _same(final, _weights(tmp_path / "checkpoint-4"))
    assert not (Path(result.final_dir) / "state.json").exists()


def test_load_best_at_end_keeps_the_best_lora_adapter_without_stopping(tiny_model, synthetic, flipped, tmp_path):
    spec = _spec(tiny_model, synthetic[0], tmp_path, validation_file=flipped, eval_steps=2, max_steps=6,
                 logging_steps=2, learning_rate=5e-3, load_best_at_end=True, lora={"r": 4, "alpha": 8})
    result = train(spec)
    assert result.early_stopped_at_step is None and result.global_step == 6 and result.best_step == 2
    adapter = "adapter_model.safetensors"
    final = _weights(Path(result.final_dir) / "adapter", adapter)
    assert _same(final, _weights(tmp_path / "checkpoint-2", adapter))
    last = _weights(Path(result.final_dir))  # the merged model: the base with the best adapter merged in
    assert any("q_proj" in k for k in last)


class _StopAt(Callbacks):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, total_steps):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


def test_a_resumed_run_keeps_the_best_and_the_patience_it_had(tiny_model, synthetic, flipped, tmp_path):
    spec = dict(validation_file=flipped, eval_steps=2, max_steps=40, logging_steps=2, save_steps=2,
                early_stopping={"patience": 2})
    first = train(_spec(tiny_model, synthetic[0], tmp_path, **spec), _StopAt(4))
    assert first.stopped and first.global_step == 4
    resumed = train(_spec(tiny_model, synthetic[0], tmp_path, resume_from="auto", **spec))
    assert resumed.early_stopped_at_step == 6 and resumed.best_step == 2
    assert resumed.eval_metrics["step"] == 2  # the final model's evaluation: the best one's
