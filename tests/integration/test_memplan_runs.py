"""The memory plan in real runs: the layers it checkpoints change no number, the user is told the plan, and a
CPU run held to a budget stays under it where the unplanned run does not."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpo_core import Callbacks, estimate, memplan, parse_spec, train
from dpo_core.data import read_jsonl
from dpo_core.memplan import Workload
from dpo_core.models import checkpoint_layers, decoder_layers
from dpo_core.spec import memory_bytes
from dpo_core.tokenize import tokenize
from dpo_core.tokenizer_loading import load_tokenizer
from dpo_core.toy import NUMBER_WORDS, build_model

REPO = Path(__file__).resolve().parents[2]


class Seen(Callbacks):
    def __init__(self):
        self.start, self.warnings = {}, []

    def on_start(self, info):
        self.start = info

    def on_warning(self, message, *, code=None, data=None):
        self.warnings.append((code, message, data))


def _spec(tiny_model, synthetic, out, **overrides):
    train_file, held_out = synthetic
    return parse_spec(dict(model=tiny_model, train_file=train_file, validation_file=held_out, output_dir=str(out),
                           learning_rate=1e-3, batch_size=8, max_steps=3, logging_steps=1, max_length=64,
                           max_prompt_length=32, device="cpu", **overrides))


def _losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _workload(spec) -> Workload:
    """What the trainer plans for: two sequences a pair of the longest train or eval row (pad multiple 1 on a CPU)."""
    tokenizer = load_tokenizer(spec.model)
    rows = [r for path in (spec.train_file, spec.validation_file) for r in tokenize(
        read_jsonl(path), tokenizer, max_length=spec.max_length, max_prompt_length=spec.max_prompt_length).rows]
    width = max(len(r.prompt_ids) + max(len(r.chosen_ids), len(r.rejected_ids)) for r in rows)
    summary = estimate.epoch_summary(rows)
    return Workload(2 * width, summary["completion_tokens"] / summary["tokens"], width)


def test_checkpointing_the_first_layers_recomputes_them_alone(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    checkpoint_layers(model, 1)
    layers = decoder_layers(model)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    calls = [0, 0]
    for i, layer in enumerate(layers):  # the recompute stops once the last saved tensor is made: count inside it
        layer.mlp.act_fn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    model.train()
    model(torch.tensor([[5, 6, 7, 8]])).logits.sum().backward()
    assert calls == [2, 1]  # layer 0 ran again in backward


def test_a_planned_run_checkpoints_layers_and_gives_the_same_losses(tiny_model, synthetic, tmp_path):
    """A budget that 8 rows fit only with 1 of the 2 layers checkpointed, the micro batch pinned: the plan
    checkpoints that layer, says so, and every step's loss is the unplanned run's."""
    plain = train(_spec(tiny_model, synthetic, tmp_path / "plain", gradient_checkpointing=False))
    assert plain.memory_plan["checkpointed_layers"] == 0 and plain.memory_plan["micro_batch"] == 8
    spec = _spec(tiny_model, synthetic, tmp_path / "planned", micro_batch_size=8)
    work, facts = _workload(spec), estimate.model_facts(tiny_model)
    room = estimate.micro_batch_memory(spec, facts, "cpu", 8 * work.tokens_per_row, work.completion_share, 1,
                                       width=work.width)["total"]
    budget = -(-room * 100 // memplan.PLAN_PERCENT)  # the budget whose share a plan may fill is `room`
    seen = Seen()
    planned = train(spec.model_copy(update={"max_memory": budget}), seen)
    assert (planned.memory_plan["micro_batch"], planned.memory_plan["checkpointed_layers"]) == (8, 1)
    assert planned.memory_plan["predicted_bytes"] == room
    assert _losses(tmp_path / "planned") == pytest.approx(_losses(tmp_path / "plain"), abs=1e-5)
    assert (seen.start["micro_batch_size"], seen.start["checkpointed_layers"], seen.start["layers"]) == (8, 1, 2)
    [(code, message, data)] = [w for w in seen.warnings if w[0] == "memory_plan"]
    assert "1 of 2 layers checkpointed" in message and data["checkpointed_layers"] == 1


# A training process on one thread: prints its plan and its own peak RSS (VmHWM: ru_maxrss would carry the
# pytest process's peak over the exec).
CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
import dpo_core
from dpo_core.estimate import peak_rss_bytes
from dpo_core.spec import TrainingSpec
result = dpo_core.train(TrainingSpec.model_validate_json(sys.argv[1]))
print(json.dumps({"plan": result.memory_plan, "rss": peak_rss_bytes()}))
"""


def _child(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    return json.loads(out.strip().splitlines()[-1])


def test_a_cpu_run_held_to_max_memory_peaks_under_it(tmp_path):
    """16 pairs of ~500 tokens through 8 narrow layers: activations (~1.2 GB) outweigh the model. Unplanned the
    process peaks near 1.6 GB; with max_memory 1GiB the plan cuts the micro batch and the peak stays under."""
    model = build_model(tmp_path / "model", hidden_size=64, num_layers=8, num_heads=4, intermediate_size=256,
                        max_position_embeddings=1024)
    rng = random.Random(0)
    words = lambda k: " ".join(rng.choice(NUMBER_WORDS) for _ in range(k))  # noqa: E731
    rows = [{"prompt": "sort : " + words(400), "chosen": " " + words(100), "rejected": " " + words(100)}
            for _ in range(16)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(model=model, train_file=str(tmp_path / "train.jsonl"), batch_size=16, max_steps=1, max_length=1024,
                max_prompt_length=512, device="cpu")
    budget = "1GiB"
    # Both on one thread each, side by side: the peaks are each process's own.
    unplanned = _child({**base, "output_dir": str(tmp_path / "a"), "gradient_checkpointing": False,
                        "micro_batch_size": 16})
    planned = _child({**base, "output_dir": str(tmp_path / "b"), "max_memory": budget})
    unplanned, planned = _result(unplanned), _result(planned)
    assert unplanned["rss"] > memory_bytes(budget) * 1.2
    assert unplanned["plan"]["predicted_bytes"] > memory_bytes(budget)
    assert planned["plan"]["micro_batch"] < 16 and planned["plan"]["predicted_bytes"] <= memory_bytes(budget)
    assert planned["rss"] < memory_bytes(budget), planned


def test_a_loaded_models_facts_are_its_files_facts_with_or_without_lora(tiny_model):
    from dpo_core.models import add_lora
    from dpo_core.spec import LoraSpec

    files = estimate.model_facts(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert estimate.live_model_facts(model) == files
    assert estimate.live_model_facts(add_lora(model, LoraSpec(r=2))) == files  # the base's, adapters left out
