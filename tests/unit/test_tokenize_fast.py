"""dpo_core.tokenize encodes with the `tokenizers` backend directly; its ids must be the tokenizer's own.

Each tokenizer here is one the trainer meets (the toy word-level one, a Llama-style BPE that adds BOS, a
byte-level BPE); the ids dpo_core.tokenize takes for prompts and prompt+completion are compared with
`tokenizer(texts)["input_ids"]` and `apply_chat_template(..., tokenize=True)` called row by row.
"""
from __future__ import annotations

import json

import pytest

import dpo_core.tokenize as tokenize_module
from dpo_core.data import read_jsonl_bytes, split_pairs
from dpo_core.tokenize import tokenize

TOOLS_TEMPLATE = (
    "{{ bos_token }}{% if tools %}[tools] {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Wetter für eine Stadt 🌦",
                                            "parameters": {"type": "object", "properties": {}}}}]
TEXTS = [  # (prompt, chosen, rejected): unicode, one-character and whitespace-led strings, repeated prompts
    ("the cat sat on the mat", " yes", " no"),
    ("the cat sat on the mat", " the cat", " a mat"),
    ("héllo wörld, 日本語 and 🙂 emoji", " naïve café", " ß"),
    ("?", " .", "\n."),
    ("a", "b", "  c  "),
    ("line one\nline two\n", "\tindented", " done<|end|>"),
]


def _llama_style():
    """A BPE saved as LlamaTokenizer: Metaspace pre-tokenizer, adds BOS to every encoded text."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in "▁abcdefghijklmnopqrstuvwxyz[]":
        vocab[ch] = len(vocab)
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)


def _byte_level(split_special_tokens: bool = False):
    """A byte-level BPE (as in Llama 3, Qwen, GPT-2), trained on the rows' own text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|begin|>", "<|end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([" ".join(row) for row in TEXTS] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin|>", eos_token="<|end|>",
                                   split_special_tokens=split_special_tokens)


def _toy():
    from dpo_core.toy import build_tokenizer

    return build_tokenizer()


BUILDERS = {"toy": _toy, "llama_style": _llama_style, "byte_level": _byte_level,
            "byte_level_split_special": lambda: _byte_level(split_special_tokens=True)}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request):
    tok = BUILDERS[request.param]()
    if request.param != "toy":  # the toy keeps its own template, which ignores tools
        tok.chat_template = TOOLS_TEMPLATE
    return tok


def _rows(conversational: bool):
    rows = []
    for i, (prompt, chosen, rejected) in enumerate(TEXTS):
        if not conversational:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        row = {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": prompt}],
               "chosen": [{"role": "assistant", "content": chosen}],
               "rejected": [{"role": "assistant", "content": rejected}]}
        rows.append({**row, "tools": TOOLS} if i % 2 else row)
    return read_jsonl_bytes("\n".join(json.dumps(r) for r in rows).encode(), "t.jsonl")


def _expected(data, fields, tokenizer):
    """Prompt ids and prompt+completion ids per field, from the tokenizer's own calls, one row at a time."""
    if data.conversational:
        def render(messages, tools, **kw):
            return list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                                      **kw)["input_ids"])

        prompts = [render(r.prompt, r.tools, add_generation_prompt=True) for r in data.rows]
        full = [[render(r.prompt + getattr(r, f), r.tools) for r in data.rows] for f in fields]
        return prompts, full
    eos = tokenizer.eos_token
    prompts = [tokenizer(r.prompt)["input_ids"] for r in data.rows]
    full = [[tokenizer(r.prompt + tokenize_module._with_eos(getattr(r, f), eos))["input_ids"] for r in data.rows]
            for f in fields]
    return prompts, full


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "chat"])
@pytest.mark.parametrize("paired", [True, False], ids=["pairs", "unpaired"])
def test_fast_path_ids_equal_the_tokenizers_own(tokenizer, conversational, paired):
    assert tokenize_module._fast_backend(tokenizer) is not None  # the path under test is the one taken
    data = _rows(conversational)
    data = data if paired else split_pairs(data)
    fields = ("chosen", "rejected") if paired else ("completion",)
    assert tokenize_module._encode(data.rows, fields, tokenizer, conversational) == _expected(data, fields, tokenizer)


def test_a_backend_set_to_truncate_keeps_the_tokenizer_call():
    """A tokenizer.json may carry truncation; tokenizer(texts) turns it off, encode_batch_fast would not."""
    tok = _byte_level()
    tok.backend_tokenizer.enable_truncation(max_length=3)
    assert tokenize_module._fast_backend(tok) is None
    data = _rows(conversational=False)
    prompts, _ = tokenize_module._encode(data.rows, ("chosen", "rejected"), tok, False)
    assert max(map(len, prompts)) > 3
    assert prompts == [tok(r.prompt)["input_ids"] for r in data.rows]


@pytest.mark.parametrize("conversational", [False, True], ids=["text", "chat"])
def test_tokenize_gives_the_same_rows_either_way(conversational, monkeypatch):
    tok = _llama_style()
    tok.chat_template = TOOLS_TEMPLATE
    data = _rows(conversational)
    fast = tokenize(data, tok, max_length=12, max_prompt_length=6)
    monkeypatch.setattr(tokenize_module, "_fast_backend", lambda tokenizer: None)
    slow = tokenize(data, tok, max_length=12, max_prompt_length=6)
    assert fast.truncated and fast == slow
