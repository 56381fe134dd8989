"""dpo_core.samples' pure parts on hand-made inputs: which prompts, left padding, the stop token, the
implicit reward, the win rate, and when a run samples."""
from __future__ import annotations

import pytest
import torch

from dpo_core.samples import Sampler, cut_at_stop, implicit_rewards, is_due, left_padded, win_rate
from dpo_core.spec import parse_spec
from dpo_core.tokenize import TokenizedPair, first_prompts


def _pair(index: int, prompt: list[int]) -> TokenizedPair:
    return TokenizedPair(index, prompt, [9, 3], [8, 3], None)


def test_prompts_are_the_first_distinct_ones_in_file_order():
    rows = [_pair(2, [5, 6]), _pair(0, [1]), _pair(1, [1]), _pair(3, [7])]
    assert first_prompts(rows, 2) == [[1], [5, 6]]
    assert first_prompts(rows, 10) == [[1], [5, 6], [7]]


def test_prompts_are_left_padded_to_end_together():
    ids, mask = left_padded([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_completion_ends_at_its_first_stop_token():
    assert cut_at_stop([5, 3, 0, 0], {3}) == [5, 3]
    assert cut_at_stop([5, 6], {3}) == [5, 6]


def test_the_implicit_reward_is_beta_times_the_log_ratio():
    policy, reference = torch.tensor([-2.0, -5.0]), torch.tensor([-3.0, -4.0])
    assert implicit_rewards(policy, reference, beta=0.1) == pytest.approx([0.1, -0.1])


def test_the_win_rate_counts_a_tie_half():
    assert win_rate([1.0, 0.0, 2.0, 5.0], [0.0, 1.0, 2.0, 4.0]) == 0.625


def test_a_run_samples_at_each_evaluation_or_every_n_steps_and_at_the_end():
    base = dict(model="m", train_file="t", validation_file="v", eval_steps=4)
    at_evals = parse_spec({**base, "samples": {}})
    assert [s for s in range(1, 11) if is_due(at_evals, s, s == 10)] == [4, 8, 10]
    every = parse_spec({**base, "samples": {"every": 3}})
    assert [s for s in range(1, 11) if is_due(every, s, s == 10)] == [3, 6, 9, 10]
    only_end = parse_spec({**base, "eval_steps": None, "samples": {}})
    assert [s for s in range(1, 11) if is_due(only_end, s, s == 10)] == [10]


def test_a_sampler_is_within_budget_while_under_its_share_of_the_time():
    sampler = Sampler(parse_spec({"model": "m", "train_file": "t", "validation_file": "v", "samples": {}}).samples,
                      0.1, [[1]], started=100.0, seconds=3.0, last=1.0)
    # max_share 0.1: 3 s so far and 1 s more are 4 s of 40 s, the run's 39 s since step 0 and that 1 s
    assert sampler.within_budget(139.0) and not sampler.within_budget(138.0)


def test_samples_need_a_live_reference_and_hold_out_training_prompts_without_a_validation_file():
    from dpo_core.spec import SpecError
    from dpo_core.tokenize import hold_out_for_samples

    with pytest.raises(SpecError) as err:
        parse_spec({"model": "m", "train_file": "t", "samples": {}, "reference_mode": "precomputed"})
    assert "use reference_mode: model" in str(err.value)
    rows = [_pair(0, [1]), _pair(1, [2]), _pair(2, [1]), _pair(3, [3])]
    spec = parse_spec({"model": "m", "train_file": "t", "samples": {"num_prompts": 1}})
    kept, held = hold_out_for_samples(spec, rows)
    assert held == [[1]] and [r.index for r in kept] == [1, 3]  # both rows with prompt [1] are held out
    with_validation = parse_spec({"model": "m", "train_file": "t", "validation_file": "v", "eval_steps": 2,
                                  "samples": {"num_prompts": 1}})
    assert hold_out_for_samples(with_validation, rows) == (rows, [])
