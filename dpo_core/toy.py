"""A tiny local Llama, its word-level tokenizer and a synthetic preference task: no model hub needed.

Tests, the demo and the benchmarks train on these. The task is "sort five number words": the chosen
completion lists them in ascending order, the rejected one in descending order, a rule a 2-layer
64-dim model learns in a few hundred CPU steps.

    python -m dpo_core.toy model OUT_DIR [--preset tiny]
    python -m dpo_core.toy data OUT_DIR [--format text] [--n-train N] [--n-eval N] [--groups a,b]
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path
from typing import Any, Sequence

SPECIAL_TOKENS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>"}
ROLE_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>")
NUMBER_WORDS = tuple(f"n{i}" for i in range(20))
TASK_WORDS = ("sort", ":") + NUMBER_WORDS
NUMBERS_PER_PROMPT = 5
FORMATS = ("text", "conversational", "openai", "unpaired")

# Each message renders as "<|role|> content ". Rendering prompt + [assistant reply] therefore starts
# with the rendering of the prompt under add_generation_prompt, which is what lets a data pipeline cut
# the completion off a rendered conversation. No EOS here: the data pipeline appends it.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('the toy chat template knows the roles system, user and assistant, not ' + message['role']) }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)

# Model sizes. "bench-20m": 2 x 32000 x 256 embedding/head + 4 layers of ~0.8M = about 19.6M parameters.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128),
    "bench-20m": dict(vocab_size=32000, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704),
}


# ---- tokenizer ----------------------------------------------------------------------------------


def base_vocab(vocab_words: Sequence[str] | None = None) -> list[str]:
    """Special tokens, role markers, task words, then `vocab_words`, without duplicates, in id order."""
    words = [*SPECIAL_TOKENS.values(), *ROLE_MARKERS, *TASK_WORDS, *(vocab_words or ())]
    return list(dict.fromkeys(words))


def build_tokenizer(out_dir=None, vocab_words: list[str] | None = None, extra_vocab: int = 0):
    """A word-level PreTrainedTokenizerFast over the toy vocabulary, with a chat template.

    Splits on whitespace only, so "<|user|>" stays one token; unknown words map to <unk>. It adds no
    special tokens by itself. `extra_vocab` appends filler words w0..w{N-1} (to reach a benchmark's
    vocabulary size). With `out_dir`, also saves it there.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = base_vocab(vocab_words) + [f"w{i}" for i in range(extra_vocab)]
    vocab = {word: i for i, word in enumerate(dict.fromkeys(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, **{f"{k}_token": v for k, v in SPECIAL_TOKENS.items()}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


# ---- model --------------------------------------------------------------------------------------


def llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 128,
    max_position_embeddings: int = 1024,
    pad_token_id: int = 0,
    bos_token_id: int = 2,
    eos_token_id: int = 3,
    architecture: str = "llama",
):
    """A LlamaConfig with untied embeddings (so LM-head memory is what a real model's would be).

    num_kv_heads below num_heads: grouped-query attention. architecture "qwen2": a Qwen2Config of the
    same shape instead (a Llama with biases on q, k and v), for code that must hold for both."""
    from transformers import LlamaConfig, Qwen2Config

    if architecture not in ("llama", "qwen2"):
        raise ValueError(f"unknown architecture {architecture!r}; choose llama or qwen2")
    return (LlamaConfig if architecture == "llama" else Qwen2Config)(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )


def parameter_count(config) -> int:
    """Parameters of a LlamaForCausalLM with `config`, counted on the meta device (no memory, fast)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def build_model(out_dir, *, vocab_size: int | None = None, seed: int = 0, tokenizer=None, **shape: int) -> str:
    """Save a randomly initialised LlamaForCausalLM (or Qwen2, see llama_config) and its tokenizer in
    `out_dir`; return the path.

    Without `tokenizer`, builds the toy one, padded with filler words up to `vocab_size` if given.
    The vocabulary defaults to the tokenizer's size. `shape`: llama_config's sizes (hidden_size,
    num_layers, num_heads, num_kv_heads, intermediate_size, max_position_embeddings; PRESETS holds some)
    and architecture.
    `AutoModelForCausalLM.from_pretrained(out_dir)` and `AutoTokenizer.from_pretrained(out_dir)` load
    the result.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = build_tokenizer(extra_vocab=max(0, (vocab_size or 0) - len(base_vocab())))
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is below the tokenizer's {len(tokenizer)} tokens; raise it")
    config = llama_config(vocab_size, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, **shape)
    # fork_rng: seed the initialisation without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    tokenizer.model_max_length = config.max_position_embeddings
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return str(out_dir)


# ---- synthetic preference task ------------------------------------------------------------------


def _number_sets(n: int, rng: random.Random) -> list[list[int]]:
    """`n` distinct sets of NUMBERS_PER_PROMPT numbers, each in a random order."""
    available = math.comb(len(NUMBER_WORDS), NUMBERS_PER_PROMPT)
    if n > available:
        raise ValueError(f"the sort task has {available} distinct prompts; ask for at most that many rows")
    seen: dict[tuple[int, ...], None] = {}
    while len(seen) < n:
        seen.setdefault(tuple(sorted(rng.sample(range(len(NUMBER_WORDS)), NUMBERS_PER_PROMPT))), None)
    sets = [list(s) for s in seen]
    for numbers in sets:
        rng.shuffle(numbers)
    return sets


def _words(numbers: Sequence[int]) -> str:
    return " ".join(NUMBER_WORDS[i] for i in numbers)


def _example(numbers: list[int]) -> tuple[str, str, str]:
    """(prompt, chosen, rejected): chosen sorts the numbers ascending, rejected descending."""
    return f"sort : {_words(numbers)}", _words(sorted(numbers)), _words(sorted(numbers, reverse=True))


def _row(prompt: str, chosen: str, rejected: str, fmt: str, index: int) -> dict[str, Any]:
    """One JSONL record of `fmt`. Unpaired rows alternate desirable / undesirable by index."""
    if fmt == "text":
        # Completions start with a space, as in TRL's examples, so prompt + completion joins cleanly.
        return {"prompt": prompt, "chosen": " " + chosen, "rejected": " " + rejected}
    if fmt == "unpaired":
        label = index % 2 == 0
        return {"prompt": prompt, "completion": " " + (chosen if label else rejected), "label": label}
    user = [{"role": "user", "content": prompt}]
    good = [{"role": "assistant", "content": chosen}]
    bad = [{"role": "assistant", "content": rejected}]
    if fmt == "conversational":
        return {"prompt": user, "chosen": good, "rejected": bad}
    return {"input": {"messages": user}, "preferred_output": good, "non_preferred_output": bad}


def _write_jsonl(path: Path, sets: list[list[int]], fmt: str, groups: Sequence[str] | None) -> None:
    with path.open("w") as f:
        for i, numbers in enumerate(sets):
            row = _row(*_example(numbers), fmt=fmt, index=i)
            if groups:
                row["group"] = groups[i % len(groups)]
            f.write(json.dumps(row) + "\n")


def make_synthetic_task(
    out_dir,
    *,
    n_train: int = 512,
    n_eval: int = 128,
    seed: int = 0,
    fmt: str = "text",
    groups: Sequence[str] | None = None,
) -> tuple[str, str]:
    """Write train.jsonl and eval.jsonl of the sort task in `out_dir`; return their paths.

    fmt: "text" {prompt, chosen, rejected}; "conversational" (the same as message lists);
    "openai" {input: {messages}, preferred_output, non_preferred_output}; "unpaired"
    {prompt, completion, label}, half true, half false. No eval prompt uses a set of numbers seen in
    training. `groups` adds a `group` field, assigned round-robin (for multi-reward DPO).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    sets = _number_sets(n_train + n_eval, random.Random(seed))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = out / "train.jsonl", out / "eval.jsonl"
    _write_jsonl(train_path, sets[:n_train], fmt, groups)
    _write_jsonl(eval_path, sets[n_train:], fmt, groups)
    return str(train_path), str(eval_path)


# ---- command ------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dpo_core.toy", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    model = commands.add_parser("model", help="save a random tiny Llama and its tokenizer")
    model.add_argument("out_dir")
    model.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    model.add_argument("--seed", type=int, default=0)
    data = commands.add_parser("data", help="write train.jsonl and eval.jsonl of the sort task")
    data.add_argument("out_dir")
    data.add_argument("--format", choices=FORMATS, default="text")
    data.add_argument("--n-train", type=int, default=512)
    data.add_argument("--n-eval", type=int, default=128)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--groups", default=None, help="comma-separated group names, e.g. helpful,safe")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "model":
        print(build_model(args.out_dir, seed=args.seed, **PRESETS[args.preset]))
        return
    groups = args.groups.split(",") if args.groups else None
    paths = make_synthetic_task(
        args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed, fmt=args.format, groups=groups
    )
    print("\n".join(paths))


if __name__ == "__main__":
    main()
