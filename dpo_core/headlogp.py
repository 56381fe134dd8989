"""log p(target) through the LM head, chunked, with a hand-written backward.

For hidden states h [T, H], an LM head W [V, H] (+ bias) and targets t [T]:

    logp_i = (h_i W^T)[t_i] - logsumexp(h_i W^T)

Forward keeps only h, W, t and the per-row logsumexp [T] — never a [T, V] tensor beyond one chunk.
Backward recomputes one chunk of logits at a time and turns it in place into the gradient
d(g·logp)/d(logits) = g · (onehot(t) - softmax) = -g · (exp(logits - lse) - onehot(t)), then
   dh = dlogits @ W,   dW += dlogits^T @ h,   db += sum(dlogits).
Compared with autograd over a checkpointed log-softmax this skips a second logsumexp, the zero-filled
scatter of the gather's backward and two full-size temporaries per chunk: on CPU the softmax passes
over [chunk, V] are as costly as the matmuls.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _logits(hidden, weight, bias, dtype: torch.dtype | None) -> torch.Tensor:
    """Logits in fp32, from a matmul in `dtype` (the autocast dtype of the forward) when one is given."""
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return F.linear(hidden, weight, bias).float()


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


class _HeadLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk: int):
        # Autocast is handled by hand: backward must redo the matmul in the same dtype as forward.
        dtype = _autocast_dtype(hidden.device.type)
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                logits = _logits(hidden[s : s + chunk], weight, bias, dtype)
                lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
                out[s : s + chunk] = logits.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse[s : s + chunk]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk, ctx.dtype = chunk, dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        mm = ctx.dtype or torch.float32  # the matmul dtype of the forward
        w = weight.to(mm)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h, t = hidden[s : s + ctx.chunk], targets[s : s + ctx.chunk]
            probs = _logits(h, weight, bias, ctx.dtype).sub_(lse[s : s + ctx.chunk, None]).exp_()  # softmax, in place
            probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0  # softmax - onehot
            dlogits = probs.mul_(-grad_out[s : s + ctx.chunk, None])
            dl = dlogits.to(mm)
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = (dl @ w).to(hidden.dtype)
            if grad_w is not None:
                grad_w += (dl.t() @ h.to(mm)).float()
            if grad_b is not None:
                grad_b += dlogits.sum(0)
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def head_logprobs(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(target) [T] (fp32) for hidden [T, H] through the linear LM head `head`."""
    return _HeadLogProb.apply(hidden, head.weight, head.bias, targets, chunk)
