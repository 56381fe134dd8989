"""Order rows into optimizer steps and pack them into tensors.

A batch is a flat list of sequences, each `prompt + completion`, so chosen and rejected go through the
model in one forward pass: the first `n_chosen` sequences are the chosen (KTO: desirable) ones, the rest
the rejected (KTO: undesirable) ones. Three layouts: one right-padded row per sequence (`collate`),
one row per pair with the prompt shared (`_collate_shared`), and every sequence in one row with no
padding between them (`_collate_packed`).

What the log-probs need is described apart from the layout (`Targets`): for each completion token,
the flat position of the hidden state that predicts it, its id and its sequence. Paired batches list
targets pair by pair (pair p's chosen tokens, then its rejected ones), so whole pairs are contiguous.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import accumulate
from typing import NamedTuple

import torch

from dpo_core.tokenize import TokenizedPair, TokenizedRow

# Length grouping sorts within windows of this many batches: enough to cut most padding, small
# enough that the order stays random at the scale of an epoch.
_GROUP_WINDOW = 32


class Targets(NamedTuple):
    """The completion tokens of a batch: what each sequence's log-prob sums over. T targets, S sequences."""

    pos: torch.Tensor  # [T] long: flat index into the [R * L] positions of the hidden state predicting it
    ids: torch.Tensor  # [T] long: the target token
    seq: torch.Tensor  # [T] long: its sequence, 0..S-1 (chosen/desirable first, as in a Batch)
    counts: torch.Tensor  # [S] float: targets per sequence
    paired: bool  # S = 2B, sequence p pairs with p + B, and targets are pair-major

    def to(self, device: torch.device) -> Targets:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Targets(move(self.pos), move(self.ids), move(self.seq), move(self.counts), self.paired)


class Segments(NamedTuple):
    """Where each sequence of a packed row starts and ends, as variable-length attention takes it."""

    cu: torch.Tensor  # [S' + 1] int32: segment boundaries 0 = cu[0] < ... < cu[-1] = row width
    max_len: int  # the longest segment (a Python int: kernels size their launch from it)

    def to(self, device: torch.device) -> Segments:
        return Segments(self.cu.to(device, non_blocking=True), self.max_len)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [R, L] long, right-padded; R rows = N sequences unless the prompt is shared
    attention_mask: torch.Tensor  # [R, L] long
    targets: Targets
    n_chosen: int  # sequences [0, n_chosen) are chosen/desirable, the rest rejected/undesirable
    row_index: torch.Tensor  # [N] dataset row of each sequence
    side: torch.Tensor  # [N] 0 for chosen/desirable sequences, 1 for rejected/undesirable
    groups: list[str | None]  # [N] multi-reward group of each sequence
    num_tokens: int  # non-padding tokens in the batch
    # Shared-prompt layout (`_collate_shared`): rows are pairs, attention_mask is [B, 1, L, L] bool.
    # Packed layout (`_collate_packed`): one row, positions restart at 0 in each segment.
    position_ids: torch.Tensor | None = None  # [R, L] long
    segments: Segments | None = None  # packed layout only

    def to(self, device: torch.device) -> Batch:
        self.input_ids = self.input_ids.to(device, non_blocking=True)
        self.attention_mask = self.attention_mask.to(device, non_blocking=True)
        if self.position_ids is not None:
            self.position_ids = self.position_ids.to(device, non_blocking=True)
        if self.segments is not None:
            self.segments = self.segments.to(device)
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


