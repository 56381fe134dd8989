"""training.samples on the tiny model: step 0's completions are the reference's, later steps the
policy's, each scored by its implicit reward; a reward model gives the win rate; length_drift fires on a
run whose chosen answers are the long ones and stays quiet on a healthy run."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from dpo_core import Callbacks, parse_spec, train
from dpo_core.toy import NUMBER_WORDS, build_tokenizer, llama_config


class Samples(Callbacks):
    def __init__(self):
        self.steps: dict[int, list[dict]] = {}
        self.summaries: list[dict] = []
        self.codes: list[str] = []

    def on_samples(self, step, records, summary):
        self.steps[step] = records
        self.summaries.append(summary)

    def on_warning(self, message, *, code=None, data=None):
        self.codes.append(code)


def _spec(model, train_file, eval_file, out, **overrides):
    base = dict(model=model, train_file=str(train_file), validation_file=str(eval_file), output_dir=str(out),
                learning_rate=1e-3, batch_size=8, max_steps=8, eval_steps=4, logging_steps=4, max_length=64,
                max_prompt_length=32, samples={"num_prompts": 3, "max_new_tokens": 12, "max_share": 1.0})
    return parse_spec({**base, **overrides})


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory) -> str:
    """A tiny sequence-classification Llama over the toy vocabulary (random weights: its verdicts are
    arbitrary but deterministic)."""
    import torch
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("reward") / "model"
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    config = llama_config(len(tokenizer))
    config.num_labels = 1
    LlamaForSequenceClassification(config).save_pretrained(out)
    return str(out)


def test_step_0_is_the_reference_and_later_steps_the_policy(tiny_model, synthetic, tmp_path):
    seen = Samples()
    train(_spec(tiny_model, *synthetic, tmp_path / "run"), seen)
    assert sorted(seen.steps) == [0, 4, 8]
    first, last = seen.steps[0], seen.steps[8]
    assert len(first) == 3 and [r["prompt"] for r in first] == [r["prompt"] for r in last]
    for record in first:  # before training the policy is the reference: same answer, reward 0
        assert record["policy"] == record["reference"]
        assert record["reference"]["reward"] == pytest.approx(0.0, abs=1e-5)
        assert 1 <= record["reference"]["tokens"] <= 12 and record["prompt"].startswith("sort")
    assert [r["reference"]["text"] for r in last] == [r["reference"]["text"] for r in first]
    assert any(r["policy"]["text"] != r["reference"]["text"] for r in last)  # lr 1e-3 for 8 steps moves the answers
    assert any(abs(r["reference"]["reward"]) > 1e-4 for r in last)  # scored under the trained policy now
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "samples/length" in r] == [0, 4, 8]


def test_a_reward_model_gives_the_win_rate_and_sampling_is_seeded(tiny_model, synthetic, reward_model, tmp_path):
    runs = []
    for name in ("a", "b"):
        seen = Samples()
        samples = {"num_prompts": 2, "max_new_tokens": 8, "temperature": 1.0, "every": 4, "reward_model": reward_model,
                   "max_share": 1.0}
        train(_spec(tiny_model, *synthetic, tmp_path / name, samples=samples, eval_steps=None), seen)
        runs.append(seen)
    assert [s["step"] for s in runs[0].summaries] == [0, 4, 8]
    assert all(0.0 <= s["samples/win_rate"] <= 1.0 for s in runs[0].summaries)
    assert runs[0].summaries[0]["samples/win_rate"] == 0.5  # the same answers tie
    assert "score" in runs[0].steps[8][0]["policy"]
    assert runs[0].steps == runs[1].steps  # seeded: the same samples twice


def test_samples_over_their_share_of_the_time_skip_steps_but_never_the_first_or_last(tiny_model, synthetic,
                                                                                    tmp_path):
    seen = Samples()
    samples = {"num_prompts": 3, "max_new_tokens": 12, "every": 1, "max_share": 0.01}
    train(_spec(tiny_model, *synthetic, tmp_path / "run", samples=samples, eval_steps=None), seen)
    steps = [s["step"] for s in seen.summaries]
    assert steps[0] == 0 and steps[-1] == 8 and len(steps) < 9  # generation takes far more than 1% here
    spent = sum(s["samples/seconds"] for s in seen.summaries[:-1])
    assert all(s["samples/seconds"] > 0 for s in seen.summaries) and spent > 0


@pytest.fixture(scope="module")
def long_chosen(tmp_path_factory) -> tuple[str, str]:
    """Pairs whose chosen answer is long and rejected answer short: a policy trained on them answers longer."""
    rng, out = random.Random(0), tmp_path_factory.mktemp("long")
    for name, n in (("train", 128), ("eval", 8)):
        rows = []
        for _ in range(n):
            words = rng.sample(NUMBER_WORDS, 5)
            rows.append({"prompt": "sort : " + " ".join(words), "chosen": " " + " ".join(words * 3),
                         "rejected": " " + words[0]})
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(out / "train.jsonl"), str(out / "eval.jsonl")


@pytest.mark.slow
def test_length_drift_fires_when_answers_grow_and_not_on_a_healthy_run(tiny_model, synthetic, long_chosen, tmp_path):
    samples = {"num_prompts": 4, "max_new_tokens": 24, "every": 3, "max_share": 1.0}
    drifting = Samples()
    train(_spec(tiny_model, *long_chosen, tmp_path / "drift", max_steps=15, eval_steps=None, samples=samples,
                learning_rate=3e-3), drifting)
    assert "length_drift" in drifting.codes, drifting.summaries
    healthy = Samples()
    train(_spec(tiny_model, *synthetic, tmp_path / "healthy", max_steps=15, eval_steps=None, samples=samples),
          healthy)
    assert "length_drift" not in healthy.codes, healthy.summaries


class _StopAt(Samples):
    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_step(self, step, total_steps):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


def test_a_resumed_run_keeps_its_reference_answers_and_samples_like_an_uninterrupted_one(tiny_model, synthetic,
                                                                                       tmp_path):
    common = dict(save_steps=4, samples={"num_prompts": 2, "max_new_tokens": 8, "every": 2, "max_share": 1.0},
                  eval_steps=None)
    straight = Samples()
    train(_spec(tiny_model, *synthetic, tmp_path / "straight", **common), straight)
    first, second = _StopAt(4), Samples()
    train(_spec(tiny_model, *synthetic, tmp_path / "split", **common), first)
    train(_spec(tiny_model, *synthetic, tmp_path / "split", resume_from="auto", **common), second)
    assert sorted(first.steps) == [0, 2, 4] and sorted(second.steps) == [6, 8]  # step 0 not reported again
    for a, b in zip(second.steps[8], straight.steps[8]):  # the same answers and rewards as without the stop
        for side in ("reference", "policy"):
            assert a[side]["text"] == b[side]["text"] and a[side]["tokens"] == b[side]["tokens"]
            assert a[side]["reward"] == pytest.approx(b[side]["reward"], abs=1e-4)
