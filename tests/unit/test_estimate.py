"""Unit: dpo_core.estimate's model facts, steps, FLOPs, memory and seconds, on hand-worked values."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dpo_core import estimate
from dpo_core.estimate import ModelFacts
from dpo_core.spec import TrainingSpec

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    """A safetensors file of zeros: the 8-byte header length, the JSON header, the data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))


def _llama_dir(tmp: Path, tied: bool = False, sharded: bool = False) -> Path:
    """A 2-layer Llama's config.json and weights: vocab 100, hidden 8, MLP 16, 2 heads of 4, 1 kv head."""
    config = {"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "intermediate_size": 16, "max_position_embeddings": 64}
    shapes = {"model.embed_tokens.weight": [100, 8], "model.norm.weight": [8]}
    for i in range(2):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": [8, 8], p + "self_attn.k_proj.weight": [4, 8],
                       p + "self_attn.v_proj.weight": [4, 8], p + "self_attn.o_proj.weight": [8, 8],
                       p + "mlp.gate_proj.weight": [16, 8], p + "mlp.up_proj.weight": [16, 8],
                       p + "mlp.down_proj.weight": [8, 16], p + "input_layernorm.weight": [8],
                       p + "post_attention_layernorm.weight": [8]})
    if not tied:
        shapes["lm_head.weight"] = [100, 8]
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(config))
    if not sharded:
        _safetensors(tmp / "model.safetensors", shapes)
        return tmp
    names = sorted(shapes)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in parts.items():
        _safetensors(tmp / file, {n: shapes[n] for n in part})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: file for file, part in parts.items() for n in part}}))
    return tmp


# Per layer: q 64 + k 32 + v 32 + o 64 + gate 128 + up 128 + down 128 + 2 norms 16 = 592.
LAYER = 592
UNTIED = 2 * LAYER + 800 + 8 + 800  # layers, embedding, final norm, head


@pytest.mark.parametrize("sharded", [False, True])
def test_model_facts_from_config_and_safetensors_headers(tmp_path, sharded):
    facts = estimate.model_facts(_llama_dir(tmp_path, sharded=sharded))
    assert (facts.parameters, facts.embedding_parameters, facts.head_parameters) == (UNTIED, 800, 800)
    assert facts.body_parameters == 2 * LAYER + 8
    assert (facts.layers, facts.hidden_size, facts.heads, facts.kv_heads, facts.head_dim) == (2, 8, 2, 1, 4)
    assert (facts.vocab_size, facts.intermediate_size, facts.max_positions) == (100, 16, 64)
    assert not facts.tied_embeddings
    assert len(facts.linears) == 14 and ("model.layers.0.self_attn.k_proj", 8, 4) in facts.linears


def test_a_tied_head_counts_once(tmp_path):
    facts = estimate.model_facts(_llama_dir(tmp_path, tied=True))
    assert (facts.parameters, facts.head_parameters, facts.tied_embeddings) == (UNTIED - 800, 0, True)


def test_model_facts_match_the_parameters_torch_counts(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_core.toy import build_model

    path = build_model(tmp_path / "m", hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert estimate.model_facts(path).parameters == sum(p.numel() for p in model.parameters())


def test_model_facts_say_what_is_missing(tmp_path):
    with pytest.raises(estimate.EstimateError, match="not a local directory"):
        estimate.model_facts(tmp_path / "nowhere")
    tmp_path.joinpath("config.json").write_text("{}")
    with pytest.raises(estimate.EstimateError, match="no .safetensors"):
        estimate.model_facts(tmp_path)
    tmp_path.joinpath("model.safetensors").write_bytes(b"\x01")
    with pytest.raises(estimate.EstimateError, match="not a safetensors file"):
        estimate.model_facts(tmp_path)


PROBE = r"""
import json, sys
from dpo_core import estimate
facts = estimate.model_facts(sys.argv[1])
print(json.dumps({"parameters": facts.parameters, "loaded": sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft", "numpy"))}))
"""


def test_estimates_import_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(_llama_dir(tmp_path))], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"parameters": UNTIED, "loaded": []}


def _spec(**fields) -> TrainingSpec:
    return TrainingSpec(model="m", train_file="t.jsonl", **fields)