def _targets(input_ids: torch.Tensor, seqs: list[tuple[torch.Tensor, torch.Tensor]], paired: bool) -> Targets:
    """Targets of sequences given, per sequence, (predictor positions, target positions) within the flat
    [R * L] positions: a target token at flat position t is normally predicted from t - 1."""
    n = len(seqs)
    order = [i for p in range(n // 2) for i in (p, p + n // 2)] if paired else range(n)
    empty = torch.zeros(0, dtype=torch.long)
    pos = torch.cat([seqs[i][0] for i in order]) if n else empty
    tok = torch.cat([seqs[i][1] for i in order]) if n else empty
    seq = torch.cat([torch.full((len(seqs[i][0]),), i) for i in order]) if n else empty
    counts = torch.tensor([len(p) for p, _ in seqs], dtype=torch.float32)
    return Targets(pos, input_ids.reshape(-1)[tok], seq, counts, paired)


def _span(offset: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictors, targets) of the tokens at positions [start, end) of a sequence that begins at flat
    position `offset`; its first token has no predictor."""
    tok = torch.arange(max(start, 1), end) + offset
    return tok - 1, tok


def padded_width(longest: int, multiple: int, limit: int | None = None) -> int:
    """The batch's row width: the longest row rounded up to a multiple of `multiple`, but not past
    `limit` (max_length: a model with learned positions may have no more) unless the row itself is."""
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, limit)) if limit is not None else rounded


def collate(rows: list[TokenizedPair] | list[TokenizedRow], pad_id: int, share_prompt: bool = False,
            pad_to_multiple_of: int = 1, max_width: int | None = None, packed: bool = False) -> Batch:
    """Pack rows into one right-padded batch; padding only ever follows a sequence's last token.

    share_prompt (pairs only): one row per pair instead of two, see `_collate_shared`.
    packed: every sequence in one row, see `_collate_packed`.
    pad_to_multiple_of: round the width up, so a GPU sees few distinct shapes: its attention kernels are
    planned per shape. In the two-row layout padding takes the next positions, so the width stays within
    max_width (max_length); shared-prompt and packed padding restart at position 0 and need no such cap.
    """
    if packed:
        return _collate_packed(rows, pad_id, pad_to_multiple_of)
    if share_prompt and rows and isinstance(rows[0], TokenizedPair):
        return _collate_shared(rows, pad_id, pad_to_multiple_of)
    seqs = _sequences(rows)
    lengths = [len(p) + len(c) for p, c, *_ in seqs]
    n, width = len(seqs), padded_width(max(lengths), pad_to_multiple_of, max_width)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for i, (prompt, completion, *_rest) in enumerate(seqs):
        total = len(prompt) + len(completion)
        input_ids[i, :total] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[i, :total] = 1
    n_chosen = sum(1 for s in seqs if s[3] == 0)
    spans = [_span(i * width, len(p), len(p) + len(c)) for i, (p, c, *_) in enumerate(seqs)]
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


def _collate_packed(rows: list[TokenizedPair] | list[TokenizedRow], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """Every sequence of the batch in one row [1, W], in Batch order, no padding between them.

    Each sequence is a segment: its positions restart at 0 and its attention stays within it (the model
    runs under dpo_core.packing's attention, told the boundaries by `segments`), so each token sees
    exactly what it would in a row of its own. Rounding W up to pad_to_multiple_of adds a tail of padding
    as a segment of its own, which no target reads.
    """
    seqs = _sequences(rows)
    lengths = [len(p) + len(c) for p, c, *_ in seqs]
    starts = list(accumulate(lengths, initial=0))[:-1]
    total = sum(lengths)
    width = padded_width(total, pad_to_multiple_of)
    input_ids = torch.full((1, width), pad_id, dtype=torch.long)
    attention = torch.zeros((1, width), dtype=torch.long)
    positions = torch.zeros((1, width), dtype=torch.long)
    for start, n, (prompt, completion, *_rest) in zip(starts, lengths, seqs):
        input_ids[0, start : start + n] = torch.tensor(prompt + completion, dtype=torch.long)
        attention[0, start : start + n] = 1
        positions[0, start : start + n] = torch.arange(n)
    positions[0, total:] = torch.arange(width - total)
    bounds = [*starts, total] + ([width] if width > total else [])
    spans = [_span(start, len(p), n) for start, n, (p, *_) in zip(starts, lengths, seqs)]
    return Batch(
        input_ids=input_ids,
        attention_mask=attention,
        targets=_targets(input_ids, spans, bool(rows) and isinstance(rows[0], TokenizedPair)),
        n_chosen=sum(1 for s in seqs if s[3] == 0),
        row_index=torch.tensor([s[2] for s in seqs], dtype=torch.long),
        side=torch.tensor([s[3] for s in seqs], dtype=torch.long),
        groups=[s[4] for s in seqs],
        num_tokens=total,
        position_ids=positions,
        segments=Segments(torch.tensor(bounds, dtype=torch.int32), max(lengths + [width - total])),
    )


def _shared_mask(width: int, p: int, c: int, total: int) -> torch.Tensor:
    """[width, width] bool, True where query q may attend to key k: causal, no padding keys, and
    nothing after the chosen completion (the rejected one, its padding) sees the chosen tokens."""
    q, k = torch.arange(width)[:, None], torch.arange(width)[None, :]
    return (k <= q) & (k < total) & ~((q >= p + c) & (k >= p) & (k < p + c))


def _collate_shared(rows: list[TokenizedPair], pad_id: int, pad_to_multiple_of: int = 1) -> Batch:
    """One row per pair, `prompt, chosen, rejected`, so the prompt runs through the model once.

    The rejected part's positions restart at len(prompt) and a 4-D mask [B, 1, L, L] hides the chosen
    part from it, so each completion sees exactly what it would in a row of its own; the prompt's last
    hidden state predicts the first token of both. Sequences (targets, groups, sides) stay 2B, chosen
    first, as in the two-row layout; num_tokens counts the prompt twice, as that layout would.
    """
    b = len(rows)
    sizes = [(len(r.prompt_ids), len(r.chosen_ids), len(r.rejected_ids)) for r in rows]
    width = padded_width(max(p + c + r for p, c, r in sizes), pad_to_multiple_of)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    positions = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, 1, width, width), dtype=torch.bool)
    chosen, rejected = [], []
    for i, (row, (p, c, r)) in enumerate(zip(rows, sizes)):
        total = p + c + r
        input_ids[i, :total] = torch.tensor(row.prompt_ids + row.chosen_ids + row.rejected_ids, dtype=torch.long)
        positions[i, : p + c] = torch.arange(p + c)
        positions[i, p + c : total] = torch.arange(p, p + r)  # padding stays at 0: within any position table
        mask[i, 0] = _shared_mask(width, p, c, total)
        chosen.append(_span(i * width, p, p + c))
        pred, tok = _span(i * width, p + c, total)
        if p:  # the rejected completion's first token follows the prompt, not the chosen completion
            pred[0] = i * width + p - 1
        else:  # no prompt: that token has no predictor, as at position 0 of a row of its own
            pred, tok = pred[1:], tok[1:]
        rejected.append((pred, tok))
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        targets=_targets(input_ids, chosen + rejected, True),
        n_chosen=b,
        row_index=torch.tensor([r.index for r in rows] * 2, dtype=torch.long),
        side=torch.tensor([0] * b + [1] * b, dtype=torch.long),
        groups=[r.group for r in rows] * 2,
        num_tokens=sum(2 * p + c + r for p, c, r in sizes),
        position_ids=positions,
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


def micro_batches(rows: list, size: int) -> list[list]:
    return [rows[s : s + size] for s in range(0, len(rows), size)]
