"""The packed layout: one row per micro batch, positions restarting per sequence, attention kept within
each sequence by dpo_core.packing with no [T, T] mask; the same log-probs and gradients as padded rows."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core import packing
from dpo_core.batching import collate
from dpo_core.logprobs import completion_logps, packing_unsupported, sequence_logps, unwrap
from dpo_core.tokenize import TokenizedPair, TokenizedRow
from dpo_core.toy import build_model


def _pairs():
    return [
        TokenizedPair(0, [5, 6, 7], [8, 9, 3], [10, 3], None),
        TokenizedPair(1, [5], [11, 12, 13, 14, 3], [9, 3], "g"),
        TokenizedPair(2, [], [11, 3], [9, 12, 3], "g"),
    ]


def test_pairs_pack_chosen_then_rejected_into_one_row_with_restarting_positions():
    b = collate(_pairs(), pad_id=0, packed=True, pad_to_multiple_of=8)
    # Sequences c0 (6 tokens), c1 (6), c2 (2), r0 (5), r1 (3), r2 (3): 25 tokens, a tail of 7 to reach 32.
    assert b.input_ids.shape == b.position_ids.shape == b.attention_mask.shape == (1, 32)
    assert b.input_ids[0, :14].tolist() == [5, 6, 7, 8, 9, 3, 5, 11, 12, 13, 14, 3, 11, 3]
    assert b.input_ids[0, 14:].tolist() == [5, 6, 7, 10, 3, 5, 9, 3, 9, 12, 3] + [0] * 7
    assert b.position_ids[0].tolist() == [*range(6), *range(6), 0, 1, *range(5), 0, 1, 2, 0, 1, 2, *range(7)]
    assert b.segments.cu.tolist() == [0, 6, 12, 14, 19, 22, 25, 32] and b.segments.cu.dtype == torch.int32
    assert b.segments.max_len == 7  # the tail is a segment too
    assert b.attention_mask[0].tolist() == [1] * 25 + [0] * 7
    # Pair-major targets: pair 0's chosen (predicted from 2, 3, 4) and rejected (r0 starts at 14), then
    # pair 1's, then pair 2's, whose chosen has no prompt: its first token has no predictor.
    assert b.targets.pos.tolist() == [2, 3, 4, 16, 17, 6, 7, 8, 9, 10, 19, 20, 12, 22, 23]
    assert b.targets.seq.tolist() == [0, 0, 0, 3, 3, 1, 1, 1, 1, 1, 4, 4, 2, 5, 5]
    padded = collate(_pairs(), pad_id=0)
    assert b.targets.ids.tolist() == padded.targets.ids.tolist()
    assert b.targets.counts.tolist() == padded.targets.counts.tolist() == [3, 5, 1, 2, 2, 2]
    assert b.targets.paired and b.n_chosen == 3 and b.num_tokens == padded.num_tokens == 25
    assert b.side.tolist() == padded.side.tolist() and b.row_index.tolist() == padded.row_index.tolist()
    assert b.groups == padded.groups
    assert collate(_pairs(), pad_id=0, packed=True).segments.cu.tolist() == [0, 6, 12, 14, 19, 22, 25]


def test_unpaired_rows_pack_desirable_then_undesirable():
    rows = [TokenizedRow(0, [5, 6], [7, 3], True, None), TokenizedRow(1, [5], [8, 9, 3], False, "g"),
            TokenizedRow(2, [], [7, 3], True, None)]
    b = collate(rows, pad_id=0, packed=True)
    assert b.input_ids[0].tolist() == [5, 6, 7, 3, 7, 3, 5, 8, 9, 3]
    assert b.position_ids[0].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3]
    assert b.segments.cu.tolist() == [0, 4, 6, 10] and b.segments.max_len == 4
    assert b.targets.pos.tolist() == [1, 2, 4, 6, 7, 8] and b.targets.ids.tolist() == [7, 3, 3, 8, 9, 3]
    assert b.targets.seq.tolist() == [0, 0, 1, 2, 2, 2] and not b.targets.paired
    assert b.n_chosen == 2 and b.row_index.tolist() == [0, 2, 1] and b.side.tolist() == [0, 0, 1]


@pytest.fixture(scope="module", params=["llama", "llama-gqa", "qwen2-gqa"])
def model_path(request, tmp_path_factory) -> str:
    """The tiny Llama; one with 2 key/value heads for 4 query heads; a Qwen2 (biases on q, k, v) with GQA."""
    shape = {"llama": {}, "llama-gqa": {"num_kv_heads": 2},
             "qwen2-gqa": {"num_kv_heads": 2, "architecture": "qwen2"}}[request.param]
    return build_model(tmp_path_factory.mktemp(request.param) / "model", seed=3, **shape)


def _packed_model(path):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert packing_unsupported(model) is None
    packing.enable(model)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_close_grads(a: dict, b: dict) -> None:
    for name in a:
        scale = b[name].abs().max().item() or 1.0
        assert (a[name] - b[name]).abs().max().item() <= 1e-5 * scale, name


def test_packed_log_probs_and_gradients_equal_padded_ones(model_path):
    model = _packed_model(model_path)
    padded, packed = collate(_pairs(), 0), collate(_pairs(), 0, packed=True, pad_to_multiple_of=16)
    a = sequence_logps(model, padded, chunk_size=4)
    a.sum().backward()
    padded_grads = _grads(model)
    b = sequence_logps(model, packed, chunk_size=4)
    b.sum().backward()
    assert torch.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    _assert_close_grads(_grads(model), padded_grads)


def test_packed_fused_pair_head_gives_the_padded_loss_and_gradients(model_path):
    model = _packed_model(model_path)

    def objective(pairs, chosen, rejected):  # a sigmoid DPO-like loss of the pairs' log-prob margins
        return -torch.nn.functional.logsigmoid(0.1 * (chosen - rejected) + 0.01 * pairs).sum()

    results = []
    for batch in (collate(_pairs(), 0), collate(_pairs(), 0, packed=True)):
        loss, logps = completion_logps(model, batch.input_ids, batch.attention_mask, batch.targets, 4, objective,
                                       batch.position_ids, batch.segments)
        loss.backward()
        results.append((loss.detach(), logps, _grads(model)))
    (loss_a, logps_a, grads_a), (loss_b, logps_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and torch.allclose(logps_a, logps_b, atol=1e-5)
    _assert_close_grads(grads_b, grads_a)


def _attention_masks_seen(model) -> tuple[list, list]:
    """(the attention_mask, whether cu_seq_lens_q came) of every attention module call, as the decoder
    layers hand them over; and the hooks' handles."""
    seen, handles = [], []

    def record(_module, _args, kwargs):
        mask = kwargs.get("attention_mask")
        seen.append((None if mask is None else tuple(mask.shape), "cu_seq_lens_q" in kwargs))

    for name, module in unwrap(model).named_modules():
        if name.endswith("self_attn"):
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    return seen, handles


