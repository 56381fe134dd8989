"""Read and validate preference data in JSONL, reporting every bad line at once.

Imports neither torch nor transformers, even indirectly: the API validates uploads with it.

Four formats, detected per file from the first JSON object whose keys name one; every line must use it:
  text            {"prompt": str, "chosen": str, "rejected": str}
  conversational  {"prompt": [messages], "chosen": [one assistant message], "rejected": [one assistant message]}
  openai          {"input": {"messages": [...], "tools": [...]}, "preferred_output": [...],
                   "non_preferred_output": [...]}
                  (OpenAI preference fine-tuning), read as conversational pairs
  unpaired        {"prompt": str | [messages], "completion": str | [one assistant message], "label": true | false}
Any row may carry a `group` (multi-reward DPO); conversational rows may carry `tools` (JSON schemas passed to the
chat template). A prompt may be empty; a completion may not.

Valid rows that are probably not what their author meant do not fail the file; they are counted and
reported as DataWarnings: pairs whose chosen and rejected are the same (`identical_pair`), and rows with
keys the reader ignores (`unknown_fields`, often a misspelled field name).

`Validator` checks one line at a time and is the one definition of a valid file: `read_jsonl` keeps the
rows it passes; an upload streams through it keeping none, so its memory does not grow with the file.
"""
from __future__ import annotations

import codecs
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

ROLES = ("system", "user", "assistant", "tool")
_PAIRED_KEYS = frozenset({"chosen", "rejected"})
_UNPAIRED_KEYS = frozenset({"completion", "label"})
_OPENAI_KEYS = frozenset({"preferred_output", "non_preferred_output"})
_FAMILY_WORDS = {
    "paired": "a prompt/chosen/rejected pair",
    "openai": "an OpenAI preference row (input/preferred_output/non_preferred_output)",
    "unpaired": "an unpaired prompt/completion/label row",
}
# Keys each format reads; any other key in a row is reported as an unknown field.
_KNOWN_KEYS = {
    "text": frozenset({"prompt", "chosen", "rejected", "group"}),
    "conversational": frozenset({"prompt", "chosen", "rejected", "group", "tools"}),
    "openai": frozenset({"input", "preferred_output", "non_preferred_output", "group"}),
    "unpaired-text": frozenset({"prompt", "completion", "label", "group"}),
    "unpaired-conversational": frozenset({"prompt", "completion", "label", "group", "tools"}),
}
SHOWN_LINES = 10   # line numbers a warning lists
SHOWN_FIELDS = 20  # unknown field names a warning lists
# A \uD800-\uDFFF escape: only such a line can hold a lone surrogate (an escape without its pair).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")
_FORMAT_HINT = (
    "cannot tell the format: expected the keys prompt/chosen/rejected, prompt/completion/label, "
    "or input/preferred_output/non_preferred_output"
)

Message = dict[str, Any]
Content = str | list[Message]


class Problem(NamedTuple):
    """One thing wrong with a data file; `line` is 1-based, `field` a path like 'prompt[0].role'."""

    file: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        field = "" if self.field is None else f" field {self.field!r}:"
        return f"{where}:{field} {self.message}"


class DataError(ValueError):
    """A data file cannot be used. `problems` lists up to max_errors of them; `total` counts all."""

    def __init__(self, problems: list[Problem], total: int | None = None):
        self.problems = list(problems)
        self.total = len(self.problems) if total is None else total
        source = self.problems[0].file if self.problems else "data"
        lines = [f"{self.total} problem{'s' * (self.total != 1)} in {source}"]
        lines += [f"  {p}" for p in self.problems]
        if self.total > len(self.problems):
            lines.append(f"  ... and {self.total - len(self.problems)} more")
        super().__init__("\n".join(lines))

    def __reduce__(self):  # pickled whole (e.g. by a task queue), not rebuilt from the message alone
        return type(self), (self.problems, self.total)


