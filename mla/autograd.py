"""The Triton kernels as ``torch.library`` custom ops, and the ``torch.autograd.Function`` wrappers.

Every kernel launcher is registered as an opaque operator in the ``mla`` namespace with a fake (meta)
implementation, so ``torch.compile`` traces through it without graph breaks and without looking
inside Triton; forward ops also carry a registered autograd formula, so ``torch.library.opcheck``
passes for them. The modules call the ``torch.autograd.Function`` classes below (one per op), whose
forward and backward run the same ops.

Each forward saves ``q, k, v, out, lse``; each backward recomputes the probabilities from ``lse``
(FlashAttention-2, Dao 2023, arXiv 2307.08691). ``lse`` is differentiable: its gradient ``dlse``
enters the backward as ``delta - dlse`` (``∂lse/∂S = P``). The per-head max logit is a statistic and
carries no gradient.

Importing this module imports the kernels (and therefore Triton); ``mla.functional`` imports it only
when the Triton backend is used, so ``import mla`` works without Triton.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.attention_bwd import attention_bwd, attention_bwd_varlen
from kernels.attention_fwd import attention_fwd, attention_fwd_varlen
from kernels.block_sparse import block_sparse_attention_bwd, block_sparse_attention_fwd
from kernels.decode import mla_decode_fwd
from kernels.topk_sparse import topk_attention_bwd, topk_attention_fwd

__all__ = [
    "BlockSparseAttentionFunction",
    "LatentAttentionFunction",
    "TopkAttentionFunction",
    "triton_attention",
    "triton_attention_varlen",
    "triton_decode",
    "kernel_supports",
    "OPS",
]


def _no_max(lse: Tensor) -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "max logit not requested".
    return lse.new_empty(0)


# ------------------------------------------------------------------------------------------------
# dense
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mla::attention_fwd", mutates_args=())
def attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, return_max_logit: bool,
    window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense fused forward: ``(out [B,T,Hq,Dv], lse fp32 [B,Hq,T], max_logit fp32 [B,Hq] or [0])``;
    ``window_left/right`` the sliding window (-1 unbounded), ``sinks`` fp32 ``[Hq]`` or None."""
    out, lse, max_logit = attention_fwd(
        q, k, v, softmax_scale, causal, return_max_logit=return_max_logit,
        window_size=(window_left, window_right), sinks=sinks,
    )
    return out, lse, (max_logit if max_logit is not None else _no_max(lse))


def _fake_attention_outputs(q: Tensor, v: Tensor, return_max_logit: bool):
    """Meta outputs of every attention forward op: out [B,T,Hq,Dv], lse [B,Hq,T], max_logit [B,Hq] or [0]."""
    B, T, Hq, _ = q.shape
    lse = q.new_empty(B, Hq, T, dtype=torch.float32)
    ml = q.new_empty((B, Hq) if return_max_logit else (0,), dtype=torch.float32)
    return q.new_empty(B, T, Hq, v.shape[-1]), lse, ml


@attention_fwd_op.register_fake
def _(q, k, v, softmax_scale, causal, return_max_logit, window_left=-1, window_right=-1, sinks=None):
    return _fake_attention_outputs(q, v, return_max_logit)


