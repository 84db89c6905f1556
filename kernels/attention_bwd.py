"""Dense fused attention backward: ``delta`` preprocessing, a dK/dV kernel and a dQ kernel.

Same layout, packing and head-dim plan as :mod:`kernels.attention_fwd` (read its docstring):

* ``kernels._jit.bwd_preprocess``: ``delta[b, h, t] = sum_d dO * O`` in fp32 (:func:`bwd_delta`).
* ``_attn_bwd_dkdv_kernel``: one program per (key block, batch, kv head, split). K/V tiles of the
  block stay resident; the program walks the packed ``[T*G]`` query rows (all heads of the group,
  so GQA needs no atomics) and accumulates ``dV = Pᵀ·dO`` and ``dK = dSᵀ·Q``. All products are
  formed transposed (``[BLOCK_N, BLOCK_M]``) so the key block is the M side of every dot.
  With ``NSPLIT > 1`` split ``s`` owns dV columns ``[s*BV, +BV)`` and dK columns ``[s*BK, +BK)``
  (the last split also the dK tail); every split recomputes P and dP. The absorbed shape needs
  ``NSPLIT = 4`` (sm80) or 8 (sm90: 128-key blocks, so that 8 warps do not replicate the score dots)
  to stay spill-free (a 2-way split would hold 2 x 256 + 64 fp32 accumulator columns), so its
  scores are computed 4 or 8 times: 2.6x or 4.7x the minimal tensor-core work.
* ``_attn_bwd_dq_kernel``: one program per packed row block (and split), walking the same key
  blocks as the forward (:func:`kernels._jit.dense_key_range`), ``dQ = dS·K``. All three compute their
  scores with the one helper :func:`kernels._jit.scores`.
* Both take the forward's constexpr ``SPARSE`` switch (:mod:`kernels.block_sparse` launches it): dQ
  walks the ``kv_indices`` sub-tiles like the forward, dK/dV the row tiles of the query blocks listed
  in the transposed ``q_indices`` (causally masked prefix first), per head of the group when the mask
  has per-head lists (:func:`kernels._jit.sparse_q_tile`, :func:`kernels._jit.sparse_masked_q_tiles`).

``TILE.RESIDENT`` / ``TILE.STREAM`` (per config) choose whether the fixed side's tiles (dkdv: K/V, dq: q/dO)
are loaded once or re-read every step; see :func:`_dkdv_block` for why re-reads need ``hide``.

Each output element is written by exactly one program: no atomics, bitwise deterministic.
When ``v`` is a prefix view of ``k`` the shared tile is loaded once and feeds both the score and
the ``dP`` contraction; ``dk`` still holds only the score-path gradient and ``dv`` the value path.
Rows without visible keys have ``lse = +inf``, so ``P = exp2(s - lse) = 0`` and their gradients vanish.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels._common import (
    LOG2E,
    BwdConfig,
    TileConfig,
    bwd_outputs,
    compiled_launch,
    device_arch,
    dot_precision,
    dtype_name,
    head_class,
    is_prefix_alias,
    launch,
    specs_getattr,
    tile_constexprs,
    varlen_plan,
)
from kernels._jit import (
    batch_offsets,
    bwd_preprocess,
    causal_q_range,
    fixed_tiles,
    key_step,
    key_walk,
    mask_scores,
    own_tiles,
    packed_side,
    row_program,
    row_tile,
    scores,
    sparse_kv_keep,
    sparse_masked_q_tiles,
    sparse_q_keep,
    sparse_q_tile,
    store_tile,
    varlen_clip,
    window_bounds,
    window_q_range,
)
from kernels._tables import PRE_BLOCK_T, PRE_WARPS, bwd_configs, pre_block_d
from kernels._tables import bwd_interp_config as interp_config
from kernels.attention_fwd import window_sink_kwargs

__all__ = ["BwdConfig", "attention_bwd", "attention_bwd_varlen", "bwd_configs", "bwd_delta", "interp_config",
           "sink_grad"]

# Compile-spec names that moved to kernels._specs, still readable here.
__getattr__ = specs_getattr(__name__, "bwd_spec", "preprocess_spec", compile_specs="dense_bwd_specs")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

_LOG2E = tl.constexpr(LOG2E)
_LANES = tl.constexpr(64)  # q_indices lanes read per step when counting masked row tiles


@triton.jit
def _step_rows(m_start, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Packed rows ``m_start + [0, BLOCK_M)`` of a dK/dV step as ``(tok0, grp0, dtok, dgrp)``: token
    ``tok0 + dtok``, head ``grp0 + dgrp``, with per-step scalars ``tok0``/``grp0`` and step-invariant
    ``dtok``/``dgrp`` when ``G > 1`` divides ``BLOCK_M`` or ``BLOCK_M`` divides ``G`` (every step then starts at a
    multiple of ``G``, resp. of ``BLOCK_M``: dense row blocks and the sub-tiles of mask query blocks of
    ``MASK_BM * G`` rows). The compiler hoists the invariant row offsets out of the row loop, so a step
    adds one scalar per side instead of recomputing ``rows // G``, ``rows % G`` and two 64-bit products
    per row (about a sixth of the d128 loop's instructions). ``G == 1`` keeps the per-step rows: one
    product per row, and no offsets held across the loop (192/128 is at the register limit)."""
    i = tl.arange(0, BLOCK_M)
    if G > 1 and BLOCK_M % G == 0:
        tok0, grp0, dtok, dgrp = m_start // G, m_start * 0, i // G, i % G
    elif G % BLOCK_M == 0:
        tok0, grp0, dtok, dgrp = m_start // G, m_start % G, i * 0, i
    else:
        tok0, grp0, dtok, dgrp = m_start * 0, m_start * 0, (m_start + i) // G, (m_start + i) % G
    return tok0, grp0, dtok, dgrp


