"""The memory plan's choices (dpo_core.memplan), on a hand-sized model whose bytes are worked out below."""
from __future__ import annotations

import pytest

from dpo_core import memplan
from dpo_core.errors import TrainingError
from dpo_core.estimate import RUNTIME_BYTES, ModelFacts
from dpo_core.spec import SpecError, TrainingSpec, memory_bytes, parse_spec

P = 1_000_000
FACTS = ModelFacts(parameters=P, layers=4, hidden_size=64, heads=4, kv_heads=4, head_dim=16, vocab_size=1000,
                   intermediate_size=256, max_positions=None, tied_embeddings=False, embedding_parameters=64_000,
                   head_parameters=64_000, linears=())
# A row puts 1000 tokens in a micro batch, every one a completion token; a head chunk of 1000 rows keeps
# the LM head's bytes the same at any micro batch: 1000 rows x 1000 vocab, logits and softmax, fp32.
ROW = memplan.Workload(tokens_per_row=1000, completion_share=1.0)
HEAD = 2 * 1000 * 1000 * 4
# Per token and layer: norms 6 x 64 x 4 + (3 x 64 + 2 x 64 + 4 x 256) x 4 = 6912; a checkpointed layer's input 256.
LAYER, INPUT = 6912, 256
# Activations of one row by checkpointed layers k (the first k): (4 - k) x 6912 + k x 256 per token, with all
# four checkpointed the inputs plus one layer recomputed (4 x 256 + 6912); and backward's one layer, 6912.
PER_ROW = {0: 34_560_000, 1: 27_904_000, 2: 21_248_000, 3: 14_592_000, 4: 14_848_000}
# Weights, gradients, AdamW's two states and the frozen reference: 4 + 4 + 8 + 4 bytes a parameter.
FIXED = {device: 20 * P + HEAD + RUNTIME_BYTES[device] for device in ("cpu", "cuda")}


def _spec(**fields) -> TrainingSpec:
    return TrainingSpec(model="m", train_file="t.jsonl", batch_size=8, logprob_chunk_size=1000, **fields)


