"""Turn preference rows into token ids exactly as TRL 1.16's DPOTrainer and KTOTrainer do.

What TRL 1.16 does (trl/trainer/dpo_trainer.py `DPOTrainer._prepare_dataset`, its inner `tokenize_fn`;
trl/trainer/kto_trainer.py the same for unpaired rows; helpers `_tokenize` and `common_prefix_length` in
trl/data_utils.py), and so what we do:
  * Text rows: the EOS *text* is appended to each completion unless it already ends with it. Then the prompt and
    prompt+completion are tokenized as whole strings with the tokenizer's defaults, so a tokenizer that adds BOS
    (Llama-style post-processor) puts it at the start of the prompt. Prompt and completion are NOT tokenized
    separately with add_special_tokens=False.
  * Conversational rows: the prompt is rendered and tokenized with `apply_chat_template(prompt,
    add_generation_prompt=True)` and the whole conversation with `apply_chat_template(prompt + completion)`
    (the chat template's own control tokens only; no EOS is appended, so a completion ends with whatever the
    template closes an assistant turn with, e.g. "<|im_end|>" "\\n").
  * The completion starts where the tokenized prompt and prompt+completion first differ; for a pair, at the
    smaller of the two places. This is usually the end of the prompt; when tokens merge across the boundary or
    the template renders the prompt differently, the tail of the prompt is dropped (a warning says so).
  * Truncation, TRL's default `truncation_mode="keep_start"` with `max_length` (default 1024): prompt+completion
    is cut from the right to max_length, and a row whose prompt alone fills max_length is dropped.
TRL 1.16 has no `max_prompt_length`. Ours, when set, keeps the LAST max_prompt_length prompt tokens (as TRL
< 0.20 did, its `truncation_mode="keep_end"` for prompts) before the completion is fitted; pass None to match
TRL 1.16 token for token.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dpo_core.data import PreferenceData
from dpo_core.errors import TrainingError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_CHUNK = 1024  # rows per tokenizer call: batched for speed, bounded for memory


@dataclass(frozen=True)
class TokenizedPair:
    index: int                    # position in the source rows
    prompt_ids: list[int]
    chosen_ids: list[int]         # text rows: end with EOS; conversational: with the template's end of turn
    rejected_ids: list[int]
    group: str | None


@dataclass(frozen=True)
class TokenizedRow:
    index: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    group: str | None


@dataclass
class TokenizeResult:
    rows: list[TokenizedPair] | list[TokenizedRow]
    skipped: int                  # rows dropped because no completion token would fit
    truncated: int                # rows kept with prompt or completion shortened
    truncated_tokens: int = 0     # tokens those rows lost: prompt (once per row) and completions
    # Per source row, dropped ones too, before truncation: (prompt, chosen, rejected) or (prompt, completion).
    lengths: list[tuple[int, ...]] = field(default_factory=list)


def tokenize(
    data: PreferenceData, tokenizer: PreTrainedTokenizerBase, *, max_length: int, max_prompt_length: int | None
) -> TokenizeResult:
    """Tokenize every row, truncate it to fit, and drop the rows that cannot keep a completion token."""
    _check(data, tokenizer, max_length, max_prompt_length)
    fields = ("chosen", "rejected") if data.paired else ("completion",)
    result = TokenizeResult(rows=[], skipped=0, truncated=0)
    misaligned = 0
    for start in range(0, len(data.rows), _CHUNK):
        chunk = data.rows[start : start + _CHUNK]
        prompts, full = _encode(chunk, fields, tokenizer, data.conversational)
        for i, row in enumerate(chunk):
            prompt, completions, cut_prompt = _split(prompts[i], [f[i] for f in full])
            misaligned += cut_prompt
            sizes = (len(prompt), *map(len, completions))
            result.lengths.append(sizes)
            fitted = _fit(prompt, completions, max_length, max_prompt_length)
            if fitted is None:
                result.skipped += 1
                continue
            prompt, completions, cut = fitted
            result.truncated += cut
            if cut:
                result.truncated_tokens += sum(sizes) - len(prompt) - sum(map(len, completions))
            result.rows.append(_make_row(start + i, row, prompt, completions, data.paired))
    if misaligned:
        logger.warning(
            "%d of %d rows: the tokenized prompt is not a prefix of prompt+completion (tokens merge across the "
            "boundary, or the chat template renders the prompt alone differently). As in TRL, the completion "
            "starts where they differ and the rest of the prompt is left out. End prompts on a token boundary "
            "(e.g. a space or newline) or fix the chat template to avoid it.", misaligned, len(data.rows))
    return result


def _check(data: PreferenceData, tokenizer: Any, max_length: int, max_prompt_length: int | None) -> None:
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive or None, got {max_prompt_length}")
    # The user's to fix, not a bug: TrainingError, which the worker reports as the job's error.
    if data.conversational and not getattr(tokenizer, "chat_template", None):
        raise TrainingError(f"{data.source} holds chat messages but the tokenizer has no chat template; "
                         "use a chat model's tokenizer, set tokenizer.chat_template, or use text data")
    if not data.conversational and tokenizer.eos_token is None:
        raise TrainingError("the tokenizer has no eos_token, which text completions need; set tokenizer.eos_token")


def _encode(rows: list, fields: tuple[str, ...], tokenizer: Any, conversational: bool):
    """Token ids of each prompt alone, and of prompt+completion for each completion field."""
    prompts = [r.prompt for r in rows]
    backend = _fast_backend(tokenizer)
    if conversational:
        tools = [r.tools for r in rows]
        conversations = [prompts] + [[r.prompt + getattr(r, f) for r in rows] for f in fields]
        if backend is None or not _base_chat_template(tokenizer):
            rendered = [_render(tokenizer, c, tools, add_generation_prompt=i == 0, tokenize=True)
                        for i, c in enumerate(conversations)]
            return rendered[0], rendered[1:]
        texts = [t for i, c in enumerate(conversations)
                 for t in _render(tokenizer, c, tools, add_generation_prompt=i == 0, tokenize=False)]
        # What apply_chat_template(tokenize=True) does with the rendered text: the template writes its own
        # special tokens, so the tokenizer adds none (and neither pads nor truncates).
        ids = _encode_unique(backend, texts, add_special_tokens=False)
    else:
        eos = tokenizer.eos_token
        texts = prompts + [r.prompt + _with_eos(getattr(r, f), eos) for f in fields for r in rows]
        ids = tokenizer(texts)["input_ids"] if backend is None else _encode_unique(backend, texts, True)
    n = len(rows)
    return ids[:n], [ids[n * k : n * (k + 1)] for k in range(1, len(fields) + 1)]


def _fast_backend(tokenizer: Any):
    """The `tokenizers` backend, when encoding with it directly gives the ids `tokenizer(texts)` gives; else None.

    For transformers 5's TokenizersBackend, `tokenizer(texts)` (no padding or truncation asked for) turns the
    backend's own padding and truncation off, sets its encode_special_tokens to `split_special_tokens`, then calls
    the backend's encode_batch and also builds offsets, masks and a BatchEncoding the trainer never reads; the
    backend's encode_batch_fast gives the same ids without the offsets. That holds only when the setup changes
    nothing and no subclass changes how text is encoded (CodeLlama's _encode_plus handles infilling; mBART-style
    _switch_to_input_mode sets language tokens), so any other tokenizer (a slow one, a backend set to truncate or
    pad, split_special_tokens out of step) goes through `tokenizer(...)` as before.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    cls = type(tokenizer)
    plain = (isinstance(tokenizer, TokenizersBackend) and cls.__call__ is PreTrainedTokenizerBase.__call__
             and cls._encode_plus is TokenizersBackend._encode_plus and not hasattr(cls, "_switch_to_input_mode"))
    settled = (backend.truncation is None and backend.padding is None
               and backend.encode_special_tokens == bool(tokenizer.split_special_tokens))
    return backend if plain and settled else None