def test_no_mask_reaches_the_attention_of_a_packed_forward(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    batch = collate(_pairs(), 0, packed=True)
    width = batch.input_ids.shape[1]
    seen, handles = _attention_masks_seen(model)
    sequence_logps(model, batch)  # under plain SDPA: transformers turns restarting positions into a [T, T] mask
    assert seen and all(shape == (1, 1, width, width) for shape, _ in seen)
    seen.clear()
    packing.enable(model)
    sequence_logps(model, batch)
    assert seen and all(shape is None and segments for shape, segments in seen)
    for handle in handles:
        handle.remove()
    # The packed attention refuses a mask: a forward that passes segments outside packed_forward() gets one.
    body = unwrap(model).model
    with pytest.raises(RuntimeError, match="no attention mask"):
        body(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
             **packing.attention_kwargs(batch.segments))


def test_generation_under_the_packed_attention_is_sdpa_generation(tiny_model):
    """Without segments the packed attention is SDPA under SDPA's mask: left-padded batched generation
    (what samples does) gives the same tokens and scores."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[0, 0, 20, 5, 6], [21, 7, 8, 9, 10]])
    mask = (ids != 0).long()
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True,
                  return_dict_in_generate=True)
    plain = model.generate(input_ids=ids, **kwargs)
    packing.enable(model)
    packed = model.generate(input_ids=ids, **kwargs)
    assert torch.equal(plain.sequences, packed.sequences)
    for a, b in zip(plain.scores, packed.scores):
        assert torch.allclose(a, b, atol=1e-5)


def test_sliding_window_and_softcapped_models_do_not_pack(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, use_sliding_window=True, sliding_window=8)
    assert "sliding" in packing_unsupported(Qwen2ForCausalLM(config))
    config.use_sliding_window, config.sliding_window, config.layer_types = False, None, ["full_attention"]
    assert packing_unsupported(Qwen2ForCausalLM(config)) is None
    config.attn_logit_softcapping = 30.0
    assert "soft-capped" in packing_unsupported(Qwen2ForCausalLM(config))


def test_packing_and_share_prompt_both_true_is_refused_naming_packing():
    from dpo_core.spec import SpecError, parse_spec

    base = {"model": "m", "train_file": "t.jsonl"}
    with pytest.raises(SpecError) as err:
        parse_spec({**base, "packing": True, "share_prompt": True})
    assert [loc for loc, _ in err.value.problems] == ["packing"]
    assert parse_spec({**base, "packing": "auto", "share_prompt": True}).packing == "auto"  # share_prompt wins