@dataclass(frozen=True)
class PairRow:
    prompt: Content               # text, or a list of chat messages {"role", "content"}
    chosen: Content               # text, or a list holding one assistant message
    rejected: Content
    group: str | None = None      # multi-reward DPO group
    line: int = 0                 # 1-based line number in the file
    tools: list[dict] | None = None  # tool schemas for the chat template (conversational rows only)


@dataclass(frozen=True)
class UnpairedRow:
    prompt: Content
    completion: Content
    label: bool                   # True: desirable
    group: str | None = None
    line: int = 0
    tools: list[dict] | None = None


@dataclass(frozen=True)
class DataWarning:
    """Valid rows that are probably not what their author meant; a file holding them is still used."""

    code: str                     # "identical_pair" | "unknown_fields"
    count: int                    # rows
    lines: tuple[int, ...]        # the first SHOWN_LINES of them
    fields: tuple[str, ...] = ()  # unknown_fields: the names found (the first SHOWN_FIELDS)

    @property
    def message(self) -> str:
        one = self.count == 1
        rows = f"{self.count} row{'' if one else 's'} ({_lines_text(self.lines, self.count)})"
        if self.code == "identical_pair":
            return (f"{rows} {'has' if one else 'have'} the same chosen and rejected completion: such a pair adds "
                    "nothing to the preference loss; fix or remove it")
        return (f"{rows} {'holds' if one else 'hold'} fields that are ignored: {', '.join(self.fields)}; check "
                "their spelling (see the formats in docs/training.md) or remove them")

    def as_dict(self) -> dict:
        """JSON-ready, as the service stores and shows it."""
        out = {"code": self.code, "count": self.count, "lines": list(self.lines)}
        if self.code == "unknown_fields":
            out["fields"] = list(self.fields)
        return {**out, "message": self.message}


@dataclass(frozen=True)
class DataSummary:
    """What a valid file holds, without its rows."""

    source: str
    format: str                   # "text" | "conversational" | "openai" | "unpaired"
    rows: int
    warnings: tuple[DataWarning, ...] = ()


@dataclass
class PreferenceData:
    source: str                   # file name used in messages
    format: str                   # "text" | "conversational" | "openai" | "unpaired"
    rows: list[PairRow] | list[UnpairedRow]
    warnings: list[DataWarning] = field(default_factory=list)

    @property
    def paired(self) -> bool:
        return self.format != "unpaired"

    @property
    def conversational(self) -> bool:
        """Rows hold message lists (every row alike: the reader checks it)."""
        if self.format in ("conversational", "openai"):
            return True
        return bool(self.rows) and isinstance(self.rows[0].prompt, list)


def read_jsonl(path: str | Path, *, max_errors: int = 20) -> PreferenceData:
    """Read and validate a preference JSONL file; raise DataError naming every bad line (up to max_errors)."""
    path = Path(path)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        raise DataError([Problem(path.name, None, None, f"file not found: {path}; check the path")]) from None
    except OSError as err:
        raise DataError([Problem(path.name, None, None, f"cannot read {path}: {err.strerror}")]) from None
    with f:
        return _read(f, path.name, max_errors)


def read_jsonl_bytes(data: bytes, name: str, *, max_errors: int = 20) -> PreferenceData:
    """Like read_jsonl, for data held in memory; `name` is used in messages."""
    return _read(io.BytesIO(data), name, max_errors)


def split_pairs(data: PreferenceData) -> PreferenceData:
    """Paired data as unpaired rows (for KTO): each pair gives (prompt, chosen, True) and (prompt, rejected, False)."""
    if not data.paired:
        return data
    rows = []
    for r in data.rows:
        rows.append(UnpairedRow(r.prompt, r.chosen, True, r.group, r.line, r.tools))
        rows.append(UnpairedRow(r.prompt, r.rejected, False, r.group, r.line, r.tools))
    return PreferenceData(source=data.source, format="unpaired", rows=rows, warnings=data.warnings)


