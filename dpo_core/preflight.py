"""The pre-flight data report: what a run's data looks like to the model, before any compute is spent.

`data_report(spec, tokenizer)` reads the spec's files with dpo_core.data.read_jsonl, takes the rows its loss
trains on (dpo_core.data.rows_for_loss: KTO splits each pair into two rows) and tokenizes them with
dpo_core.tokenize.tokenize at the spec's max_length and max_prompt_length, as the trainer does, so its
counts are the trainer's: `tokens.total` is the trainer's `num_tokens` after one epoch, `rows_dropped` and
`rows_truncated` its own counts. Pass the tokenizer dpo_core.tokenizer_loading.load_tokenizer gives. No torch.

Per file (`FileReport`, JSON-ready):
  rows                 rows the trainer reads (KTO on pairs: two per pair)
  rows_used            rows that keep a completion token within max_length
  rows_dropped         the others, which the trainer skips
  rows_truncated       used rows cut to fit; truncated_tokens: the tokens cut (a row's prompt counted once)
  lengths              token-length percentiles p50/p90/p99/max of prompt, chosen, rejected (unpaired rows:
                       prompt, completion) before truncation, over every row; nearest-rank percentiles
                       (the smallest length that at least p% of the rows do not exceed)
  tokens               total: non-padding tokens one epoch trains on, sum over used rows of
                       (prompt + chosen) + (prompt + rejected), or prompt + completion; longest_sequence:
                       the longest prompt + completion trained
  duplicate_pairs      rows repeating an earlier row exactly (prompt, tools and completions; unpaired rows:
                       prompt, completion and label)
  identical_pairs      pairs whose chosen equals rejected (files of pairs, also under KTO; else 0)
  length_bias          over the used pairs as trained: the share where chosen is longer, and the mean of
                       chosen minus rejected tokens; None when the run trains on unpaired rows
  groups               rows per `group` ("default" for rows without one), when any row has one
  overlap_with_training  validation file only: its rows whose prompt the training file also holds
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from dpo_core.data import SHOWN_LINES, PairRow, PreferenceData, read_jsonl, rows_for_loss
from dpo_core.spec import TrainingSpec
from dpo_core.tokenize import TokenizedPair, TokenizeResult, hold_out_for_samples, tokenize

PERCENTILES = (50, 90, 99)
# A length bias worth a warning: chosen longer (or shorter) in at least this share of the pairs.
LENGTH_BIAS_SHARE = 0.7
_FILES = {"training_file": "training file", "validation_file": "validation file"}


def data_report(spec: TrainingSpec, tokenizer: Any) -> dict:
    """{"training_file": FileReport, "validation_file": FileReport | None, "warnings": [...]}. Raises what
    the trainer would raise on the same data (DataError for a bad file, TrainingError for unpaired rows
    under a paired loss or message rows without a chat template)."""
    train = _analyse("training_file", read_jsonl(spec.train_file), spec, tokenizer)
    valid = None
    if spec.validation_file:
        valid = _analyse("validation_file", read_jsonl(spec.validation_file), spec, tokenizer, train.prompts)
    warnings = train.warnings + (valid.warnings if valid else [])
    warnings += _spec_warnings(spec, train)
    return {"training_file": train.report, "validation_file": valid.report if valid else None,
            "warnings": warnings}


@dataclass
class _File:
    """One file's report, the warnings about its rows, and its prompts (for the validation overlap)."""

    report: dict
    warnings: list[dict] = field(default_factory=list)
    prompts: set = field(default_factory=set)
    groups: set = field(default_factory=set)


class _Lines:
    """Rows with one finding: all counted, the first SHOWN_LINES distinct file lines kept (KTO's two rows of
    a pair share a line)."""

    def __init__(self) -> None:
        self.count, self.lines = 0, []

    def add(self, line: int) -> None:
        self.count += 1
        if len(self.lines) < SHOWN_LINES and line not in self.lines:
            self.lines.append(line)


