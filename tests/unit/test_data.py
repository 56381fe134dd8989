"""dpo_core.data: each format read and normalized; every bad input named by file, line and field."""
import json
import pickle
import subprocess
import sys

import pytest

from dpo_core.data import (
    SHOWN_FIELDS,
    SHOWN_LINES,
    DataError,
    DataWarning,
    PairRow,
    Problem,
    UnpairedRow,
    Validator,
    read_jsonl,
    read_jsonl_bytes,
    split_pairs,
)


def jsonl(*rows) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode()


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


TEXT = {"prompt": "2+2=", "chosen": "4", "rejected": "5"}
CONV = {"prompt": [user("2+2?")], "chosen": [assistant("4")], "rejected": [assistant("5")]}
OPENAI = {
    "input": {"messages": [user("2+2?")], "tools": [{"type": "function", "function": {"name": "calc"}}],
              "parallel_tool_calls": True},
    "preferred_output": [assistant("4")],
    "non_preferred_output": [assistant("5")],
}
UNPAIRED = {"prompt": "2+2=", "completion": "4", "label": True}


def problems(data: bytes, name="train.jsonl", **kw) -> DataError:
    with pytest.raises(DataError) as info:
        read_jsonl_bytes(data, name, **kw)
    return info.value


def only(err: DataError) -> Problem:
    assert len(err.problems) == 1, str(err)
    return err.problems[0]


# Formats.

def test_text_format():
    data = read_jsonl_bytes(jsonl(TEXT, {**TEXT, "prompt": "", "group": "math", "extra": 1}), "t.jsonl")
    assert (data.source, data.format, data.paired, data.conversational) == ("t.jsonl", "text", True, False)
    assert data.rows == [PairRow("2+2=", "4", "5", None, 1), PairRow("", "4", "5", "math", 2)]
    assert data.warnings == [DataWarning("unknown_fields", 1, (2,), ("extra",))]


def test_conversational_format():
    system = {"role": "system", "content": ""}
    data = read_jsonl_bytes(jsonl({**CONV, "prompt": [system, user("2+2?")]}), "c.jsonl")
    assert (data.format, data.paired, data.conversational) == ("conversational", True, True)
    assert data.rows == [PairRow([system, user("2+2?")], [assistant("4")], [assistant("5")], None, 1)]


def test_openai_format_normalized_to_message_pairs():
    data = read_jsonl_bytes(jsonl(OPENAI, {**OPENAI, "group": "g"}), "o.jsonl")
    assert (data.format, data.paired, data.conversational) == ("openai", True, True)
    row = data.rows[1]
    assert (row.prompt, row.chosen, row.rejected, row.group, row.line) == (
        [user("2+2?")], [assistant("4")], [assistant("5")], "g", 2)
    assert row.tools == OPENAI["input"]["tools"]


def test_openai_assistant_tool_call_without_content_is_accepted():
    call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function"}]}
    result = {"role": "tool", "content": "4", "tool_call_id": "1"}
    row = {**OPENAI, "input": {"messages": [user("2+2?"), call, result]}}
    assert read_jsonl_bytes(jsonl(row), "o.jsonl").rows[0].prompt[1] == call