@torch.library.custom_op("mla::attention_bwd", mutates_args=())
def attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense fused backward: ``(dq, dk, dv, dsinks)`` shaped like ``q, k, v`` (contiguous) and ``sinks``
    (an empty tensor without sinks)."""
    res = attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal, dlse=dlse,
                        window_size=(window_left, window_right), sinks=sinks)
    return res if sinks is not None else (*res, _no_max(lse))


@attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, softmax_scale, causal, window_left=-1, window_right=-1, sinks=None):
    ds = sinks.new_empty(sinks.shape) if sinks is not None else lse.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _dense_setup(ctx, inputs, output):
    q, k, v, softmax_scale, causal, _ = inputs[:6]
    wl, wr, sinks = (tuple(inputs[6:9]) + (-1, -1, None)[len(inputs) - 6:])
    out, lse, max_logit = output
    ctx.save_for_backward(q, k, v, out, lse, sinks)
    ctx.softmax_scale, ctx.causal, ctx.window = softmax_scale, causal, (wl, wr)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(max_logit)


def _dense_backward(ctx, dout, dlse, _dmax):
    q, k, v, out, lse, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, ds = attention_bwd_op(
        dout.contiguous(), q, k, v, out, lse, dlse, ctx.softmax_scale, ctx.causal, *ctx.window, sinks
    )
    grads = (dq, dk, dv, None, None, None, None, None, ds if sinks is not None else None)
    return grads[: ctx.n_inputs]


attention_fwd_op.register_autograd(_dense_backward, setup_context=_dense_setup)


class LatentAttentionFunction(torch.autograd.Function):
    """Dense fused attention: ``apply(q, k, v, softmax_scale, causal, return_max_logit, window_left=-1,
    window_right=-1, sinks=None)``.

    Shapes as ``mla.functional.latent_attention``; returns ``(out, lse, max_logit)`` where
    ``max_logit`` is ``[B, Hq]`` or an empty tensor when not requested. Forward and backward run
    the ``mla::attention_fwd`` / ``mla::attention_bwd`` ops; ``sinks`` (fp32 ``[Hq]``) gets a gradient.
    """

    @staticmethod
    def forward(q, k, v, softmax_scale: float, causal: bool, return_max_logit: bool,
                window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None):
        return attention_fwd_op(q, k, v, softmax_scale, causal, return_max_logit, window_left, window_right, sinks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _dense_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        return _dense_backward(ctx, dout, dlse, dmax)


# ------------------------------------------------------------------------------------------------
# top-k sparse
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mla::topk_attention_fwd", mutates_args=())
def topk_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, topk_indices: Tensor, softmax_scale: float, causal: bool,
    return_max_logit: bool, sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k sparse forward (``topk_indices`` int32 ``[B,T,Hkv,K]``): ``(out, lse, max_logit or [0])``;
    ``sinks`` fp32 ``[Hq]`` or None."""
    out, lse, max_logit = topk_attention_fwd(
        q, k, v, topk_indices, softmax_scale, causal, return_max_logit=return_max_logit, sinks=sinks
    )
    return out, lse, (max_logit if max_logit is not None else _no_max(lse))


@topk_attention_fwd_op.register_fake
def _(q, k, v, topk_indices, softmax_scale, causal, return_max_logit, sinks=None):
    return _fake_attention_outputs(q, v, return_max_logit)


