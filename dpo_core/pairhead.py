"""The policy's LM head and a per-pair loss in one pass: the loss and the head's gradients, no recompute.

For a paired loss, the gradient with respect to a sequence's summed log-prob depends on its own pair
only (dpo_core.losses: `per_pair`). So the head runs over one group of whole pairs at a time, and
while that chunk's logits are alive:

    logits  = h W^T + b                                   [n, V]  n ≈ chunk rows, never a split pair
    logp_i  = logits[i, t_i] - logsumexp(logits_i)        [n]
    π_s     = Σ_{i in s} logp_i                           per sequence s of the chunk's pairs
    c_s     = dL/dπ_s                                     autograd over those pairs' loss (tiny tensors)
    dlogits = c_s(i) · (onehot(t_i) - softmax(logits_i))  built in place in the kept logit tiles
    dh = dlogits @ W,   dW += dlogits^T @ h,   db += Σ_i dlogits_i

The logits are computed and kept in vocabulary tiles (dpo_core.headlogp.vocab_tiles), the logsumexp
accumulated tile by tile, so each tile's softmax work runs while it is in cache. Against
dpo_core.headlogp (a forward, then a backward that recomputes the logits) that is three
[n, H] x [H, V] products instead of four. Forward returns the loss; backward only scales the
gradients kept from forward by the incoming scalar gradient.
"""
from __future__ import annotations

from typing import Callable

import torch

from dpo_core.headlogp import Head, _autocast_dtype, add_grads, lse_and_target, vocab_tiles

# (pair indices [K], chosen π [K], rejected π [K]) -> the loss those pairs contribute (a scalar).
PairObjective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def pair_chunks(pair_rows: list[int], chunk: int) -> list[tuple[int, int, int, int]]:
    """(first pair, end pair, first row, end row) per chunk: whole pairs, at most `chunk` rows unless
    one pair alone has more. Rows are pair-major: pair p's chosen then rejected target rows."""
    out, p0, r0, rows = [], 0, 0, 0
    for p, n in enumerate(pair_rows):
        if rows and rows + n > chunk:
            out.append((p0, p, r0, r0 + rows))
            p0, r0, rows = p, r0 + rows, 0
        rows += n
    if p0 < len(pair_rows):
        out.append((p0, len(pair_rows), r0, r0 + rows))
    return out


def _slot_grads(objective: PairObjective, p0: int, p1: int, slots: torch.Tensor) -> torch.Tensor:
    """dL/dπ [2K] for slots [2K] = (chosen, rejected) π of pairs p0..p1-1, interleaved."""
    pairs = torch.arange(p0, p1, device=slots.device)
    with torch.enable_grad():
        chosen = slots[0::2].detach().requires_grad_()
        rejected = slots[1::2].detach().requires_grad_()
        loss = objective(pairs, chosen, rejected)
        if not loss.requires_grad:
            return torch.zeros_like(slots)
        grads = torch.autograd.grad(loss, (chosen, rejected), allow_unused=True)
    grads = [torch.zeros_like(chosen) if g is None else g for g in grads]
    return torch.stack(grads, 1).reshape(-1)


class _PairHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, slot, chunks, objective):
        # Autocast by hand, as in headlogp: products in the autocast dtype, softmax and loss in fp32.
        dtype = _autocast_dtype(hidden.device.type)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n_pairs = chunks[-1][1] if chunks else 0
        slots = torch.zeros(2 * n_pairs, dtype=torch.float32, device=hidden.device)  # π, pair-major
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        head = Head(weight, bias, dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for p0, p1, r0, r1 in chunks:
                h, t, s = hidden[r0:r1], targets[r0:r1], slot[r0:r1] - 2 * p0
                # Forward's logit tiles are kept for the gradient: the third product replaces a recompute.
                tiles = vocab_tiles(h.shape[0], weight.shape[0], h.device)
                lse, target, kept = lse_and_target(head, h, t, tiles, keep=True)
                slots[2 * p0 : 2 * p1].index_add_(0, s, target - lse)
                coef = _slot_grads(objective, p0, p1, slots[2 * p0 : 2 * p1])
                gh = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if grad_h is not None else None
                add_grads(head, h, t, lse, coef[s], tiles, kept, gh, grad_w, grad_b)
                if gh is not None:
                    grad_h[r0:r1] = gh.to(hidden.dtype)
            pairs = torch.arange(n_pairs, device=hidden.device)
            loss = objective(pairs, slots[0::2], slots[1::2]).detach()
        ctx.grads = [grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                     None if grad_b is None else grad_b.to(bias.dtype)]
        logps = torch.cat([slots[0::2], slots[1::2]])  # chosen sequences first, as in a Batch
        ctx.mark_non_differentiable(logps)
        return loss, logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads]
        ctx.grads = None
        return *grads, None, None, None, None


def pair_head_loss(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, slot: torch.Tensor,
                   pair_rows: list[int], chunk: int, objective: PairObjective) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, π [2B]) through the linear LM head for B pairs, the loss differentiable.

    hidden [T, H] and targets [T] are target rows in pair-major order (pair p's chosen rows, then its
    rejected rows); slot [T] is 2p for a chosen row of pair p, 2p + 1 for a rejected one; pair_rows
    [B] counts each pair's rows. π is fp32, chosen sequences first, detached.
    """
    chunks = pair_chunks(pair_rows, chunk)
    return _PairHeadLoss.apply(hidden, head.weight, head.bias, targets, slot, chunks, objective)
