"""log p(target) through the LM head, in vocabulary tiles, with a hand-written backward.

For hidden states h [T, H], an LM head W [V, H] (+ bias) and targets t [T]:

    logp_i = (h_i W^T)[t_i] - logsumexp(h_i W^T)

Rows go in chunks of `chunk`; within a chunk the vocabulary goes in tiles (`vocab_tiles`) and the
logsumexp is accumulated tile by tile (a running max and sum, as flash attention does). Forward keeps
only h, W, t and the per-row logsumexp [T]: never a [T, V] tensor. Backward recomputes each tile as
softmax = exp(logits - lse), in place, and adds the gradient of g·logp, d/dlogits = g · (onehot(t) - softmax):

    dh += (softmax @ W_tile) · (-g),   dW_tile += softmax^T @ (h · (-g)),   db_tile += softmax^T @ (-g)

(the per-row factor applied to the small [n, H] operands, not the tile), then the onehot part as rows
(dh_i += g_i W[t_i], dW[t_i] += g_i h_i).

Why tiles: on CPU, the softmax passes over a [1024, 32000] chunk (131 MB) run at memory speed and
cost as much as the matmuls; over a 4 MiB tile they stay in cache. On a GPU a tile is the whole
vocabulary, as the passes there are cheap and fewer, larger kernels are what count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Logits per vocabulary tile on CPU: 1M fp32 values, 4 MiB, so a tile's softmax work stays in cache;
# never narrower than MIN_TILE_COLUMNS, so a tile's matmul stays efficient.
CPU_TILE_ELEMENTS = 1 << 20
MIN_TILE_COLUMNS = 256


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def vocab_tiles(rows: int, vocab: int, device: torch.device) -> list[slice]:
    """Column ranges of the vocabulary for a chunk of `rows` rows (one range off the CPU)."""
    if device.type != "cpu":
        return [slice(0, vocab)]
    width = max(MIN_TILE_COLUMNS, CPU_TILE_ELEMENTS // max(rows, 1))
    return [slice(v, min(v + width, vocab)) for v in range(0, vocab, width)]


class Head:
    """An LM head's weight and bias, cast once to the matmul dtype of the pass (autocast's, or fp32)."""

    def __init__(self, weight, bias, dtype: torch.dtype | None):
        self.dtype = dtype
        self.w = weight.to(dtype) if dtype is not None else weight
        self.b = bias.to(dtype) if bias is not None and dtype is not None else bias

    def logits(self, h, cols: slice) -> torch.Tensor:
        """fp32 logits [n, cols] of rows h [n, H]."""
        hh = h.to(self.dtype) if self.dtype is not None else h
        return F.linear(hh, self.w[cols], None if self.b is None else self.b[cols]).float()


def lse_and_target(head: Head, h, targets, tiles: list[slice], keep: bool = False):
    """(logsumexp [n], target logit [n], kept) for rows h [n, H].

    With `keep`, kept holds per tile (exp(logits - m), m) with m [n] the running max after that tile,
    so every kept value is at most 1 and softmax = value · exp(m - logsumexp): the gradient pass then
    needs no elementwise pass over the tile at all (see add_grads).
    """
    n = h.shape[0]
    running_max = torch.full((n,), float("-inf"), device=h.device)
    running_sum = torch.zeros(n, device=h.device)
    target = torch.zeros(n, device=h.device)
    kept = []
    for cols in tiles:
        tile = head.logits(h, cols)
        inside = (targets >= cols.start) & (targets < cols.stop)
        column = (targets - cols.start).clamp(0, tile.shape[1] - 1)
        target += torch.where(inside, tile.gather(-1, column[:, None])[:, 0], 0.0)
        new_max = torch.maximum(running_max, tile.amax(-1))
        tile.sub_(new_max[:, None]).exp_()
        running_sum.mul_(torch.exp(running_max - new_max)).add_(tile.sum(-1))
        running_max = new_max
        if keep:
            kept.append((tile, new_max))
    return running_max + running_sum.log(), target, (kept if keep else None)


def add_grads(head: Head, h, targets, lse, coef, tiles: list[slice], kept, grad_h, grad_w, grad_b) -> None:
    """Accumulate the gradients of Σ coef_i · logp_i into grad_h [n, H] (fp32), grad_w [V, H], grad_b [V].

    `kept` is lse_and_target's (keep=True), or None to recompute each tile. The softmax part of
    d/dlogits is probs · r per row (r = -coef · scale); the row factor r is applied to the [n, H]
    operands of the two products rather than to the [n, V] tile.
    """
    for k, cols in enumerate(tiles):
        if kept is not None:
            probs, shift = kept[k]
            r = -coef * torch.exp(shift - lse)
        else:
            probs, r = head.logits(h, cols).sub_(lse[:, None]).exp_(), -coef
        _add_tile_grads(head, h, probs, r, cols, grad_h, grad_w, grad_b)
    # The onehot part: d logits[i, t_i] += coef_i.
    if grad_h is not None:
        grad_h.add_(coef[:, None] * head.w[targets].float())
    if grad_w is not None:
        grad_w.index_add_(0, targets, coef[:, None] * h.float())
    if grad_b is not None:
        grad_b.index_add_(0, targets, coef)


def _add_tile_grads(head: Head, h, probs, r, cols: slice, grad_h, grad_w, grad_b) -> None:
    """Add the gradients of a tile whose d/dlogits is probs [n, cols] scaled by r [n] row by row."""
    if grad_b is not None:
        grad_b[cols] += probs.t() @ r
    p = probs if head.dtype is None else probs.to(head.dtype)
    if grad_h is not None:
        grad_h.addcmul_((p @ head.w[cols]).float(), r[:, None])
    if grad_w is None:
        return
    hr = (h.float() * r[:, None]).to(p.dtype)
    if head.dtype is None:
        grad_w[cols].addmm_(p.t(), hr)  # in place: no [cols, H] temporary
    else:
        grad_w[cols] += (p.t() @ hr).float()


class _HeadLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        # Autocast is handled by hand: backward must redo the matmul in the same dtype as forward.
        dtype = _autocast_dtype(hidden.device.type)
        head = Head(weight, bias, dtype)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk], targets[s : s + chunk]
                tiles = vocab_tiles(h.shape[0], weight.shape[0], h.device)
                lse[s : s + chunk], target, _ = lse_and_target(head, h, t, tiles)
                out[s : s + chunk] = target - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        head = Head(weight, bias, ctx.dtype)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk]
            tiles = vocab_tiles(h.shape[0], weight.shape[0], h.device)
            add_grads(head, h, t, lse[s : s + ctx.chunk], grad_out[s : s + ctx.chunk].float(), tiles, None,
                      None if grad_h is None else grad_h[s : s + ctx.chunk], grad_w, grad_b)
        grad_h = grad_h.to(hidden.dtype) if grad_h is not None else None
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def head_logprobs(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) [T] (fp32) for hidden [T, H] through the linear LM head `head`."""
    return _HeadLogProb.apply(hidden, head.weight, head.bias, targets, chunk)
