"""compile: true on the tiny model trains as the eager run does, and saves what an eager run saves."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch._dynamo.utils import counters
from transformers import AutoModelForCausalLM

from dpo_core import parse_spec, train
from dpo_core.compiling import compile_layers
from dpo_core.samples import generate
from dpo_core.spec import SamplesSpec


def _records(out) -> list[dict]:
    """The train and eval records."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r or "eval_loss" in r]


# Inductor's first compile of the tiny model's layers (training, then the no-gradient graph of evaluation and
# the frozen reference) takes about 50 s on two CPU cores (half that with inductor's on-disk cache warm).
@pytest.mark.slow
def test_a_compiled_run_follows_the_eager_run_and_saves_the_same_keys(tiny_model, synthetic, tmp_path, monkeypatch):
    train_file, held_out = synthetic
    # Compile in this process: inductor's default pool of compile workers, one a core, would take the cores
    # the suite's other test processes run on.
    monkeypatch.setattr(torch._inductor.config, "compile_threads", 1)
    # Gradient checkpointing runs inside the compiled layers; packed rows take the CPU attention path, whose
    # per-segment loop (cu.tolist()) is a graph break. Both eager and compiled runs use them.
    common = dict(model=tiny_model, train_file=train_file, validation_file=held_out, learning_rate=1e-3,
                  batch_size=8, micro_batch_size=4, max_steps=3, logging_steps=1, max_length=64,
                  max_prompt_length=32, device="cpu", gradient_checkpointing=True, packing=True, save_steps=3)
    eager = train(parse_spec({**common, "output_dir": str(tmp_path / "eager")}))
    torch._dynamo.reset()  # this run compiles its own graphs, whatever compiled before in this process
    graphs = counters["stats"]["unique_graphs"]
    compiled = train(parse_spec({**common, "output_dir": str(tmp_path / "compiled"), "compile": True}))
    assert counters["stats"]["unique_graphs"] > graphs  # the layers ran compiled, not eagerly

    a, b = _records(tmp_path / "eager"), _records(tmp_path / "compiled")
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 4
    for x, y in zip(a, b):
        for key in ("loss", "grad_norm", "rewards/margins", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-5), (x["step"], key)

    saved = tmp_path / "compiled" / "checkpoint-3" / "model.safetensors"
    assert sorted(load_file(saved)) == sorted(load_file(tmp_path / "eager" / "checkpoint-3" / "model.safetensors"))
    assert not [k for k in load_file(saved) if "_orig_mod" in k]
    for final in (eager.final_dir, compiled.final_dir):
        assert Path(final, "model.safetensors").exists()
    x = AutoModelForCausalLM.from_pretrained(eager.final_dir).state_dict()
    y = AutoModelForCausalLM.from_pretrained(compiled.final_dir).state_dict()
    assert sorted(x) == sorted(y)
    assert max((x[k] - y[k]).abs().max().item() for k in x) < 1e-4
    # The checkpoint itself loads with from_pretrained too, with every weight it holds.
    loaded = AutoModelForCausalLM.from_pretrained(saved.parent)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in load_file(saved).items())


def test_samples_generate_with_compiled_layers_run_eagerly(tiny_model):
    """Generation (samples) compiles nothing: its KV cache would recompile the layers at every token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tokenizer.encode("sort : n3 n1 n2"), tokenizer.encode("sort : n9 n4")]
    spec = SamplesSpec(max_new_tokens=6)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = generate(model, prompts, tokenizer, spec, seed=0, device=torch.device("cpu"))
    assert compile_layers(model) == model.config.num_hidden_layers
    graphs = counters["stats"]["unique_graphs"]
    assert generate(model, prompts, tokenizer, spec, seed=0, device=torch.device("cpu")) == expected
    assert counters["stats"]["unique_graphs"] == graphs