def rows_for_loss(data: PreferenceData, unpaired: bool) -> PreferenceData:
    """The rows a loss trains on: for an unpaired loss (KTO) pairs are split, for a paired one unpaired rows
    are refused (TrainingError)."""
    if unpaired:
        return split_pairs(data)
    if not data.paired:
        from dpo_core.errors import TrainingError

        raise TrainingError(f"{data.source} holds unpaired rows (prompt/completion/label); train it with "
                            "loss.type: kto, or supply pairs")
    return data


def _read(lines: Iterable[bytes], source: str, max_errors: int) -> PreferenceData:
    check = Validator(source, max_errors=max_errors, keep_rows=True)
    for raw in lines:
        check.add(raw)
    summary = check.finish()
    return PreferenceData(source=source, format=summary.format, rows=check.rows, warnings=list(summary.warnings))


class _Log:
    """Collects problems: keeps the first max_errors, counts them all."""

    def __init__(self, source: str, max_errors: int):
        if max_errors < 1:
            raise ValueError("max_errors must be at least 1")
        self.source, self.max_errors = source, max_errors
        self.problems: list[Problem] = []
        self.total = 0

    def add(self, line: int | None, field: str | None, message: str) -> None:
        self.total += 1
        if len(self.problems) < self.max_errors:
            self.problems.append(Problem(self.source, line, field, message))


class _Tally:
    """Rows that share one warning: all counted, the first SHOWN_LINES line numbers kept."""

    def __init__(self, code: str):
        self.code, self.count = code, 0
        self.lines: list[int] = []
        self.fields: dict[str, None] = {}  # an ordered set, capped at SHOWN_FIELDS

    def add(self, line: int, fields: Iterable[str] = ()) -> None:
        self.count += 1
        if len(self.lines) < SHOWN_LINES:
            self.lines.append(line)
        for name in fields:
            if len(self.fields) >= SHOWN_FIELDS:
                break
            self.fields.setdefault(_field_name(name))

    def warning(self) -> DataWarning | None:
        return DataWarning(self.code, self.count, tuple(self.lines), tuple(self.fields)) if self.count else None


class Validator:
    """Checks a JSONL file one line at a time: `add` each line (bytes, as split on b"\\n"), then `finish`.

    The file's format is set by the first line that names one, and every later line must keep to it.
    Bad lines are logged (the first max_errors kept, all counted) and the checks go on, so that every
    problem is reported at once; `finish` raises DataError if there was any. With keep_rows=False,
    `rows` stays empty and memory does not grow with the file."""

    def __init__(self, source: str, *, max_errors: int = 20, keep_rows: bool = True):
        self.source, self.keep_rows = source, keep_rows
        self.rows: list = []
        self._log = _Log(source, max_errors)
        self._decoder = json.JSONDecoder(parse_int=_int)  # built once per file, never shared across threads
        self._lineno = self._count = self._fmt_line = 0
        self._fmt: str | None = None  # the file's format, set by the first line that names one
        self._identical, self._unknown = _Tally("identical_pair"), _Tally("unknown_fields")

    @property
    def failed(self) -> bool:
        """A line so far was bad (finish will raise)."""
        return self._log.total > 0

    def add(self, raw: bytes) -> None:
        self._lineno += 1
        lineno = self._lineno
        if lineno == 1:
            if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
                raise DataError([Problem(self.source, None, None, "the file is UTF-16; save it as UTF-8")])
            raw = raw.removeprefix(codecs.BOM_UTF8)
        obj = _parse_line(raw, lineno, self._log, self._decoder)
        if obj is None or not self._keeps_format(obj, lineno):
            return
        errs: list[tuple[str, str]] = []
        row = _ROW_READERS[self._fmt](obj, errs, lineno)
        for name, message in errs:
            self._log.add(lineno, name, message)
        if errs:
            return
        self._count += 1
        if self.keep_rows:
            self.rows.append(row)
        if isinstance(row, PairRow) and row.chosen == row.rejected:
            self._identical.add(lineno)
        unknown = [key for key in obj if key not in _KNOWN_KEYS[self._fmt]]
        if unknown:
            self._unknown.add(lineno, unknown)

    def _keeps_format(self, obj: dict, lineno: int) -> bool:
        """Set the file's format from its first row that names one; log a row of another format."""
        family = _family(obj)
        if self._fmt is None:
            if family is None:
                self._log.add(lineno, None, _FORMAT_HINT)
                return False
            self._fmt, self._fmt_line = _format_of(obj, family), lineno
        elif family is not None and family != _family_of_format(self._fmt):
            self._log.add(lineno, None, f"this line is {_FAMILY_WORDS[family]}, but the file holds "
                                        f"{_FAMILY_WORDS[_family_of_format(self._fmt)]} (from line {self._fmt_line}); "
                                        "use one format per file")
            return False
        return True

    def finish(self) -> DataSummary:
        """The file's summary; DataError naming every bad line, or saying that the file holds no rows."""
        if self._log.total:
            raise DataError(self._log.problems, self._log.total)
        if not self._count:
            raise DataError([Problem(self.source, None, None,
                                     "the file holds no rows; write one JSON object per line")])
        warnings = tuple(w for w in (self._identical.warning(), self._unknown.warning()) if w)
        fmt = self._fmt.removesuffix("-text").removesuffix("-conversational")
        return DataSummary(self.source, fmt, self._count, warnings)

    def passing(self, lines: Iterable[bytes]) -> Iterator[bytes]:
        """Each line, checked on its way through, until the first bad one; then the rest is only checked.
        Once the lines run out, `finish` raises DataError if any was bad: a consumer that keeps what it
        was given only when the iteration ends without an error (a storage write) keeps only a valid file."""
        for raw in lines:
            self.add(raw)
            if not self.failed:
                yield raw
        self.finish()


