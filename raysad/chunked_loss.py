"""Chunked, masked evaluation of per-token losses as one autograd.Function, memory-bounded (as Liger's fused
linear + loss): Σ_tokens div_weight·div + ce_weight·ce over chosen (b, t) positions, a chunk of positions at a
time, with the gradients computed during the forward pass.

The maths of a chunk (which divergence, against which teacher) is the caller's `ChunkPlan.chunk_losses`:
raysad.losses builds it on `divergence`, whatever the student or teacher form.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class ChunkPlan(NamedTuple):
    """What one chunked pass computes: tokens (b, t), their weights, the per-chunk maths, the chunk size."""

    rows_b: torch.Tensor
    rows_t: torch.Tensor
    div_weight: torch.Tensor | None  # [n] weight of each token's divergence in the total; None = no KD
    ce_weight: torch.Tensor | None  # [n] weight of each token's CE in the total; None = no CE
    # (logits [c, V], b [c], t [c]) -> (divergence [c] or None, CE [c] or None): one chunk's per-token losses
    chunk_losses: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple]
    chunk_size: int
    grad_enabled: bool


class ChunkedLoss(torch.autograd.Function):
    """Σ_tokens div_weight·div + ce_weight·ce, chunk by chunk; gradients are computed during the forward pass.

    Each chunk's logits [c, V] (sliced, or hidden @ lm_head.T) are a fresh leaf: autograd gives d total /
    d logits for that chunk, then the matmul's gradients are accumulated by hand (grad_hidden rows, and
    grad_lm_head += dlogits.T @ hidden in float32). So at most one chunk of [c, V] tensors is alive, nothing
    is recomputed, and backward only scales the stored gradients (as Liger's fused linear + loss).
    Outputs: the total (differentiable), and the detached per-token divergence and CE (empty if not asked).
    """

    @staticmethod
    def forward(ctx, student_x, lm_head, plan: ChunkPlan):
        want_x = plan.grad_enabled and student_x.requires_grad
        want_w = plan.grad_enabled and lm_head is not None and lm_head.requires_grad
        grad_x = torch.zeros_like(student_x) if want_x else None
        grad_w = torch.zeros_like(lm_head, dtype=torch.float32) if want_w else None
        n = plan.rows_b.numel()
        device = student_x.device
        div_all = torch.zeros(n, device=device) if plan.div_weight is not None else torch.empty(0, device=device)
        ce_all = torch.zeros(n, device=device) if plan.ce_weight is not None else torch.empty(0, device=device)
        for start in range(0, n, plan.chunk_size):
            end = min(start + plan.chunk_size, n)
            b, t = plan.rows_b[start:end], plan.rows_t[start:end]
            x = student_x[b, t]
            logits = (x @ lm_head.T if lm_head is not None else x).requires_grad_(want_x or want_w)
            with torch.set_grad_enabled(want_x or want_w):
                div, ce = plan.chunk_losses(logits, b, t)
                chunk_total = logits.new_zeros((), dtype=torch.float32)
                if div is not None:
                    chunk_total = chunk_total + (div * plan.div_weight[start:end]).sum()
                    div_all[start:end] = div.detach()
                if ce is not None:
                    chunk_total = chunk_total + (ce * plan.ce_weight[start:end]).sum()
                    ce_all[start:end] = ce.detach()
            if not (want_x or want_w):
                continue
            (dlogits,) = torch.autograd.grad(chunk_total, logits)
            del logits, div, ce, chunk_total  # free this chunk's graph before the next one
            if lm_head is None:
                grad_x[b, t] = dlogits.to(grad_x.dtype)
                continue
            if want_x:  # under autocast the product may come out in another dtype than the hidden states
                grad_x[b, t] = (dlogits @ lm_head).to(grad_x.dtype)
            if want_w and dlogits.dtype == torch.float32:
                grad_w.addmm_(dlogits.T, x)
            elif want_w:  # low-precision weights: the product in their dtype, the running sum in float32
                grad_w += dlogits.T @ x
        total = div_all.new_zeros(())
        if plan.div_weight is not None:
            total = total + (div_all * plan.div_weight).sum()
        if plan.ce_weight is not None:
            total = total + (ce_all * plan.ce_weight).sum()
        ctx.grads = (grad_x, grad_w.to(lm_head.dtype) if want_w else None)
        ctx.mark_non_differentiable(div_all, ce_all)
        return total, div_all, ce_all

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total, _grad_div, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("raysad.losses: backward through a chunked loss can run only once")
        grad_x, grad_w = ctx.grads
        ctx.grads = None
        # in place: a second [B, T, V] buffer is exactly what chunking avoids
        if grad_x is not None:
            grad_x.mul_(grad_total.to(grad_x.dtype))
        if grad_w is not None:
            grad_w.mul_(grad_total.to(grad_w.dtype))
        return grad_x, grad_w, None
