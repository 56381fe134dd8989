"""torch.compile of a model's decoder layers (TrainingSpec.compile), one layer at a time.

Each decoder layer is compiled in place (nn.Module.compile), so norms, rotary embeddings, activations and
residual adds fuse into fewer kernels. What stays eager, and why:
- the embedding and the body's mask building (dpo_core.packing's mask step reads a context variable);
- the LM head pass (dpo_core.headlogp, dpo_core.pairhead): hand-written autograd Functions that tile the
  head over chunks of positions; tracing them would gain nothing and put their memory bounds at risk;
- generation (`eager()`): a KV cache changes at every token, and each change would be a recompile.

In place keeps every parameter name (no `_orig_mod.` prefix from a torch.compile wrapper), so
checkpoints, optimizer state, DDP's buckets and PEFT's adapter names see the model as it was. A LoRA
layer's adapters are traced with the layer. Identical layers share one compiled graph. Gradient
checkpointing (transformers' GradientCheckpointingLayer wraps `forward` in torch.utils.checkpoint) runs
within the compiled call: traced as one region where dynamo can, else the checkpoint runs eagerly around
compiled parts (a side effect inside the layer prevents the trace, e.g. the `kernels` package's hub-kernel
wrapper of a layer sets a variable). Either way the results are the eager ones.

Dynamic shapes, not one static graph per shape: a batch's width changes from step to step (rounded up
to pad_to_multiple_of, 64 on a GPU, so within max_length there are up to max_length / 64 widths), the
packed layout's segment lengths (max_length_q) change with every batch, and so would the number of rows
of a last micro batch. Static graphs would compile once per distinct width and max_length_q, and past
torch._dynamo's recompile limit (8 per layer's code) run the rest eagerly; one dynamic graph per kind of
call (training, evaluation without gradients, LoRA with adapters disabled, packed or padded) compiles
once. Matrix multiplies go to the same BLAS kernels either way; what dynamic shapes cost is the fused
kernels' fixed-size specialisation, which is small next to a recompile per width.
"""
from __future__ import annotations

import contextlib

import torch

from dpo_core.errors import TrainingError
from dpo_core.models import decoder_layers


def compile_layers(model) -> int:
    """Compile each decoder layer of `model` in place (dynamic shapes, see the module docstring); the
    number of layers. Compiling happens at each layer's first call, and again at the first call of each
    new kind (no gradients, eval mode, adapters disabled). Call it after any copy.deepcopy of the model:
    a copy would keep calling the original's compiled layers."""
    layers = decoder_layers(model)
    if not layers:
        raise TrainingError(f"compile: {type(model).__name__} has no decoder layers transformers can address one "
                            "by one (GradientCheckpointingLayer); set compile: false")
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules eagerly within (generation, where the KV cache would recompile every token).
    torch before 2.6 has no set_stance: there generation runs the compiled layers, and recompiles."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch 2.6 and later
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
