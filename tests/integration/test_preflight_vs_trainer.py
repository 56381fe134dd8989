"""The pre-flight data report against a real run: its token total is what one epoch trains on, and its
rows dropped and truncated are the trainer's own counts."""
from __future__ import annotations

import json

import pytest

from dpo_core import Callbacks, parse_spec, train
from dpo_core.preflight import data_report
from dpo_core.tokenizer_loading import load_tokenizer
from dpo_core.toy import NUMBER_WORDS

MAX_LENGTH = 12  # toy tokens are words: prompts of 3 to 14 tokens, completions of 1 to 6


def rows(n: int, fmt: str, offset: int = 0) -> list[dict]:
    """Sort-task rows of varied lengths, so that some fit, some are cut and some cannot keep a completion."""
    out = []
    for i in range(offset, offset + n):
        numbers = [NUMBER_WORDS[(i + j) % len(NUMBER_WORDS)] for j in range(1 + i % 12)]
        prompt = "sort : " + " ".join(numbers)
        chosen = " ".join(sorted(numbers)[: 1 + i % 5])
        rejected = " ".join(sorted(numbers, reverse=True)[: 1 + (3 * i) % 6])
        if fmt == "conversational":
            out.append({"prompt": [{"role": "user", "content": prompt}],
                        "chosen": [{"role": "assistant", "content": chosen}],
                        "rejected": [{"role": "assistant", "content": rejected}]})
        else:
            out.append({"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected})
    return out


def write(path, data: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


class Started(Callbacks):
    def __init__(self):
        self.info, self.warnings = None, []

    def on_start(self, info):
        self.info = info

    def on_warning(self, message):
        self.warnings.append(message)


CASES = {
    "text": ("text", {}),
    "conversational": ("conversational", {}),
    "kto": ("text", {"loss": {"type": "kto"}}),
    "share_prompt": ("text", {"share_prompt": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_report_counts_what_one_epoch_trains_on(case, tiny_model, tmp_path):
    fmt, extra = CASES[case]
    spec = parse_spec({
        "model": tiny_model, "output_dir": str(tmp_path / "run"),
        "train_file": write(tmp_path / "train.jsonl", rows(24, fmt)),
        "validation_file": write(tmp_path / "valid.jsonl", rows(12, fmt, offset=5)),
        "max_length": MAX_LENGTH, "max_prompt_length": None, "num_epochs": 1, "batch_size": 4,
        "micro_batch_size": 2, "logging_steps": 100, "learning_rate": 1e-4, "device": "cpu", **extra,
    })
    report = data_report(spec, load_tokenizer(spec.model))
    started = Started()
    result = train(spec, started)

    data, valid = report["training_file"], report["validation_file"]
    assert data["rows_dropped"] > 0 and data["rows_truncated"] > 0  # the case covers both
    assert data["tokens"]["total"] == result.trained_tokens
    assert started.info["num_train_rows"] == data["rows_used"]
    assert (started.info["train_rows_dropped"], started.info["train_rows_truncated"]) == (
        data["rows_dropped"], data["rows_truncated"])
    assert (started.info["eval_rows_dropped"], started.info["eval_rows_truncated"]) == (
        valid["rows_dropped"], valid["rows_truncated"])
    assert started.info["num_eval_rows"] == valid["rows_used"]
    assert any(f"skipped {data['rows_dropped']} of {data['rows']} rows" in w for w in started.warnings)
    assert data["tokens"]["longest_sequence"] <= MAX_LENGTH


def test_samples_without_a_validation_file_hold_out_what_the_report_says(tiny_model, tmp_path):
    """The training prompts samples take are held out of training, and the report counts what remains."""
    spec = parse_spec({
        "model": tiny_model, "output_dir": str(tmp_path / "run"),
        "train_file": write(tmp_path / "train.jsonl", rows(24, "text")),
        "max_length": MAX_LENGTH, "max_prompt_length": None, "num_epochs": 1, "batch_size": 4,
        "logging_steps": 100, "learning_rate": 1e-4, "device": "cpu",
        "samples": {"num_prompts": 2, "max_new_tokens": 4},
    })
    report = data_report(spec, load_tokenizer(spec.model))["training_file"]
    started = Started()
    result = train(spec, started)
    assert report["rows_held_out"] >= 2
    assert report["rows_used"] + report["rows_held_out"] + report["rows_dropped"] == report["rows"]
    assert started.info["num_train_rows"] == report["rows_used"]
    assert report["tokens"]["total"] == result.trained_tokens
