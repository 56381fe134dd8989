"""Order rows into optimizer steps and pack them into padded tensors.

A batch is a flat list of sequences, each `prompt + completion`, right-padded, so chosen and
rejected go through the model in one forward pass: the first `n_chosen` sequences are the chosen
(KTO: desirable) ones, the rest the rejected (KTO: undesirable) ones.

What the log-probs need is described apart from the layout (`Targets`): for each completion token,
the flat position of the hidden state that predicts it, its id and its sequence. Paired batches list
targets pair by pair (pair p's chosen tokens, then its rejected ones), so whole pairs are contiguous.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dpo_core.tokenize import TokenizedPair, TokenizedRow

# Length grouping sorts within windows of this many batches: enough to cut most padding, small
# enough that the order stays random at the scale of an epoch.
_GROUP_WINDOW = 32


class Targets(NamedTuple):
    """The completion tokens of a batch: what each sequence's log-prob sums over. T targets, S sequences."""

    pos: torch.Tensor  # [T] long: flat index into the [N * L] positions of the hidden state predicting it
    ids: torch.Tensor  # [T] long: the target token
    seq: torch.Tensor  # [T] long: its sequence, 0..S-1 (chosen/desirable first, as in a Batch)
    counts: torch.Tensor  # [S] float: targets per sequence
    paired: bool  # S = 2B, sequence p pairs with p + B, and targets are pair-major

    def to(self, device: torch.device) -> Targets:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Targets(move(self.pos), move(self.ids), move(self.seq), move(self.counts), self.paired)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, L] long, right-padded
    attention_mask: torch.Tensor  # [N, L] long
    targets: Targets
    n_chosen: int  # sequences [0, n_chosen) are chosen/desirable, the rest rejected/undesirable
    row_index: torch.Tensor  # [N] dataset row of each sequence
    side: torch.Tensor  # [N] 0 for chosen/desirable sequences, 1 for rejected/undesirable
    groups: list[str | None]  # [N] multi-reward group of each sequence
    num_tokens: int  # non-padding tokens in the batch

    def to(self, device: torch.device) -> Batch:
        self.input_ids = self.input_ids.to(device, non_blocking=True)
        self.attention_mask = self.attention_mask.to(device, non_blocking=True)
        self.targets = self.targets.to(device)
        return self


def _sequences(rows: list[TokenizedPair] | list[TokenizedRow]):
    """(prompt_ids, completion_ids, row_index, side, group) for each sequence, chosen side first."""
    if rows and isinstance(rows[0], TokenizedPair):
        chosen = [(r.prompt_ids, r.chosen_ids, r.index, 0, r.group) for r in rows]
        rejected = [(r.prompt_ids, r.rejected_ids, r.index, 1, r.group) for r in rows]
        return chosen + rejected
    good = [(r.prompt_ids, r.completion_ids, r.index, 0, r.group) for r in rows if r.label]
    bad = [(r.prompt_ids, r.completion_ids, r.index, 1, r.group) for r in rows if not r.label]
    return good + bad


def _targets(input_ids: torch.Tensor, spans: list[tuple[int, int]], paired: bool) -> Targets:
    """Targets of sequences where row i's completion occupies positions spans[i] = [start, end)."""
    width, n = input_ids.shape[1], len(spans)
    # Position t's hidden state predicts token t + 1; a token at position 0 has no predictor.
    per_seq = [torch.arange(max(a, 1), b) + i * width for i, (a, b) in enumerate(spans)]
    order = [i for p in range(n // 2) for i in (p, p + n // 2)] if paired else range(n)
    flat = torch.cat([per_seq[i] for i in order]) if n else torch.zeros(0, dtype=torch.long)
    seq = torch.cat([torch.full((len(per_seq[i]),), i) for i in order]) if n else flat
    counts = torch.tensor([len(t) for t in per_seq], dtype=torch.float32)
    return Targets(flat - 1, input_ids.reshape(-1)[flat], seq, counts, paired)


def collate(rows: list[TokenizedPair] | list[TokenizedRow], pad_id: int) -> Batch:
    """Pack rows into one right-padded batch; padding only ever follows a sequence's last token."""
    seqs = _sequences(rows)
    lengths = [len(p) + len(c) for p, c, *_ in seqs]
    n, width = len(seqs), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (prompt, completion, *_rest) in enumerate(seqs):
        total = len(prompt) + len(completion)
        input_ids[i, :total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[i, :total] = 1
    n_chosen = sum(1 for s in seqs if s[3] == 0)
    spans = [(len(p), len(p) + len(c)) for p, c, *_ in seqs]
    paired = bool(rows) and isinstance(rows[0], TokenizedPair)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        targets=_targets(input_ids, spans, paired),
        n_chosen=n_chosen,
        row_index=torch.tensor([s[2] for s in seqs], dtype=torch.long),
        side=torch.tensor([s[3] for s in seqs], dtype=torch.long),
        groups=[s[4] for s in seqs],
        num_tokens=sum(lengths),
    )


def row_length(row: TokenizedPair | TokenizedRow) -> int:
    if isinstance(row, TokenizedPair):
        return len(row.prompt_ids) + max(len(row.chosen_ids), len(row.rejected_ids))
    return len(row.prompt_ids) + len(row.completion_ids)


def epoch_order(lengths: list[int], batch_size: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """Row positions for each optimizer step of one epoch; a pure function of (seed, epoch), so a
    resumed run replays exactly the batches an uninterrupted one would have seen."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = batch_size * _GROUP_WINDOW
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lengths.__getitem__)]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        # Sorting put long batches together; shuffle the batches so the step cost doesn't drift.
        rng.shuffle(batches)
    return batches


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return math.ceil(num_rows / batch_size)


def micro_batches(rows: list, size: int) -> list[list]:
    return [rows[s : s + size] for s in range(0, len(rows), size)]
