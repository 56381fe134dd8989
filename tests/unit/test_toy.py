"""The toy model, tokenizer and synthetic task that the other tests train on."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_core import toy


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return toy.build_model(tmp_path_factory.mktemp("toy-model"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_model_and_tokenizer_round_trip_through_auto_classes(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer("sort : n7 n3 n12 n1 n9", return_tensors="pt")["input_ids"]
    assert tokenizer.unk_token_id not in ids.tolist()[0]
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert not model.config.tie_word_embeddings
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_same_seed_gives_the_same_weights(tmp_path, model_dir):
    again = AutoModelForCausalLM.from_pretrained(toy.build_model(tmp_path, seed=0))
    first = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(again.lm_head.weight, first.lm_head.weight)


def test_chat_template_renders_prompt_as_prefix_of_conversation(model_dir):
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = [{"role": "user", "content": "sort : n3 n1"}]
    reply = [{"role": "assistant", "content": "n1 n3"}]
    rendered_prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    rendered_all = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    assert rendered_prompt == "<|user|> sort : n3 n1 <|assistant|> "
    assert rendered_all.startswith(rendered_prompt)
    ids = tokenizer(rendered_all, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert len(ids) == 8  # one token per word


def test_extra_vocab_and_vocab_words():
    tokenizer = toy.build_tokenizer(vocab_words=["hello"], extra_vocab=10)
    assert len(tokenizer) == len(toy.base_vocab()) + 1 + 10
    assert tokenizer.unk_token_id not in tokenizer("hello w9")["input_ids"]


@pytest.mark.parametrize(
    "fmt, fields",
    [
        ("text", {"prompt", "chosen", "rejected"}),
        ("conversational", {"prompt", "chosen", "rejected"}),
        ("openai", {"input", "preferred_output", "non_preferred_output"}),
        ("unpaired", {"prompt", "completion", "label"}),
    ],
)
def test_synthetic_files_have_the_fields_of_their_format(tmp_path, fmt, fields):
    train, evaluation = toy.make_synthetic_task(tmp_path, n_train=20, n_eval=6, fmt=fmt)
    train_rows, eval_rows = read_jsonl(train), read_jsonl(evaluation)
    assert (len(train_rows), len(eval_rows)) == (20, 6)
    assert all(set(row) == fields for row in train_rows + eval_rows)


def test_text_rows_follow_the_sort_rule(tmp_path):
    train, _ = toy.make_synthetic_task(tmp_path, n_train=8, n_eval=2)
    for row in read_jsonl(train):
        numbers = row["prompt"].split()[2:]
        ascending = sorted(numbers, key=lambda word: int(word[1:]))
        assert row["chosen"].split() == ascending
        assert row["rejected"].split() == ascending[::-1]


def test_train_and_eval_prompts_are_disjoint(tmp_path):
    train, evaluation = toy.make_synthetic_task(tmp_path, n_train=512, n_eval=128)
    number_set = lambda row: frozenset(row["prompt"].split()[2:])  # noqa: E731
    train_sets = {number_set(row) for row in read_jsonl(train)}
    eval_sets = {number_set(row) for row in read_jsonl(evaluation)}
    assert len(train_sets) == 512 and len(eval_sets) == 128
    assert not train_sets & eval_sets


def test_unpaired_labels_are_half_true(tmp_path):
    train, _ = toy.make_synthetic_task(tmp_path, n_train=10, n_eval=2, fmt="unpaired")
    assert sum(row["label"] for row in read_jsonl(train)) == 5


def test_groups_are_assigned_round_robin(tmp_path):
    train, _ = toy.make_synthetic_task(tmp_path, n_train=4, n_eval=2, groups=("helpful", "safe"))
    assert [row["group"] for row in read_jsonl(train)] == ["helpful", "safe", "helpful", "safe"]


def test_every_task_word_is_in_the_vocabulary(tmp_path):
    tokenizer = toy.build_tokenizer()
    train, _ = toy.make_synthetic_task(tmp_path, n_train=64, n_eval=2)
    text = " ".join(f"{row['prompt']} {row['chosen']} {row['rejected']}" for row in read_jsonl(train))
    assert tokenizer.unk_token_id not in tokenizer(text)["input_ids"]


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(ValueError, match="conversational"):
        toy.make_synthetic_task(tmp_path, fmt="sharegpt")


def test_bench_preset_has_about_20m_parameters():
    preset = dict(toy.PRESETS["bench-20m"])
    count = toy.parameter_count(toy.llama_config(preset.pop("vocab_size"), **preset))
    assert abs(count - 20_000_000) <= 0.15 * 20_000_000


def test_command_writes_data(tmp_path, capsys):
    toy.main(["data", str(tmp_path), "--format", "conversational", "--n-train", "3", "--n-eval", "1"])
    assert capsys.readouterr().out.split() == [str(tmp_path / "train.jsonl"), str(tmp_path / "eval.jsonl")]
    assert isinstance(read_jsonl(tmp_path / "train.jsonl")[0]["prompt"], list)
