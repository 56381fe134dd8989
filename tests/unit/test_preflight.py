"""dpo_core.preflight.data_report on hand-made files, with the word-level tokenizer of test_tokenize (one
token per word, EOS appended to text completions), so that every count can be worked out by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_core.errors import TrainingError
from dpo_core.preflight import data_report
from dpo_core.spec import parse_spec
from tests.unit.test_tokenize import conv, make_tokenizer

REPO = Path(__file__).resolve().parents[2]


def pair(prompt: str, chosen: str, rejected: str, **extra) -> dict:
    return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected, **extra}


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def report(tmp_path, rows, validation=None, **spec):
    spec = parse_spec({"model": "unused", "train_file": write(tmp_path / "train.jsonl", rows),
                       "validation_file": write(tmp_path / "valid.jsonl", validation) if validation else None,
                       "batch_size": 1, "max_length": 100, "max_prompt_length": None, **spec})
    return data_report(spec, make_tokenizer())


def codes(out) -> dict[str, dict]:
    return {(w["code"], w["param"]): w for w in out["warnings"]}


# Tokens: prompt words; completion words + EOS.
ROWS = [
    pair("a b c", "yes", "no"),                # 3, 2, 2: fits
    pair("a b c d e f", "yes", "g h"),          # 6, 2, 3: the prompt fills max_length 6: dropped
    pair("the sky is", "blue", "red green"),    # 3, 2, 3: fits
    pair("a b c d e f g h", "yes", "no"),       # 8, 2, 2: dropped
    pair("how are you", "fine a b c", "no"),    # 3, 5, 2: chosen cut to 3 (2 tokens)
]


def test_counts_lengths_and_tokens_of_text_pairs(tmp_path):
    out = report(tmp_path, ROWS, max_length=6, batch_size=2)
    train = out["training_file"]
    assert {k: train[k] for k in ("rows", "rows_used", "rows_dropped", "rows_truncated", "truncated_tokens")} == {
        "rows": 5, "rows_used": 3, "rows_dropped": 2, "rows_truncated": 1, "truncated_tokens": 2}
    # Before truncation, over all 5 rows; nearest rank: p50 is the 3rd of 5, p90 and p99 the 5th.
    assert train["lengths"] == {"prompt": {"p50": 3, "p90": 8, "p99": 8, "max": 8},
                                "chosen": {"p50": 2, "p90": 5, "p99": 5, "max": 5},
                                "rejected": {"p50": 2, "p90": 3, "p99": 3, "max": 3}}
    # (3+2)+(3+2), (3+2)+(3+3), (3+3)+(3+2): the prompt counts in both sequences.
    assert train["tokens"] == {"total": 10 + 11 + 11, "longest_sequence": 6}
    assert train["length_bias"] == {"chosen_longer_share": pytest.approx(1 / 3, abs=1e-4),
                                    "mean_difference_tokens": 0.0}
    assert (train["duplicate_pairs"], train["identical_pairs"], train["groups"]) == (0, 0, None)
    assert "overlap_with_training" not in train and out["validation_file"] is None
    found = codes(out)
    assert set(found) == {("rows_dropped", "training_file"), ("rows_truncated", "training_file")}
    dropped, truncated = found["rows_dropped", "training_file"], found["rows_truncated", "training_file"]
    assert (dropped["count"], dropped["lines"], truncated["count"], truncated["lines"]) == (2, [2, 4], 1, [5])
    assert "lines 2, 4" in dropped["message"] and "training.max_length" in dropped["message"]
    assert "2 tokens" in truncated["message"]


def test_prompt_truncation_counts_the_prompt_once(tmp_path):
    out = report(tmp_path, [pair("a b c d e f", "yes", "g h")], max_length=6, max_prompt_length=4)
    train = out["training_file"]
    # Prompt 6 -> 4 (2 cut), room 2: chosen keeps 2, rejected 2 of 3.
    assert (train["rows_truncated"], train["truncated_tokens"]) == (1, 3)
    assert train["tokens"] == {"total": 6 + 6, "longest_sequence": 6}
    assert train["lengths"]["prompt"]["max"] == 6  # before truncation


def test_duplicates_and_identical_pairs(tmp_path):
    rows = [pair("a", "yes", "no"), pair("a", "yes", "no", group="g"), pair("a", "yes", "yes"),
            pair("a", "yes", "yes"), pair("b", "yes", "no")]
    out = report(tmp_path, rows)
    train = out["training_file"]
    assert (train["duplicate_pairs"], train["identical_pairs"]) == (2, 2)
    found = codes(out)
    assert found["duplicate_pairs", "training_file"]["lines"] == [2, 4]  # the group is not part of a row's text
    assert found["identical_pairs", "training_file"]["lines"] == [3, 4]
    assert train["groups"] == {"default": 4, "g": 1}


def test_length_bias_both_ways_and_not_on_ties(tmp_path):
    longer = [pair(f"{w}", "a b c", "a") for w in "abcdefgh"] + [pair("yes", "a", "a b"), pair("no", "a", "a")]
    out = report(tmp_path, longer)
    assert out["training_file"]["length_bias"] == {"chosen_longer_share": 0.8, "mean_difference_tokens": 1.5}
    bias = codes(out)["length_bias", "training_file"]
    assert (bias["count"], bias["lines"]) == (8, list(range(1, 9)))
    assert "longer" in bias["message"] and "80%" in bias["message"]

    shorter = [pair(f"{w}", "a", "a b c") for w in "abcdefg"] + [pair("yes", "a b", "a"), pair("no", "a", "a"),
                                                                  pair("how", "a", "a")]
    out = report(tmp_path, shorter)
    assert out["training_file"]["length_bias"]["chosen_longer_share"] == 0.1
    bias = codes(out)["length_bias", "training_file"]
    assert (bias["count"], bias["lines"]) == (7, list(range(1, 8))) and "shorter" in bias["message"]

    ties = [pair(f"{w}", "a b", "c d") for w in "abcdefgh"]
    out = report(tmp_path, ties)
    assert out["training_file"]["length_bias"] == {"chosen_longer_share": 0.0, "mean_difference_tokens": 0.0}
    assert ("length_bias", "training_file") not in codes(out)


def test_groups_unknown_and_unused(tmp_path):
    rows = [pair("a", "yes", "no", group="helpful"), pair("b", "yes", "no", group="harmles"),
            pair("c", "yes", "no"), pair("d", "yes", "no", group="helpful")]
    out = report(tmp_path, rows, loss={"beta_by_group": {"helpful": 0.2, "harmless": 0.3}})
    assert out["training_file"]["groups"] == {"helpful": 2, "harmles": 1, "default": 1}
    found = codes(out)
    unknown = found["unknown_group", "training_file"]
    assert (unknown["count"], unknown["lines"]) == (1, [2])  # a row without a group is the default group
    unused = found["unused_group", "training.loss.beta_by_group"]
    assert (unused["count"], unused["lines"]) == (1, []) and "'harmless'" in unused["message"]
    # Without beta_by_group every group trains with loss.beta: nothing to warn about.
    assert set(codes(report(tmp_path, rows))) == set()


def test_validation_overlap_and_too_few_rows(tmp_path):
    train = [pair("a", "yes", "no"), pair("b", "yes", "no")]
    valid = [pair("b", "no", "yes"), pair("c", "yes", "no"), pair("a", "g", "h")]
    out = report(tmp_path, train, validation=valid, batch_size=4)
    assert out["validation_file"]["overlap_with_training"] == 2
    found = codes(out)
    overlap = found["validation_overlap", "validation_file"]
    assert (overlap["count"], overlap["lines"]) == (2, [1, 3])
    few = found["too_few_rows", "training.batch_size"]
    assert few["count"] == 2 and "batch_size=4" in few["message"]


def test_kto_splits_pairs_as_the_trainer_does(tmp_path):
    rows = [pair("a b c", "yes", "no"), pair("a b c d e f", "yes", "yes"), pair("the sky is", "blue", "red green")]
    out = report(tmp_path, rows, max_length=6, loss={"type": "kto"})
    train = out["training_file"]
    assert (train["rows"], train["rows_used"], train["rows_dropped"], train["rows_truncated"]) == (6, 4, 2, 0)
    assert set(train["lengths"]) == {"prompt", "completion"}
    assert train["lengths"]["completion"] == {"p50": 2, "p90": 3, "p99": 3, "max": 3}
    assert train["tokens"] == {"total": 5 + 5 + 5 + 6, "longest_sequence": 6}
    assert (train["identical_pairs"], train["length_bias"]) == (1, None)  # identical: counted on the file's pairs
    dropped = codes(out)["rows_dropped", "training_file"]
    assert (dropped["count"], dropped["lines"]) == (2, [2])  # both rows of line 2


def test_unpaired_file(tmp_path):
    rows = [{"prompt": "a", "completion": " yes", "label": True}, {"prompt": "a", "completion": " yes", "label": False},
            {"prompt": "a", "completion": " yes", "label": True, "lable": 1}]
    out = report(tmp_path, rows, loss={"type": "kto"})
    train = out["training_file"]
    assert (train["rows"], train["duplicate_pairs"], train["identical_pairs"]) == (3, 1, 0)
    assert train["tokens"]["total"] == 3 * 3
    unknown = codes(out)["unknown_fields", "training_file"]
    assert unknown["lines"] == [3] and unknown["fields"] == ["lable"]
    with pytest.raises(TrainingError, match="loss.type: kto"):
        report(tmp_path, rows)


def test_conversational_pairs_render_through_the_chat_template(tmp_path):
    out = report(tmp_path, [conv("the sky is", "blue", "red green"), conv("how are you", "fine", "no")])
    lengths = out["training_file"]["lengths"]
    # <|im_start|> user ... <|im_end|> <|im_start|> assistant; completions close with <|im_end|>, no EOS.
    assert lengths["prompt"]["max"] == 8 and lengths["chosen"]["max"] == 2 and lengths["rejected"]["max"] == 3
    assert out["training_file"]["tokens"]["total"] == (8 + 2) + (8 + 3) + (8 + 2) + (8 + 2)


def test_the_report_needs_no_torch(tmp_path):
    from dpo_core.toy import build_tokenizer

    build_tokenizer(tmp_path / "tok")
    train = write(tmp_path / "train.jsonl", [pair("sort : n1 n2", "n1 n2", "n2 n1")])
    code = ("import json, sys\nfrom dpo_core.preflight import data_report\nfrom dpo_core.spec import parse_spec\n"
            "from dpo_core.tokenizer_loading import load_tokenizer\n"
            f"spec = parse_spec({{'model': {str(tmp_path / 'tok')!r}, 'train_file': {train!r}}})\n"
            "report = data_report(spec, load_tokenizer(spec.model))\n"
            "print(json.dumps([report['training_file']['tokens']['total'], 'torch' in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == [(4 + 3) * 2, False]  # "sort : n1 n2" and "n1 n2 </s>", twice