def _base_chat_template(tokenizer: Any) -> bool:
    """True when apply_chat_template is transformers' own (render, then encode without special tokens), so
    rendering and encoding separately gives its ids."""
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    return type(tokenizer).apply_chat_template is PreTrainedTokenizerBase.apply_chat_template


def _encode_unique(backend: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """backend.encode_batch_fast's ids for each text, each distinct text encoded once (rows often share a prompt)."""
    unique = list(dict.fromkeys(texts))
    encoded = backend.encode_batch_fast(unique, add_special_tokens=add_special_tokens)
    if len(unique) == len(texts):
        return [e.ids for e in encoded]
    by_text = {t: e.ids for t, e in zip(unique, encoded)}
    return [by_text[t] for t in texts]


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _render(tokenizer: Any, conversations: list, tools: list, *, add_generation_prompt: bool, tokenize: bool) -> list:
    """apply_chat_template in batches (rendered text, or its ids when tokenize); rows are grouped by their tools,
    since one call takes one tools list."""
    by_tools: dict[str, list[int]] = {}
    for i, t in enumerate(tools):
        by_tools.setdefault(json.dumps(t, sort_keys=True), []).append(i)
    out: list = [None] * len(conversations)
    for idx in by_tools.values():
        rendered = tokenizer.apply_chat_template(
            [conversations[i] for i in idx], tools=tools[idx[0]], add_generation_prompt=add_generation_prompt,
            tokenize=tokenize, return_dict=True,
        )
        if tokenize:
            rendered = [list(row_ids) for row_ids in rendered["input_ids"]]
        for i, row in zip(idx, rendered):
            out[i] = row
    return out


def _split(prompt: list[int], full: list[list[int]]) -> tuple[list[int], list[list[int]], bool]:
    """Prompt ids and completion ids, split where prompt and prompt+completion first differ (TRL's rule)."""
    n = min(_common_prefix(prompt, f) for f in full)
    return prompt[:n], [f[n:] for f in full], n < len(prompt)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    return next(i for i in range(n) if a[i] != b[i])


def _fit(prompt: list[int], completions: list[list[int]], max_length: int, max_prompt_length: int | None):
    """(prompt, completions, truncated) within the limits, or None if some completion would keep no token."""
    cut = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        prompt, cut = prompt[-max_prompt_length:], True
    room = max_length - len(prompt)
    if room <= 0 or not all(completions):
        return None
    if any(len(c) > room for c in completions):
        completions, cut = [c[:room] for c in completions], True
    return prompt, completions, cut


def _make_row(index: int, row: Any, prompt: list[int], completions: list[list[int]], paired: bool):
    if paired:
        return TokenizedPair(index, prompt, completions[0], completions[1], row.group)
    return TokenizedRow(index, prompt, completions[0], row.label, row.group)


def first_prompts(rows: list, count: int) -> list[list[int]]:
    """The first `count` distinct prompts of tokenized rows, in file order (samples' fixed prompts)."""
    seen, prompts = set(), []
    for row in sorted(rows, key=lambda r: r.index):
        key = tuple(row.prompt_ids)
        if key not in seen:
            seen.add(key)
            prompts.append(list(row.prompt_ids))
        if len(prompts) == count:
            break
    return prompts


def hold_out_for_samples(spec, rows: list) -> tuple[list, list[list[int]]]:
    """(the training rows to train on, the prompts held out for samples). With `samples` and no validation
    file, samples take the training file's first `num_prompts` distinct prompts, and every row with one of
    them is left out of training, so the samples show answers to prompts the model did not train on. The
    trainer and the pre-flight report both apply this one rule."""
    if spec.samples is None or spec.validation_file:
        return rows, []
    prompts = first_prompts(rows, spec.samples.num_prompts)
    held = {tuple(p) for p in prompts}
    return [r for r in rows if tuple(r.prompt_ids) not in held], prompts