class _TooManyDigits(ValueError):
    pass


def _int(text: str) -> int:
    """A JSON integer, refused past the interpreter's digit limit (int() would raise a bare ValueError, and
    without the limit take quadratic time)."""
    limit = sys.get_int_max_str_digits() or sys.int_info.default_max_str_digits
    digits = len(text) - text.startswith("-")
    if digits > limit:
        raise _TooManyDigits(digits, limit)
    return int(text)


def _parse_line(raw: bytes, lineno: int, log: _Log, decoder: json.JSONDecoder) -> dict | None:
    """The line's JSON object, or None for a blank or bad line (bad ones are logged)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        log.add(lineno, None, f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line); "
                              "save the file as UTF-8")
        return None
    if not text.strip():
        return None
    try:
        obj = decoder.decode(text)
    except json.JSONDecodeError as err:
        log.add(lineno, None, f"not valid JSON: {err.msg} at column {err.colno}")
        return None
    except RecursionError:
        log.add(lineno, None, "not valid JSON: nested too deeply")
        return None
    except _TooManyDigits as err:
        digits, limit = err.args
        log.add(lineno, None, f"holds an integer of {digits} digits, over the limit of {limit}; "
                              "write such a number as a string")
        return None
    if not isinstance(obj, dict):
        log.add(lineno, None, f"must be a JSON object, got {_kind(obj)}")
        return None
    if _SURROGATE_ESCAPE.search(raw) and (where := _lone_surrogate(obj)) is not None:
        log.add(lineno, where or None, "holds a lone surrogate (a \\ud800-\\udfff escape without its pair), which "
                                       "is not a character; fix the text's encoding")
        return None
    return obj


def _lone_surrogate(obj: dict) -> str | None:
    """The path of the first value holding a string that UTF-8 cannot encode (a lone surrogate), "" when it is
    a key of the line's object; None if there is none. Iterative: the line may nest as deep as JSON allows."""
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodable(key):
                    return path  # the object holding the key: the key itself cannot be shown
                stack.append((item, _short_path(f"{path}.{key}" if path else key)))
        elif isinstance(value, list):
            stack.extend((item, _short_path(f"{path}[{i}]")) for i, item in enumerate(value))
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _short_path(path: str) -> str:
    return path if len(path) <= 80 else path[:77] + "..."