@pytest.mark.parametrize("row, conversational", [
    (UNPAIRED, False),
    ({"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False}, True),
])
def test_unpaired_format(row, conversational):
    data = read_jsonl_bytes(jsonl(row, {**row, "group": "g"}), "u.jsonl")
    assert (data.format, data.paired, data.conversational) == ("unpaired", False, conversational)
    assert data.rows[1] == UnpairedRow(row["prompt"], row["completion"], row["label"], "g", 2)


def test_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl(TEXT).replace(b"\n", b"\r\n") + b"\r\n\r\n   \n" + jsonl(TEXT) + b"\n")
    data = read_jsonl(path)
    assert [r.line for r in data.rows] == [1, 4]
    assert data.source == "train.jsonl"


def test_very_long_line():
    long = "word " * 500_000
    assert read_jsonl_bytes(jsonl({**TEXT, "chosen": long}), "t.jsonl").rows[0].chosen == long


def test_split_pairs_for_kto():
    data = split_pairs(read_jsonl_bytes(jsonl(OPENAI), "o.jsonl"))
    assert (data.format, data.paired, data.conversational) == ("unpaired", False, True)
    assert [(r.completion, r.label, r.line) for r in data.rows] == [([assistant("4")], True, 1),
                                                                    ([assistant("5")], False, 1)]
    assert data.rows[0].tools == OPENAI["input"]["tools"]
    unpaired = read_jsonl_bytes(jsonl(UNPAIRED), "u.jsonl")
    assert split_pairs(unpaired) is unpaired


# Errors: each names the file, the line and the field.

@pytest.mark.parametrize("row, field, words", [
    ({"prompt": "q", "rejected": "5"}, "chosen", "is missing"),
    ({**TEXT, "chosen": ""}, "chosen", "non-empty"),
    ({**TEXT, "rejected": " \n\t"}, "rejected", "non-empty"),
    ({**TEXT, "prompt": 3}, "prompt", "must be a string"),
    ({**TEXT, "prompt": None}, "prompt", "got null"),
    ({**TEXT, "group": 7}, "group", "non-empty string"),
])
def test_text_row_errors(row, field, words):
    p = only(problems(jsonl(TEXT, row)))
    assert (p.file, p.line, p.field) == ("train.jsonl", 2, field)
    assert words in p.message


@pytest.mark.parametrize("change, field, words", [
    ({"prompt": []}, "prompt", "non-empty list of messages, got 0"),
    ({"prompt": "2+2?"}, "prompt", "message lists"),
    ({"prompt": [{"role": "bot", "content": "x"}]}, "prompt[0].role", "one of system, user, assistant, tool"),
    ({"prompt": [{"content": "x"}]}, "prompt[0].role", "missing"),
    ({"prompt": [user(3)]}, "prompt[0].content", "must be a string"),
    ({"prompt": ["hi"]}, "prompt[0]", "must be an object"),
    ({"chosen": [assistant("4"), assistant("4")]}, "chosen", "one assistant message, got 2"),
    ({"chosen": []}, "chosen", "one assistant message, got 0"),
    ({"chosen": [user("4")]}, "chosen[0].role", "must be 'assistant'"),
    ({"rejected": [assistant("  ")]}, "rejected[0].content", "non-empty"),
])
def test_conversational_row_errors(change, field, words):
    p = only(problems(jsonl(CONV, {**CONV, **change})))
    assert (p.line, p.field) == (2, field)
    assert words in p.message, p.message


@pytest.mark.parametrize("row, field", [
    ({**OPENAI, "input": "2+2?"}, "input"),
    ({**OPENAI, "input": {}}, "input.messages"),
    ({**OPENAI, "input": {"messages": [user("a"), {"role": "dev", "content": "b"}]}}, "input.messages[1].role"),
    ({**OPENAI, "preferred_output": [user("4")]}, "preferred_output[0].role"),
    ({k: v for k, v in OPENAI.items() if k != "non_preferred_output"}, "non_preferred_output"),
    ({**OPENAI, "input": {**OPENAI["input"], "tools": "calc"}}, "input.tools"),
])
def test_openai_row_errors(row, field):
    assert only(problems(jsonl(OPENAI, row)))[1:3] == (2, field)


@pytest.mark.parametrize("label", [1, 0, "true", None])
def test_label_must_be_a_json_boolean(label):
    p = only(problems(jsonl(UNPAIRED, {**UNPAIRED, "label": label})))
    assert (p.line, p.field) == (2, "label")
    assert "JSON boolean" in p.message


def test_unpaired_rows_keep_to_text_or_messages():
    row = {"prompt": [user("2+2?")], "completion": [assistant("4")], "label": True}
    err = problems(jsonl(UNPAIRED, row))
    assert [(p.line, p.field) for p in err.problems] == [(2, "prompt"), (2, "completion")]
    assert "string" in err.problems[0].message and "array" in err.problems[0].message  # what it must be, what it is


@pytest.mark.parametrize("line, words", [
    (b'{"prompt": "a", "chosen": ', "not valid JSON"),
    (b"[1, 2]", "must be a JSON object, got an array"),
    (b'"text"', "must be a JSON object, got a string"),
    (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8 (byte 0xe9"),
    (b"[" * 100_000, "not valid JSON"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1' + b"0" * 5000 + b"}", "integer of 5001 digits"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": [-1' + b"0" * 4300 + b"]}", "integer of 4301 digits"),
])
def test_bad_lines(line, words):
    p = only(problems(jsonl(TEXT) + b"\n" + line))
    assert (p.line, p.field) == (2, None)
    assert words in p.message
    assert str(p).startswith("train.jsonl:2: ")


def test_an_integer_too_long_to_convert_is_a_problem_of_its_line_and_the_others_are_still_read():
    huge = b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1' + b"0" * 5000 + b"}"
    err = problems(jsonl(TEXT) + b"\n" + huge + b"\n" + jsonl({**TEXT, "chosen": ""}))
    assert [(p.line, p.field) for p in err.problems] == [(2, None), (3, "chosen")]
    assert "4300" in err.problems[0].message
    # At the limit an integer is read; a float of any length is a float.
    at_limit = b'{"prompt": "p", "chosen": "a", "rejected": "b", "x": [1' + b"0" * 4299 + b", 1" + b"0" * 9000 + b".5]}"
    assert read_jsonl_bytes(at_limit, "t.jsonl").rows[0].chosen == "a"


@pytest.mark.parametrize("line, field", [
    (b'{"prompt": "p", "chosen": "a\\ud800", "rejected": "b"}', "chosen"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "group": "\\udfff"}', "group"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "notes": {"x": ["ok", "\\uDBFF"]}}', "notes.x[1]"),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "\\udc00": 1}', None),
    (b'{"prompt": "p", "chosen": "a", "rejected": "b", "notes": {"\\udc00": 1}}', "notes"),
    (b'{"prompt": "p", "completion": "a", "label": "\\ud800"}', "label"),
])
def test_a_lone_surrogate_is_a_problem_naming_its_field(line, field):
    err = problems(line)
    p = only(err)
    assert (p.line, p.field) == (1, field)
    assert "lone surrogate" in p.message
    str(err).encode("utf-8")  # the report itself is valid text


def test_a_surrogate_pair_and_an_escaped_backslash_are_text():
    line = b'{"prompt": "\\ud83d\\ude00", "chosen": "\\\\ud800", "rejected": "b"}'
    row = read_jsonl_bytes(line, "t.jsonl").rows[0]
    assert (row.prompt, row.chosen) == ("\U0001f600", "\\ud800")


def test_line_mixing_formats():
    p = only(problems(jsonl(TEXT, UNPAIRED)))
    assert (p.line, p.field) == (2, None)
    # Names the line's format, the file's, and the line that set it.
    assert all(words in p.message for words in ("prompt/completion/label", "prompt/chosen/rejected", "line 1"))


def test_text_file_with_a_message_list_row():
    err = problems(jsonl(TEXT, CONV))
    assert [(p.line, p.field) for p in err.problems] == [(2, "prompt"), (2, "chosen"), (2, "rejected")]
    assert "string" in err.problems[0].message and "array" in err.problems[0].message


def test_row_of_no_known_format():
    other = {"question": "q", "answer": "a"}
    err = problems(jsonl(other, other))  # no line names a format: each is reported
    assert [p.line for p in err.problems] == [1, 2]
    for keys in ("prompt/chosen/rejected", "prompt/completion/label", "input/preferred_output/non_preferred_output"):
        assert keys in err.problems[0].message  # the formats it knows, by their keys
    err = problems(jsonl(TEXT, other))  # once the format is known, its fields are missing
    assert [(p.line, p.field, p.message) for p in err.problems] == [
        (2, f, "is missing") for f in ("prompt", "chosen", "rejected")]


def test_every_bad_line_is_listed_with_every_bad_field():
    data = jsonl(TEXT, {"prompt": "q", "chosen": "", "rejected": 5}, TEXT, "not json", [1], TEXT)
    err = problems(data)
    assert [(p.line, p.field) for p in err.problems] == [(2, "chosen"), (2, "rejected"), (4, None), (5, None)]
    assert err.total == 4
    assert str(err).splitlines()[0] == "4 problems in train.jsonl"
    assert "  train.jsonl:2: field 'chosen': must be a non-empty string" in str(err).splitlines()


def test_problems_capped_but_all_counted():
    err = problems(jsonl(TEXT, *["{bad"] * 30), max_errors=5)
    assert len(err.problems) == 5 and err.total == 30
    assert [p.line for p in err.problems] == [2, 3, 4, 5, 6]
    assert str(err).splitlines()[-1] == "  ... and 25 more"


def test_first_row_decides_the_format_even_after_bad_lines():
    err = problems(jsonl("oops", UNPAIRED, TEXT))
    assert [(p.line, p.field) for p in err.problems] == [(1, None), (3, None)]
    assert "unpaired" in err.problems[1].message


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_empty_file(content):
    p = only(problems(content))
    assert (p.file, p.line, p.field) == ("train.jsonl", None, None)
    assert "no rows" in p.message


def test_utf16_file():
    p = only(problems(json.dumps(TEXT).encode("utf-16")))
    assert "UTF-16" in p.message


def test_file_not_found(tmp_path):
    with pytest.raises(DataError) as info:
        read_jsonl(tmp_path / "missing.jsonl")
    p = only(info.value)
    assert p.file == "missing.jsonl" and "file not found" in p.message


def test_problem_str_omits_missing_parts():
    assert str(Problem("t.jsonl", 12, "chosen", "must be x")) == "t.jsonl:12: field 'chosen': must be x"
    assert str(Problem("t.jsonl", 3, None, "not valid JSON")) == "t.jsonl:3: not valid JSON"
    assert str(Problem("t.jsonl", None, None, "file not found")) == "t.jsonl: file not found"
    assert str(DataError([Problem("t.jsonl", None, None, "x")])).startswith("1 problem in t.jsonl\n")


def test_importing_data_leaves_torch_and_transformers_out():
    code = "import sys, dpo_core.data; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_data_error_survives_pickling():
    err = problems(jsonl(TEXT, *["{bad"] * 3), max_errors=2)
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.problems, copy.total, str(copy)) == (err.problems, err.total, str(err))