def _report(rows=10, tokens=1000, longest=60, prompt=30, chosen=10, rejected=10) -> dict:
    return {"training_file": {"rows_used": rows, "tokens": {"total": tokens, "longest_sequence": longest},
                              "lengths": {"prompt": {"p50": prompt}, "chosen": {"p50": chosen},
                                          "rejected": {"p50": rejected}}}}


FACTS = ModelFacts(parameters=1_000_000, layers=2, hidden_size=64, heads=4, kv_heads=4, head_dim=16, vocab_size=1000,
                   intermediate_size=256, max_positions=None, tied_embeddings=False, embedding_parameters=64_000,
                   head_parameters=64_000, linears=(("l0.q_proj", 64, 64), ("l0.mlp.down_proj", 256, 64)))


@pytest.mark.parametrize("fields, steps, tokens, epochs", [
    ({"batch_size": 3}, 4, 1000, 1.0),  # 10 rows: steps of 3, 3, 3, 1
    ({"batch_size": 3, "num_epochs": 1.5}, 6, 1600, 1.6),  # an epoch of 4 steps, then 2 steps of 3 rows
    ({"batch_size": 3, "max_steps": 5}, 5, 1300, 1.3),
    ({"batch_size": 4, "max_steps": 2}, 2, 800, 0.8),
])
def test_steps_and_tokens_as_the_trainer_steps(fields, steps, tokens, epochs):
    plan = estimate.training_plan(_spec(**fields), FACTS, _report())
    assert (plan["steps"], plan["tokens"], plan["epochs"]) == (steps, tokens, epochs)
    assert plan["steps"] == _spec(**fields).total_steps(10)


def test_flops_policy_and_reference():
    """Hand-worked: body 872,000 parameters; 100 tokens of 50 a sequence, completion share 20 / 80."""
    shape = estimate.shape_of_report(_report(rows=1, tokens=100)["training_file"], unpaired=False)
    assert (shape.completion_share, shape.mean_sequence, shape.sequences_per_row) == (0.25, 50.0, 2)
    body, head, attention = 2 * 872_000, 2 * 1000 * 64 * 0.25, 2 * 2 * 4 * 16 * 50.0
    forward = body + head + attention
    full = estimate.run_flops(_spec(), FACTS, shape, tokens=100)
    assert full["policy"] == pytest.approx(100 * 3 * forward)
    assert full["reference"] == pytest.approx(100 * forward)
    lora = estimate.run_flops(_spec(lora={"r": 4, "target_modules": ["q_proj"]}), FACTS, shape, tokens=100)
    assert lora["policy"] == pytest.approx(100 * (2 * (body + head) + 3 * attention + 6 * 4 * (64 + 64)))
    checkpointed = estimate.run_flops(_spec(gradient_checkpointing=True), FACTS, shape, tokens=100)
    assert checkpointed["policy"] - full["policy"] == pytest.approx(100 * (body + attention))
    assert estimate.run_flops(_spec(loss={"type": "simpo"}), FACTS, shape, tokens=100)["reference"] == 0
    once = estimate.run_flops(_spec(reference_mode="precomputed"), FACTS, shape, tokens=300)
    assert once["reference"] == pytest.approx(100 * forward)  # one epoch, whatever the run's length
    assert full["total"] == full["policy"] + full["reference"]


def test_lora_targets_as_peft_matches_them():
    all_linear = estimate.trainable_parameters(_spec(lora={"r": 2}), FACTS)
    assert all_linear == 2 * (64 + 64) + 2 * (256 + 64)
    assert estimate.trainable_parameters(_spec(lora={"r": 2, "target_modules": ["down_proj"]}), FACTS) == 2 * 320
    assert estimate.trainable_parameters(_spec(lora={"r": 2, "target_modules": r".*\.q_proj"}), FACTS) == 2 * 128
    assert estimate.trainable_parameters(_spec(), FACTS) == FACTS.parameters