@triton.jit
def _step_side(base, strides, tok0, grp0, dtok, dgrp, row_ok):
    """The side (``kernels._jit`` doc) of :func:`_step_rows`'s packed rows of a ``(batch, token, head,
    dim)``-strided tensor: the per-step scalar folded into ``base``, the row offsets step-invariant."""
    base = base + tok0.to(tl.int64) * strides[1] + grp0.to(tl.int64) * strides[2]
    return base, dtok.to(tl.int64) * strides[1] + dgrp.to(tl.int64) * strides[2], row_ok, strides[3]


@triton.jit
def _dkdv_block(
    accs, kv_own, keys, k, v, m_start, row_end, qdo, stats, T, S, qk_scale, split, hide,
    G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    keep_t=None, HAS_KEEP: tl.constexpr = False,
):
    """Accumulate one packed query-row block into the key block's dK/dV (transposed products).

    ``accs = (dk_acc, dk_tail, dv_acc)``, ``kv_own = (k_own, k_tail, v_own)`` (the key block's resident
    tiles); ``k``, ``v``: the key block's sides (``kernels._jit`` doc); ``qdo = (q_base, q_strides, do_base,
    do_strides)``; ``stats = (LSE_BH, DELTA_BH, st_h)``: the group's statistics, head stride ``st_h``.
    Rows at or past ``row_end`` (``T*G``, or the end of a block-sparse mask query block) read
    ``lse = +inf`` and contribute nothing.

    ``hide`` is 0, but opaque to the compiler. Added to the base of the loop-invariant K/V
    re-loads (own tiles without ``TILE.RESIDENT``, the other splits' pieces with ``TILE.STREAM``) it stops
    Triton's LICM from hoisting them: they stream through the pipeline instead of staying live
    in registers for the whole loop.
    """
    dk_acc, dk_tail, dv_acc = accs
    k_own, k_tail, v_own = kv_own
    BT: tl.constexpr = TILE.BT
    if not TILE.RESIDENT:
        # Re-read the key block's tiles (cache hits) instead of holding them for the whole loop.
        k_own, k_tail, v_own = fixed_tiles(k, v, k_tail, split, HEAD_DK, HEAD_DV, TILE, V_IS_K, hide)
    tok0, grp0, dtok, dgrp = _step_rows(m_start, G, TILE.BLOCK_M)
    tok = tok0 + dtok
    row_ok = m_start + tl.arange(0, TILE.BLOCK_M) < row_end
    q_base, q_strides, do_base, do_strides = qdo
    q = _step_side(q_base, q_strides, tok0, grp0, dtok, dgrp, row_ok)
    do = _step_side(do_base, do_strides, tok0, grp0, dtok, dgrp, row_ok)
    q_own, do_own = own_tiles(q, do, split, HEAD_DK, HEAD_DV, TILE, True, False)
    st, dpt, q_tail = scores(k_own, q_own, k_tail, k, q, v_own, do_own, v, do, split, hide,
                             HEAD_DK, HEAD_DV, TILE, True, True, V_IS_K, True, DOT)
    # Padding rows read lse = +inf: P = 0 there.
    LSE_BH, DELTA_BH, st_h = stats
    st0 = grp0.to(tl.int64) * st_h + tok0
    st_off = dgrp.to(tl.int64) * st_h + dtok
    lse = tl.load(LSE_BH + st0 + st_off, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA_BH + st0 + st_off, mask=row_ok, other=0.0)
    st = st * qk_scale
    if MASKED:
        if CAUSAL:
            st = tl.where(keys[:, None] <= tok[None, :] + (S - T), st, float("-inf"))
        if HAS_WINDOW:
            w_lo, w_hi = window_bounds(tok, T, S, window)
            st = tl.where((keys[:, None] >= w_lo[None, :]) & (keys[:, None] <= w_hi[None, :]), st, float("-inf"))
        if HAS_KEEP:  # partial block of a FlexAttention mask: per-token bits, [keys, rows]
            st = tl.where(keep_t, st, float("-inf"))
    pt = tl.exp2(st - lse[None, :])
    dv_acc = tl.dot(pt.to(do_own.dtype), do_own, dv_acc, input_precision=DOT)
    dst = (pt * (dpt - delta[None, :])).to(q_own.dtype)
    dk_acc = tl.dot(dst, q_own, dk_acc, input_precision=DOT)
    if BT > 0:
        dk_tail = tl.dot(dst, q_tail, dk_tail, input_precision=DOT)
    return dk_acc, dk_tail, dv_acc


