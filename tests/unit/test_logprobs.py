"""Completion log-probs: the chunked LM-head path equals a plain full forward, gradients included."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core.batching import collate, epoch_order
from dpo_core.logprobs import _full_forward_logps, sequence_logps
from dpo_core.tokenize import TokenizedPair


def _batch():
    rows = [
        TokenizedPair(0, [5, 6, 7], [8, 9, 3], [10, 3], None),
        TokenizedPair(1, [5], [11, 12, 13, 14, 3], [9, 3], "g"),
    ]
    return collate(rows, pad_id=0)


def test_collate_packs_prompt_and_completion_with_padding_only_at_the_end():
    b = _batch()
    assert b.n_chosen == 2 and b.input_ids.shape == (4, 6)
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 3]
    assert b.input_ids[2].tolist() == [5, 6, 7, 10, 3, 0]
    # Pair by pair: pair 0's chosen (row 0) and rejected (row 2) targets, then pair 1's (rows 1, 3).
    assert b.targets.seq.tolist() == [0, 0, 0, 2, 2, 1, 1, 1, 1, 1, 3, 3]
    assert b.targets.pos[:5].tolist() == [2, 3, 4, 14, 15]  # row 2 starts at 2 * 6
    assert b.targets.ids[:5].tolist() == [8, 9, 3, 10, 3]
    assert b.targets.counts.tolist() == [3, 5, 2, 2]
    assert b.attention_mask[3].tolist() == [1, 1, 1, 0, 0, 0]
    assert b.side.tolist() == [0, 0, 1, 1] and b.row_index.tolist() == [0, 1, 0, 1]
    assert b.num_tokens == 6 + 6 + 5 + 3


def test_chunked_log_probs_equal_the_full_forward(tiny_model, tiles):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = _batch()
    full = _full_forward_logps(model, batch.input_ids, batch.attention_mask, batch.targets)
    full.sum().backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = sequence_logps(model, batch, chunk_size=3)
    chunked.sum().backward()
    assert torch.allclose(chunked, full, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, full_grads[name], atol=1e-5), name


def test_epoch_order_is_deterministic_and_covers_every_row():
    lengths = [5, 50, 7, 30, 9, 11, 2, 40, 3, 8]
    a = epoch_order(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert a == epoch_order(lengths, 3, seed=1, epoch=0, group_by_length=True)
    assert sorted(i for batch in a for i in batch) == list(range(10))
    assert a != epoch_order(lengths, 3, seed=1, epoch=1, group_by_length=True)


@pytest.fixture(params=["one tile", "many tiles"])
def tiles(request, monkeypatch):
    """The CPU head in one vocabulary tile, or in tiles of 7 columns (online logsumexp across tiles)."""
    from dpo_core import headlogp

    if request.param == "many tiles":
        monkeypatch.setattr(headlogp, "CPU_TILE_ELEMENTS", 1)
        monkeypatch.setattr(headlogp, "MIN_TILE_COLUMNS", 7)
    return request.param


def test_fused_head_log_probs_match_autograd_with_bias_and_in_bf16(tiles):
    from dpo_core.headlogp import head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=True)
    hidden = torch.randn(13, 8, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    weights = torch.randn(13)
    ours = head_logprobs(head, hidden, targets, chunk=5)
    (ours * weights).sum().backward()
    got = (hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone())
    hidden.grad = head.weight.grad = head.bias.grad = None
    ref = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * weights).sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    for a, b in zip(got, (hidden.grad, head.weight.grad, head.bias.grad)):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = head_logprobs(head, hidden, targets, chunk=4)
    low.sum().backward()
    assert torch.allclose(low, ref, atol=0.1) and torch.isfinite(head.weight.grad).all()


def _pairs_with_an_empty_prompt():
    return [
        TokenizedPair(0, [5, 6, 7], [8, 9, 3], [10, 3], None),
        TokenizedPair(1, [5], [11, 12, 13, 14, 3], [9, 3], "g"),
        TokenizedPair(2, [], [11, 3], [9, 12, 3], "g"),
    ]


def test_shared_prompt_layout_is_one_row_per_pair_with_restarted_positions():
    b = collate(_pairs_with_an_empty_prompt(), pad_id=0, share_prompt=True)
    assert b.input_ids.shape == (3, 8) and b.attention_mask.shape == (3, 1, 8, 8)
    assert b.input_ids[0].tolist() == [5, 6, 7, 8, 9, 3, 10, 3]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4]  # rejected restarts after the prompt
    assert b.position_ids[2].tolist() == [0, 1, 0, 1, 2, 0, 0, 0]
    mask = b.attention_mask[0, 0]
    assert mask[6].tolist() == [True, True, True, False, False, False, True, False]  # rejected sees no chosen
    assert mask[5].tolist() == [True] * 6 + [False] * 2  # chosen: plain causal
    assert not b.attention_mask[2, 0, :, 5:].any()  # padding keys
    # Pair 0: chosen targets predicted from 2, 3, 4; the rejected's first from the prompt's last (2).
    assert b.targets.pos[:5].tolist() == [2, 3, 4, 2, 6]
    assert b.targets.ids[:5].tolist() == [8, 9, 3, 10, 3]
    unshared = collate(_pairs_with_an_empty_prompt(), pad_id=0)
    assert b.targets.counts.tolist() == unshared.targets.counts.tolist() == [3, 5, 1, 2, 2, 2]
    assert b.targets.ids.tolist() == unshared.targets.ids.tolist()
    assert b.num_tokens == unshared.num_tokens and b.side.tolist() == unshared.side.tolist()
    assert b.row_index.tolist() == unshared.row_index.tolist() and b.groups == unshared.groups


def test_shared_prompt_gives_the_same_log_probs_and_gradients(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        batch = collate(_pairs_with_an_empty_prompt(), pad_id=0, share_prompt=share)
        logps = sequence_logps(model, batch, chunk_size=4)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-6)
    for name, g in grads_a.items():
        # The prompt's gradient sums both completions' contributions, in another order: rounding only.
        assert (grads_b[name] - g).abs().max() <= 1e-6 * g.abs().max(), name


def test_only_sdpa_body_head_models_take_the_shared_layout(tiny_model):
    from dpo_core.logprobs import can_share_prompt

    assert can_share_prompt(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa"))
    # Eager attention adds the mask as floats: a boolean 4-D mask would be read as 0/1 biases.
    assert not can_share_prompt(AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager"))


@pytest.mark.parametrize("share", [False, True], ids=["two-rows", "shared-prompt"])
def test_padding_to_a_multiple_changes_the_width_only(tiny_model, share):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    results = []
    for multiple in (1, 16):
        model.zero_grad(set_to_none=True)
        batch = collate(_pairs_with_an_empty_prompt(), pad_id=0, share_prompt=share, pad_to_multiple_of=multiple)
        assert batch.input_ids.shape[1] == (16 if multiple == 16 else 8 if share else 6)
        logps = sequence_logps(model, batch, chunk_size=4)
        (logps * torch.arange(1.0, 7.0)).sum().backward()
        results.append((batch, logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (narrow, a, grads_a), (wide, b, grads_b) = results
    assert wide.num_tokens == narrow.num_tokens and wide.targets.ids.tolist() == narrow.targets.ids.tolist()
    assert torch.allclose(a, b, atol=1e-6)
    for name, g in grads_a.items():
        # A wider batch may take other kernel tiles (on a GPU): rounding only.
        assert (grads_b[name] - g).abs().max() <= 1e-5 * g.abs().max(), name


def test_padding_stops_at_max_length_but_never_cuts_a_row():
    from dpo_core.batching import padded_width

    assert padded_width(6, 64) == 64 and padded_width(64, 64) == 64 and padded_width(65, 64) == 128
    assert padded_width(6, 64, limit=10) == 10  # a model with learned positions may have no more
    assert padded_width(12, 64, limit=10) == 12  # never narrower than the longest row
    assert collate(_pairs_with_an_empty_prompt(), pad_id=0, pad_to_multiple_of=64, max_width=7).input_ids.shape == (6, 7)
    # Shared-prompt rows (prompt, chosen, rejected) are longer than max_length, and their padding sits
    # at position 0: they round up whatever the cap.
    shared = collate(_pairs_with_an_empty_prompt(), pad_id=0, share_prompt=True, pad_to_multiple_of=64, max_width=7)
    assert shared.input_ids.shape == (3, 64)
