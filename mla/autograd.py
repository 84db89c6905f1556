"""The Triton kernels as ``torch.library`` custom ops, each forward op with its registered autograd formula.

This is the one autograd path of the kernels: every launcher is registered as an opaque operator in the
``mla`` namespace with a fake (meta) implementation, so ``torch.compile`` traces through it without graph
breaks and without looking inside Triton, and each forward op carries its backward through
``register_autograd`` (so ``torch.library.opcheck`` passes and eager, ``aot_eager`` and inductor all run
the same formula). ``mla.functional`` calls the ops through ``triton_attention`` /
``triton_attention_varlen`` / ``triton_decode`` below; there are no ``torch.autograd.Function`` wrappers.

Each forward saves its tensor inputs and ``out, lse``; each backward recomputes the probabilities from
``lse`` (FlashAttention-2, Dao 2023, arXiv 2307.08691). ``lse`` is differentiable: its gradient ``dlse``
enters the backward as ``delta - dlse`` (``∂lse/∂S = P``). The per-head max logit is a statistic and
carries no gradient.

Importing this module imports the kernels (and therefore Triton); ``mla.functional`` imports it only
when the Triton backend is used, so ``import mla`` works without Triton.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from kernels.attention_bwd import attention_bwd, attention_bwd_varlen
from kernels.attention_fwd import attention_fwd, attention_fwd_varlen
from kernels.block_sparse import block_sparse_attention_bwd, block_sparse_attention_fwd
from kernels.decode import mla_decode_fwd
from kernels.topk_sparse import topk_attention_bwd, topk_attention_fwd

__all__ = [
    "triton_attention",
    "triton_attention_varlen",
    "triton_decode",
    "OPS",
]


def _no_max(lse: Tensor) -> Tensor:
    # Custom ops cannot return None: an empty tensor stands for "max logit (or dsinks) not requested".
    return lse.new_empty(0)


def _no_none(res, lse: Tensor, n: int) -> tuple:
    """``res`` padded to ``n`` outputs, an empty tensor (``_no_max``) for each one that is None or missing (a
    max logit or dsinks not requested): a custom op returns a fixed number of tensors."""
    return tuple(_no_max(lse) if x is None else x for x in (*res, *(None,) * (n - len(res))))


def _fake_attention_outputs(q: Tensor, v: Tensor, return_max_logit: bool, **_):
    """Meta outputs of every attention forward op: out [B,T,Hq,Dv], lse [B,Hq,T], max_logit [B,Hq] or [0]."""
    B, T, Hq, _ = q.shape
    lse = q.new_empty(B, Hq, T, dtype=torch.float32)
    ml = q.new_empty((B, Hq) if return_max_logit else (0,), dtype=torch.float32)
    return q.new_empty(B, T, Hq, v.shape[-1]), lse, ml


def _fake_grads(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, sinks: Tensor | None = None, **_):
    """Meta outputs of every attention backward op: dq, dk, dv like q, k, v; dsinks like sinks or [0]."""
    ds = sinks.new_empty(sinks.shape) if sinks is not None else _no_max(lse)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ds


#: Each op's parameter names, in order (``_op`` fills it): the backward ops take the forward's inputs by name.
_PARAMS: dict = {}


def _register_autograd(fwd_op, bwd_op) -> None:
    """Attach ``bwd_op`` as the backward of ``fwd_op`` (outputs ``(out, lse[, max_logit])``, inputs
    ``q, k, v, ...``).

    ``bwd_op`` takes ``dout, out, lse, dlse`` and, under the same names, whichever forward inputs it needs,
    and returns ``(dq, dk, dv[, dsinks])``; ``dsinks`` is the gradient of the forward's ``sinks`` input when
    one is given. The op's inputs arrive with their defaults filled; tensors are saved with
    ``save_for_backward``, the rest on ``ctx``.
    """
    fwd_params, bwd_params = _PARAMS[fwd_op], _PARAMS[bwd_op]
    sinks_pos = fwd_params.index("sinks") if "sinks" in fwd_params else None

    def setup_context(ctx, inputs, output):
        out, lse = output[0], output[1]
        if len(output) > 2:
            ctx.mark_non_differentiable(output[2])
        ctx.tensor_pos = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.consts = [None if isinstance(x, Tensor) else x for x in inputs]
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_pos), out, lse)

    def backward(ctx, dout, dlse, *_no_grad_stats):
        *saved, out, lse = ctx.saved_tensors
        inputs = list(ctx.consts)
        for i, t in zip(ctx.tensor_pos, saved):
            inputs[i] = t
        if dout is None:
            dout = torch.zeros_like(out)
        given = dict(zip(fwd_params, inputs), dout=dout.contiguous(), out=out, lse=lse, dlse=dlse)
        dq, dk, dv, *ds = bwd_op(*(given[name] for name in bwd_params))
        grads = [dq, dk, dv] + [None] * (len(inputs) - 3)
        if sinks_pos is not None and inputs[sinks_pos] is not None:
            grads[sinks_pos] = ds[0]
        return tuple(grads)

    fwd_op.register_autograd(backward, setup_context=setup_context)


def _no_backward(op, why: str) -> None:
    """Register a backward for ``op`` that raises ``RuntimeError(why)``: without one, torch's message for a
    backward through it asks the user to ``register_autograd`` (it is reached only when such a backward runs,
    so a forward, or ``create_graph=True`` without a second backward, still works)."""

    def backward(ctx, *grads):
        raise RuntimeError(why)

    op.register_autograd(backward, setup_context=lambda ctx, inputs, output: None)


_DOUBLE_BACKWARD = (
    "mla: double backward (a gradient of a gradient, e.g. torch.autograd.grad(..., create_graph=True) "
    "then backward) through the Triton attention kernels ({}) is not supported; use backend='reference' "
    "for higher-order gradients"
)


def _op(name: str, fake):
    """Decorator: ``fn`` as the custom op ``mla::<name>`` with the meta implementation ``fake``, which gets the
    op's arguments by name with their defaults filled (so one ``fake`` serves ops of different arities)."""

    def wrap(fn):
        op = torch.library.custom_op(f"mla::{name}", mutates_args=())(fn)
        sig = inspect.signature(fn)

        def fake_impl(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            return fake(**bound.arguments)

        op.register_fake(fake_impl)
        _PARAMS[op] = list(sig.parameters)
        return op

    return wrap


def _backward_op(name: str, fwd_op, fake=_fake_grads):
    """Decorator: ``fn`` as the backward custom op ``mla::<name>`` (meta outputs from ``fake``), attached to
    ``fwd_op`` by ``_register_autograd``; a second backward through it raises (``_no_backward``)."""

    def wrap(fn):
        op = _op(name, fake)(fn)
        _register_autograd(fwd_op, op)
        _no_backward(op, _DOUBLE_BACKWARD.format(name))
        return op

    return wrap


def _fake_varlen_outputs(q: Tensor, v: Tensor, **_):
    """Meta outputs of the varlen forward: out [total_q, Hq, Dv], lse [Hq, total_q]."""
    total_q, Hq, _ = q.shape
    return q.new_empty(total_q, Hq, v.shape[-1]), q.new_empty(Hq, total_q, dtype=torch.float32)


def _fake_varlen_grads(q: Tensor, k: Tensor, v: Tensor, **_):
    """Meta outputs of the varlen backward: dq, dk, dv like q, k, v (no sinks on this path)."""
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _fake_decode_outputs(q: Tensor, head_dim_v: int, **_):
    """Meta outputs of the decode op: out [B, Tq, H, head_dim_v], lse [B, H, Tq]."""
    B, Tq, H, _ = q.shape
    return q.new_empty(B, Tq, H, head_dim_v), q.new_empty(B, H, Tq, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# dense
# ------------------------------------------------------------------------------------------------
@_op("attention_fwd", _fake_attention_outputs)
def attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, causal: bool, return_max_logit: bool,
    window_left: int = -1, window_right: int = -1, sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense fused forward: ``(out [B,T,Hq,Dv], lse fp32 [B,Hq,T], max_logit fp32 [B,Hq] or [0])``;
    ``window_left/right`` the sliding window (-1 unbounded), ``sinks`` fp32 ``[Hq]`` or None."""
    res = attention_fwd(
        q, k, v, softmax_scale, causal, return_max_logit=return_max_logit,
        window_size=(window_left, window_right), sinks=sinks,
    )
    return _no_none(res, res[1], 3)


@_backward_op("attention_bwd", attention_fwd_op)
def attention_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    softmax_scale: float, causal: bool, window_left: int = -1, window_right: int = -1,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Dense fused backward: ``(dq, dk, dv, dsinks)`` shaped like ``q, k, v`` (contiguous) and ``sinks``
    (an empty tensor without sinks)."""
    res = attention_bwd(dout, q, k, v, out, lse, softmax_scale, causal, dlse=dlse,
                        window_size=(window_left, window_right), sinks=sinks)
    return _no_none(res, lse, 4)


# ------------------------------------------------------------------------------------------------
# top-k sparse
# ------------------------------------------------------------------------------------------------
@_op("topk_attention_fwd", _fake_attention_outputs)
def topk_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, topk_indices: Tensor, softmax_scale: float, causal: bool,
    return_max_logit: bool, sinks: Tensor | None = None, deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k sparse forward (``topk_indices`` int32 ``[B,T,Hkv,K]``): ``(out, lse, max_logit or [0])``;
    ``sinks`` fp32 ``[Hq]`` or None. ``deterministic`` is for the backward only: True computes dK/dV from
    a key-major transposed index built with a sort (bitwise reproducible, no atomics), False uses fp32
    atomics."""
    res = topk_attention_fwd(
        q, k, v, topk_indices, softmax_scale, causal, return_max_logit=return_max_logit, sinks=sinks
    )
    return _no_none(res, res[1], 3)


@_backward_op("topk_attention_bwd", topk_attention_fwd_op)
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
    return _no_none(res, lse, 4)


# ------------------------------------------------------------------------------------------------
# varlen (FlashAttention's packed layout)
# ------------------------------------------------------------------------------------------------
@_op("attention_varlen_fwd", _fake_varlen_outputs)
def attention_varlen_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
    max_seqlen_k: int, softmax_scale: float, causal: bool,
) -> tuple[Tensor, Tensor]:
    """Varlen dense forward: ``(out [total_q, Hq, Dv], lse fp32 [Hq, total_q])``."""
    out, lse, _ = attention_fwd_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       softmax_scale, causal)
    return out, lse


@_backward_op("attention_varlen_bwd", attention_varlen_fwd_op, fake=_fake_varlen_grads)
def attention_varlen_bwd_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Tensor | None,
    cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
    causal: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Varlen dense backward (deterministic): ``(dq, dk, dv)`` shaped like ``q, k, v``."""
    return attention_bwd_varlen(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                softmax_scale, causal, dlse=dlse)


# ------------------------------------------------------------------------------------------------
# block sparse
# ------------------------------------------------------------------------------------------------
@_op("block_sparse_attention_fwd", _fake_attention_outputs)
def block_sparse_attention_fwd_op(
    q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor, q_num_blocks: Tensor,
    q_indices: Tensor, block_m: int, block_n: int, softmax_scale: float, causal: bool, return_max_logit: bool,
    kv_partial: Tensor | None = None, q_partial: Tensor | None = None, partial_bits: Tensor | None = None,
    sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Block-sparse forward over a ``BlockMask``'s tensors (``q_num_blocks``/``q_indices``/``q_partial`` are
    carried for the backward only; ``kv_partial``/``partial_bits``: partial blocks of a FlexAttention mask):
    ``(out, lse, max_logit or [0])``; ``sinks`` fp32 ``[Hq]`` or None. Inside a listed block every key is
    kept unless ``causal`` (or a partial block's bits) hides it; the backward is deterministic."""
    res = block_sparse_attention_fwd(
        q, k, v, kv_num_blocks, kv_indices, (block_m, block_n), softmax_scale, causal,
        return_max_logit=return_max_logit, kv_partial=kv_partial, partial_bits=partial_bits, sinks=sinks,
    )
    return _no_none(res, res[1], 3)


@_backward_op("block_sparse_attention_bwd", block_sparse_attention_fwd_op)
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
    return _no_none(res, lse, 4)


# ------------------------------------------------------------------------------------------------
# decode (inference only)
# ------------------------------------------------------------------------------------------------
@_op("decode", _fake_decode_outputs)
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


_no_backward(decode_op, "mla_decode: backend='triton' is inference-only (the decode kernel has no backward); "
                        "use backend='reference', or latent_attention for training")


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


# ------------------------------------------------------------------------------------------------
# what mla.functional calls (validated inputs)
# ------------------------------------------------------------------------------------------------
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
    """Run the fused kernels with autograd: ``(out, lse, max_logit | None)``.

    Inputs must be validated by ``mla.functional`` (which also keeps ``window_size`` with a
    ``block_mask``/``topk_indices`` off this path). ``deterministic`` applies to the top-k backward (the
    dense and block-sparse ones never use atomics). Every op argument is passed explicitly.
    """
    scale, causal, want_max = float(softmax_scale), bool(causal), bool(return_max_logit)
    if topk_indices is not None:
        out, lse, ml = topk_attention_fwd_op(q, k, v, topk_indices, scale, causal, want_max, sinks,
                                             bool(deterministic))
    elif block_mask is not None:
        bm, bn = block_mask.BLOCK_SIZE
        partial = ((block_mask.kv_partial, block_mask.q_partial, block_mask.partial_bits)
                   if block_mask.has_partial else (None, None, None))
        out, lse, ml = block_sparse_attention_fwd_op(
            q, k, v, block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.q_num_blocks, block_mask.q_indices,
            int(bm), int(bn), scale, causal, want_max, *partial, sinks,
        )
    else:
        wl, wr = (int(w) for w in window_size)
        out, lse, ml = attention_fwd_op(q, k, v, scale, causal, want_max, wl, wr, sinks)
    return out, lse, (ml if return_max_logit else None)


def triton_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                            softmax_scale: float, causal: bool):
    """``mla::attention_varlen_fwd`` with autograd (see ``mla.functional.latent_attention_varlen``);
    inputs must be validated. Returns ``(out [total_q, Hq, Dv], lse fp32 [Hq, total_q])``."""
    return attention_varlen_fwd_op(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                   float(softmax_scale), bool(causal))


def triton_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal=False,
                  topk_indices=None, num_splits=None, kv_fp8=False, sinks=None, window_left=-1):
    """``mla::decode`` (see ``mla.functional.mla_decode`` for shapes). Inputs must be validated."""
    return decode_op(q, kv_cache, block_table, cache_seqlens, float(softmax_scale), int(head_dim_v),
                     bool(causal), topk_indices, num_splits, bool(kv_fp8), sinks, int(window_left))