@triton.jit
def _dkdv_rows(
    dk_acc, dk_tail, dv_acc, kv_own, lo, hi, keys, k, v, qdo, stats, T, S, qk_scale, split, opaque_zero, walk,
    partial, G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
    V_IS_K: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    SPARSE: tl.constexpr, MASKED: tl.constexpr, HAS_PARTIAL: tl.constexpr,
):
    """Row steps ``[lo, hi)`` of a key tile, all masked or none (``MASKED``): dense row blocks
    ``m * BLOCK_M``, or (``SPARSE``) the row sub-tiles of a ``q_indices`` row, ``walk = (idx_base, sil,
    NSUB_M, rows_per_block, MASK_BM, MASK_BN, kb, part_off)``, with the partial-block bits of ``partial``."""
    for j in range(lo, hi):
        keep_t = None
        if SPARSE:
            idx_base, sil, NSUB_M, rows_per_block, MASK_BM, MASK_BN, kb, part_off = walk
            m_start, row_end = sparse_q_tile(idx_base, sil, j, NSUB_M, rows_per_block, T * G, TILE.BLOCK_M)
            if HAS_PARTIAL:
                keep_t = sparse_q_keep(partial, idx_base, part_off, sil, j, NSUB_M, m_start, keys - kb * MASK_BN,
                                        MASK_BM, MASK_BN, G, TILE.BLOCK_M)
        else:
            m_start = j * TILE.BLOCK_M
            row_end = T * G
        dk_acc, dk_tail, dv_acc = _dkdv_block(
            (dk_acc, dk_tail, dv_acc), kv_own, keys, k, v, m_start, row_end, qdo, stats, T, S, qk_scale, split,
            j * opaque_zero, G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, MASKED, DOT, window, HAS_WINDOW,
            keep_t, HAS_PARTIAL,
        )
    return dk_acc, dk_tail, dv_acc


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, q_strides, k_strides, v_strides, do_strides, dk_strides, dv_strides,
    T, S, Hkv, qk_scale, sm_scale, opaque_zero, mask, mask_geom,
    G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    SPARSE: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr,
    partial=None, HAS_PARTIAL: tl.constexpr = False,
    varlen=None, IS_VARLEN: tl.constexpr = False,
    window=(-1, -1), HAS_WINDOW: tl.constexpr = False,
):
    """Grid ``(n_n * B*Hkv, NSPLIT)``: dK/dV of one key tile of one kv head (arguments as in
    ``kernels.attention_fwd._attn_fwd_kernel``; ``sm_scale`` scales dK).

    ``HAS_WINDOW`` (dense only): sliding window ``window = (WIN_L, WIN_R)``; only the row blocks of
    :func:`window_q_range` are walked, all masked.

    Dense: ``n_n = cdiv(S, BLOCK_N)``, every packed query row of the group is walked (``mask`` unused,
    ``KV_REP = 1``). Block-sparse (``mask = (QN, QI, snb, snh, snk, sib, sih, sik, sil)``, ``mask_geom =
    (MASK_BM, MASK_BN, KV_REP)``): ``n_n = cdiv(S, MASK_BN) * NSUB_N`` key tiles, each inside one mask key
    block ``kb``; for each of the ``KV_REP`` head groups ``hg`` of the kv head (one after the other, no
    atomics) the rows of the query blocks listed in ``QI[b, hg, kb, :QN[b, hg, kb]]`` are walked in ``BLOCK_M``
    steps.
    ``HAS_PARTIAL``: ``partial = (PART, BITS)`` (``PART`` laid out like ``QI``) as in the forward; every row
    tile then runs masked. ``IS_VARLEN`` (dense only): packed sequences as in the forward kernel; key
    tiles past their sequence's end visit nothing and store nothing.
    """
    BLOCK_N: tl.constexpr = TILE.BLOCK_N
    NSPLIT: tl.constexpr = TILE.NSPLIT
    BK: tl.constexpr = TILE.BK
    BT: tl.constexpr = TILE.BT
    BV: tl.constexpr = TILE.BV
    if SPARSE:
        QN, QI, snb, snh, snk, sib, sih, sik, sil = mask
        MASK_BM, MASK_BN, KV_REP = mask_geom
        # Sub-tiles per mask block (mask blocks need not be multiples of the kernel tiles).
        NSUB_M = tl.cdiv(MASK_BM * G, TILE.BLOCK_M)
        NSUB_N = tl.cdiv(MASK_BN, BLOCK_N)
        n_n = tl.cdiv(S, MASK_BN) * NSUB_N
    else:
        KV_REP = 1
        n_n = tl.cdiv(S, BLOCK_N)  # axis 0 flattened (batch*kv head, key block), as in the forward
    pid_n = tl.program_id(0) % n_n
    pid_bh = tl.program_id(0) // n_n
    if NSPLIT > 1:
        split = tl.program_id(1)
    else:
        split = 0
    b = (pid_bh // Hkv).to(tl.int64)
    hkv = (pid_bh % Hkv).to(tl.int64)
    Hq = Hkv * KV_REP * G
    # Batch offsets; statistics at st_bh + head * st_h + token.
    q_b, k_b, v_b, do_b, st_bh, st_h, T, S = batch_offsets(b, T, S, Hq, q_strides, k_strides, v_strides,
                                                           do_strides, varlen, IS_VARLEN)
    MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
    MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
    MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV

    if SPARSE:
        kb = pid_n // NSUB_N
        n_start = kb * MASK_BN + (pid_n % NSUB_N) * BLOCK_N
        kend = tl.minimum(kb * MASK_BN + MASK_BN, S)
    else:
        n_start = pid_n * BLOCK_N
        kend = S
    keys = n_start + tl.arange(0, BLOCK_N)
    key_ok = keys < kend
    k = (K + k_b + hkv * k_strides[2], keys.to(tl.int64) * k_strides[1], key_ok, k_strides[3])
    v = (V + v_b + hkv * v_strides[2], keys.to(tl.int64) * v_strides[1], key_ok, v_strides[3])
    k_own = tl.zeros([BLOCK_N, BK], dtype=K.dtype.element_ty)
    k_tail = tl.zeros([BLOCK_N, BT if BT > 0 else 16], dtype=K.dtype.element_ty)
    v_own = tl.zeros([BLOCK_N, BV], dtype=V.dtype.element_ty)
    if TILE.RESIDENT:
        k_own, k_tail, v_own = fixed_tiles(k, v, k_tail, split, HEAD_DK, HEAD_DV, TILE, V_IS_K)
    kv_own = (k_own, k_tail, v_own)

    dk_acc = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
    dk_tail = tl.zeros([BLOCK_N, BT if BT > 0 else 16], dtype=tl.float32)
    dv_acc = tl.zeros([BLOCK_N, BV], dtype=tl.float32)

    if SPARSE:
        rows_per_block = MASK_BM * G
        # First packed row whose token sees the tile's last valid key (bottom-right causal).
        first_full_row = (tl.minimum(n_start + BLOCK_N, kend) - 1 - S + T) * G
        for r in range(0, KV_REP):
            hg = hkv * KV_REP + r
            qdo = (Q + q_b + hg * G * q_strides[2], q_strides, DO + do_b + hg * G * do_strides[2], do_strides)
            stats = (LSE + st_bh + hg * G * st_h, DELTA + st_bh + hg * G * st_h, st_h)
            n_blk = tl.load(QN + b * snb + hg * snh + kb.to(tl.int64) * snk)
            part_off = b * sib + hg * sih + kb.to(tl.int64) * sik
            walk = (QI + part_off, sil, NSUB_M, rows_per_block, MASK_BM, MASK_BN, kb, part_off)
            n_tiles = n_blk * NSUB_M
            if NSPLIT > 1 or HAS_PARTIAL:  # split bodies: one masked loop; partial blocks: bits everywhere
                n_masked = n_tiles
            elif CAUSAL:
                n_masked = sparse_masked_q_tiles(QI + part_off, sil, n_blk, first_full_row, rows_per_block,
                                                  NSUB_M, TILE.BLOCK_M, _LANES)
            else:
                n_masked = 0
            dk_acc, dk_tail, dv_acc = _dkdv_rows(
                dk_acc, dk_tail, dv_acc, kv_own, 0, n_masked, keys, k, v, qdo, stats, T, S, qk_scale, split,
                opaque_zero, walk, partial, G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT, window, False,
                True, True, HAS_PARTIAL)
            if NSPLIT == 1:  # row tiles that see the whole key tile skip the mask
                dk_acc, dk_tail, dv_acc = _dkdv_rows(
                    dk_acc, dk_tail, dv_acc, kv_own, n_masked, n_tiles, keys, k, v, qdo, stats, T, S, qk_scale,
                    split, opaque_zero, walk, partial, G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT, window,
                    False, True, False, False)
    else:
        qdo = (Q + q_b + hkv * G * q_strides[2], q_strides, DO + do_b + hkv * G * do_strides[2], do_strides)
        stats = (LSE + st_bh + hkv * G * st_h, DELTA + st_bh + hkv * G * st_h, st_h)
        if HAS_WINDOW:  # the row blocks whose window reaches this key block, all masked
            m_lo, m_end = window_q_range(n_start, T, S, G, TILE.BLOCK_M, BLOCK_N, window)
            m_full = m_end
        else:
            m_lo, m_full, m_end = causal_q_range(n_start, T, S, G, TILE.BLOCK_M, BLOCK_N, CAUSAL)
        if IS_VARLEN:
            m_full, m_end = varlen_clip(m_full, m_end, n_start < S)
            m_lo = tl.minimum(m_lo, m_full)
        if NSPLIT > 1:  # large (split) bodies: one masked loop halves code size and compile time
            m_full = m_end
        dk_acc, dk_tail, dv_acc = _dkdv_rows(
            dk_acc, dk_tail, dv_acc, kv_own, m_lo, m_full, keys, k, v, qdo, stats, T, S, qk_scale, split,
            opaque_zero, None, partial, G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT, window, HAS_WINDOW,
            False, True, False)
        if NSPLIT == 1:  # row blocks that see the whole key block skip the mask
            dk_acc, dk_tail, dv_acc = _dkdv_rows(
                dk_acc, dk_tail, dv_acc, kv_own, m_full, m_end, keys, k, v, qdo, stats, T, S, qk_scale, split,
                opaque_zero, None, partial, G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT, window, False,
                False, False, False)

    # Output offsets computed here, not held across the loop (register pressure).
    if IS_VARLEN:
        k0 = tl.load(varlen[1] + b).to(tl.int64)
        dk_b, dv_b = k0 * dk_strides[1], k0 * dv_strides[1]
    else:
        dk_b, dv_b = b * dk_strides[0], b * dv_strides[0]
    dk = (DK + dk_b + hkv * dk_strides[2], keys.to(tl.int64) * dk_strides[1], key_ok, dk_strides[3])
    store_tile(dk, split * BK, HEAD_DK, BK, MASK_K, (dk_acc * sm_scale).to(DK.dtype.element_ty))
    if BT > 0:
        if split == NSPLIT - 1:
            store_tile(dk, NSPLIT * BK, HEAD_DK, BT, MASK_T, (dk_tail * sm_scale).to(DK.dtype.element_ty))
    dv = (DV + dv_b + hkv * dv_strides[2], keys.to(tl.int64) * dv_strides[1], key_ok, dv_strides[3])
    store_tile(dv, split * BV, HEAD_DV, BV, MASK_V, dv_acc.to(DV.dtype.element_ty))


#: The dK/dV kernel under its public name: :mod:`kernels.block_sparse` launches it with ``SPARSE``.
attn_bwd_dkdv_kernel = _attn_bwd_dkdv_kernel


@triton.jit
def _dq_block(
    dq_acc, dq_tail, q_tiles, stats, q, do, tok, start_n, kend, kv, T, S, qk_scale, split, hide,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    keep=None, HAS_KEEP: tl.constexpr = False,
):
    """Accumulate one key block into a packed row block's dQ; keys at or past ``kend`` are masked out
    when ``MASKED``. ``q_tiles = (q_own, q_tail, do_own)`` (resident tiles), ``stats = (lse, delta)`` of
    the rows, ``q``/``do`` the row sides, ``kv = (k_base, k_strides, v_base, v_strides)``. ``hide``: see
    :func:`_dkdv_block`, here for the q/dO re-loads."""
    q_own, q_tail, do_own = q_tiles
    k_base, k_strides, v_base, v_strides = kv
    BT: tl.constexpr = TILE.BT
    if not TILE.RESIDENT:
        # Re-read the row block's q/dO tiles (cache hits) instead of holding them for the whole loop.
        q_own, q_tail, do_own = fixed_tiles(q, do, q_tail, split, HEAD_DK, HEAD_DV, TILE, False, hide)
    keys = start_n + tl.arange(0, TILE.BLOCK_N)
    key_ok = keys < kend
    k = (k_base, keys.to(tl.int64) * k_strides[1], key_ok, k_strides[3])
    v = (v_base, keys.to(tl.int64) * v_strides[1], key_ok, v_strides[3])
    k_own, v_own = own_tiles(k, v, split, HEAD_DK, HEAD_DV, TILE, MASKED, V_IS_K)
    s, dp, k_tail = scores(q_own, k_own, q_tail, q, k, do_own, v_own, do, v, split, hide,
                           HEAD_DK, HEAD_DV, TILE, MASKED, False, V_IS_K, True, DOT)
    s = s * qk_scale
    if MASKED:
        s = mask_scores(s, keys, key_ok, tok, T, S, CAUSAL, window, HAS_WINDOW, keep, HAS_KEEP)
    lse, delta = stats
    p = tl.exp2(s - lse[:, None])
    ds = (p * (dp - delta[:, None])).to(k_own.dtype)
    dq_acc = tl.dot(ds, k_own, dq_acc, input_precision=DOT)
    if BT > 0:
        dq_tail = tl.dot(ds, k_tail, dq_tail, input_precision=DOT)
    return dq_acc, dq_tail


@triton.jit
def _dq_blocks(
    dq_acc, dq_tail, lo, hi, q_tiles, stats, q, do, tok, kv, T, S, qk_scale, split, opaque_zero, walk, partial,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    TILE: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    SPARSE: tl.constexpr, MASKED: tl.constexpr, HAS_PARTIAL: tl.constexpr,
):
    """Key steps ``[lo, hi)`` of a row tile into its dQ, all masked or none (``MASKED``); the walk as in
    ``kernels.attention_fwd._fwd_blocks`` (:func:`kernels._jit.key_step`)."""
    for j in range(lo, hi):
        start_n, kend = key_step(j, walk, S, TILE.BLOCK_N, SPARSE)
        keep = None
        if HAS_PARTIAL:
            keep = sparse_kv_keep(partial, walk, j, tok, TILE.BLOCK_N)
        dq_acc, dq_tail = _dq_block(
            dq_acc, dq_tail, q_tiles, stats, q, do, tok, start_n, kend, kv, T, S, qk_scale, split, j * opaque_zero,
            HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, MASKED, DOT, window, HAS_WINDOW, keep, HAS_PARTIAL,
        )
    return dq_acc, dq_tail


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, q_strides, k_strides, v_strides, do_strides, dq_strides,
    T, S, Hkv, qk_scale, sm_scale, opaque_zero, mask, mask_geom,
    G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    SPARSE: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr,
    partial=None, HAS_PARTIAL: tl.constexpr = False,
    varlen=None, IS_VARLEN: tl.constexpr = False,
    window=(-1, -1), HAS_WINDOW: tl.constexpr = False,
):
    """Grid ``(n_m * B*Hkv*KV_REP, NSPLIT)``: dQ of one packed row tile of one head group; row
    tiles and key walk exactly as in the forward kernel (``kernels.attention_fwd._attn_fwd_kernel``)."""
    BLOCK_M: tl.constexpr = TILE.BLOCK_M
    NSPLIT: tl.constexpr = TILE.NSPLIT
    BK: tl.constexpr = TILE.BK
    BT: tl.constexpr = TILE.BT
    BV: tl.constexpr = TILE.BV
    pid_m, split, b, hg, hkv, n_hg, NSUB_M, NSUB_N = row_program(T, G, Hkv, mask_geom, TILE, SPARSE)
    # Batch offsets; statistics at st_bh + head * st_h + token (varlen: as in the forward).
    q_b, k_b, v_b, do_b, st_bh, st_h, T, S = batch_offsets(b, T, S, n_hg * G, q_strides, k_strides, v_strides,
                                                           do_strides, varlen, IS_VARLEN)
    MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
    MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
    qb, m_start, tok, grp, row_ok = row_tile(pid_m, T, G, mask_geom, NSUB_M, BLOCK_M, SPARSE)
    q = packed_side(Q + q_b + hg * G * q_strides[2], q_strides, tok, grp, row_ok)
    do = packed_side(DO + do_b + hg * G * do_strides[2], do_strides, tok, grp, row_ok)
    kv = (K + k_b + hkv * k_strides[2], k_strides, V + v_b + hkv * v_strides[2], v_strides)
    q_own = tl.zeros([BLOCK_M, BK], dtype=Q.dtype.element_ty)
    q_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=Q.dtype.element_ty)
    do_own = tl.zeros([BLOCK_M, BV], dtype=DO.dtype.element_ty)
    if TILE.RESIDENT:
        q_own, q_tail, do_own = fixed_tiles(q, do, q_tail, split, HEAD_DK, HEAD_DV, TILE, False)
    q_tiles = (q_own, q_tail, do_own)
    head = st_bh + (hg * G + grp.to(tl.int64)) * st_h + tok
    # lse = +inf (no visible key) makes P = 0 on the whole row.
    lse = tl.load(LSE + head, mask=row_ok, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + head, mask=row_ok, other=0.0)
    stats = (lse, delta)

    dq_acc = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
    dq_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=tl.float32)
    # The forward's key walk (kernels.attention_fwd._attn_fwd_kernel).
    walk, n_full, n_lo, n_end = key_walk(mask, mask_geom, b, hg, qb, m_start, T, S, G, NSUB_N, TILE, CAUSAL, window,
                                         HAS_WINDOW, HAS_PARTIAL, IS_VARLEN, SPARSE, _LANES)
    if NSPLIT == 1 and not HAS_WINDOW:
        dq_acc, dq_tail = _dq_blocks(dq_acc, dq_tail, 0, n_full, q_tiles, stats, q, do, tok, kv, T, S, qk_scale,
                                     split, opaque_zero, walk, partial, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT,
                                     window, False, SPARSE, False, False)
    dq_acc, dq_tail = _dq_blocks(dq_acc, dq_tail, n_lo, n_end, q_tiles, stats, q, do, tok, kv, T, S, qk_scale,
                                 split, opaque_zero, walk, partial, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT,
                                 window, HAS_WINDOW, SPARSE, True, HAS_PARTIAL)

    if IS_VARLEN:  # computed here, not held across the loop (register pressure)
        dq_b = tl.load(varlen[0] + b).to(tl.int64) * dq_strides[1]
    else:
        dq_b = b * dq_strides[0]
    dq = packed_side(DQ + dq_b + hg * G * dq_strides[2], dq_strides, tok, grp, row_ok)
    store_tile(dq, split * BK, HEAD_DK, BK, MASK_K, (dq_acc * sm_scale).to(DQ.dtype.element_ty))
    if BT > 0:
        if split == NSPLIT - 1:
            store_tile(dq, NSPLIT * BK, HEAD_DK, BT, MASK_T, (dq_tail * sm_scale).to(DQ.dtype.element_ty))


