"""Attention confined to the segments of a packed row (batching._collate_packed), with no [T, T] mask.

A packed row holds every sequence of a micro-batch back to back, T tokens in all. The model runs under
the attention implementation registered here (NAME). transformers hands each attention layer the extra
keyword arguments of the model's forward, and a packed forward passes the segment boundaries in them
as cu_seq_lens_q/k and max_length_q/k (the names transformers' own variable-length kernels read).
With those, attention is causal within each segment and nothing crosses a boundary:
- on a GPU in bf16/fp16: torch.nn.attention.varlen.varlen_attn where torch has it (no dropout), else
  flash_attn's flash_attn_varlen_func where that package is installed;
- otherwise (a CPU, fp32): scaled_dot_product_attention over each segment in turn, exact, one call a
  segment.
Without them (generation, a padded or shared-prompt batch) it is transformers' SDPA attention under
SDPA's mask, so one model serves every layout.

The mask: transformers builds it before the layers run, and from position_ids that restart it would
build a block-diagonal [T, T] one. The mask function registered under NAME gives None inside
`packed_forward()` and SDPA's mask everywhere else; a packed forward that gets a mask fails loudly.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from contextvars import ContextVar

import torch
import torch.nn.functional as F

NAME = "dpo_packed"

_PACKED = ContextVar("dpo_packed_forward", default=False)


@contextlib.contextmanager
def packed_forward():
    """Around a packed forward: the causal-mask step builds no mask (the attention gets the segments)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


def attention_kwargs(segments) -> dict:
    """The forward keyword arguments that carry a packed row's segments (batching.Segments) to attention."""
    return {"cu_seq_lens_q": segments.cu, "cu_seq_lens_k": segments.cu,
            "max_length_q": segments.max_len, "max_length_k": segments.max_len}


def unsupported(model) -> str | None:
    """Why the transformers model `model` cannot run packed rows, or None when it can."""
    cfg = model.config
    if not (getattr(model, "_supports_attention_backend", False) and getattr(model, "_supports_sdpa", False)):
        return f"needs a model that takes a registered attention function and SDPA ({type(model).__name__} does not)"
    layer_types = getattr(cfg, "layer_types", None) or ()
    if getattr(cfg, "sliding_window", None) or "sliding_attention" in layer_types:
        return "does not take sliding-window attention (the model's config sets sliding_window)"
    if getattr(cfg, "attn_logit_softcapping", None):
        return "does not take soft-capped attention (the model's config sets attn_logit_softcapping)"
    return None


def enable(model) -> None:
    """Run `model` (a transformers or PEFT model) under NAME: packed rows when a forward passes segments,
    SDPA otherwise."""
    from dpo_core.logprobs import unwrap

    register()
    inner = unwrap(model)
    if hasattr(inner, "set_attn_implementation"):
        inner.set_attn_implementation(NAME)
    else:
        inner.config._attn_implementation = NAME


@functools.cache
def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)


def _mask(*args, **kwargs):
    if _PACKED.get():
        return None
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    return ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              **kwargs):
    """query [1, Hq, T, D], key and value [1, Hkv, T, D] -> ([1, T, Hq, D], None), as transformers'
    attention functions take and return them."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                               scaling=scaling, **kwargs)
    if attention_mask is not None or query.shape[0] != 1:
        raise RuntimeError(f"a packed forward takes one row and no attention mask; got {query.shape[0]} rows and "
                           f"a mask of shape {None if attention_mask is None else tuple(attention_mask.shape)}")
    if kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise RuntimeError("packed attention takes neither a sliding window nor a softcap")
    return _segment_attention(query, key, value, cu, kwargs["max_length_q"], scaling, dropout), None


def _segment_attention(query, key, value, cu, max_len: int, scaling, dropout: float) -> torch.Tensor:
    dtype = _kernel_dtype(query)
    if dtype is not None:
        q, k, v = (t[0].transpose(0, 1).to(dtype).contiguous() for t in (query, key, value))  # [T, H, D]
        varlen = _torch_varlen()
        if varlen is not None and not dropout:
            return varlen(q, k, v, cu, max_len, scaling).unsqueeze(0)
        flash = _flash_attn_varlen()
        if flash is not None:
            out = flash(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout, softmax_scale=scaling, causal=True)
            return out.unsqueeze(0)
    return _segment_loop(query, key, value, cu.tolist(), scaling, dropout)


def _kernel_dtype(query) -> torch.dtype | None:
    """The 16-bit dtype a GPU varlen kernel runs in (autocast's, or the query's own), or None."""
    if not query.is_cuda:
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else None


def _segment_loop(query, key, value, bounds: list[int], scaling, dropout: float) -> torch.Tensor:
    """Causal SDPA over each segment [bounds[i], bounds[i+1]) on its own: [1, T, Hq, D]."""
    gqa = query.shape[1] != key.shape[1]
    parts = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout,
                                            is_causal=True, scale=scaling, enable_gqa=gqa)
             for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts, dim=2).transpose(1, 2)


@functools.cache
def _torch_varlen():
    """torch's varlen_attn as f(q, k, v, cu, max_len, scale) -> [T, Hq, D], causal; None where torch lacks
    it. Its keywords moved between releases: causality is is_causal=True in some, window_size=(-1, 0) in
    others; GQA is enable_gqa where it exists, else the key/value heads are repeated."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        causal = {"is_causal": True}
    elif "window_size" in params:
        causal = {"window_size": (-1, 0)}
    else:
        return None

    def run(q, k, v, cu, max_len: int, scale):
        extra = dict(causal)
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                extra["enable_gqa"] = True
            else:
                k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, scale=scale, **extra)

    return run


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func
