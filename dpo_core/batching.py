"""Order rows into optimizer steps and pack them into padded tensors.

A batch is a flat list of sequences, each `prompt + completion`, right-padded, so chosen and
rejected go through the model in one forward pass: the first `n_chosen` sequences are the chosen
(KTO: desirable) ones, the rest the rejected (KTO: undesirable) ones.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from dpo_core.tokenize import TokenizedPair, TokenizedRow

# Length grouping sorts within windows of this many batches: enough to cut most padding, small
# enough that the order stays random at the scale of an epoch.
_GROUP_WINDOW = 32


@dataclass
class Batch:
    input_ids: torch.Tensor  # [N, L] long, right-padded
    attention_mask: torch.Tensor  # [N, L] long
    loss_mask: torch.Tensor  # [N, L] bool: True where the token is a completion token (a target)
    n_chosen: int  # sequences [0, n_chosen) are chosen/desirable, the rest rejected/undesirable
    row_index: torch.Tensor  # [N] dataset row of each sequence
    side: torch.Tensor  # [N] 0 for chosen/desirable sequences, 1 for rejected/undesirable
    groups: list[str | None]  # [N] multi-reward group of each sequence
    num_tokens: int  # non-padding tokens in the batch

    def to(self, device: torch.device) -> Batch:
        self.input_ids = self.input_ids.to(device, non_blocking=True)
        self.attention_mask = self.attention_mask.to(device, non_blocking=True)
        self.loss_mask = self.loss_mask.to(device, non_blocking=True)
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


def collate(rows: list[TokenizedPair] | list[TokenizedRow], pad_id: int) -> Batch:
    """Pack rows into one right-padded batch; padding only ever follows a sequence's last token."""
    seqs = _sequences(rows)
    lengths = [len(p) + len(c) for p, c, *_ in seqs]
    n, width = len(seqs), max(lengths)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    loss_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, completion, *_rest) in enumerate(seqs):
        p, total = len(prompt), len(prompt) + len(completion)
        input_ids[i, :total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[i, :total] = 1
        loss_mask[i, p:total] = True
    n_chosen = sum(1 for s in seqs if s[3] == 0)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        loss_mask=loss_mask,
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
