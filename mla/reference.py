"""Pure-PyTorch latent attention: the oracle for every kernel and the CPU fallback.

The math follows DESIGN §3–4 (FlashAttention-2 conventions, Dao 2023, arXiv 2307.08691):

* scores ``S = (q · kᵀ) · softmax_scale`` with ``q [B,T,Hq,Dk]``, ``k [B,S,Hkv,Dk]``; query head ``h``
  reads kv head ``h // (Hq / Hkv)`` (GQA/MQA);
* causal masking is bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + S - T``;
* a sliding window ``(left, right)`` (FlashAttention semantics, ``-1`` unbounded, bottom-right aligned)
  keeps key ``j`` for query ``i`` iff ``i + S - T - left <= j <= i + S - T + right``;
* optional attention sinks (one logit per query head, gpt-oss / DeepSeek-V4) join every row's softmax
  with no value: ``p_j = exp(s_j - lse)``, ``lse = log(exp(sink_h) + Σ_j exp(s_j))``;
* optional block mask (``mla.sparsity.BlockMask``), top-k key lists (``-1`` lanes ignored) and a dense
  element mask / additive bias restrict or shift the scores;
* ``lse = log Σ exp(S)`` in natural log; a row that sees no key returns output 0, ``lse = +inf`` and
  zero gradients (never NaN).

Queries are processed in chunks so that at most ``chunk × S`` scores per head exist at once; when
gradients are needed and there is more than one chunk, each chunk is checkpointed so the backward
pass has the same bound.

On CPU, float32 dense attention (no masks beyond causal, no max logit, lse not needed as a differentiable
output) runs on torch's fused flash-attention CPU kernel instead (``_sdpa_cpu``; the kernel behind
``scaled_dot_product_attention``, also memory-bounded): several times faster at long sequences. The
chunked path stays the oracle: float64, masks, sparsity and everything else run there.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from mla.quant import dequantize_fp8_ds_mla
from mla.sparsity import as_block_mask

__all__ = ["attention_reference", "attention_reference_varlen", "compute_dtype", "window_keep",
           "decode_reference", "decode_keep_mask", "gather_pages", "DEFAULT_CHUNK_ELEMENTS"]

#: Upper bound on the number of score elements (all heads of one chunk) materialised at once.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of ``dtype``: float64 stays float64, everything else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_rows(T: int, S: int, Hq: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return max(1, min(T, int(chunk_size)))
    return max(1, min(T, DEFAULT_CHUNK_ELEMENTS // max(1, S * Hq)))


def _allowed_chunk(
    t0: int,
    t1: int,
    T: int,
    S: int,
    Hkv: int,
    G: int,
    device: torch.device,
    causal: bool,
    window: tuple[int, int] | None,
    block_grid: torch.Tensor | None,
    block_size: tuple[int, int] | None,
    topk_indices: torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.Tensor | None:
    """Boolean keep-mask broadcastable to ``[B, Hkv, G, t1-t0, S]`` for query rows ``t0:t1`` (None: keep all)."""
    allowed = None

    def _and(a, b):
        return b if a is None else a & b

    if causal:
        rows = torch.arange(t0, t1, device=device)[:, None]
        cols = torch.arange(S, device=device)[None, :]
        allowed = _and(allowed, (cols <= rows + (S - T))[None, None, None])
    if window is not None:
        allowed = _and(allowed, window_keep(t0, t1, T, S, window, device)[None, None, None])
    if block_grid is not None:
        bm, bn = block_size
        qb = torch.arange(t0, t1, device=device) // bm
        kb = torch.arange(S, device=device) // bn
        g = block_grid[:, :, qb][:, :, :, kb]  # [Bm, Hm, c, S]
        if g.shape[1] == 1:
            g = g[:, :, None]
        else:
            g = rearrange(g, "b (hk g) c s -> b hk g c s", g=G)
        allowed = _and(allowed, g)
    if topk_indices is not None:
        idx = topk_indices[:, t0:t1].long()  # [B, c, Hkv, K]
        idx = torch.where(idx < 0, torch.full_like(idx, S), idx)
        sel = torch.zeros(*idx.shape[:3], S + 1, dtype=torch.bool, device=device)
        sel.scatter_(-1, idx, True)
        sel = rearrange(sel[..., :S], "b c hk s -> b hk 1 c s")
        allowed = _and(allowed, sel)
    if mask is not None:
        m = mask[:, :, t0:t1]  # [Bm, Hm, c, S]
        if m.shape[1] == 1:
            m = m[:, :, None]
        else:
            m = rearrange(m, "b (hk g) c s -> b hk g c s", g=G)
        allowed = _and(allowed, m)
    return allowed


def window_keep(t0: int, t1: int, T: int, S: int, window: tuple[int, int], device=None) -> torch.Tensor:
    """Bool ``[t1 - t0, S]``: query rows ``t0:t1`` see key ``j`` iff
    ``i + S - T - left <= j <= i + S - T + right`` (``-1``: that side unbounded; FlashAttention semantics)."""
    left, right = window
    d = torch.arange(S, device=device)[None, :] - torch.arange(t0, t1, device=device)[:, None] - (S - T)
    keep = torch.ones_like(d, dtype=torch.bool)
    if left >= 0:
        keep = keep & (d >= -left)
    if right >= 0:
        keep = keep & (d <= right)
    return keep


def _sdpa_cpu(q, k, v, causal: bool, scale: float):
    """Dense attention on torch's fused flash-attention CPU kernel
    (``aten._scaled_dot_product_flash_attention_for_cpu``, what ``scaled_dot_product_attention`` runs on CPU),
    or None where it does not compute exactly our function within a bounded memory.

    q ``[B,T,Hq,Dk]``, k ``[B,S,Hkv,Dk]``, v ``[B,S,Hkv,Dv]`` float32 CPU, ``T, S > 0``. Returns
    ``(out [B,T,Hq,Dv], lse [B,Hq,T] float32)``; ``lse`` is not differentiable (the kernel's backward ignores
    it), gradients of ``out`` are exact. Adaptations, each exact:

    * causal is bottom-right aligned here, top-left in the kernel: ``T == S`` uses the kernel's flag, ``T < S``
      an explicit ``[T, S]`` additive mask (when at most ``DEFAULT_CHUNK_ELEMENTS``); ``T > S`` leaves rows
      with no key (the kernel cannot give them 0 / +inf): not dispatched.
    * the kernel needs one head size: the shorter of ``Dk`` / ``Dv`` is zero-padded (zero columns of v add
      zero outputs, zero columns of q and k add zero to the scores).
    * GQA: k and v are repeated to ``Hq`` heads (when the copies total at most 4 × DEFAULT_CHUNK_ELEMENTS).
    """
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    # The kernel reads the head dim as unit-stride whatever the strides say (x[..., ::2] gave wrong values).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    mask = None
    if causal and T > S:
        return None
    if causal and T < S:
        if T * S > DEFAULT_CHUNK_ELEMENTS:
            return None
        keep = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
        mask = torch.zeros(T, S, dtype=q.dtype).masked_fill_(~keep, float("-inf"))
    D = max(Dk, Dv)
    if Hq != Hkv:
        if 2 * B * S * Hq * D > 4 * DEFAULT_CHUNK_ELEMENTS:
            return None
        k, v = k.repeat_interleave(Hq // Hkv, dim=2), v.repeat_interleave(Hq // Hkv, dim=2)
    if Dk < D:
        q, k = torch.nn.functional.pad(q, (0, D - Dk)), torch.nn.functional.pad(k, (0, D - Dk))
    if Dv < D:
        v = torch.nn.functional.pad(v, (0, D - Dv))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal and T == S,
        attn_mask=mask, scale=scale,
    )
    out = out.transpose(1, 2)
    # Dk > Dv (naive MLA): a slice of the padded output; contiguous as on every other path (callers .view it).
    return (out[..., :Dv].contiguous() if Dv < D else out), lse.detach()


def _chunk_forward(q, k, v, allowed, bias, scale: float, sinks=None):
    """One query chunk. q [B,c,Hkv,G,Dk], k [B,S,Hkv,Dk], v [B,S,Hkv,Dv] (compute dtype);
    sinks None or [Hkv, G] (compute dtype).

    Returns out [B,c,Hkv,G,Dv], lse [B,Hkv,G,c], row max [B,Hkv,G,c] of the scores (-inf where empty).
    """
    s = torch.einsum("bchgd,bshd->bhgcs", q, k) * scale
    if bias is not None:
        s = s + bias
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # The running max is only a stabiliser: detaching it keeps gradients exact and NaN-free.
    m = s.detach().amax(dim=-1, keepdim=True)
    m_stab = m if sinks is None else torch.maximum(m, sinks.detach()[None, :, :, None, None])
    m_safe = torch.where(torch.isfinite(m_stab), m_stab, torch.zeros_like(m_stab))
    e = torch.exp(s - m_safe)
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:  # the sink joins the normaliser only (it carries no value)
        denom = denom + torch.exp(sinks[None, :, :, None, None] - m_safe)
    empty = denom == 0
    denom = torch.where(empty, torch.ones_like(denom), denom)
    p = e / denom
    out = torch.einsum("bhgcs,bshe->bchge", p, v)
    lse = (m_safe + torch.log(denom)).squeeze(-1)
    lse = torch.where(empty.squeeze(-1), torch.full_like(lse, float("inf")), lse)
    return out, lse, m.squeeze(-1)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask=None,
    topk_indices: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_max_logit: bool = False,
    lse_grad: bool = True,
    fused_cpu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Latent attention in plain PyTorch, chunked over queries (or torch's fused CPU kernel where exact).

    Args:
        q: ``[B, T, Hq, Dk]`` float16/bfloat16/float32/float64.
        k: ``[B, S, Hkv, Dk]``, same dtype and device; ``Hq % Hkv == 0``.
        v: ``[B, S, Hkv, Dv]``; may be a view of ``k`` (absorbed MLA).
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff ``j <= i + S - T``).
        softmax_scale: multiplier of ``q · kᵀ``; default ``Dk ** -0.5``.
        block_mask: ``mla.sparsity.BlockMask`` for ``(T, S)`` (or a FlexAttention BlockMask, converted
            with ``BlockMask.from_flex``); inside a listed block every key is kept (unless ``causal``
            removes it, or the block is partial and its token bits do).
        topk_indices: int ``[B, T, Hkv, K]``, key positions in ``[0, S)`` or ``-1`` (ignored).
        attn_mask: bool keep-mask (True = attend) or float additive bias, broadcastable to
            ``[B, Hq, T, S]``. A float ``-inf`` entry removes the key like a False entry.
        window_size: ``(left, right)`` sliding window, ``-1`` = unbounded on that side (FlashAttention
            semantics, bottom-right aligned): query ``i`` sees key ``j`` iff
            ``i + S - T - left <= j <= i + S - T + right``; combined (AND) with every other mask.
        sinks: ``[Hq]`` attention-sink logits (float32; gradients flow to them): each row's softmax
            includes ``exp(sinks[h])`` in its denominator, with no value. ``lse`` then includes the sink
            term, and a row with no visible key gives output 0 and ``lse = sinks[h]`` (finite).
        chunk_size: query rows per chunk (default: so that ``chunk × S × Hq ≤ 2**24`` scores).
        return_max_logit: also return the per-(batch, head) maximum visible scaled score.
        lse_grad: gradients may flow through the returned ``lse`` (False when the caller discards it).
        fused_cpu: allow torch's fused flash-attention CPU kernel (``_sdpa_cpu``) for float32 CPU inputs
            without ``block_mask`` / ``topk_indices`` / ``attn_mask`` / ``chunk_size`` /
            ``return_max_logit``, when no gradient is needed or ``lse_grad`` is False (its ``lse`` has no
            gradient), outside ``torch.compile``. Same function up to float32 rounding.

    Returns:
        ``(out, lse, max_logit)``: ``out [B, T, Hq, Dv]`` in ``q.dtype``; ``lse [B, Hq, T]`` float32
        (float64 for float64 inputs), ``+inf`` for rows with no visible key (without sinks; with sinks it
        includes the sink term); ``max_logit [B, Hq]`` (of the scores; sinks excluded)
        (``-inf`` for heads that see nothing) or None. Inputs are assumed validated
        (``mla.functional.latent_attention`` does that); shapes that do not fit raise from torch.
    """
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    if block_mask is not None:
        block_mask = as_block_mask(block_mask)
    scale = Dk**-0.5 if softmax_scale is None else float(softmax_scale)
    cdt = compute_dtype(q.dtype)
    device = q.device
    stat_dtype = torch.float64 if cdt == torch.float64 else torch.float32

    window = None if tuple(window_size) == (-1, -1) else tuple(int(w) for w in window_size)
    sink_c = None if sinks is None else rearrange(sinks.to(cdt), "(hk g) -> hk g", g=G)
    if T == 0 or S == 0:
        out = q.new_zeros(B, T, Hq, Dv)
        lse = torch.full((B, Hq, T), math.inf, dtype=stat_dtype, device=device)
        ml = torch.full((B, Hq), -math.inf, dtype=stat_dtype, device=device) if return_max_logit else None
        tensors = (q, k, v) + (() if sinks is None else (sinks,))
        if sinks is not None:  # no key: the sink takes the whole row (lse = sink, output 0)
            lse = sinks.to(stat_dtype)[None, :, None].expand(B, Hq, T)
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            # Keep the graph connected so that backward yields zero gradients rather than None.
            out = out + 0 * sum(t.sum() for t in tensors).to(out.dtype)
        return out, lse, ml

    grads = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if (fused_cpu and device.type == "cpu" and q.dtype == torch.float32 and block_mask is None
            and window is None and sink_c is None
            and topk_indices is None and attn_mask is None and chunk_size is None and not return_max_logit
            and not (grads and lse_grad) and not torch.compiler.is_compiling()):
        fused = _sdpa_cpu(q, k, v, causal, scale)
        if fused is not None:
            return fused[0], fused[1], None

    block_grid = None
    block_size = None
    if block_mask is not None and not block_mask.has_partial:
        block_grid = block_mask.to_dense().to(device)
        block_size = block_mask.BLOCK_SIZE

    bool_mask = None
    bias = None
    if attn_mask is not None:
        am = attn_mask
        while am.dim() < 4:
            am = am.unsqueeze(0)
        if am.dtype == torch.bool:
            bool_mask = am.expand(am.shape[0], am.shape[1], T, S)
        else:
            bias = am.to(cdt).expand(am.shape[0], am.shape[1], T, S)
    if block_mask is not None and block_mask.has_partial:
        # Partial blocks carry token bits: use the token-level mask (a reference may materialise T x S).
        elem = block_mask.to_element_mask().to(device)
        bool_mask = elem if bool_mask is None else bool_mask & elem

    qc = rearrange(q.to(cdt), "b t (hk g) d -> b t hk g d", g=G)
    kc = k.to(cdt)
    vc = v.to(cdt)
    rows = _chunk_rows(T, S, Hq, chunk_size)
    n_chunks = math.ceil(T / rows)
    use_ckpt = n_chunks > 1 and torch.is_grad_enabled() and any(
        t.requires_grad
        for t in (q, k, v) + ((bias,) if bias is not None else ()) + ((sinks,) if sinks is not None else ())
    )

    # One chunk needs no Python loop over T: under torch.compile a dynamic T then stays symbolic
    # (the chunk count is the compile bucket).
    bounds = [(0, T)] if n_chunks == 1 else [(t0, min(T, t0 + rows)) for t0 in range(0, T, rows)]
    outs, lses, maxes = [], [], []
    for t0, t1 in bounds:
        allowed = _allowed_chunk(
            t0, t1, T, S, Hkv, G, device, causal, window, block_grid, block_size, topk_indices, bool_mask
        )
        b_chunk = None
        if bias is not None:
            b_chunk = bias[:, :, t0:t1]
            b_chunk = (
                b_chunk[:, :, None]
                if b_chunk.shape[1] == 1
                else rearrange(b_chunk, "b (hk g) c s -> b hk g c s", g=G)
            )
        if use_ckpt:
            o, lse, m = checkpoint(
                _chunk_forward, qc[:, t0:t1], kc, vc, allowed, b_chunk, scale, sink_c, use_reentrant=False
            )
        else:
            o, lse, m = _chunk_forward(qc[:, t0:t1], kc, vc, allowed, b_chunk, scale, sink_c)
        outs.append(o)
        lses.append(lse)
        if return_max_logit:
            maxes.append(m.amax(dim=-1))

    out = rearrange(torch.cat(outs, dim=1), "b t hk g e -> b t (hk g) e").to(q.dtype)
    lse = rearrange(torch.cat(lses, dim=-1), "b hk g t -> b (hk g) t").to(stat_dtype)
    max_logit = None
    if return_max_logit:
        max_logit = rearrange(torch.stack(maxes, 0).amax(0), "b hk g -> b (hk g)").to(stat_dtype).detach()
    return out, lse, max_logit


