"""Continuing from a checkpoint: a run that starts where another ended (DPO after DPO) starts from exactly
its weights, and its default reference is that starting point (rewards are 0 before the first step)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dpo_core import parse_spec, train
from dpo_core.errors import ModelLoadError

LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _spec(model, synthetic, out, **overrides):
    train_file, held_out = synthetic
    base = dict(model=model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                learning_rate=5e-3, batch_size=8, max_steps=6, logging_steps=3, max_length=64,
                max_prompt_length=32, loss={"type": "sigmoid", "beta": 0.1})
    base.update(overrides)
    return parse_spec(base)


def _evals(out) -> dict[int, dict]:
    records = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "eval_loss" in r}


def _starts_at(first: dict, before: dict) -> None:
    """The second run's step-0 evaluation: the first run's policy log-probs, and no reward yet (its
    reference is its policy's starting point)."""
    assert first["eval_logps/chosen"] == pytest.approx(before["eval_logps/chosen"], abs=1e-4)
    assert first["eval_logps/rejected"] == pytest.approx(before["eval_logps/rejected"], abs=1e-4)
    assert first["eval_rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert first["eval_rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_full_weights_continue_from_final_and_from_a_mid_checkpoint(tiny_model, synthetic, tmp_path):
    a = train(_spec(tiny_model, synthetic, tmp_path / "a", save_steps=3, eval_steps=3))
    a_evals = _evals(tmp_path / "a")
    assert a_evals[6]["eval_rewards/margins"] > 0  # A learned something B must inherit
    for start, step in ((a.final_dir, 6), (str(tmp_path / "a" / "checkpoint-3"), 3)):
        out = tmp_path / f"b{step}"
        train(_spec(start, synthetic, out, max_steps=1, eval_on_start=True))
        _starts_at(_evals(out)[0], a_evals[step])


def test_lora_continues_its_adapter_on_the_same_base(tiny_model, synthetic, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    a = train(_spec(tiny_model, synthetic, tmp_path / "a", lora=LORA, save_steps=3, eval_steps=3))
    a_evals = _evals(tmp_path / "a")
    adapter = str(Path(a.final_dir) / "adapter")
    b = train(_spec(tiny_model, synthetic, tmp_path / "b", lora=LORA, adapter=adapter, max_steps=3,
                    eval_on_start=True))
    b_evals = _evals(tmp_path / "b")
    _starts_at(b_evals[0], a_evals[6])
    assert b_evals[3]["eval_rewards/margins"] != pytest.approx(0, abs=1e-6)  # trained on from there
    weights = {}
    for name, directory in (("a", adapter), ("b", Path(b.final_dir) / "adapter")):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), directory)
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(not torch.equal(weights["a"][n], weights["b"][n]) for n in weights["a"] if "lora_B" in n)
    # A mid checkpoint of a LoRA run holds its adapter: it continues the same way.
    train(_spec(tiny_model, synthetic, tmp_path / "c", lora=LORA, adapter=str(tmp_path / "a" / "checkpoint-3"),
                max_steps=1, eval_on_start=True))
    _starts_at(_evals(tmp_path / "c")[0], a_evals[3])


def test_an_adapter_needs_lora_and_a_missing_one_fails_to_load(tiny_model, synthetic, tmp_path):
    with pytest.raises(ValueError, match="lora"):
        _spec(tiny_model, synthetic, tmp_path, adapter=str(tmp_path))
    with pytest.raises(ModelLoadError, match="could not load .*gone"):
        train(_spec(tiny_model, synthetic, tmp_path / "x", lora=LORA, adapter=str(tmp_path / "gone")))