# Warnings: valid rows that are probably a mistake, counted with their first lines.

@pytest.mark.parametrize("row, same", [
    (TEXT, {**TEXT, "rejected": TEXT["chosen"]}),
    (CONV, {**CONV, "rejected": CONV["chosen"]}),
    (OPENAI, {**OPENAI, "non_preferred_output": OPENAI["preferred_output"]}),
])
def test_identical_pairs_are_counted_with_their_first_lines(row, same):
    rows = [row, same] + [row, same] * (SHOWN_LINES + 2)
    data = read_jsonl_bytes(jsonl(*rows), "t.jsonl")
    assert len(data.rows) == len(rows)
    (warning,) = data.warnings
    assert (warning.code, warning.count) == ("identical_pair", SHOWN_LINES + 3)
    assert warning.lines == tuple(range(2, 2 * SHOWN_LINES + 1, 2))
    assert warning.as_dict() == {"code": "identical_pair", "count": SHOWN_LINES + 3, "lines": list(warning.lines),
                                 "message": warning.message}
    assert "lines 2, 4," in warning.message and "and 3 more" in warning.message


def test_an_unpaired_file_has_no_identical_pairs():
    assert read_jsonl_bytes(jsonl(UNPAIRED, {**UNPAIRED, "label": False}), "u.jsonl").warnings == []