#: The dQ kernel under its public name: :mod:`kernels.block_sparse` launches it with ``SPARSE``.
attn_bwd_dq_kernel = _attn_bwd_dq_kernel


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def attention_bwd(do, q, k, v, out, lse, softmax_scale: float, causal: bool, *,
                  dlse=None, dq=None, dk=None, dv=None, delta=None,
                  dkdv_config: TileConfig | None = None, dq_config: TileConfig | None = None,
                  allow_tf32: bool | None = None, window_size: tuple[int, int] | None = None, sinks=None):
    """Fused attention backward.

    Args:
        do: ``[B, T, Hq, Dv]`` upstream gradient; q, k, v, out: as given to / returned by
            :func:`kernels.attention_fwd.attention_fwd` (same dtype and device, any strides);
            lse: fp32 ``[B, Hq, T]`` from the forward.
        softmax_scale, causal: as in the forward.
        dlse: optional fp32 ``[B, Hq, T]`` gradient of ``lse`` (for losses that use it); it enters
            as ``delta - dlse`` because ``d lse / dS = P``.
        dq, dk, dv: optional preallocated outputs (shapes of q, k, v; q.dtype; any strides), for
            tests that poison them with NaN. delta: optional fp32 ``[B, Hq, T]`` scratch.
        dkdv_config, dq_config: force tile configurations (tests/benchmarks); default: a pinned or
            deterministic choice (:mod:`kernels.tuning`), else autotune on GPU; a single small
            config under the interpreter.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32`` (:func:`kernels._common.dot_precision`).
        window_size, sinks: as in the forward. The kernels need no sink term (``lse`` includes it, so
            ``P = exp(S - lse)`` already excludes the sink's share); the sink gradient is returned.

    Returns:
        ``(dq like q, dk like k, dv like v)`` in the input dtype, and with ``sinks`` a fourth entry
        ``dsinks`` fp32 ``[Hq]``: ``−Σ_{b,t} P_sink · (delta − dlse)`` with ``P_sink = exp(sink − lse)``,
        summed by torch in a fixed order (deterministic). When ``v`` is a prefix view of
        ``k`` the kernel loads the shared tile once, but ``dk`` holds only the score-path
        gradient and ``dv`` only the value-path gradient (autograd sums them through the view).

    Raises:
        ValueError: a pinned config is not a candidate.
    """
    B, T, Hq = q.shape[:3]
    dq, dk, dv, done = bwd_outputs(q, k, v, dq, dk, dv)
    if done and sinks is None:
        return dq, dk, dv
    if done:  # no kernel: no key (P_sink = 1, delta = 0) or no query; only dlse reaches the sinks
        ds = torch.zeros(Hq, dtype=torch.float32, device=q.device)
        if dlse is not None and k.shape[1] == 0:
            ds = dlse.float().sum((0, 2))
        return dq, dk, dv, ds
    v_is_k = is_prefix_alias(k, v)
    lse = lse.contiguous()  # offsets below assume [B, Hq, T] contiguous
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device) if delta is None else delta
    compiled = compiled_launch(q)
    if compiled:
        dkdv_config, dq_config = _pinned_configs(q, v, dkdv_config, dq_config, v_is_k)
    _launch_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, softmax_scale, causal, v_is_k, compiled,
                dkdv_config, dq_config, dlse, dot_precision(q.dtype, allow_tf32),
                window_size=window_size, sinks=sinks)
    if sinks is None:
        return dq, dk, dv
    return dq, dk, dv, sink_grad(sinks, lse, delta)