def _analyse(param: str, source: PreferenceData, spec: TrainingSpec, tokenizer: Any,
             training_prompts: set | None = None) -> _File:
    data = rows_for_loss(source, spec.loss.unpaired)
    result = tokenize(data, tokenizer, max_length=spec.max_length, max_prompt_length=spec.max_prompt_length)
    dropped, truncated = _fit_lines(data, result)
    held = 0
    if param == "training_file":  # rows whose prompt samples hold out are not trained on
        kept, _ = hold_out_for_samples(spec, result.rows)
        held, result.rows = len(result.rows) - len(kept), kept
    duplicates, prompts = _duplicates(data)
    identical = _identical(source)
    bias, bias_lines = _length_bias(result, data)
    report = {
        "rows": len(data.rows), "rows_used": len(result.rows), "rows_dropped": result.skipped,
        "rows_truncated": result.truncated, "truncated_tokens": result.truncated_tokens,
        "lengths": _lengths(result, data.paired), "tokens": _tokens(result),
        "duplicate_pairs": duplicates.count, "identical_pairs": identical.count,
        "length_bias": bias, "groups": _groups(data), "rows_held_out": held,
    }
    out = _File(report, prompts=set(prompts), groups={r.group for r in data.rows})
    w = _Warner(param, out.warnings)
    w.add("rows_dropped", dropped, f"cannot keep a completion token within max_length={spec.max_length} after "
          f"the prompt, so training skips them (of {len(data.rows)} rows); raise training.max_length or lower "
          "training.max_prompt_length")
    w.add("rows_truncated", truncated, f"are cut to fit max_length={spec.max_length} and max_prompt_length="
          f"{spec.max_prompt_length}, losing {result.truncated_tokens} tokens: the prompt keeps its end and the "
          "completion its start; raise the limits or shorten those rows")
    w.add("duplicate_pairs", duplicates, "repeat an earlier row exactly, so training weighs them more; remove "
          "the copies")
    w.add("identical_pairs", identical, "have the same chosen and rejected completion: such a pair adds nothing "
          "to the preference loss; fix or remove it")
    if bias_lines is not None:
        w.add("length_bias", bias_lines, _bias_message(bias))
    w.add("unknown_group", _unknown_groups(data, spec), "have a group that training.loss.beta_by_group does not "
          "name, so they train with loss.beta and weight 1; add the group to beta_by_group or fix its spelling")
    if training_prompts is not None:
        overlap = _overlap(data, prompts, training_prompts)
        report["overlap_with_training"] = overlap.count
        w.add("validation_overlap", overlap, "have a prompt that the training file also holds, so evaluation on "
              "them overstates how the model does on new prompts; keep each prompt in one file")
    _unknown_fields(source, w)
    return out


# `what` is written for several rows; one row takes the singular of its first verb.
_SINGULAR = {"are": "is", "have": "has", "repeat": "repeats", "hold": "holds"}


def _agree(what: str, count: int) -> str:
    verb, _, rest = what.partition(" ")
    return f"{_SINGULAR.get(verb, verb)} {rest}" if count == 1 else what


class _Warner:
    """Builds the warnings about one file's rows: {code, param, count, lines, message}."""

    def __init__(self, param: str, out: list[dict]):
        self.param, self.out = param, out

    def add(self, code: str, rows: _Lines, what: str) -> None:
        if not rows.count:
            return
        shown = ", ".join(map(str, rows.lines))
        plural = "s" * (len(rows.lines) != 1)
        where = f"first at lines {shown}" if rows.count > len(rows.lines) else f"line{plural} {shown}"
        rows_text = f"{rows.count} row{'s' * (rows.count != 1)} of the {_FILES[self.param]}"
        message = f"{rows_text} ({where}) {_agree(what, rows.count)}"
        self.out.append({"code": code, "param": self.param, "count": rows.count, "lines": rows.lines,
                         "message": message})


def _fit_lines(data: PreferenceData, result: TokenizeResult) -> tuple[_Lines, _Lines]:
    """The rows tokenization dropped, and the used rows it truncated."""
    dropped, truncated = _Lines(), _Lines()
    used = iter(result.rows)
    row = next(used, None)
    for i, sizes in enumerate(result.lengths):
        if row is None or row.index != i:
            dropped.add(data.rows[i].line)
            continue
        if sizes != _sizes(row):
            truncated.add(data.rows[i].line)
        row = next(used, None)
    return dropped, truncated


def _sizes(row) -> tuple[int, ...]:
    if isinstance(row, TokenizedPair):
        return len(row.prompt_ids), len(row.chosen_ids), len(row.rejected_ids)
    return len(row.prompt_ids), len(row.completion_ids)


def _lengths(result: TokenizeResult, paired: bool) -> dict:
    names = ("prompt", "chosen", "rejected") if paired else ("prompt", "completion")
    columns = zip(*result.lengths)
    return {name: _percentiles(sorted(column)) for name, column in zip(names, columns)}


def _percentiles(values: list[int]) -> dict:
    """Nearest-rank percentiles of sorted `values`: the value at rank ceil(p/100 * n)."""
    n = len(values)
    out = {f"p{p}": values[max(math.ceil(p * n / 100), 1) - 1] for p in PERCENTILES}
    return {**out, "max": values[-1]}


