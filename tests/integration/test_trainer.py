"""The trainer on the tiny local model: it learns, saves loadable models, resumes exactly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core import Callbacks, parse_spec, train
from dpo_core.toy import make_synthetic_task


def _spec(tiny_model, synthetic, out, **overrides):
    train_file, held_out = synthetic
    base = dict(
        model=tiny_model,
        train_file=train_file,
        validation_file=held_out,
        output_dir=str(out),
        learning_rate=1e-3,
        batch_size=8,
        micro_batch_size=4,
        max_steps=30,
        logging_steps=5,
        max_length=64,
        max_prompt_length=32,
        loss={"type": "sigmoid", "beta": 0.1},
    )
    base.update(overrides)
    return parse_spec(base)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_training_learns_the_held_out_rule_and_saves_a_loadable_model(tiny_model, synthetic, tmp_path):
    before = _params(AutoModelForCausalLM.from_pretrained(tiny_model))
    result = train(_spec(tiny_model, synthetic, tmp_path, eval_on_start=True))
    evals = [r for r in _records(tmp_path) if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.1
    after = _params(AutoModelForCausalLM.from_pretrained(result.final_dir))
    unchanged = [n for n in before if torch.equal(before[n], after[n])]
    assert unchanged == [], f"parameters that did not train: {unchanged}"


def test_metrics_file_has_the_documented_keys(tiny_model, synthetic, tmp_path):
    train(_spec(tiny_model, synthetic, tmp_path, max_steps=5))
    record = [r for r in _records(tmp_path) if "loss" in r][-1]
    for key in ("step", "epoch", "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
                "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "num_tokens",
                "elapsed_s", "tokens_per_s", "step_time_s"):
        assert key in record, key
    assert record["num_tokens"] > 0 and record["tokens_per_s"] > 0 and 0 < record["step_time_s"] <= record["elapsed_s"]


def test_lora_leaves_base_untouched_and_yields_adapter_and_merged_model(tiny_model, synthetic, tmp_path):
    from peft import PeftModel

    before = _params(AutoModelForCausalLM.from_pretrained(tiny_model))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    result = train(_spec(tiny_model, synthetic, tmp_path, lora=lora, max_steps=10, learning_rate=5e-3))
    base_again = _params(AutoModelForCausalLM.from_pretrained(tiny_model))
    assert all(torch.equal(before[n], base_again[n]) for n in before)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), Path(result.final_dir) / "adapter")
    lora_weights = {n: p for n, p in adapted.named_parameters() if "lora_B" in n}
    assert lora_weights and any(p.abs().sum() > 0 for p in lora_weights.values())
    merged = _params(AutoModelForCausalLM.from_pretrained(result.final_dir))
    changed = [n for n in before if "q_proj" in n and not torch.equal(before[n], merged[n])]
    assert changed, "the merged model should carry the adapter's update"


class _StopAfter(Callbacks):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, total_steps):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _records(out) if "loss" in r}


@pytest.mark.parametrize("share_prompt", [False, True], ids=["two-rows", "shared-prompt"])
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_model, synthetic, tmp_path, share_prompt):
    common = dict(max_steps=12, logging_steps=1, save_steps=6, validation_file=None, group_by_length=True,
                  share_prompt=share_prompt)
    straight = train(_spec(tiny_model, synthetic, tmp_path / "straight", **common))
    stopped = train(_spec(tiny_model, synthetic, tmp_path / "split", **common), _StopAfter(6))
    assert stopped.stopped and stopped.global_step == 6 and stopped.final_dir is None
    resumed = train(_spec(tiny_model, synthetic, tmp_path / "split", resume_from="auto", **common))
    assert resumed.global_step == straight.global_step == 12
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def test_eval_only_writes_the_eval_record_and_no_model(tiny_model, tiny_reference, synthetic, tmp_path):
    result = train(_spec(tiny_model, synthetic, tmp_path, max_steps=0, reference_model=tiny_reference))
    assert result.final_dir is None and result.global_step == 0
    (record,) = _records(tmp_path)
    assert record["step"] == 0 and record["eval_loss"] > 0
    assert not any(p.name.startswith(("checkpoint-", "final")) for p in tmp_path.iterdir())


def test_precomputed_reference_gives_the_same_numbers_as_a_live_one(tiny_model, tiny_reference, synthetic, tmp_path):
    live = train(_spec(tiny_model, synthetic, tmp_path / "live", max_steps=0, reference_model=tiny_reference))
    pre = train(_spec(tiny_model, synthetic, tmp_path / "pre", max_steps=0, reference_model=tiny_reference,
                      reference_mode="precomputed"))
    for key, value in live.eval_metrics.items():
        assert pre.eval_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("extra", [{}, {"reference_mode": "precomputed", "loss": {"type": "sigmoid", "sft_weight": 0.5}},
                                   {"loss": {"type": "simpo"}}], ids=["live", "precomputed-rpo", "simpo"])
def test_shared_prompt_trains_and_evaluates_like_two_rows(tiny_model, synthetic, tmp_path, extra):
    common = dict(max_steps=6, logging_steps=1, eval_on_start=True, **extra)
    two = train(_spec(tiny_model, synthetic, tmp_path / "two", share_prompt=False, **common))
    one = train(_spec(tiny_model, synthetic, tmp_path / "one", share_prompt=True, **common))
    a, b = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a), (a, b)
    assert one.trained_tokens == two.trained_tokens
    evals = [[r for r in _records(out) if "eval_loss" in r] for out in (tmp_path / "two", tmp_path / "one")]
    for before, after in zip(*evals):
        for key, value in before.items():
            if key.endswith("accuracies") and torch.cuda.is_available():
                # Near-tied rewards (the policy is still close to the reference) order by rounding, and a
                # GPU's kernels round the two layouts differently: a row's accuracy can flip there.
                continue
            assert after[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key


def test_checkpoints_are_complete_and_pruned(tiny_model, synthetic, tmp_path):
    seen = []

    class Record(Callbacks):
        def on_checkpoint(self, step, path):
            seen.append(step)

    train(_spec(tiny_model, synthetic, tmp_path, max_steps=9, save_steps=3, save_total_limit=2, validation_file=None), Record())
    assert seen == [3, 6, 9]
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("checkpoint-"))
    assert left == ["checkpoint-6", "checkpoint-9"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "no temporary directories left behind"
    AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-9")


@pytest.mark.parametrize(
    "loss",
    [
        {"type": "sigmoid", "beta": 0.1, "label_smoothing": 0.1},
        {"type": "ipo", "beta": 0.5},
        {"type": "hinge", "beta": 0.1},
        {"type": "robust", "beta": 0.1, "label_smoothing": 0.2},
        {"type": "simpo", "beta": 2.0, "gamma": 0.5},
        {"type": "orpo", "beta": 0.1, "orpo_lambda": 0.1},
        {"type": "sigmoid", "beta": 0.1, "sft_weight": 1.0},
        {"type": "kto", "beta": 0.1},
    ],
    ids=lambda loss: loss["type"] + ("+sft" if loss.get("sft_weight") else ""),
)
def test_every_loss_trains_and_improves_held_out_margin(tiny_model, synthetic, tmp_path, loss):
    result = train(_spec(tiny_model, synthetic, tmp_path, loss=loss, max_steps=12, eval_on_start=True))
    evals = [r for r in _records(tmp_path) if "eval_loss" in r]
    assert all(torch.isfinite(torch.tensor(r["eval_loss"])) for r in evals)
    start, end = evals[0], evals[-1]
    assert end["eval_rewards/chosen"] - end["eval_rewards/rejected"] > start["eval_rewards/chosen"] - start["eval_rewards/rejected"]
    assert result.final_dir


def test_kto_trains_on_an_unpaired_file(tiny_model, tmp_path):
    train_file, held_out = make_synthetic_task(tmp_path / "data", n_train=64, n_eval=16, fmt="unpaired")
    result = train(_spec(tiny_model, (str(train_file), str(held_out)), tmp_path / "out",
                         loss={"type": "kto", "beta": 0.1}, max_steps=4))
    assert result.global_step == 4 and "kl" in result.metrics


def test_multi_reward_groups_get_their_own_beta_and_metrics(tiny_model, tmp_path):
    train_file, held_out = make_synthetic_task(tmp_path / "data", n_train=64, n_eval=16, groups=("helpful", "safe"))
    loss = {"type": "sigmoid", "beta": 0.1, "beta_by_group": {"helpful": 0.1, "safe": {"beta": 0.5, "weight": 2.0}}}
    result = train(_spec(tiny_model, (str(train_file), str(held_out)), tmp_path / "out", loss=loss, max_steps=4))
    for group in ("helpful", "safe"):
        assert f"eval_rewards/accuracies/{group}" in result.eval_metrics
        assert f"loss/{group}" in result.metrics


def test_group_beta_scales_that_groups_rewards(tiny_model, tiny_reference, tmp_path):
    train_file, held_out = make_synthetic_task(tmp_path / "data", n_train=16, n_eval=16, groups=("a", "b"))
    results = {}
    for beta_b in (0.1, 0.4):
        loss = {"type": "sigmoid", "beta": 0.1, "beta_by_group": {"b": beta_b}}
        spec = _spec(tiny_model, (str(train_file), str(held_out)), tmp_path / f"out{beta_b}", loss=loss,
                     max_steps=0, reference_model=tiny_reference)
        results[beta_b] = train(spec).eval_metrics
    assert results[0.4]["eval_rewards/margins/b"] == pytest.approx(4 * results[0.1]["eval_rewards/margins/b"], rel=1e-4)
    # Group a's β is the same in both runs (rel 1e-4: GPU reductions differ run to run in the last bits).
    assert results[0.4]["eval_rewards/margins/a"] == pytest.approx(results[0.1]["eval_rewards/margins/a"], rel=1e-4)


@pytest.mark.parametrize("extra", [{"precision": "bf16"}, {"gradient_checkpointing": True}, {"logprob_chunk_size": 7}],
                         ids=["bf16", "grad-ckpt", "small-chunks"])
def test_compute_options_train(tiny_model, synthetic, tmp_path, extra):
    result = train(_spec(tiny_model, synthetic, tmp_path, max_steps=3, validation_file=None, **extra))
    assert result.global_step == 3 and result.metrics["loss"] > 0


def test_gradient_accumulation_matches_one_big_batch(tiny_model, synthetic, tmp_path):
    whole = train(_spec(tiny_model, synthetic, tmp_path / "a", max_steps=3, logging_steps=1, micro_batch_size=8, validation_file=None))
    split = train(_spec(tiny_model, synthetic, tmp_path / "b", max_steps=3, logging_steps=1, micro_batch_size=2, validation_file=None))
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-4)
    assert whole.trained_tokens == split.trained_tokens


@pytest.mark.parametrize("fmt", ["conversational", "openai"])
def test_chat_formats_train_through_the_chat_template(tiny_model, tmp_path, fmt):
    train_file, held_out = make_synthetic_task(tmp_path / "data", n_train=32, n_eval=8, fmt=fmt)
    result = train(_spec(tiny_model, (str(train_file), str(held_out)), tmp_path / "out", max_steps=3, max_length=96, max_prompt_length=64))
    assert result.global_step == 3 and result.eval_metrics["eval_loss"] > 0


def test_fp16_autocast_with_grad_scaling_runs(tiny_model, synthetic, tmp_path):
    result = train(_spec(tiny_model, synthetic, tmp_path, max_steps=2, validation_file=None, precision="fp16"))
    assert result.global_step == 2


class _Preempted(_StopAfter):
    def checkpoint_on_stop(self):
        return True


def test_a_preempted_run_checkpoints_where_it_stopped_and_resumes_from_there(tiny_model, synthetic, tmp_path):
    seen = []

    class Record(_Preempted):
        def on_checkpoint(self, step, path):
            seen.append(step)

    common = dict(max_steps=8, logging_steps=1, validation_file=None)
    straight = train(_spec(tiny_model, synthetic, tmp_path / "straight", **common))
    stopped = train(_spec(tiny_model, synthetic, tmp_path / "split", **common), Record(5))
    assert stopped.stopped and seen == [5]
    train(_spec(tiny_model, synthetic, tmp_path / "split", resume_from="auto", **common))
    a, b = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) <= 1e-5 for k in a)
    assert straight.global_step == 8


def test_save_total_limit_keeps_the_latest_checkpoints_and_the_best_by_eval(tiny_model, synthetic, tmp_path):
    """The validation pairs have chosen and rejected swapped, so eval_loss rises as the model learns the
    training rule: the best checkpoint is an early one that the latest-two rule alone would delete."""
    swapped = tmp_path / "swapped.jsonl"
    rows = [json.loads(line) for line in Path(synthetic[1]).read_text().splitlines()][:16]
    swapped.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                               for r in rows))
    out = tmp_path / "out"
    train(_spec(tiny_model, (synthetic[0], str(swapped)), out, max_steps=10, save_steps=2, eval_steps=2,
                save_total_limit=2))
    evals = {r["step"]: r["eval_loss"] for r in _records(out) if "eval_loss" in r and r["step"] < 10}
    best = min(evals, key=lambda step: (evals[step], -step))
    assert best < 8
    assert sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*")) == [best, 8, 10]