@torch.library.custom_op("mla::topk_attention_bwd", mutates_args=())
def topk_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, topk_indices: Tensor,
    dlse: Tensor | None, softmax_scale: float, causal: bool, deterministic: bool, sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k sparse backward: ``(dq, dk, dv, dsinks or [0])``; ``deterministic`` uses the key-major index
    (no atomics)."""
    res = topk_attention_bwd(
        dout, q, k, v, out, lse, topk_indices, softmax_scale, causal, dlse=dlse, deterministic=deterministic,
        sinks=sinks,
    )
    return res if sinks is not None else (*res, _no_max(lse))


@topk_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, topk_indices, dlse, softmax_scale, causal, deterministic, sinks=None):
    ds = sinks.new_empty(sinks.shape) if sinks is not None else lse.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _topk_setup(ctx, inputs, output):
    q, k, v, topk_indices, softmax_scale, causal, _ = inputs[:7]
    out, lse, max_logit = output
    # The op's inputs end (..., return_max_logit[, sinks]); the Function's (..., deterministic[, sinks]).
    ctx.deterministic = next((x for x in inputs[7:] if isinstance(x, bool)), True)
    ctx.sinks_pos = next((i for i in range(7, len(inputs)) if isinstance(inputs[i], Tensor)), None)
    sinks = inputs[ctx.sinks_pos] if ctx.sinks_pos is not None else None
    ctx.save_for_backward(q, k, v, out, lse, topk_indices, sinks)
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(max_logit)


def _topk_backward(ctx, dout, dlse, _dmax):
    q, k, v, out, lse, topk_indices, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, ds = topk_attention_bwd_op(
        dout.contiguous(), q, k, v, out, lse, topk_indices, dlse, ctx.softmax_scale, ctx.causal, ctx.deterministic,
        sinks,
    )
    grads = [dq, dk, dv] + [None] * (len(ctx.needs_input_grad) - 3)
    if ctx.sinks_pos is not None:
        grads[ctx.sinks_pos] = ds
    return tuple(grads)


topk_attention_fwd_op.register_autograd(_topk_backward, setup_context=_topk_setup)


class TopkAttentionFunction(torch.autograd.Function):
    """Top-k sparse attention: ``apply(q, k, v, topk_indices, softmax_scale, causal, return_max_logit,
    deterministic)`` -> ``(out, lse, max_logit)``.

    ``deterministic=True`` (the default of ``latent_attention``) computes dK/dV from a key-major
    transposed index built with a sort: bitwise reproducible, no atomics; ``False`` uses fp32 atomics.
    """

    @staticmethod
    def forward(q, k, v, topk_indices, softmax_scale: float, causal: bool, return_max_logit: bool,
                deterministic: bool, sinks: Tensor | None = None):
        return topk_attention_fwd_op(q, k, v, topk_indices, softmax_scale, causal, return_max_logit, sinks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _topk_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        return _topk_backward(ctx, dout, dlse, dmax)


# ------------------------------------------------------------------------------------------------
# varlen (FlashAttention's packed layout)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mla::attention_varlen_fwd", mutates_args=())
def attention_varlen_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, softmax_scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:
    """Varlen dense forward: ``(out [total_q, Hq, Dv], lse fp32 [Hq, total_q])``."""
    out, lse, _ = attention_fwd_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       softmax_scale, causal)
    return out, lse


@attention_varlen_fwd_op.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    total_q, Hq, _ = q.shape
    return q.new_empty(total_q, Hq, v.shape[-1]), q.new_empty(Hq, total_q, dtype=torch.float32)


@torch.library.custom_op("mla::attention_varlen_bwd", mutates_args=())
def attention_varlen_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Varlen dense backward (deterministic): ``(dq, dk, dv)`` shaped like ``q, k, v``."""
    return attention_bwd_varlen(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, causal, dlse=dlse)


@attention_varlen_bwd_op.register_fake
def _(dout, q, k, v, out, lse, dlse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, softmax_scale, causal)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = attention_varlen_bwd_op(dout.contiguous(), q, k, v, out, lse, dlse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None


attention_varlen_fwd_op.register_autograd(_varlen_backward, setup_context=_varlen_setup)


def triton_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                            softmax_scale: float, causal: bool):
    """``mla::attention_varlen_fwd`` with autograd (see ``mla.functional.latent_attention_varlen``);
    inputs must be validated. Returns ``(out [total_q, Hq, Dv], lse fp32 [Hq, total_q])``."""
    return attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   float(softmax_scale), bool(causal))


# ------------------------------------------------------------------------------------------------
# block sparse
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mla::block_sparse_attention_fwd", mutates_args=())
def block_sparse_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor,
    q_indices: Tensor, block_m: int, block_n: int, softmax_scale: float, causal: bool, return_max_logit: bool,
    kv_partial: Tensor | None = None, q_partial: Tensor | None = None, partial_bits: Tensor | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block-sparse forward over a ``BlockMask``'s tensors (``q_num_blocks``/``q_indices``/``q_partial`` are
    carried for the backward only; ``kv_partial``/``partial_bits``: partial blocks of a FlexAttention mask):
    ``(out, lse, max_logit or [0])``; ``sinks`` fp32 ``[Hq]`` or None."""
    out, lse, max_logit = block_sparse_attention_fwd(
        q, k, v, kv_num_blocks, kv_indices, (block_m, block_n), softmax_scale, causal,
        return_max_logit=return_max_logit, kv_partial=kv_partial, partial_bits=partial_bits, sinks=sinks,
    )
    return out, lse, (max_logit if max_logit is not None else _no_max(lse))


@block_sparse_attention_fwd_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_m, block_n, softmax_scale, causal,
      return_max_logit, kv_partial=None, q_partial=None, partial_bits=None, sinks=None):
    return _fake_attention_outputs(q, v, return_max_logit)


@torch.library.custom_op("mla::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_num_blocks: Tensor,
    kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor, dlse: Tensor | None, block_m: int, block_n: int,
    softmax_scale: float, causal: bool,
    kv_partial: Tensor | None = None, q_partial: Tensor | None = None, partial_bits: Tensor | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Block-sparse backward (deterministic, no atomics): ``(dq, dk, dv, dsinks or [0])``."""
    res = block_sparse_attention_bwd(
        dout, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, (block_m, block_n),
        softmax_scale, causal, dlse=dlse, kv_partial=kv_partial, q_partial=q_partial, partial_bits=partial_bits,
        sinks=sinks,
    )
    return res if sinks is not None else (*res, _no_max(lse))