def attention_reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed variable-length attention in plain PyTorch: :func:`attention_reference` per sequence.

    Args:
        q ``[total_q, Hq, Dk]``, k ``[total_k, Hkv, Dk]``, v ``[total_k, Hkv, Dv]``; sequence ``b`` is rows
        ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v
        (int ``[B+1]``, validated by the caller). causal: bottom-right aligned per sequence.

    Returns:
        ``(out [total_q, Hq, Dv] q.dtype, lse [Hq, total_q])`` (float32, float64 for float64 inputs;
        ``+inf`` for rows without keys): FlashAttention's varlen layout. Reads the offsets on the host.
    """
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for b in range(len(bq) - 1):
        o, lse, _ = attention_reference(
            q[None, bq[b]:bq[b + 1]], k[None, bk[b]:bk[b + 1]], v[None, bk[b]:bk[b + 1]],
            causal=causal, softmax_scale=softmax_scale, lse_grad=True,
        )
        outs.append(o[0])
        lses.append(lse[0])
    Hq, Dv = q.shape[1], v.shape[2]
    if not outs:
        stat = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_zeros(0, Hq, Dv), torch.zeros(Hq, 0, dtype=stat, device=q.device)
    return torch.cat(outs, 0), torch.cat(lses, 1)


# ---------------------------------------------------------------------------------------------------
# Decode over a paged latent cache
# ---------------------------------------------------------------------------------------------------
def gather_pages(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                 S: int) -> torch.Tensor:
    """Contiguous rows of each sequence from a paged cache.

    Args:
        kv_cache: ``[num_pages, page_size, 1, row]`` (any dtype; the uint8 FP8 pool too).
        block_table: int32 ``[B, max_pages]`` page ids; entries past a sequence's pages are never read.
        cache_seqlens: int ``[B]`` tokens cached per sequence. S: rows to return per sequence.

    Returns:
        ``[B, S, row]`` in ``kv_cache``'s dtype, zeros past each sequence's length (unused slots may hold
        NaN or garbage; zeroing them makes 0-probability keys contribute exactly 0). No host sync.
    """
    page_size = kv_cache.shape[1]
    n_pages = -(-S // page_size)
    B = block_table.shape[0]
    used = torch.arange(n_pages, device=block_table.device)[None, :] < (
        (cache_seqlens.long()[:, None] + page_size - 1) // page_size
    )
    pages = torch.where(used, block_table[:, :n_pages].long(), torch.zeros((), dtype=torch.long, device=used.device))
    rows = kv_cache[pages][:, :, :, 0].reshape(B, n_pages * page_size, kv_cache.shape[3])[:, :S]
    valid = torch.arange(S, device=rows.device)[None, :] < cache_seqlens.long()[:, None]
    return torch.where(valid[..., None], rows, torch.zeros((), dtype=rows.dtype, device=rows.device))


def decode_keep_mask(cache_seqlens: torch.Tensor, S: int, Tq: int, causal: bool,
                     topk_indices: torch.Tensor | None, window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """Bool ``[B, 1, Tq, S]``: key ``s`` exists (``s < L``, ``L = cache_seqlens[b]``), is causal / inside the
    window per sequence (bottom-right: query ``j`` sits at position ``L − Tq + j``) and, with
    ``topk_indices`` int ``[B, Tq, K]``, is listed (``-1`` and out-of-range lanes ignored)."""
    L = cache_seqlens.long()[:, None, None]
    s = torch.arange(S, device=cache_seqlens.device)[None, None, :]
    keep = s < L
    j = torch.arange(Tq, device=cache_seqlens.device)[None, :, None]
    if causal:
        keep = keep & (s <= L - Tq + j)
    left, right = window_size
    if left >= 0:
        keep = keep & (s >= L - Tq + j - left)
    if right >= 0:
        keep = keep & (s <= L - Tq + j + right)
    if topk_indices is not None:
        idx = topk_indices.long()
        idx = torch.where((idx < 0) | (idx >= S), S, idx)
        sel = torch.zeros(*idx.shape[:2], S + 1, dtype=torch.bool, device=idx.device)
        sel.scatter_(-1, idx, True)
        keep = keep & sel[..., :S]
    return keep[:, None]


def decode_reference(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    head_dim_v: int,
    causal: bool = False,
    topk_indices: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
    kv_fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mla.functional.mla_decode`` in plain PyTorch (inputs validated there; shapes as documented there).

    Gathers every position the block table addresses (``max_pages · page_size``, masked past each length:
    a shape, not a value, so no host sync under ``torch.compile`` / CUDA graphs), dequantizes an FP8
    ``fp8_ds_mla`` pool exactly (``code · scale`` in fp32, then ``q``'s dtype, as the kernel computes it in
    registers) and runs :func:`attention_reference` with :func:`decode_keep_mask`. Returns
    ``(out [B, Tq, H, head_dim_v] q.dtype, lse [B, H, Tq])``.
    """
    S = block_table.shape[1] * kv_cache.shape[1]
    Dk, Dv = q.shape[-1], int(head_dim_v)
    rows = gather_pages(kv_cache, block_table, cache_seqlens, S)
    if kv_fp8:
        rows = dequantize_fp8_ds_mla(rows, Dv, Dk - Dv, torch.float32).to(q.dtype)
    k = rows[:, :, None, :]
    keep = decode_keep_mask(cache_seqlens, S, q.shape[1], causal, topk_indices, window_size)
    out, lse, _ = attention_reference(q, k, k[..., :Dv], softmax_scale=softmax_scale, attn_mask=keep, sinks=sinks)
    return out, lse