def test_memory_terms():
    p = FACTS.parameters
    full = estimate.memory(_spec(batch_size=2), FACTS, _report(), "cpu")
    assert (full["weights"], full["gradients"], full["optimizer"], full["reference"]) == (4 * p, 4 * p, 8 * p, 4 * p)
    # 2 rows x 2 sequences x 60 tokens; per layer and token (6 x 64) x 4 bytes + (3 x 64 + 2 x 64 + 4 x 256) x 4,
    # and the padded batch's attention mask, 60 wide: 60 x 4. Two layers, and one more in backward.
    per_token_layer = 6 * 64 * 4 + (3 * 64 + 2 * 64 + 4 * 256) * 4 + 60 * 4
    head = 2 * 4 * min(60 * 1000, 1 << 20)  # 240 tokens x 1/4 completion = 60 rows of logits, and their softmax
    assert full["activations"] == 240 * 3 * per_token_layer + head
    # The first layer checkpointed keeps its input alone (64 x 4 bytes a token); every layer: the inputs and a
    # layer recomputed.
    one = estimate.memory(_spec(batch_size=2), FACTS, _report(), "cpu", checkpointed=1)
    assert one["activations"] == 240 * (2 * per_token_layer + 256) + head
    every = estimate.memory(_spec(batch_size=2, gradient_checkpointing=True), FACTS, _report(), "cpu")
    assert every["activations"] == 240 * (2 * per_token_layer + 2 * 256) + head
    assert full["runtime"] == estimate.RUNTIME_BYTES["cpu"]
    assert full["total"] == sum(v for k, v in full.items() if k != "total")
    lora = estimate.memory(_spec(batch_size=2, lora={"r": 2}), FACTS, _report(), "cpu")
    t = estimate.trainable_parameters(_spec(lora={"r": 2}), FACTS)
    assert (lora["weights"], lora["gradients"], lora["optimizer"], lora["reference"]) == (4 * (p + t), 4 * t, 8 * t, 0)
    assert estimate.memory(_spec(loss={"type": "orpo"}), FACTS, _report(), "cpu")["reference"] == 0
    bf16 = estimate.memory(_spec(batch_size=2, precision="bf16"), FACTS, _report(), "cpu")
    assert bf16["weights"] == 6 * p and bf16["activations"] < full["activations"]
    sharded = estimate.memory(_spec(batch_size=2, distributed="fsdp"), FACTS, _report(), "cuda", gpus=4)
    assert (sharded["weights"], sharded["optimizer"]) == (p, 2 * p)


def test_a_precomputed_reference_peaks_in_its_own_pass_when_that_is_larger():
    lora = _spec(lora={"r": 2}, reference_mode="precomputed", reference_model="other")
    mem = estimate.memory(lora, FACTS, _report(), "cuda", micro_batch_size=1)  # activations below a model
    assert mem["reference"] == 0 and mem["total"] > sum(v for k, v in mem.items() if k != "total")


def test_the_largest_micro_batch_that_fits():
    spec = _spec(batch_size=16, max_length=512)
    report = _report(longest=500)
    sizes = [estimate.memory(spec, FACTS, report, "cuda", m)["total"] for m in range(1, 17)]
    assert sizes == sorted(sizes)
    assert estimate.largest_micro_batch(spec, FACTS, report, "cuda", sizes[4]) == 5
    assert estimate.largest_micro_batch(spec, FACTS, report, "cuda", sizes[4] + 1) == 5
    assert estimate.largest_micro_batch(spec, FACTS, report, "cuda", 10 * GIB) == 16
    assert estimate.largest_micro_batch(spec, FACTS, report, "cuda", sizes[0] - 1) is None


def _plan(parameters=1_000_000, flops=1e12, precision="fp32") -> dict:
    return {"parameters": parameters, "flops": {"total": flops}, "precision": precision}


def _measured(job_id, parameters, flops, seconds, **fields) -> dict:
    return {"job_id": job_id, "parameters": parameters, "flops": flops, "train_seconds": seconds, "gpus": 1,
            "device": "cpu", "gpu_type": "cpu", "precision": "fp32", **fields}