@block_sparse_attention_bwd_op.register_fake
def _(dout, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices, dlse, block_m, block_n,
      softmax_scale, causal, kv_partial=None, q_partial=None, partial_bits=None, sinks=None):
    ds = sinks.new_empty(sinks.shape) if sinks is not None else lse.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


def _block_setup(ctx, inputs, output):
    q, k, v, kvn, kvi, qn, qi, block_m, block_n, softmax_scale, causal, _ = inputs[:12]
    extra = tuple(inputs[12:16]) + (None,) * (16 - len(inputs))  # kv_partial, q_partial, partial_bits, sinks
    out, lse, max_logit = output
    ctx.save_for_backward(q, k, v, out, lse, kvn, kvi, qn, qi, *extra)
    ctx.block_size, ctx.softmax_scale, ctx.causal = (block_m, block_n), softmax_scale, causal
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(max_logit)


def _block_backward(ctx, dout, dlse, _dmax):
    q, k, v, out, lse, kvn, kvi, qn, qi, kv_part, q_part, bits, sinks = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, ds = block_sparse_attention_bwd_op(
        dout.contiguous(), q, k, v, out, lse, kvn, kvi, qn, qi, dlse, *ctx.block_size, ctx.softmax_scale, ctx.causal,
        kv_part, q_part, bits, sinks,
    )
    return ((dq, dk, dv) + (None,) * 12 + (ds if sinks is not None else None,))[: ctx.n_inputs]


block_sparse_attention_fwd_op.register_autograd(_block_backward, setup_context=_block_setup)


class BlockSparseAttentionFunction(torch.autograd.Function):
    """Block-sparse attention: ``apply(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_m,
    block_n, softmax_scale, causal, return_max_logit)`` -> ``(out, lse, max_logit)``.

    The mask tensors are ``mla.sparsity.BlockMask`` fields (int32, batch/head dims 1 or B/Hq); inside a
    listed block every key is kept unless ``causal`` hides it. The backward is deterministic.
    """

    @staticmethod
    def forward(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices, block_m: int, block_n: int,
                softmax_scale: float, causal: bool, return_max_logit: bool, kv_partial=None, q_partial=None,
                partial_bits=None, sinks: Tensor | None = None):
        return block_sparse_attention_fwd_op(q, k, v, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                                             block_m, block_n, softmax_scale, causal, return_max_logit,
                                             kv_partial, q_partial, partial_bits, sinks)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _block_setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, dout, dlse, dmax):
        return _block_backward(ctx, dout, dlse, dmax)


# ------------------------------------------------------------------------------------------------
# decode (inference only)
# ------------------------------------------------------------------------------------------------
@torch.library.custom_op("mla::decode", mutates_args=())
def decode_op(
    q: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor, softmax_scale: float,
    head_dim_v: int, causal: bool, topk_indices: Tensor | None, num_splits: int | None, kv_fp8: bool = False,
    sinks: Tensor | None = None, window_left: int = -1,
) -> tuple[Tensor, Tensor]:
    """Split-KV decode over a paged latent cache: ``(out [B,Tq,H,Dv], lse fp32 [B,H,Tq])``; ``kv_fp8``: the
    cache is the uint8 ``fp8_ds_mla`` pool; ``sinks`` fp32 ``[H]`` or None (added once, in the combine);
    ``window_left``: sliding window (-1: none)."""
    return mla_decode_fwd(
        q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal=causal,
        topk_indices=topk_indices, num_splits=num_splits, kv_fp8=kv_fp8, sinks=sinks, window_left=window_left,
    )


