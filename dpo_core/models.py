"""Loading the policy and the reference: any transformers causal LM, by local directory or hub id, with
LoRA through PEFT. The tokenizer loads through dpo_core.tokenizer_loading, which needs no torch."""
from __future__ import annotations

import copy

import torch

from dpo_core.errors import TrainingError, load_error
from dpo_core.spec import LoraSpec, TrainingSpec


def load_causal_lm(name: str, what: str = "model", dtype: torch.dtype | None = None):
    """`dtype` None: fp32. A policy's master weights stay fp32 (bf16/fp16 come from autocast, so optimizer
    updates are not lost); a frozen reference may be loaded in its 16-bit dtype (reference.frozen_dtype)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError, KeyError) as err:
        raise load_error(what, name, err) from None


def add_lora(model, lora: LoraSpec):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # PEFT: no module matches target_modules, or one it cannot adapt
        first = str(err).strip().splitlines()[0][:300]
        raise TrainingError(f"lora.target_modules {lora.target_modules!r} does not fit this model: {first}; name "
                            "its linear layers (e.g. q_proj, v_proj) or use all-linear",
                            code="invalid_training_spec") from None


def load_policy(spec: TrainingSpec, resume_dir: str | None):
    """The trainable model: fresh from `spec.model` (with a new LoRA adapter, or `spec.adapter` to train
    further), or the policy saved in a checkpoint of this run."""
    if spec.lora is None:
        return load_causal_lm(resume_dir or spec.model)
    base = load_causal_lm(spec.model)
    start = resume_dir or spec.adapter
    return add_lora(base, spec.lora) if start is None else load_adapter(base, start, trainable=True)


def load_adapter(base, directory: str, trainable: bool):
    """`base` with the LoRA adapter saved in `directory` (its own r, alpha and target modules)."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, directory, is_trainable=trainable)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # missing files, or an adapter for another base
        raise load_error("LoRA adapter", directory, err) from None


def adapter_start(spec: TrainingSpec, dtype: torch.dtype | None = None):
    """The starting point of a run that trains `spec.adapter` further: the base with that adapter merged in,
    frozen, its weights in `dtype` (None: fp32). It is the default reference of such a run: the policy's
    initial weights, as without LoRA. The merge itself is done in fp32."""
    merged = load_adapter(load_causal_lm(spec.model), spec.adapter, trainable=False).merge_and_unload()
    return cast_weights(merged.eval().requires_grad_(False), dtype)


def frozen_copy(model, dtype: torch.dtype | None = None):
    """A frozen copy of the policy's initial weights: the default reference without LoRA. With a `dtype`
    each weight is copied straight into it, so no second fp32 copy of the model is ever held."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype or p.dtype, copy=True), requires_grad=False)
            for p in model.parameters()}  # deepcopy takes these for the parameters (tied ones stay tied)
    ref = copy.deepcopy(model, memo)
    return ref.eval().requires_grad_(False)


def cast_weights(model, dtype: torch.dtype | None):
    """`model` with its parameters in `dtype` (None: left as they are), one at a time, so no second copy of
    the model is held. Buffers keep theirs: rotary frequencies stay fp32, as from_pretrained keeps them."""
    if dtype is not None:
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def enable_gradient_checkpointing(model) -> None:
    # Non-reentrant checkpointing works with inputs that need no grad (frozen embeddings under LoRA).
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def decoder_layers(model) -> list:
    """The model's decoder layers, in order: the modules transformers can checkpoint one by one
    (GradientCheckpointingLayer, in transformers 4.52 and later)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def checkpoint_layers(model, count: int) -> None:
    """Checkpoint the first `count` decoder layers (non-reentrant), keep every activation of the others.

    The first ones, because backward runs the layers last to first: by the time it reaches a checkpointed
    layer, the activations of every later (kept) layer are freed, so one layer's recompute adds to the saved
    layer inputs alone (dpo_core.estimate._activation_bytes). Checkpointing the last layers instead would
    recompute them while every earlier layer's activations are still held. Enabling checkpointing sets the
    flag on every such layer; the layers past `count` get it switched off again (the flag is per instance).
    A model without such layers (older remote code) checkpoints as its own flag says: every layer, which
    keeps less than the plan counted on."""
    if count <= 0:
        return
    enable_gradient_checkpointing(model)
    for layer in decoder_layers(model)[count:]:
        layer.gradient_checkpointing = False
