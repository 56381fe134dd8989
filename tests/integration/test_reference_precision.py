"""The frozen reference model under bf16: 16-bit weights, log-probs still fp32 and close to an fp32-weight
reference's, and a run that trains with it."""
from __future__ import annotations

import pytest
import torch

from dpo_core import parse_spec, train
from dpo_core.models import load_causal_lm
from dpo_core.reference import ModelReference
from dpo_core.step import aligned_batches, evaluate
from dpo_core.trainer import setup

# A bf16 weight is its fp32 value rounded to 8 significant bits: a relative error of at most 2^-9 each.
# A summed log-prob made from such weights keeps an error of that order, so 2^-8 relative bounds it with
# room; the measured worst on the tiny model is 2.6e-4, the same order as bf16 autocast's own (2.0e-4
# against fp32 without autocast).
BF16_RELATIVE = 2.0 ** -8


def _spec(tiny_model, synthetic, out, **extra):
    train_file, held_out = synthetic
    base = dict(model=tiny_model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                learning_rate=1e-3, batch_size=8, max_steps=3, logging_steps=1, max_length=64, max_prompt_length=32,
                precision="bf16", loss={"type": "sigmoid", "beta": 0.1})
    return parse_spec({**base, **extra})


@pytest.mark.parametrize("separate", [True, False], ids=["reference_model", "frozen-copy"])
def test_bf16_reference_holds_16_bit_weights_and_stays_close_to_fp32_weights(tiny_model, tiny_reference,
                                                                            synthetic, tmp_path, separate):
    reference = tiny_reference if separate else tiny_model
    spec = _spec(tiny_model, synthetic, tmp_path, reference_model=tiny_reference if separate else None)
    run, _ = setup(spec)
    half = run.reference
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16}
    full = ModelReference(load_causal_lm(reference), run.autocast, spec.logprob_chunk_size)
    worst = 0.0
    for batch in aligned_batches(run, run.eval_rows, 16):
        got, want = half.logps(batch), full.logps(batch)
        assert got.dtype == torch.float32 and not got.is_inference() and not got.requires_grad
        assert torch.allclose(got, want, rtol=BF16_RELATIVE, atol=0), (got - want).abs().max()
        worst = max(worst, (got - want).abs().max().item())
    with_half = evaluate(run)
    run.reference = full
    with_full = evaluate(run)
    # The sigmoid loss moves by at most beta per unit of a reference log-prob, and a pair has two.
    assert with_half["eval_loss"] == pytest.approx(with_full["eval_loss"], abs=2 * spec.loss.beta * worst + 1e-7)


@pytest.mark.parametrize("extra", [{}, {"reference_mode": "precomputed"}], ids=["live", "precomputed"])
def test_a_bf16_run_trains_with_the_16_bit_frozen_copy(tiny_model, synthetic, tmp_path, extra):
    spec = _spec(tiny_model, synthetic, tmp_path, validation_file=None, **extra)
    before = {n: p.detach().clone() for n, p in load_causal_lm(tiny_model).named_parameters()}
    result = train(spec)
    after = dict(load_causal_lm(result.final_dir).named_parameters())
    assert result.global_step == 3 and 0 < result.metrics["loss"] < 1
    assert all(not torch.equal(before[n], after[n].detach()) for n in before)


def test_the_adapter_start_is_16_bit_and_the_adapter_disabled_base_stays_the_policys(tiny_model, synthetic, tmp_path):
    lora = {"r": 4, "alpha": 8}
    first = train(_spec(tiny_model, synthetic, tmp_path / "lora", validation_file=None, precision="fp32", lora=lora))
    further, _ = setup(_spec(tiny_model, synthetic, tmp_path / "further", adapter=f"{first.final_dir}/adapter",
                             lora=lora))
    assert isinstance(further.reference, ModelReference)
    assert {p.dtype for p in further.reference.model.parameters()} == {torch.bfloat16}
    fresh, _ = setup(_spec(tiny_model, synthetic, tmp_path / "fresh", lora=lora))
    assert fresh.reference.model is fresh.model  # AdapterReference: the policy's own fp32 weights
    assert {p.dtype for p in fresh.model.parameters()} == {torch.float32}
