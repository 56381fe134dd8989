"""Training with packing: true on the tiny model follows the padded run's losses and evaluations step for
step (fused pair head, KTO, LoRA, gradient checkpointing, a separate or precomputed reference, resume,
samples), and the trainer picks the layout as docs/training.md says."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from dpo_core import Callbacks, parse_spec, train
from dpo_core.errors import TrainingError
from dpo_core.toy import NUMBER_WORDS, build_tokenizer
from dpo_core.trainer import setup


def _spec(tiny_model, data, out, **overrides):
    train_file, held_out = data
    base = dict(model=tiny_model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                learning_rate=1e-3, batch_size=8, micro_batch_size=4, max_steps=4, logging_steps=1, eval_steps=2,
                max_length=64, max_prompt_length=32, loss={"type": "sigmoid", "beta": 0.1}, device="cpu")
    base.update(overrides)
    return parse_spec(base)


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(padded_out, packed_out) -> None:
    """Every train and eval record of the two runs agrees to 1e-5 (timings aside)."""
    a, b = _records(padded_out), _records(packed_out)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key, value in x.items():
            if key in ("elapsed_s", "tokens_per_s", "step_time_s"):
                continue
            assert y[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (x["step"], key)


def _write_varied(path: Path, rows: int, unpaired: bool, rng: random.Random) -> str:
    """The sort task with 2 to 7 numbers a prompt and rejected answers cut short: sequences of many
    lengths, so padded rows carry padding and packed segments differ in length."""
    with path.open("w") as f:
        for i in range(rows):
            numbers = [NUMBER_WORDS[j] for j in rng.sample(range(len(NUMBER_WORDS)), rng.randint(2, 7))]
            chosen = " " + " ".join(sorted(numbers, key=NUMBER_WORDS.index))
            rejected = " " + " ".join(sorted(numbers, key=NUMBER_WORDS.index, reverse=True)[: rng.randint(1, 7)])
            row = {"prompt": "sort : " + " ".join(numbers), "chosen": chosen, "rejected": rejected}
            if unpaired:
                row = {"prompt": row["prompt"], "completion": chosen if i % 2 else rejected, "label": bool(i % 2)}
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def varied(tmp_path_factory) -> tuple[str, str]:
    out, rng = tmp_path_factory.mktemp("varied"), random.Random(0)
    return _write_varied(out / "train.jsonl", 128, False, rng), _write_varied(out / "eval.jsonl", 16, False, rng)


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory) -> tuple[str, str]:
    out, rng = tmp_path_factory.mktemp("kto"), random.Random(1)
    return _write_varied(out / "train.jsonl", 64, True, rng), _write_varied(out / "eval.jsonl", 16, True, rng)


@pytest.mark.parametrize("extra", [
    {},
    {"loss": {"type": "kto", "beta": 0.1}},
    {"lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 5e-3},
    {"gradient_checkpointing": True, "pad_to_multiple_of": 16},
], ids=["sigmoid-fused-head", "kto", "lora", "checkpointing-padded-tail"])
def test_packed_training_follows_the_padded_run(tiny_model, varied, unpaired, tmp_path, extra):
    data = unpaired if extra.get("loss", {}).get("type") == "kto" else varied
    padded = train(_spec(tiny_model, data, tmp_path / "padded", packing=False, **extra))
    packed = train(_spec(tiny_model, data, tmp_path / "packed", packing=True, **extra))
    _assert_same_run(tmp_path / "padded", tmp_path / "packed")
    assert packed.trained_tokens == padded.trained_tokens and packed.global_step == 4
    # The saved model names no attention of this process's: it loads anywhere.
    assert "dpo_packed" not in (Path(packed.final_dir) / "config.json").read_text()


@pytest.mark.parametrize("mode", ["model", "precomputed"])
def test_a_separate_reference_model_packs_too(tiny_model, tiny_reference, varied, tmp_path, mode):
    common = dict(reference_model=tiny_reference, reference_mode=mode, max_steps=2)
    train(_spec(tiny_model, varied, tmp_path / "padded", packing=False, **common))
    train(_spec(tiny_model, varied, tmp_path / "packed", packing=True, **common))
    _assert_same_run(tmp_path / "padded", tmp_path / "packed")


class _StopAfter(Callbacks):
    def __init__(self, step):
        self.step, self.seen = step, 0

    def on_step(self, step, total):
        self.seen = step

    def should_stop(self):
        return self.seen >= self.step


def test_a_packed_run_resumes_where_a_padded_one_would_be(tiny_model, varied, tmp_path):
    common = dict(max_steps=6, save_steps=3, validation_file=None, eval_steps=None)
    train(_spec(tiny_model, varied, tmp_path / "padded", packing=False, **common))
    assert train(_spec(tiny_model, varied, tmp_path / "packed", packing=True, **common), _StopAfter(3)).stopped
    resumed = train(_spec(tiny_model, varied, tmp_path / "packed", packing=True, resume_from="auto", **common))
    assert resumed.global_step == 6
    _assert_same_run(tmp_path / "padded", tmp_path / "packed")


class _Samples(Callbacks):
    def __init__(self):
        self.steps: dict[int, list[dict]] = {}

    def on_samples(self, step, records, summary):
        self.steps[step] = records


def test_samples_generate_the_same_on_a_packed_run(tiny_model, varied, tmp_path):
    """model.generate runs on the packed run's policy and reference (their attention under SDPA's masks
    there); the completions and their rewards are the padded run's."""
    runs = []
    for packed in (False, True):
        seen = _Samples()
        train(_spec(tiny_model, varied, tmp_path / str(packed), packing=packed, max_steps=2, eval_steps=None,
                    samples={"num_prompts": 3, "max_new_tokens": 8, "max_share": 1.0, "every": 2}), seen)
        runs.append(seen.steps)
    padded, packed = runs
    assert sorted(padded) == sorted(packed) == [0, 2]
    for step in padded:
        for a, b in zip(padded[step], packed[step]):
            for who in ("policy", "reference"):
                assert a[who]["text"] == b[who]["text"]
                assert a[who]["reward"] == pytest.approx(b[who]["reward"], abs=1e-5)