def _field_name(name: str) -> str:
    """An unknown key as a warning lists it: printable (others as \\u escapes) and at most 64 characters."""
    shown = "".join(ch if ch.isprintable() else f"\\u{ord(ch):04x}" for ch in name[:65])
    return shown if len(shown) <= 64 else shown[:61] + "..."


def _lines_text(lines: tuple[int, ...], count: int) -> str:
    shown = ", ".join(map(str, lines))
    more = f" and {count - len(lines)} more" if count > len(lines) else ""
    return f"line{'s' * (count != 1)} {shown}{more}"


def _family(obj: dict) -> str | None:
    keys = obj.keys()
    if keys & _OPENAI_KEYS or ("input" in keys and not keys & {"prompt", *_PAIRED_KEYS, *_UNPAIRED_KEYS}):
        return "openai"
    if keys & _PAIRED_KEYS:
        return "paired"
    if keys & _UNPAIRED_KEYS:
        return "unpaired"
    return None


def _format_of(obj: dict, family: str) -> str:
    """The file's format; text or message lists is decided by the first row and holds for every row."""
    if family == "openai":
        return "openai"
    fields = ("prompt", "chosen", "rejected") if family == "paired" else ("prompt", "completion")
    lists = any(isinstance(obj.get(f), list) for f in fields)
    if family == "paired":
        return "conversational" if lists else "text"
    return "unpaired-conversational" if lists else "unpaired-text"


def _family_of_format(fmt: str) -> str:
    return {"text": "paired", "conversational": "paired", "openai": "openai"}.get(fmt, "unpaired")


# Row readers: append (field, message) to errs for each problem; return the row (ignored if errs).

def _text_pair(obj: dict, errs: list, line: int) -> PairRow:
    prompt = _string(obj, "prompt", errs, completion=False)
    chosen = _string(obj, "chosen", errs, completion=True)
    rejected = _string(obj, "rejected", errs, completion=True)
    return PairRow(prompt, chosen, rejected, _group(obj, errs), line)


def _conversational_pair(obj: dict, errs: list, line: int) -> PairRow:
    prompt = _messages(obj.get("prompt"), "prompt", errs, completion=False, present="prompt" in obj)
    chosen = _messages(obj.get("chosen"), "chosen", errs, completion=True, present="chosen" in obj)
    rejected = _messages(obj.get("rejected"), "rejected", errs, completion=True, present="rejected" in obj)
    return PairRow(prompt, chosen, rejected, _group(obj, errs), line, _tools(obj.get("tools"), "tools", errs))


def _openai_pair(obj: dict, errs: list, line: int) -> PairRow:
    inp = obj.get("input")
    if isinstance(inp, dict):
        prompt = _messages(inp.get("messages"), "input.messages", errs, completion=False, present="messages" in inp)
    else:
        errs.append(("input", "is missing" if "input" not in obj else
                     f"must be an object holding 'messages', got {_kind(inp)}"))
        inp, prompt = {}, None
    chosen = _messages(obj.get("preferred_output"), "preferred_output", errs, completion=True,
                       present="preferred_output" in obj)
    rejected = _messages(obj.get("non_preferred_output"), "non_preferred_output", errs, completion=True,
                         present="non_preferred_output" in obj)
    tools = _tools(inp.get("tools"), "input.tools", errs)
    return PairRow(prompt, chosen, rejected, _group(obj, errs), line, tools)


def _unpaired_text(obj: dict, errs: list, line: int) -> UnpairedRow:
    prompt = _string(obj, "prompt", errs, completion=False)
    completion = _string(obj, "completion", errs, completion=True)
    return UnpairedRow(prompt, completion, _label(obj, errs), _group(obj, errs), line)


