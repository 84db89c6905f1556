"""``torch.autograd.Function`` wrappers over the Triton kernels (one per op).

Each forward saves ``q, k, v, out, lse``; each backward recomputes the probabilities from ``lse``
(FlashAttention-2, Dao 2023, arXiv 2307.08691). ``lse`` is differentiable too: its gradient
``dlse`` enters the backward as ``delta - dlse`` (``∂lse/∂S = P``). The per-head max logit is a
statistic and carries no gradient.

Importing this module imports the kernels (and therefore Triton); ``mla.functional`` imports it
only when the Triton backend is used, so ``import mla`` works without Triton.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.attention_bwd import attention_bwd
from kernels.attention_fwd import attention_fwd

__all__ = ["LatentAttentionFunction", "triton_attention", "kernel_supports"]


class LatentAttentionFunction(torch.autograd.Function):
    """Dense fused attention: ``forward(q, k, v, softmax_scale, causal, return_max_logit)``.

    Shapes as ``mla.functional.latent_attention``; returns ``(out, lse, max_logit | None)``.
    """

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale: float, causal: bool, return_max_logit: bool):
        out, lse, max_logit = attention_fwd(q, k, v, softmax_scale, causal, return_max_logit=return_max_logit)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.softmax_scale, ctx.causal = softmax_scale, causal
        if max_logit is not None:
            ctx.mark_non_differentiable(max_logit)
        return out, lse, max_logit

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse, _dmax):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv = attention_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal, dlse=dlse)
        return dq, dk, dv, None, None, None


def kernel_supports(q, k, v, block_mask=None, topk_indices=None) -> str:
    """Why the kernels cannot run these (validated) inputs, or ``""`` when they can."""
    if block_mask is not None or topk_indices is not None:
        return "the sparse Triton kernels are not available yet"
    return ""


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    block_mask=None,
    topk_indices: torch.Tensor | None = None,
    return_max_logit: bool = False,
):
    """Run the fused kernels with autograd: ``(out, lse, max_logit | None)``. Inputs must be validated.

    Raises:
        ValueError: a sparse layout whose kernels are not available.
    """
    if block_mask is not None or topk_indices is not None:
        raise ValueError("the sparse Triton kernels are not available: use backend='reference'")
    return LatentAttentionFunction.apply(q, k, v, float(softmax_scale), bool(causal), bool(return_max_logit))