@pytest.mark.parametrize("row, known, unknown", [
    (TEXT, ["group"], ["tools", "completion", "Chosen"]),
    (CONV, ["group", "tools"], ["label"]),
    (OPENAI, ["group"], ["prompt_id", "tools"]),
    (UNPAIRED, ["group"], ["tools", "score"]),
    ({"prompt": [user("2+2?")], "completion": [assistant("5")], "label": False}, ["group", "tools"], ["weight"]),
])
def test_unknown_fields_are_named_per_format(row, known, unknown):
    values = {"group": "g", "tools": [{"type": "function"}]}
    rows = [{**row, **{k: values.get(k, "x") for k in known}}, {**row, **{k: values.get(k, "x") for k in unknown}}]
    (warning,) = read_jsonl_bytes(jsonl(*rows), "t.jsonl").warnings
    assert (warning.code, warning.count, warning.lines, warning.fields) == ("unknown_fields", 1, (2,), tuple(unknown))
    assert warning.as_dict()["fields"] == unknown


def test_unknown_field_names_are_capped_and_printable():
    rows = [{**TEXT, f"f{i}": 1} for i in range(SHOWN_FIELDS + 5)]
    rows.append({**TEXT, "x" * 1000: 1, "tab\there": 2})
    (warning,) = read_jsonl_bytes(jsonl(*rows), "t.jsonl").warnings
    assert warning.count == len(rows) and warning.fields == tuple(f"f{i}" for i in range(SHOWN_FIELDS))
    data = read_jsonl_bytes(jsonl(TEXT, {**TEXT, "x" * 1000: 1, "tab\there": 2}), "t.jsonl")
    assert data.warnings[0].fields == ("x" * 61 + "...", "tab\\u0009here")