def _budget(room: int) -> int:
    """The smallest budget whose share a plan may fill (memplan.room_bytes) is `room`."""
    return -(-room * 100 // memplan.PLAN_PERCENT)


def _plan(device: str, room: int, **fields) -> tuple[int, int]:
    budget = _budget(room)
    assert memplan.room_bytes(budget) == room and memplan.room_bytes(budget - 1) < room
    got = memplan.plan(_spec(**fields), FACTS, device, budget, ROW)
    assert got.predicted_bytes <= room
    return got.micro_batch, got.checkpointed_layers


def test_the_worked_bytes_are_the_estimates():
    every = memplan.plan(_spec(gradient_checkpointing=True, micro_batch_size=2), FACTS, "cpu", 10**12, ROW)
    assert every.predicted_bytes == FIXED["cpu"] + 2 * PER_ROW[4]
    for k in (0, 1, 2, 3):  # room made for 8 rows at k layers is filled exactly, at k
        room = FIXED["cuda"] + 8 * PER_ROW[k]
        got = memplan.plan(_spec(), FACTS, "cuda", _budget(room), ROW)
        assert (got.checkpointed_layers, got.predicted_bytes, got.tokens_per_micro_batch) == (k, room, 8000)


def test_a_run_that_fits_keeps_every_activation_and_the_whole_batch():
    assert _plan("cpu", FIXED["cpu"] + 8 * PER_ROW[0]) == (8, 0)
    assert _plan("cuda", 100 * FIXED["cuda"]) == (8, 0)


def test_on_a_gpu_it_checkpoints_layers_rather_than_cut_a_busy_micro_batch():
    # 8 rows of 1000 tokens are below BUSY_TOKENS: the whole batch is the busy floor. 8 rows fit at k = 2.
    budget = FIXED["cuda"] + 8 * PER_ROW[2]
    assert _plan("cuda", budget) == (8, 2)
    assert _plan("cuda", budget - 1) == (8, 3)


def test_on_a_cpu_it_cuts_the_micro_batch_before_it_recomputes():
    # 169,984,000 bytes of activations: 4 rows of 34,560,000 without checkpointing.
    assert _plan("cpu", FIXED["cpu"] + 8 * PER_ROW[2]) == (4, 0)
    assert _plan("cpu", FIXED["cpu"] + PER_ROW[0] - 1) == (1, 1)  # not one row whole: the fewest layers


def test_when_no_layer_count_keeps_a_busy_micro_batch_the_largest_micro_batch_wins():
    # 72,960,000 bytes: 5 rows at k = 3 (14,592,000 each), 4 at k = 4, 3 at k = 2, 2 at k = 0 or 1.
    assert _plan("cuda", FIXED["cuda"] + 5 * PER_ROW[3]) == (5, 3)


def test_explicit_settings_are_kept():
    budget = FIXED["cpu"] + 8 * PER_ROW[2]
    assert _plan("cpu", budget, micro_batch_size=8) == (8, 2)  # the plan only chooses layers
    assert _plan("cpu", 10**12, gradient_checkpointing=True) == (8, 4)  # every layer, the whole batch
    assert _plan("cuda", FIXED["cuda"] + 8 * PER_ROW[2], gradient_checkpointing=False) == (4, 0)  # rows only
    assert _plan("cpu", 10**12, micro_batch_size=3, gradient_checkpointing=False) == (3, 0)


def test_nothing_fits_fails_with_the_bytes_the_budget_and_what_to_change():
    budget = FIXED["cuda"] + 7_000_000  # below the least: 1 row at k = 3
    with pytest.raises(TrainingError) as err:
        memplan.plan(_spec(), FACTS, "cuda", budget, ROW)
    text = str(err.value)
    assert err.value.code == "memory_budget"
    least = FIXED["cuda"] + PER_ROW[3]
    assert f"micro batch 1 with 3 of 4 layers checkpointed needs about 1.04 GiB ({least:,} bytes)" in text
    assert f"({budget:,} bytes) budget" in text
    for change in ("max_memory", "max_length (1024)", "lora", "bf16", "precomputed", "fsdp"):
        assert change in text
    with pytest.raises(TrainingError, match="with micro_batch_size 8 .* and gradient_checkpointing false"):
        memplan.plan(_spec(micro_batch_size=8, gradient_checkpointing=False), FACTS, "cpu",
                     FIXED["cpu"] + 8 * PER_ROW[0] - 1, ROW)


def test_busy_rows_and_a_process_share_of_the_batch():
    assert memplan.busy_rows("cuda", memplan.Workload(1024), 64) == 8
    assert memplan.busy_rows("cuda", memplan.Workload(100_000), 64) == 1
    assert memplan.busy_rows("cuda", memplan.Workload(10), 4) == 4
    assert memplan.busy_rows("cpu", memplan.Workload(10), 64) == 1
    assert memplan.rows_per_process(_spec(), 3) == 3
    # FSDP over 4 processes: each takes 2 of the 8 rows and a quarter of the 20 bytes a parameter.
    fsdp = _spec(distributed="fsdp")
    one = memplan.plan(fsdp, FACTS, "cuda", 10**12, ROW, world=1).predicted_bytes
    four = memplan.plan(fsdp, FACTS, "cuda", 10**12, ROW, world=4)
    assert (four.micro_batch, one - four.predicted_bytes) == (2, 15 * P + 6 * PER_ROW[0])


def test_budget_default_and_max_memory_grammar():
    assert memplan.budget_bytes(_spec(), 100 << 30) == 90 << 30
    assert memplan.budget_bytes(_spec(max_memory="40GiB"), 100 << 30) == 40 << 30
    assert 0 < memplan.cpu_memory_bytes()
    assert (memory_bytes("900 MiB"), memory_bytes("1.5TB"), memory_bytes("2gb"), memory_bytes(1 << 30)) == (
        900 << 20, 1_500_000_000_000, 2_000_000_000, 1 << 30)
    for bad in ("40 gigs", "GiB", "-1GiB", "100MiB", "65TiB", True, 1.5e9):
        with pytest.raises(SpecError) as err:
            parse_spec({"model": "m", "train_file": "t.jsonl", "max_memory": bad})
        assert [loc for loc, _ in err.value.problems] == ["max_memory"], bad
    assert _spec().gradient_checkpointing == "auto" and _spec().max_memory is None
