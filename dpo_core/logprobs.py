"""Summed log-probabilities of completions, computed only where they are needed.

A full forward pass materialises logits of shape [batch, length, vocab]: with a 32k vocabulary and
2k tokens that dwarfs the model itself. We run the transformer body once, keep the hidden states of
the positions that predict a completion token, and apply the LM head and log-softmax to those in
chunks (dpo_core.headlogp: backward recomputes one chunk of logits at a time), so no more than one
chunk of logits is alive at a time. When training a paired loss, the loss itself is handed in and its
gradient formed during that head pass (dpo_core.pairhead), which saves the recompute.

Four paths, each kept because a kind of model or step needs it, not for speed alone:
- the full forward (`_full_forward_logps`): models whose logits are more than `head(hidden)` (soft-capped
  or scaled, Gemma 2, Cohere); also the plain reference the tests compare the other paths with;
- checkpointed chunks through autograd (`_chunked_logps`): a head that is not a plain Linear (LoRA on
  the LM head);
- the tiled head with its hand-written backward (dpo_core.headlogp): a Linear head without a paired
  objective (the reference pass, evaluation, KTO, fp16);
- the fused pair head (dpo_core.pairhead): paired training on a Linear head, the common case.
Which of the last two pays on which GPU, and whether the others can go, is measured by
benchmarks/bench_gpu.py (docs/performance.md#gpu). The step computes the paired loss a second time,
without gradients, on [pairs]-sized tensors for its metrics (dpo_core.step.forward_loss): the fused
pass returns only the loss.

The body takes any of the batch layouts (dpo_core.batching): right-padded rows, shared-prompt rows
under a 4-D mask, or one packed row whose segments go to dpo_core.packing's attention. Every path
after it sees the same thing: the hidden states at the targets' flat positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dpo_core import packing
from dpo_core.batching import Batch, Segments, Targets
from dpo_core.headlogp import head_logprobs
from dpo_core.pairhead import PairObjective, pair_head_loss


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


def packing_unsupported(model) -> str | None:
    """Why `model` cannot take the packed layout (batching._collate_packed), or None when it can: it needs
    the body/head split (a packed row's logits would be [T, vocab]) and dpo_core.packing's attention."""
    if _body_and_head(model) is None:
        return "needs a model whose logits are its LM head applied to the body's output"
    return packing.unsupported(unwrap(model))


def can_share_prompt(model) -> bool:
    """Whether `model` takes the shared-prompt layout: a custom 4-D boolean mask needs SDPA attention
    (eager attention would add it as a float), and the body/head split keeps logits off the prompt."""
    attn = getattr(unwrap(model).config, "_attn_implementation", None)
    return attn == "sdpa" and _body_and_head(model) is not None


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


def _summed(token_logps: torch.Tensor, targets: Targets) -> torch.Tensor:
    """Per-sequence sums [S] of per-target log-probs [T]."""
    summed = torch.zeros(targets.counts.shape[0], dtype=torch.float32, device=token_logps.device)
    return summed.index_add(0, targets.seq, token_logps)


def _full_forward_logps(model, input_ids, attention_mask, targets: Targets, position_ids=None) -> torch.Tensor:
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False).logits
    logps = F.log_softmax(logits.flatten(0, 1)[targets.pos].float(), dim=-1)
    return _summed(logps.gather(-1, targets.ids.unsqueeze(-1)).squeeze(-1), targets)


def _pair_loss(objective, logps: torch.Tensor) -> torch.Tensor:
    """The objective over every pair of a paired batch's sequence log-probs [2B]."""
    b = logps.shape[0] // 2
    return objective(torch.arange(b, device=logps.device), logps[:b], logps[b:])


def completion_logps(model, input_ids, attention_mask, targets: Targets, chunk_size: int = 1024,
                     objective: PairObjective | None = None, position_ids=None,
                     segments: Segments | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(loss, summed completion log-probs [S] in fp32) of every sequence.

    With an `objective` (paired targets only) the loss is objective(all pairs) and differentiable;
    on a plain linear head it is computed inside the head pass (dpo_core.pairhead) and the log-probs
    come back detached. Without one the loss is None and the log-probs carry the gradient.
    position_ids (and a 4-D attention_mask) come with the shared-prompt layout (batching._collate_shared);
    position_ids and segments with the packed one (batching._collate_packed, dpo_core.packing).
    """
    parts = _body_and_head(model)
    if parts is None:
        if segments is not None:
            raise ValueError(f"a packed batch {packing_unsupported(model)}")
        logps = _full_forward_logps(model, input_ids, attention_mask, targets, position_ids)
        return (None if objective is None else _pair_loss(objective, logps)), logps
    body, head = parts
    hidden = _body_hidden(body, input_ids, attention_mask, position_ids, segments)
    picked = hidden.flatten(0, 1)[targets.pos]  # [T, H]: only positions that predict a completion token
    if objective is not None and type(head) is torch.nn.Linear:
        b = targets.counts.shape[0] // 2
        pair_rows = (targets.counts[:b] + targets.counts[b:]).long().tolist()
        slot = _slots(targets.seq, b)
        return pair_head_loss(head, picked, targets.ids, slot, pair_rows, chunk_size, objective)
    logps = _summed(_chunked_logps(head, picked, targets.ids, chunk_size), targets)
    return (None if objective is None else _pair_loss(objective, logps)), logps


def _body_hidden(body, input_ids, attention_mask, position_ids, segments: Segments | None) -> torch.Tensor:
    """The body's last hidden state [R, L, H] for the batch's layout."""
    if segments is None:
        return body(input_ids=input_ids, attention_mask=_body_mask(attention_mask), position_ids=position_ids,
                    use_cache=False).last_hidden_state
    with packing.packed_forward():
        return body(input_ids=input_ids, attention_mask=None, position_ids=position_ids, use_cache=False,
                    **packing.attention_kwargs(segments)).last_hidden_state


def _body_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The mask the body needs: none for the right-padded two-row layout, the 4-D one otherwise.

    Padding only ever follows a sequence's last token, so causal masking alone already keeps every real
    token from seeing it; only the padding positions' own outputs change, and no target reads them.
    Without a mask, SDPA runs causal (is_causal), skipping the blocks above the diagonal instead of
    adding an explicit [L, L] mask to every one of them.
    """
    return None if attention_mask.dim() == 2 else attention_mask


def _slots(seq: torch.Tensor, n_pairs: int) -> torch.Tensor:
    """Sequence s -> pair-major slot: 2p for chosen sequence p, 2p + 1 for rejected sequence p + B."""
    return torch.where(seq < n_pairs, 2 * seq, 2 * (seq - n_pairs) + 1)


def sequence_logps(model, batch: Batch, chunk_size: int = 1024) -> torch.Tensor:
    """Summed completion log-probs [S] of a packed Batch's sequences."""
    return completion_logps(model, batch.input_ids, batch.attention_mask, batch.targets, chunk_size,
                            position_ids=batch.position_ids, segments=batch.segments)[1]


class LogProbModel(torch.nn.Module):
    """A causal LM whose forward returns (loss or None, completion log-probs): see `completion_logps`.

    Going through one module's forward is what DistributedDataParallel and FSDP hook into (gradient
    sync, parameter unsharding); calling the body and head directly would bypass them. That is also
    why a paired loss is handed in as `objective`: its gradient is formed inside the head pass.
    """

    def __init__(self, model, chunk_size: int = 1024):
        super().__init__()
        self.model, self.chunk_size = model, chunk_size

    def forward(self, input_ids, attention_mask, targets: Targets, objective: PairObjective | None = None,
                position_ids=None, segments: Segments | None = None):
        return completion_logps(self.model, input_ids, attention_mask, targets, self.chunk_size, objective,
                                position_ids, segments)