def test_rows_with_both_warnings_report_both_and_a_bad_file_none():
    data = read_jsonl_bytes(jsonl({**TEXT, "rejected": "4", "note": 1}), "t.jsonl")
    assert [w.code for w in data.warnings] == ["identical_pair", "unknown_fields"]
    assert split_pairs(data).warnings == data.warnings
    problems(jsonl({**TEXT, "rejected": "4"}, "oops"))  # a file with a bad line is refused, warnings or not


# The validator one line at a time, as an upload streams through it.

def test_validator_without_rows_summarizes_the_same_file():
    lines = jsonl(TEXT, {**TEXT, "rejected": "4"}, UNPAIRED | {"prompt": "x"}).splitlines(keepends=True)[:2]
    check = Validator("t.jsonl", keep_rows=False)
    assert list(check.passing(lines)) == lines
    summary = check.finish()
    assert (summary.source, summary.format, summary.rows) == ("t.jsonl", "text", 2)
    assert summary.warnings == tuple(read_jsonl_bytes(b"".join(lines), "t.jsonl").warnings)
    assert check.rows == []


def test_validator_passes_lines_until_the_first_bad_one_and_raises_at_the_end():
    lines = jsonl(TEXT, TEXT, "oops", TEXT, {**TEXT, "chosen": 1}).splitlines(keepends=True)
    check = Validator("t.jsonl", keep_rows=False)
    passed = []
    with pytest.raises(DataError) as info:
        for line in check.passing(lines):
            passed.append(line)
    assert passed == lines[:2]  # the bad line and those after it are checked, not passed on
    assert [(p.line, p.field) for p in info.value.problems] == [(3, None), (5, "chosen")]


def test_validator_refuses_an_empty_stream():
    check = Validator("t.jsonl", keep_rows=False)
    with pytest.raises(DataError) as info:
        list(check.passing([b"\n", b"  \n"]))
    assert "no rows" in only(info.value).message