def _unpaired_conversational(obj: dict, errs: list, line: int) -> UnpairedRow:
    prompt = _messages(obj.get("prompt"), "prompt", errs, completion=False, present="prompt" in obj)
    completion = _messages(obj.get("completion"), "completion", errs, completion=True, present="completion" in obj)
    tools = _tools(obj.get("tools"), "tools", errs)
    return UnpairedRow(prompt, completion, _label(obj, errs), _group(obj, errs), line, tools)


_ROW_READERS = {
    "text": _text_pair,
    "conversational": _conversational_pair,
    "openai": _openai_pair,
    "unpaired-text": _unpaired_text,
    "unpaired-conversational": _unpaired_conversational,
}


# Field checks.

def _string(obj: dict, key: str, errs: list, *, completion: bool) -> str | None:
    if key not in obj:
        errs.append((key, "is missing"))
        return None
    value = obj[key]
    if not isinstance(value, str):
        errs.append((key, f"must be a string (the file holds text, not message lists), got {_kind(value)}"))
        return None
    if completion and not value.strip():
        errs.append((key, "must be a non-empty string"))
        return None
    return value


def _messages(value: Any, field: str, errs: list, *, completion: bool, present: bool) -> list[Message] | None:
    """A prompt's message list, or a completion's list holding exactly one assistant message."""
    if not present:
        errs.append((field, "is missing"))
        return None
    what = "a list holding one assistant message" if completion else "a non-empty list of messages"
    if not isinstance(value, list):
        hint = " (the file holds message lists, not text)" if isinstance(value, str) else ""
        errs.append((field, f"must be {what}, got {_kind(value)}{hint}"))
        return None
    if not value or (completion and len(value) != 1):
        errs.append((field, f"must be {what}, got {len(value)} messages"))
        return None
    n_errs = len(errs)
    out = [_message(m, f"{field}[{i}]", errs, completion=completion) for i, m in enumerate(value)]
    return out if len(errs) == n_errs else None


def _message(m: Any, field: str, errs: list, *, completion: bool) -> Message | None:
    if not isinstance(m, dict):
        errs.append((field, f"must be an object with 'role' and 'content', got {_kind(m)}"))
        return None
    role = m.get("role")
    if role not in ROLES:
        got = "it is missing" if "role" not in m else f"got {_short(role)}"
        errs.append((f"{field}.role", f"must be one of {', '.join(ROLES)}; {got}"))
        return None
    if completion and role != "assistant":
        errs.append((f"{field}.role", f"must be 'assistant' in a completion, got {role!r}"))
        return None
    content = m.get("content")
    if role == "assistant" and content is None and not completion and m.get("tool_calls"):
        return dict(m)  # an assistant turn that only calls tools
    if not isinstance(content, str):
        got = "it is missing" if "content" not in m else f"got {_kind(content)}"
        errs.append((f"{field}.content", f"must be a string; {got}"))
        return None
    if completion and not content.strip():
        errs.append((f"{field}.content", "must be a non-empty string"))
        return None
    return dict(m)


def _tools(value: Any, field: str, errs: list) -> list[dict] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        errs.append((field, "must be a list of tool schemas (JSON objects)"))
        return None
    return value or None


def _group(obj: dict, errs: list) -> str | None:
    group = obj.get("group")
    if group is None:
        return None
    if not isinstance(group, str) or not group:
        errs.append(("group", f"must be a non-empty string or null, got {_short(group)}"))
        return None
    return group


def _label(obj: dict, errs: list) -> bool | None:
    if "label" not in obj:
        errs.append(("label", "is missing"))
        return None
    label = obj["label"]
    if not isinstance(label, bool):
        errs.append(("label", f"must be true or false (a JSON boolean), got {_short(label)}"))
        return None
    return label


def _kind(value: Any) -> str:
    """The JSON type of a parsed value, as a user would name it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(value: Any) -> str:
    """A value for a message: JSON, cut short so that one bad line cannot flood the report."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."