def sink_grad(sinks, lse, delta):
    """``d sinks [Hq] = −Σ_{b,t} exp(sink − lse) · delta`` (``delta = rowsum(dO·O) − dlse``, fp32 ``[B, Hq, T]``;
    ``lse`` includes the sink), reduced by torch in a fixed order: deterministic."""
    return -((sinks.float()[None, :, None] - lse).exp() * delta).sum((0, 2))


def _pinned_configs(q, v, dkdv_config, dq_config, v_is_k: bool):
    """The given configs, else a pinned or deterministic choice (:mod:`kernels.tuning`; None: autotune)."""
    Dk, Dv = q.shape[-1], v.shape[-1]
    arch, dtype, cls = device_arch(q.device), dtype_name(q.dtype), head_class(Dk, Dv)
    if dkdv_config is None:
        dkdv_config = tuning.choose("attention_bwd_dkdv", cls, bwd_configs("dkdv", arch, Dk, Dv, dtype, v_is_k))
    if dq_config is None:
        dq_config = tuning.choose("attention_bwd_dq", cls, bwd_configs("dq", arch, Dk, Dv, dtype, v_is_k))
    return dkdv_config, dq_config


def attention_bwd_varlen(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, causal: bool, *, dlse=None, dq=None, dk=None, dv=None,
                         dkdv_config: TileConfig | None = None, dq_config: TileConfig | None = None,
                         allow_tf32: bool | None = None):
    """Fused attention backward over packed variable-length sequences (deterministic: no atomics).

    Args:
        do, out: ``[total_q, Hq, Dv]``; q, k, v, cu_seqlens_*, max_seqlen_*: as given to
            :func:`kernels.attention_fwd.attention_fwd_varlen`; lse: its fp32 ``[Hq, total_q]``.
        dlse: optional fp32 ``[Hq, total_q]`` gradient of ``lse``. dq, dk, dv: optional outputs (shapes
            of q, k, v). dkdv_config, dq_config, allow_tf32: as :func:`attention_bwd`.

    Returns:
        ``(dq, dk, dv)`` like q, k, v. Keys of a sequence whose queries are all empty get zero dk/dv.
    """
    dq, dk, dv, done = bwd_outputs(q[None], k[None], v[None], None if dq is None else dq[None],
                                   None if dk is None else dk[None], None if dv is None else dv[None])
    dq, dk, dv = dq[0], dk[0], dv[0]
    B = cu_seqlens_q.numel() - 1
    if done or B <= 0 or max_seqlen_q == 0 or max_seqlen_k == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    vl = varlen_plan(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    Hq, total_q = lse.shape
    delta = torch.empty((1, Hq, total_q), dtype=torch.float32, device=q.device)
    compiled = compiled_launch(q)
    k4, v4 = k[None], v[None]
    if compiled:
        dkdv_config, dq_config = _pinned_configs(q, v, dkdv_config, dq_config, is_prefix_alias(k4, v4))
    _launch_bwd(do[None], q[None], k4, v4, out[None], lse.contiguous()[None], delta, dq[None], dk[None], dv[None],
                softmax_scale, causal, is_prefix_alias(k4, v4), compiled, dkdv_config, dq_config,
                None if dlse is None else dlse[None], dot_precision(q.dtype, allow_tf32), vl)
    return dq, dk, dv


def bwd_delta(out, do, delta, dlse=None) -> None:
    """``delta[b, h, t] = sum_d out * do`` (fp32 ``[B, Hq, T]``, written in place), minus ``dlse`` when
    given: ``d lse / dS = P``, so an upstream lse gradient enters as ``dS = P * (dP - (delta - dlse))``."""
    B, T, Hq, Dv = out.shape
    launch(
        bwd_preprocess, (triton.cdiv(T, PRE_BLOCK_T) * B * Hq,),
        O=out, DO=do, DELTA=delta, o_strides=out.stride(), do_strides=do.stride(), T=T, Hq=Hq,
        HEAD_DV=Dv, BLOCK_T=PRE_BLOCK_T, BLOCK_D=pre_block_d(Dv), num_warps=PRE_WARPS,
    )
    if dlse is not None:
        delta.sub_(dlse.float())


def bwd_kernel_args(q, k, v, do, lse, delta, softmax_scale, causal, v_is_k, dot: str, T: int, S: int) -> dict:
    """Keyword arguments the dK/dV and dQ kernels share (all but the outputs, ``mask`` and ``TILE``)."""
    Hq, Dk = q.shape[2], q.shape[3]
    Hkv, Dv = k.shape[2], v.shape[3]
    return dict(
        Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta,
        q_strides=q.stride(), k_strides=k.stride(), v_strides=v.stride(), do_strides=do.stride(),
        T=T, S=S, Hkv=Hkv, qk_scale=float(softmax_scale) * LOG2E, sm_scale=float(softmax_scale), opaque_zero=0,
        G=Hq // Hkv, HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=bool(causal), V_IS_K=bool(v_is_k), DOT=dot,
    )


def _launch_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, softmax_scale, causal, v_is_k, compiled,
                dkdv_config, dq_config, dlse, dot: str, vl=None, window_size=None, sinks=None):
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    bwd_delta(out, do, delta, dlse)
    if vl is not None:  # varlen: [1, total, H, D] views; the grid's T and S are the max lengths
        B, T, S = vl["B"], vl["T"], vl["S"]
    causal, ws = window_sink_kwargs(bool(causal), window_size)
    kw = bwd_kernel_args(q, k, v, do, lse, delta, softmax_scale, causal, v_is_k, dot, T, S)
    kw.update(mask=None, mask_geom=None, SPARSE=False, **ws, **(vl["kw"] if vl is not None else {}))
    dkdv_kw = dict(kw, DK=dk, DV=dv, dk_strides=dk.stride(), dv_strides=dv.stride())
    dq_kw = dict(kw, DQ=dq, dq_strides=dq.stride())

    if compiled and dkdv_config is None:
        kern = _autotuned("dkdv", device_arch(q.device), Dk, Dv, v_is_k, dtype_name(q.dtype))
        grid = lambda meta: (triton.cdiv(S, meta["TILE"].BLOCK_N) * B * Hkv, meta["TILE"].NSPLIT)  # noqa: E731
        launch(kern, grid, **dkdv_kw)
    else:
        cfg = dkdv_config or interp_config(Dk, Dv)
        tile = tile_constexprs(cfg, Dk, Dv, v_is_k)
        launch(_attn_bwd_dkdv_kernel, (triton.cdiv(S, cfg.block_n) * B * Hkv, tile["TILE"].NSPLIT), **dkdv_kw,
               **tile, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    if compiled and dq_config is None:
        kern = _autotuned("dq", device_arch(q.device), Dk, Dv, v_is_k, dtype_name(q.dtype))
        grid = lambda meta: (triton.cdiv(T * G, meta["TILE"].BLOCK_M) * B * Hkv, meta["TILE"].NSPLIT)  # noqa: E731
        launch(kern, grid, **dq_kw)
    else:
        cfg = dq_config or interp_config(Dk, Dv)
        tile = tile_constexprs(cfg, Dk, Dv, v_is_k)
        launch(_attn_bwd_dq_kernel, (triton.cdiv(T * G, cfg.block_m) * B * Hkv, tile["TILE"].NSPLIT), **dq_kw,
               **tile, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


_AUTOTUNERS: dict = {}


def _autotuned(kind: str, arch: int, dk: int, dv: int, v_is_k: bool, dtype: str):
    """``triton.autotune`` over :func:`bwd_configs` for kernel ``kind`` and these head dims, keyed on
    the group size and causality (the dtype is part of Triton's key). Every output element is
    overwritten on each trial run, so tuning needs no reset."""
    key = (kind, arch, dk, dv, v_is_k, dtype == "fp32")
    if key not in _AUTOTUNERS:
        fn = {"dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
        configs = [
            triton.Config(tile_constexprs(c, dk, dv, v_is_k), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in bwd_configs(kind, arch, dk, dv, dtype, v_is_k)
        ]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=["G", "CAUSAL", "IS_VARLEN", "HAS_WINDOW"])(fn)
    return _AUTOTUNERS[key]
