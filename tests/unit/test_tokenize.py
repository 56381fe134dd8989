"""dpo_core.tokenize: TRL 1.16's tokenization, token for token, plus our prompt truncation.

A word-level tokenizer built here (one token per word) keeps every expected id countable by hand.
"""
import json
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import dpo_core.tokenize as tokenize_module
from dpo_core.data import read_jsonl_bytes, split_pairs
from dpo_core.errors import TrainingError
from dpo_core.tokenize import TokenizedPair, TokenizedRow, tokenize

WORDS = ("<pad> <bos> <eos> <unk> <|im_start|> <|im_end|> user assistant system tools "
         "the sky is blue red green grass yes no how are you fine a b c d e f g h").split()
ID = {w: i for i, w in enumerate(WORDS)}
BOS, EOS, START, END = ID["<bos>"], ID["<eos>"], ID["<|im_start|>"], ID["<|im_end|>"]
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system tools {% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def make_tokenizer(bos: bool = False, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """bos=True: the tokenizer adds BOS to every encoded text, as Llama's does."""
    backend = Tokenizer(models.WordLevel(ID, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"], chat_template=chat_template,
    )


def ids(text: str) -> list[int]:
    return [ID[w] for w in text.split()]


def data(*rows):
    return read_jsonl_bytes("\n".join(json.dumps(r) for r in rows).encode(), "t.jsonl")


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def conv(prompt, chosen, rejected, **extra):
    return {"prompt": [user(prompt)], "chosen": [assistant(chosen)], "rejected": [assistant(rejected)], **extra}


TEXT_ROWS = [
    {"prompt": "the sky is", "chosen": " blue", "rejected": " red green"},
    {"prompt": "", "chosen": "yes", "rejected": "no"},
    {"prompt": "how are you", "chosen": " fine<eos>", "rejected": " no", "group": "g"},
    {"prompt": "a b c d e f", "chosen": " yes", "rejected": " no"},
]
CONV_ROWS = [conv("the sky is", "blue", "red green"), conv("how are you", "fine", "no")]


def test_text_eos_appended_once_and_no_special_tokens_added():
    result = tokenize(data(*TEXT_ROWS[:3]), make_tokenizer(), max_length=100, max_prompt_length=None)
    assert result.rows == [
        TokenizedPair(0, ids("the sky is"), [ID["blue"], EOS], [ID["red"], ID["green"], EOS], None),
        TokenizedPair(1, [], [ID["yes"], EOS], [ID["no"], EOS], None),
        TokenizedPair(2, ids("how are you"), [ID["fine"], EOS], [ID["no"], EOS], "g"),
    ]
    assert (result.skipped, result.truncated) == (0, 0)


def test_text_with_a_tokenizer_that_adds_bos_keeps_it_on_the_prompt_only():
    result = tokenize(data(TEXT_ROWS[0]), make_tokenizer(bos=True), max_length=100, max_prompt_length=None)
    assert result.rows[0].prompt_ids == [BOS, *ids("the sky is")]
    assert result.rows[0].chosen_ids == [ID["blue"], EOS]


def test_conversational_split_by_chat_template():
    result = tokenize(data(*CONV_ROWS), make_tokenizer(), max_length=100, max_prompt_length=None)
    row = result.rows[0]
    # The prompt ends with the generation prompt; the completion is the rest of the rendered conversation,
    # closed by the template's end of turn (no EOS is appended to chat completions).
    assert row.prompt_ids == [START, ID["user"], *ids("the sky is"), END, START, ID["assistant"]]
    assert row.chosen_ids == [ID["blue"], END]
    assert row.rejected_ids == [ID["red"], ID["green"], END]


def test_tools_reach_the_chat_template_row_by_row():
    tools = [{"type": "function", "function": {"name": "sky"}}]
    rows = [conv("the sky is", "blue", "red", tools=tools), conv("the sky is", "blue", "red")]
    result = tokenize(data(*rows), make_tokenizer(), max_length=100, max_prompt_length=None)
    with_tools, without = (r.prompt_ids for r in result.rows)
    assert with_tools == [START, ID["system"], ID["tools"], *without]


def test_unpaired_rows():
    paired = data(*CONV_ROWS[:1])
    result = tokenize(split_pairs(paired), make_tokenizer(), max_length=100, max_prompt_length=None)
    pair = tokenize(paired, make_tokenizer(), max_length=100, max_prompt_length=None).rows[0]
    assert result.rows == [TokenizedRow(0, pair.prompt_ids, pair.chosen_ids, True, None),
                           TokenizedRow(1, pair.prompt_ids, pair.rejected_ids, False, None)]


def test_truncation_keeps_the_prompt_end_and_the_completion_start():
    row = {"prompt": "a b c d e f", "chosen": " yes", "rejected": " g h"}
    result = tokenize(data(row), make_tokenizer(), max_length=6, max_prompt_length=4)
    assert result.rows == [TokenizedPair(0, ids("c d e f"), [ID["yes"], EOS], [ID["g"], ID["h"]], None)]
    assert (result.skipped, result.truncated) == (0, 1)
    # 2 prompt tokens and the rejected EOS are cut; the lengths are those before the cut.
    assert (result.truncated_tokens, result.lengths) == (3, [(6, 2, 3)])


def test_rows_that_cannot_keep_a_completion_token_are_skipped():
    rows = [TEXT_ROWS[0], TEXT_ROWS[3], TEXT_ROWS[1]]  # prompts of 3, 6 and 0 tokens
    result = tokenize(data(*rows), make_tokenizer(), max_length=6, max_prompt_length=None)
    assert [r.index for r in result.rows] == [0, 2]
    assert (result.skipped, result.truncated) == (1, 0)
    result = tokenize(data(*rows), make_tokenizer(), max_length=4, max_prompt_length=None)
    assert [(r.index, r.chosen_ids, r.rejected_ids) for r in result.rows] == [
        (0, [ID["blue"]], [ID["red"]]), (2, [ID["yes"], EOS], [ID["no"], EOS])]
    assert (result.skipped, result.truncated) == (1, 1)
    assert result.truncated_tokens == 1 + 2  # the skipped row's tokens are not counted as truncated
    assert result.lengths == [(3, 2, 3), (6, 2, 2), (0, 2, 2)]  # every row, the skipped one too


def test_batches_give_the_same_ids(monkeypatch):
    rows = data(*CONV_ROWS, *CONV_ROWS, CONV_ROWS[0])
    whole = tokenize(rows, make_tokenizer(), max_length=100, max_prompt_length=None)
    monkeypatch.setattr(tokenize_module, "_CHUNK", 2)
    assert tokenize(rows, make_tokenizer(), max_length=100, max_prompt_length=None) == whole


def test_conversational_data_needs_a_chat_template():
    with pytest.raises(TrainingError) as err:  # the job's error, not an internal one
        tokenize(data(*CONV_ROWS), make_tokenizer(chat_template=None), max_length=100, max_prompt_length=None)
    assert err.value.code == "training_error"


# TRL 1.16 itself: its DPOTrainer/KTOTrainer._prepare_dataset uses only the tokenizer and the config, so it can be
# called without a model. Its collator then cuts prompt+completion to max_length (truncation_mode="keep_start").

def trl_tokenize(kind: str, rows: list[dict], tokenizer, max_length: int, tmp_path) -> list[dict]:
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    datasets.disable_progress_bars()
    trainer, config = (trl.DPOTrainer, trl.DPOConfig) if kind == "dpo" else (trl.KTOTrainer, trl.KTOConfig)
    args = config(output_dir=str(tmp_path), max_length=max_length, bf16=False, report_to=[])
    fake_self = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0)
    out = trainer._prepare_dataset(fake_self, datasets.Dataset.from_list(rows), tokenizer, args, "train").to_list()
    room = lambda r: max_length - len(r["prompt_ids"])  # noqa: E731 - the collator's keep_start cut
    if kind == "dpo":
        return [(r["prompt_ids"], r["chosen_ids"][: room(r)], r["rejected_ids"][: room(r)]) for r in out]
    return [(r["prompt_ids"], r["completion_ids"][: room(r)], r["label"]) for r in out]


# A template that renders the prompt alone differently from the conversation, so the prompt's tail is cut.
ODD_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant {% endif %}", "<|im_start|>assistant h {% endif %}")


@pytest.mark.parametrize("rows, bos, template", [
    (TEXT_ROWS, False, CHAT_TEMPLATE),
    (TEXT_ROWS, True, CHAT_TEMPLATE),
    (CONV_ROWS, False, CHAT_TEMPLATE),
    (CONV_ROWS, False, ODD_TEMPLATE),
], ids=["text", "text-bos", "conversational", "prompt-not-a-prefix"])
@pytest.mark.parametrize("max_length", [5, 9, 1024])
def test_same_ids_as_trl(rows, bos, template, max_length, tmp_path):
    tokenizer = make_tokenizer(bos=bos, chat_template=template)
    expected = trl_tokenize("dpo", rows, tokenizer, max_length, tmp_path)
    result = tokenize(data(*rows), tokenizer, max_length=max_length, max_prompt_length=None)
    assert [(r.prompt_ids, r.chosen_ids, r.rejected_ids) for r in result.rows] == expected
    assert result.skipped == len(rows) - len(expected)

    expected = trl_tokenize("kto", rows, tokenizer, max_length, tmp_path)
    result = tokenize(split_pairs(data(*rows)), tokenizer, max_length=max_length, max_prompt_length=None)
    # TRL's unpairing lists a batch's chosen rows, then its rejected rows; ours keeps each pair together.
    assert sorted((r.prompt_ids, r.completion_ids, r.label) for r in result.rows) == sorted(expected)


def test_trl_defaults_are_what_the_module_docstring_says(tmp_path):
    trl = pytest.importorskip("trl")
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, report_to=[])
    assert (args.max_length, args.truncation_mode) == (1024, "keep_start")
    assert not hasattr(args, "max_prompt_length")