def _tokens(result: TokenizeResult) -> dict:
    """Tokens as batching.collate counts them (num_tokens), in either layout: a pair's prompt twice."""
    sizes = [_sizes(r) for r in result.rows]
    if sizes and len(sizes[0]) == 3:
        total = sum(2 * p + c + r for p, c, r in sizes)
        longest = max((p + max(c, r) for p, c, r in sizes), default=0)
    else:
        total = sum(p + c for p, c in sizes)
        longest = max((p + c for p, c in sizes), default=0)
    return {"total": total, "longest_sequence": longest}


def _key(value: Any) -> str | None:
    """A hashable form of text or of a message list."""
    return value if value is None or isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def _duplicates(data: PreferenceData) -> tuple[_Lines, list]:
    """Rows repeating an earlier row exactly, and each row's prompt key (prompt and tools)."""
    seen: set = set()
    found, prompts = _Lines(), []
    for row in data.rows:
        prompt = (_key(row.prompt), _key(row.tools))
        prompts.append(prompt)
        rest = (_key(row.chosen), _key(row.rejected)) if isinstance(row, PairRow) else (_key(row.completion), row.label)
        key = (*prompt, *rest)
        if key in seen:
            found.add(row.line)
        seen.add(key)
    return found, prompts


def _identical(source: PreferenceData) -> _Lines:
    found = _Lines()
    for row in source.rows:
        if isinstance(row, PairRow) and row.chosen == row.rejected:
            found.add(row.line)
    return found


def _length_bias(result: TokenizeResult, data: PreferenceData) -> tuple[dict | None, _Lines | None]:
    """length_bias over the used pairs as trained, and the lines of the pairs in the direction of a bias past
    LENGTH_BIAS_SHARE (None when there is none)."""
    pairs = [r for r in result.rows if isinstance(r, TokenizedPair)]
    if not pairs:
        return None, None
    diffs = [len(r.chosen_ids) - len(r.rejected_ids) for r in pairs]
    longer, shorter = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    bias = {"chosen_longer_share": round(longer / len(pairs), 4),
            "mean_difference_tokens": round(sum(diffs) / len(pairs), 2)}
    sign = 1 if longer / len(pairs) >= LENGTH_BIAS_SHARE else -1 if shorter / len(pairs) >= LENGTH_BIAS_SHARE else 0
    if not sign:
        return bias, None
    lines = _Lines()
    for row, d in zip(pairs, diffs):
        if d * sign > 0:
            lines.add(data.rows[row.index].line)
    return bias, lines


def _bias_message(bias: dict) -> str:
    side = "longer" if bias["chosen_longer_share"] >= LENGTH_BIAS_SHARE else "shorter"
    return (f"have a chosen completion {side} than the rejected one (chosen is longer in "
            f"{bias['chosen_longer_share']:.0%} of the used pairs, by {bias['mean_difference_tokens']:+g} tokens on "
            "average): the model can learn length instead of the preference; balance the lengths, or try "
            "loss.type simpo, which normalises by length")


def _groups(data: PreferenceData) -> dict | None:
    if not any(r.group is not None for r in data.rows):
        return None
    return dict(Counter(r.group or "default" for r in data.rows))


def _unknown_groups(data: PreferenceData, spec: TrainingSpec) -> _Lines:
    found = _Lines()
    named = spec.loss.beta_by_group
    if named:
        for row in data.rows:
            if row.group is not None and row.group not in named:
                found.add(row.line)
    return found


def _overlap(data: PreferenceData, prompts: list, training_prompts: set) -> _Lines:
    found = _Lines()
    for row, prompt in zip(data.rows, prompts):
        if prompt in training_prompts:
            found.add(row.line)
    return found


def _unknown_fields(source: PreferenceData, w: _Warner) -> None:
    """The reader's unknown_fields warning (a misspelled key is ignored, not read)."""
    for warning in source.warnings:
        if warning.code == "unknown_fields":
            w.out.append({**warning.as_dict(), "param": w.param})


def _spec_warnings(spec: TrainingSpec, train: _File) -> list[dict]:
    """Findings about settings rather than rows: beta_by_group names no row has, too few rows for a batch."""
    out = []
    unused = [name for name in spec.loss.beta_by_group if name not in train.groups]
    if unused:
        out.append({"code": "unused_group", "param": "training.loss.beta_by_group", "count": len(unused),
                    "lines": [], "message": f"loss.beta_by_group names {', '.join(map(repr, unused))}, which no row "
                    "of the training file has; check the names against the rows' `group`"})
    used = train.report["rows_used"]
    if used < spec.batch_size:
        out.append({"code": "too_few_rows", "param": "training.batch_size", "count": used, "lines": [],
                    "message": f"only {used} training row{'s' * (used != 1)} fit, fewer than batch_size="
                    f"{spec.batch_size}: every step trains on the same rows; add rows or lower training.batch_size"})
    return out
