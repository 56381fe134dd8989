"""Summed log-probabilities of completions, computed only where they are needed.

A full forward pass materialises logits of shape [batch, length, vocab]: with a 32k vocabulary and
2k tokens that dwarfs the model itself. We run the transformer body once, keep the hidden states of
the positions that predict a completion token, and apply the LM head and log-softmax to those in
chunks (dpo_core.headlogp: backward recomputes one chunk of logits at a time), so no more than one
chunk of logits is alive at a time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpo_core.batching import Batch
from dpo_core.headlogp import head_logprobs


def unwrap(model):
    """The transformers model inside a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _body_and_head(model):
    """(transformer body, LM head), or None when the model's logits need more than `head(hidden)`."""
    inner = unwrap(model)
    cfg = inner.config
    # Soft-capped or scaled logits (Gemma 2, Cohere, ...) are not a plain projection: use the full forward.
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    body = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if body is None or head is None or body is inner:
        return None
    return body, head


def _token_logps(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of hidden: [T, H], [T] -> [T], in fp32 for a stable log-softmax."""
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _chunked_logps(head, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    if type(head) is torch.nn.Linear:
        return head_logprobs(head, hidden, targets, chunk)
    # Any other head (a LoRA-wrapped one, say): autograd over a checkpointed log-softmax per chunk.
    parts = []
    for s in range(0, hidden.shape[0], chunk):
        h, t = hidden[s : s + chunk], targets[s : s + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(checkpoint(_token_logps, head, h, t, use_reentrant=False))
        else:
            parts.append(_token_logps(head, h, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _full_forward_logps(model, input_ids, attention_mask, loss_mask) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = logps.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (per_token * loss_mask[:, 1:]).sum(-1)


def completion_logps(model, input_ids, attention_mask, loss_mask, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs [N] (fp32) and completion token counts [N] for every sequence.

    Position t-1's hidden state predicts token t, so targets are input_ids shifted left by one.
    """
    target_mask = loss_mask[:, 1:]  # [N, L-1]
    counts = target_mask.sum(-1).to(torch.float32)
    parts = _body_and_head(model)
    if parts is None:
        return _full_forward_logps(model, input_ids, attention_mask, loss_mask), counts
    body, head = parts
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    picked = hidden[:, :-1][target_mask]  # [T, H]: only positions that predict a completion token
    targets = input_ids[:, 1:][target_mask]  # [T]
    token_logps = _chunked_logps(head, picked, targets, chunk_size)
    rows = torch.arange(target_mask.shape[0], device=target_mask.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    summed = torch.zeros(target_mask.shape[0], dtype=torch.float32, device=hidden.device)
    return summed.index_add(0, rows, token_logps), counts


def sequence_logps(model, batch: Batch, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """`completion_logps` of a packed Batch."""
    return completion_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask, chunk_size)


class LogProbModel(torch.nn.Module):
    """A causal LM whose forward returns completion log-probs.

    Going through one module's forward is what DistributedDataParallel and FSDP hook into (gradient
    sync, parameter unsharding); calling the body and head directly would bypass them.
    """

    def __init__(self, model, chunk_size: int = 1024):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, loss_mask):
        return completion_logps(self.model, input_ids, attention_mask, loss_mask, self.chunk_size)
