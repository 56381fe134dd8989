"""`dpo-train`: a good config trains; bad input exits 2 with the line or field named, writing nothing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpo_core.cli import main

GOOD_ROW = {"prompt": "sort : n1 n3", "chosen": " n1 n3", "rejected": " n3 n1"}


def _config(tmp_path, tiny_model, train_file, **extra) -> Path:
    cfg = {"model": tiny_model, "train_file": str(train_file), "output_dir": str(tmp_path / "out"),
           "max_steps": 2, "batch_size": 2, "learning_rate": 1e-3, "max_length": 32, "max_prompt_length": 16,
           "save_steps": 1, **extra}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def test_dpo_train_command_trains_and_shows_a_summary(tmp_path, tiny_model):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD_ROW] * 4)
    cfg = _config(tmp_path, tiny_model, data)
    proc = subprocess.run([sys.executable, "-m", "dpo_core.cli", str(cfg), "--set", "loss.beta=0.2", "--set", "logging_steps=1"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "step 2/2" in proc.stderr and "done in" in proc.stderr
    assert (tmp_path / "out" / "final" / "config.json").is_file()


BAD_DATA = {
    "missing-field": ([GOOD_ROW, {"prompt": "p", "chosen": " a"}], ["bad.jsonl:2", "rejected"]),
    "empty-completion": ([GOOD_ROW, {"prompt": "p", "chosen": "", "rejected": " b"}], ["bad.jsonl:2", "chosen"]),
    "not-json": ([GOOD_ROW, "{not json", GOOD_ROW], ["bad.jsonl:2"]),
    "wrong-type": ([GOOD_ROW, GOOD_ROW, {"prompt": "p", "chosen": 5, "rejected": " b"}], ["bad.jsonl:3", "chosen"]),
    "huge-integer": ([GOOD_ROW, '{"prompt": "p", "chosen": " a", "rejected": " b", "x": 1' + "0" * 5000 + "}"],
                     ["bad.jsonl:2", "5001 digits"]),
    "lone-surrogate": ([GOOD_ROW, '{"prompt": "p", "chosen": " a\\ud800", "rejected": " b"}'],
                       ["bad.jsonl:2", "'chosen'"]),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_exits_2_naming_the_line_and_field(tmp_path, tiny_model, capsys, case):
    rows, expected = BAD_DATA[case]
    cfg = _config(tmp_path, tiny_model, _jsonl(tmp_path / "bad.jsonl", rows))
    assert main([str(cfg)]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    "extra, expected",
    [({"loss": {"type": "nope"}}, "unknown loss type"), ({"loss": {"beta": 0}}, "loss.beta"),
     ({"train_file": "/no/such/file.jsonl"}, "/no/such/file.jsonl")],
    ids=["unknown-loss", "beta-zero", "missing-file"],
)
def test_bad_config_exits_2(tmp_path, tiny_model, capsys, extra, expected):
    data = extra.pop("train_file", None) or _jsonl(tmp_path / "d.jsonl", [GOOD_ROW] * 4)
    cfg = _config(tmp_path, tiny_model, data, **extra)
    assert main([str(cfg)]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_model_exits_2_with_a_clear_message(tmp_path, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [GOOD_ROW] * 4)
    cfg = _config(tmp_path, str(tmp_path / "no-such-model"), data)
    assert main([str(cfg)]) == 2
    assert "could not load" in capsys.readouterr().err


def test_rows_too_long_are_skipped_with_one_warning(tmp_path, tiny_model, capsys):
    long_prompt = " ".join(["n1"] * 40)
    rows = [GOOD_ROW] * 4 + [{"prompt": long_prompt, "chosen": " n1", "rejected": " n2"}]
    cfg = _config(tmp_path, tiny_model, _jsonl(tmp_path / "d.jsonl", rows), max_prompt_length=None, max_length=20)
    assert main([str(cfg)]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped 1 of 5 rows") == 1
    (warned,) = [line for line in err.splitlines() if "skipped 1 of 5 rows" in line]
    assert "d.jsonl" in warned and str(tmp_path) not in warned  # the file's name: a service job shows it to teams


def test_a_run_that_diverges_exits_3_and_leaves_only_its_finite_checkpoints(tmp_path, tiny_model, synthetic, capsys):
    """The rigged model of tests/diverging.py gives a NaN loss at step 3, with valid hyperparameters."""
    from tests.diverging import SPEC, poisoned_model, poisoned_rows

    model = poisoned_model(tiny_model, tmp_path / "model")
    data = poisoned_rows(synthetic[0], tmp_path / "train.jsonl", 3, batch_size=2, seed=42)
    cfg = _config(tmp_path, model, data, max_steps=6, **SPEC)
    assert main([str(cfg)]) == 3
    assert "training diverged at step 3" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").glob("[cf]*")) == ["checkpoint-1", "checkpoint-2"]


def test_identical_pairs_and_unknown_fields_are_warned_once_each(tmp_path, tiny_model, capsys):
    rows = [GOOD_ROW, {**GOOD_ROW, "rejected": GOOD_ROW["chosen"]}, {**GOOD_ROW, "chosen_": " n3 n1"},
            GOOD_ROW, {**GOOD_ROW, "rejected": GOOD_ROW["chosen"], "score": 1}]
    cfg = _config(tmp_path, tiny_model, _jsonl(tmp_path / "d.jsonl", rows))
    assert main([str(cfg)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2, warnings
    identical, unknown = warnings
    assert "d.jsonl" in identical and "2 rows (lines 2, 5)" in identical
    assert "2 rows (lines 3, 5)" in unknown and "chosen_, score" in unknown
