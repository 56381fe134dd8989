"""The one model and one dataset every benchmark contender trains on: built locally, no model hub.

The model is dpo_core.toy's "bench-20m" preset (a Llama of ~19.6M parameters, 32k vocabulary, untied
embeddings). The data are preference pairs of random vocabulary words sized to fill `max_length`:
for max_length 512 a prompt of 150-250 tokens and completions of 150-300 tokens (both scaled with
max_length), so rows vary in length and some are cut by max_length, as in real data. The toy tokenizer
splits on whitespace, so a row's token count is its word count: the benchmark counts tokens from the data.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

EOS = "</s>"
VOCAB = 32000
# Token ranges at max_length 512; scaled linearly for other lengths.
PROMPT_RANGE = (150, 250)
COMPLETION_RANGE = (150, 300)


@dataclass(frozen=True)
class Row:
    prompt: str
    chosen: str
    rejected: str

    def as_json(self) -> dict:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def _scaled(bounds: tuple[int, int], max_length: int) -> tuple[int, int]:
    lo, hi = bounds
    return max(1, lo * max_length // 512), max(2, hi * max_length // 512)


def make_rows(n: int, max_length: int, seed: int = 0) -> list[Row]:
    """`n` pairs. Chosen words come from the lower half of the filler vocabulary, rejected from the
    upper half, so the preference is learnable and the loss moves from its first steps.

    Completions start with a space and end with " </s>", so prompt + completion splits on word
    boundaries and neither trainer appends EOS as text (which would glue it to the last word).
    """
    from dpo_core.toy import base_vocab

    rng = random.Random(seed)
    first = len(base_vocab())
    half = (VOCAB - first) // 2
    prompt_range, completion_range = _scaled(PROMPT_RANGE, max_length), _scaled(COMPLETION_RANGE, max_length)

    def words(count: int, offset: int) -> str:
        return " ".join(f"w{offset + rng.randrange(half)}" for _ in range(count))

    rows = []
    for _ in range(n):
        prompt = words(rng.randint(*prompt_range), 0)
        chosen = words(rng.randint(*completion_range) - 1, 0)
        rejected = words(rng.randint(*completion_range) - 1, half)
        rows.append(Row(prompt, f" {chosen} {EOS}", f" {rejected} {EOS}"))
    return rows


def write_jsonl(path: Path, rows: list[Row]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row.as_json()) + "\n")
    return str(path)


def pair_tokens(row: Row, max_length: int) -> int:
    """Non-padding tokens of the chosen and rejected sequences of a pair after truncation to max_length.

    The toy tokenizer adds no special tokens and splits on whitespace, so tokens are words."""
    return sum(sequence_tokens(row, max_length))


def sequence_tokens(row: Row, max_length: int) -> tuple[int, int]:
    """Tokens of the chosen and of the rejected sequence (prompt included) after truncation to max_length."""
    prompt = len(row.prompt.split())
    return min(prompt + len(row.chosen.split()), max_length), min(prompt + len(row.rejected.split()), max_length)


def build_model(work_dir: Path, max_length: int) -> str:
    """The bench-20m Llama and its 32k-word tokenizer, saved under work_dir (reused if already there)."""
    from dpo_core.toy import PRESETS, build_model as toy_build_model

    out_dir = work_dir / "bench-20m"
    if (out_dir / "config.json").is_file():
        return str(out_dir)
    positions = max(max_length, 2048)  # rotary positions hold no weights: one model serves every length
    return toy_build_model(out_dir, max_position_embeddings=positions, seed=0, **PRESETS["bench-20m"])
