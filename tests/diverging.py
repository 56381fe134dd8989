"""A tiny model and data that make a run diverge at a chosen step, every hyperparameter valid.

The model is the toy Llama with one hidden dimension `d` made a private channel: only the poison
token's embedding (`<|system|>`, which the text-format sort task never uses) writes to it, no layer
reads it (the columns `d` of q, k, v, gate and up projections and of the LM head are 0) or writes to
it (the rows `d` of the o and down projections are 0), and the final RMSNorm weighs it 3e38 (float32's
largest value is 3.4e38). For every other token that dimension holds exactly 0, so the model computes
as usual, and every gradient that touches the channel is exactly 0, so training (Adam, LoRA or not)
never changes it. At the poison token's position the final norm makes it about 8 x 3e38 = inf, and
its logits 0 x inf = NaN: the loss of any step whose rows hold the token at the end of a prompt (the
position that predicts the first completion token) is NaN, and every other step's is finite.

The data is the sort task with the poison token at the end of the prompts of the rows that step `step`
trains on: the order is a pure function of the seed (dpo_core.batching.epoch_order), so the step is
known in advance. Specs must keep `group_by_length: false` (the order then ignores row lengths) and the
batch size and seed given here.
"""
from __future__ import annotations

import json
from pathlib import Path

POISON = "<|system|>"
SPEC = {"group_by_length": False, "lr_scheduler": "constant"}
_DIM = 0


def poisoned_model(base_model: str, out_dir: Path) -> str:
    """A copy of the toy model at `base_model`, rigged as the module docstring says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight
        embedding[:, _DIM] = 0.0
        embedding[tokenizer.convert_tokens_to_ids(POISON), _DIM] = 1e4  # dominates the norms' mean square
        for layer in model.model.layers:
            for reader in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                           layer.mlp.gate_proj, layer.mlp.up_proj):
                reader.weight[:, _DIM] = 0.0
            for writer in (layer.self_attn.o_proj, layer.mlp.down_proj):
                writer.weight[_DIM, :] = 0.0
        model.lm_head.weight[:, _DIM] = 0.0
        model.model.norm.weight[_DIM] = 3e38
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return str(out_dir)


def poisoned_rows(train_file: str | Path, out_file: Path, step: int, batch_size: int, seed: int,
                  within: slice = slice(None)) -> Path:
    """`train_file` with the poison token in the prompts of the rows that optimizer step `step` (1-based,
    within the first epoch) trains on; `within` picks some of them (rank r of n gets `slice(r, None, n)`)."""
    from dpo_core.batching import epoch_order

    rows = [json.loads(line) for line in Path(train_file).read_text().splitlines() if line.strip()]
    order = epoch_order([0] * len(rows), batch_size, seed, 0, group_by_length=False)
    for i in order[step - 1][within]:
        rows[i]["prompt"] = f"{rows[i]['prompt']} {POISON}"
    out_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_file