@decode_op.register_fake
def _(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal, topk_indices, num_splits,
      kv_fp8=False, sinks=None, window_left=-1):
    B, Tq, H, _ = q.shape
    return q.new_empty(B, Tq, H, head_dim_v), q.new_empty(B, H, Tq, dtype=torch.float32)


def triton_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal=False,
                  topk_indices=None, num_splits=None, kv_fp8=False, sinks=None, window_left=-1):
    """``mla::decode`` (see ``mla.functional.mla_decode`` for shapes). Inputs must be validated."""
    return decode_op(q, kv_cache, block_table, cache_seqlens, float(softmax_scale), int(head_dim_v),
                     bool(causal), topk_indices, num_splits, bool(kv_fp8), sinks, int(window_left))


#: Every registered op (for ``torch.library.opcheck`` in the tests).
OPS = {
    "attention_fwd": attention_fwd_op,
    "attention_bwd": attention_bwd_op,
    "attention_varlen_fwd": attention_varlen_fwd_op,
    "attention_varlen_bwd": attention_varlen_bwd_op,
    "block_sparse_attention_fwd": block_sparse_attention_fwd_op,
    "block_sparse_attention_bwd": block_sparse_attention_bwd_op,
    "decode": decode_op,
    "topk_attention_fwd": topk_attention_fwd_op,
    "topk_attention_bwd": topk_attention_bwd_op,
}


def kernel_supports(q, k, v, block_mask=None, topk_indices=None, window_size=(-1, -1), sinks=None) -> str:
    """Why the kernels cannot run these (validated) inputs, or ``""`` when they can (every validated
    dense, block-sparse and top-k layout runs on the kernels; windows on the dense kernels, sinks on all)."""
    if (block_mask is not None or topk_indices is not None) and tuple(window_size) != (-1, -1):
        return "window_size with block_mask / topk_indices runs on backend='reference' only"
    return ""


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    softmax_scale: float,
    block_mask=None,
    topk_indices: Tensor | None = None,
    return_max_logit: bool = False,
    deterministic: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    sinks: Tensor | None = None,
):
    """Run the fused kernels with autograd: ``(out, lse, max_logit | None)``. Inputs must be validated.

    ``deterministic`` applies to the top-k backward (the dense one never uses atomics).

    Raises:
        ValueError: a layout the kernels do not support (see ``kernel_supports``).
    """
    why = kernel_supports(q, k, v, block_mask, topk_indices, window_size, sinks)
    if why:
        raise ValueError(why)
    scale, causal, want_max = float(softmax_scale), bool(causal), bool(return_max_logit)
    if topk_indices is not None:
        extra = () if sinks is None else (sinks,)
        out, lse, ml = TopkAttentionFunction.apply(
            q, k, v, topk_indices, scale, causal, want_max, bool(deterministic), *extra
        )
    elif block_mask is not None:
        bm, bn = block_mask.BLOCK_SIZE
        extra = ((block_mask.kv_partial, block_mask.q_partial, block_mask.partial_bits)
                 if block_mask.has_partial else (None, None, None)) + (sinks,)
        out, lse, ml = BlockSparseAttentionFunction.apply(
            q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
            int(bm), int(bn), scale, causal, want_max, *extra,
        )
    elif tuple(window_size) != (-1, -1) or sinks is not None:
        wl, wr = (int(w) for w in window_size)
        out, lse, ml = LatentAttentionFunction.apply(q, k, v, scale, causal, want_max, wl, wr, sinks)
    else:
        out, lse, ml = LatentAttentionFunction.apply(q, k, v, scale, causal, want_max)
    return out, lse, (ml if return_max_logit else None)