def test_the_trainer_picks_the_layout(tiny_model, varied, tmp_path):
    run, _ = setup(_spec(tiny_model, varied, tmp_path / "auto"))
    assert not run.packing  # auto on a CPU: padded rows
    run, _ = setup(_spec(tiny_model, varied, tmp_path / "on", packing=True, share_prompt="auto"))
    assert run.packing and not run.share_prompt
    assert run.model.config._attn_implementation == "dpo_packed"
    assert run.reference.model.model.config._attn_implementation == "dpo_packed"  # the frozen copy
    run, _ = setup(_spec(tiny_model, varied, tmp_path / "shared", share_prompt=True))
    assert run.share_prompt and not run.packing


@pytest.fixture(scope="module")
def sliding_model(tmp_path_factory) -> str:
    """A tiny Qwen2 with sliding-window attention: a model packing does not take."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out = tmp_path_factory.mktemp("sliding") / "model"
    tokenizer = build_tokenizer(out)
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, use_sliding_window=True,
                                 sliding_window=16, max_window_layers=0)).save_pretrained(out)
    return str(out)


def test_a_model_that_cannot_pack_says_what_to_set(tiny_model, sliding_model, varied, tmp_path):
    with pytest.raises(TrainingError, match="sliding-window.*set packing: false"):
        setup(_spec(sliding_model, varied, tmp_path / "policy", packing=True))
    with pytest.raises(TrainingError, match="the reference model does not take sliding-window.*packing: false"):
        setup(_spec(tiny_model, varied, tmp_path / "reference", packing=True, reference_model=sliding_model))