def test_seconds_calibrated_by_the_nearest_model_size():
    runs = [_measured("a", 900_000, 1e11, 2.0), _measured("b", 5_000_000, 1e11, 1.0),
            _measured("c", 1_100_000, 3e11, 4.0), _measured("d", 1_000_000, 1e11, 0.1, precision="bf16"),
            _measured("e", 1_000_000, 1e11, 0.1, device="cuda", gpu_type="h100")]
    guess = estimate.seconds(_plan(parameters=1_000_000), runs, "cpu")
    # By ratio, 1.1M (c) is nearer 1M than 0.9M (a) is: log 1.1 < log(1 / 0.9). Other precisions, devices: not used.
    assert guess == {"seconds": pytest.approx(1e12 / 7.5e10), "basis": "calibrated", "calibrated_by": ["c"],
                     "flops_per_s": pytest.approx(7.5e10), "mfu": None}
    two = estimate.seconds(_plan(parameters=1_000_000), runs + [_measured("f", 1_100_000, 1e11, 6.0)], "cpu")
    assert two["calibrated_by"] == ["c", "f"] and two["flops_per_s"] == pytest.approx(4e11 / 10)


def test_seconds_from_the_flops_model_without_history():
    cpu = estimate.seconds(_plan(), [], "cpu")
    assert (cpu["basis"], cpu["seconds"], cpu["mfu"]) == ("flops_model", 1e12 / estimate.CPU_FLOPS_PER_S, None)
    h100 = estimate.seconds(_plan(flops=989.4e12, precision="bf16"), [], "cuda", "h100", gpus=2)
    assert (h100["seconds"], h100["mfu"]) == (pytest.approx(1 / (0.4 * 2)), 0.4)
    measured = [_measured("g", 1_000_000, 989.4e12 * 0.2, 1.0, device="cuda", gpu_type="h100", precision="bf16")]
    calibrated = estimate.seconds(_plan(precision="bf16"), measured, "cuda", "h100")
    assert (calibrated["basis"], calibrated["mfu"]) == ("calibrated", 0.2)
    assert estimate.seconds(_plan(precision="bf16"), measured, "cuda", "a100")["basis"] == "flops_model"
    unknown = estimate.seconds(_plan(precision="bf16"), [], "cuda", "mystery")
    assert (unknown["flops_per_s"], unknown["mfu"]) == (0.4 * estimate.UNKNOWN_GPU_PEAK[0], None)


def test_epoch_summary_and_what_a_run_measured():
    pair = SimpleNamespace(prompt_ids=[1, 2, 3], chosen_ids=[4, 5], rejected_ids=[6])
    row = SimpleNamespace(prompt_ids=[1], completion_ids=[2, 3, 4])
    assert estimate.epoch_summary([pair, pair]) == {"rows": 2, "tokens": 18, "completion_tokens": 6, "sequences": 4,
                                                   "longest_sequence": 5}
    assert estimate.epoch_summary([row])["tokens"] == 4
    summary = estimate.epoch_summary([pair] * 10)
    result = SimpleNamespace(train_seconds=2.0, global_step=5, trained_tokens=90, parameters=FACTS.parameters,
                             trainable_parameters=FACTS.parameters, device="cpu", peak_memory_bytes=GIB,
                             memory_kind="rss", epoch=summary)
    got = estimate.measured(_spec(), result, "cpu", 1, FACTS)
    shape = estimate.shape_of_summary(summary)
    assert got["flops"] == pytest.approx(estimate.run_flops(_spec(), FACTS, shape, 90)["total"])
    assert (got["tokens_per_s"], got["steps"], got["peak_memory_bytes"], got["memory_kind"]) == (45.0, 5, GIB, "rss")
    assert estimate.measured(_spec(), result, "cpu", 1, None)["flops"] is None
    precomputed = estimate.measured(_spec(reference_mode="precomputed"), result, "cpu", 1, FACTS)
    assert precomputed["flops"] == pytest.approx(estimate.run_flops(_spec(), FACTS, shape, 90)["policy"])
    # The plan the run had: its checkpointed layers' recompute counts, and it is recorded.
    result.memory_plan = {"micro_batch": 2, "checkpointed_layers": 1, "layers": FACTS.layers,
                          "budget_bytes": 3 * GIB, "predicted_bytes": 2 * GIB}
    planned = estimate.measured(_spec(), result, "cpu", 1, FACTS)
    assert planned["flops"] == pytest.approx(estimate.run_flops(_spec(), FACTS, shape, 90, checkpointed=1)["total"])
    assert planned["flops"] > got["flops"]
    assert (planned["micro_batch_size"], planned["checkpointed_layers"], planned["gradient_checkpointing"],
            planned["memory_budget_bytes"], planned["predicted_memory_bytes"]) == (2, 1, True, 3 * GIB, 2 * GIB)
