"""``@triton.jit`` pieces the dense-family kernels share (forward, dK/dV, dQ, block-sparse, and the
other ops where they fit): tile load/store, packed rows, varlen offsets, key-block ranges (causal,
sliding window, block-sparse walks), partial-block bits, the one score helper, the score masks, the
sink fold and the ``delta`` preprocess kernel.

Conventions. A *side* is a tuple ``(base, row_off, row_ok, col_stride)``: a pointer (batch and head
offsets applied), int64 element offsets of the tile's rows, which rows are valid, and the element
stride of the columns; :func:`load_tile` / :func:`store_tile` read and write ``[rows, BLOCK_D]`` tiles of
it. ``TILE`` is the :class:`kernels._common.Tile` constexpr (``BLOCK_M``, ``BLOCK_N``, the head-dim plan
``NSPLIT``/``BK``/``BT``/``BV``/``BC`` and the ``RESIDENT``/``STREAM`` switches).

This module imports Triton; :mod:`kernels` itself does not (``import mla`` works without Triton).
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "batch_offsets",
    "bwd_preprocess",
    "causal_block_range",
    "causal_q_range",
    "dense_key_range",
    "key_step",
    "key_walk",
    "load_tile",
    "mask_scores",
    "other_col",
    "fixed_tiles",
    "own_tiles",
    "packed_rows",
    "packed_side",
    "partial_keep",
    "row_program",
    "row_tile",
    "scores",
    "sink_finish",
    "sparse_full_tiles",
    "sparse_kv_keep",
    "sparse_kv_tile",
    "sparse_kv_walk",
    "sparse_masked_q_tiles",
    "sparse_q_keep",
    "sparse_q_tile",
    "sparse_row_tile",
    "store_tile",
    "varlen_clip",
    "varlen_seq",
    "window_block_range",
    "window_bounds",
    "window_q_range",
]


# --------------------------------------------------------------------------------------------
# Tiles
# --------------------------------------------------------------------------------------------


@triton.jit
def load_tile(side, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr,
              off=0, step=None):
    """``[R, BLOCK_D]`` tile of ``side`` (module doc): columns ``col0 + [0, BLOCK_D)`` of ``D``; ``off`` is
    added to the base (the opaque zero that keeps re-loads in the loop, see :func:`scores`); ``step`` (a
    scalar element offset, or None) is added last: with a loop-invariant side the pointer tile is hoisted
    and each step costs one wide multiply-add per address (an int32 ``step``) instead of a 64-bit add pair.

    Masks only where the caller cannot rule out overhang (statically known full tiles keep
    vectorized, unpredicated loads); masked elements read 0.
    """
    base, row_off, row_ok, col_stride = side
    cols = col0 + tl.arange(0, BLOCK_D)
    ptrs = base + off + row_off[:, None] + cols.to(tl.int64)[None, :] * col_stride
    if step is not None:
        ptrs = ptrs + step
    if ROW_MASK and COL_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)
    elif ROW_MASK:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif COL_MASK:
        x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(side, col0, D: tl.constexpr, BLOCK_D: tl.constexpr, COL_MASK: tl.constexpr, x):
    """Store ``x`` ``[R, BLOCK_D]`` to columns ``col0 + [0, BLOCK_D)`` of ``side`` (valid rows only)."""
    base, row_off, row_ok, col_stride = side
    cols = col0 + tl.arange(0, BLOCK_D)
    ptrs = base + row_off[:, None] + cols.to(tl.int64)[None, :] * col_stride
    if COL_MASK:
        tl.store(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < D))
    else:
        tl.store(ptrs, x, mask=row_ok[:, None])


@triton.jit
def packed_rows(m_start, row_end, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows ``m_start + [0, BLOCK_M)`` of the packed ``[T*G]`` axis -> (token, head in group, valid); rows
    at or past ``row_end`` (``T*G``, or the end of the tile's mask query block) are invalid."""
    rows = m_start + tl.arange(0, BLOCK_M)
    return rows // G, rows % G, rows < row_end


@triton.jit
def packed_side(base, strides, tok, grp, row_ok):
    """The side (module doc) of packed rows ``(tok, grp, row_ok)`` (:func:`packed_rows`) of a
    ``(batch, token, head, dim)``-strided tensor; ``base`` already points at the batch and head group."""
    return base, tok.to(tl.int64) * strides[1] + grp.to(tl.int64) * strides[2], row_ok, strides[3]


@triton.jit
def own_tiles(a, b, split, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, TILE: tl.constexpr, ROW_MASK: tl.constexpr,
              B_IS_A: tl.constexpr):
    """The program's own column chunks of two sides -> ``(a_own, b_own)``: ``a``'s ``[split*BK, +BK)``
    (score operand) and ``b``'s ``[split*BV, +BV)`` (``a_own`` itself when ``B_IS_A``: the shared latent
    tile, loaded once); rows masked when ``ROW_MASK``."""
    a_own = load_tile(a, split * TILE.BK, HEAD_DK, TILE.BK, ROW_MASK, HEAD_DK < TILE.NSPLIT * TILE.BK)
    if B_IS_A:
        b_own = a_own
    else:
        b_own = load_tile(b, split * TILE.BV, HEAD_DV, TILE.BV, ROW_MASK, HEAD_DV < TILE.NSPLIT * TILE.BV)
    return a_own, b_own


@triton.jit
def fixed_tiles(a, b, a_tail, split, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, TILE: tl.constexpr,
                B_IS_A: tl.constexpr, off=0):
    """Load the backward's fixed-side tiles (dK/dV: k and v, dQ: q and dO) -> ``(a_own, a_tail, b_own)``:
    ``a``'s own chunk ``[split*BK, +BK)`` and ``BT`` tail (``a_tail`` returned as given when ``BT == 0``),
    ``b``'s own chunk ``[split*BV, +BV)`` (``a_own`` itself when ``B_IS_A``: the shared latent tile, loaded
    once). Rows always masked; ``off`` as in :func:`load_tile`."""
    NSPLIT: tl.constexpr = TILE.NSPLIT
    BK: tl.constexpr = TILE.BK
    BT: tl.constexpr = TILE.BT
    BV: tl.constexpr = TILE.BV
    a_own = load_tile(a, split * BK, HEAD_DK, BK, True, HEAD_DK < NSPLIT * BK, off)
    if BT > 0:
        a_tail = load_tile(a, NSPLIT * BK, HEAD_DK, BT, True, HEAD_DK < NSPLIT * BK + BT, off)
    if B_IS_A:
        b_own = a_own
    else:
        b_own = load_tile(b, split * BV, HEAD_DV, BV, True, HEAD_DV < NSPLIT * BV, off)
    return a_own, a_tail, b_own


@triton.jit
def other_col(c, split, BK: tl.constexpr, BC: tl.constexpr):
    """First column of score piece ``c`` outside the own chunk ``split`` (chunks skip ``split``)."""
    PER: tl.constexpr = BK // BC
    j = c // PER
    j = j + (j >= split).to(tl.int32)
    return j * BK + (c % PER) * BC


# --------------------------------------------------------------------------------------------
# Varlen
# --------------------------------------------------------------------------------------------


@triton.jit
def varlen_seq(CU_Q, CU_K, b):
    """FlashAttention varlen: sequence ``b`` owns rows ``[cu_q[b], cu_q[b+1])`` of the packed query
    axis and ``[cu_k[b], cu_k[b+1])`` of the key axis. Returns ``(q0, k0, T_b, S_b)`` (offsets int64)."""
    q0 = tl.load(CU_Q + b)
    k0 = tl.load(CU_K + b)
    return q0.to(tl.int64), k0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0


@triton.jit
def batch_offsets(b, T, S, Hq, q_strides, k_strides, v_strides, o_strides, varlen, IS_VARLEN: tl.constexpr):
    """Offsets of batch ``b``: ``(q, k, v, o, st_bh, st_h, T, S)`` where the query-side tensors (q and the
    one of ``o_strides``: out, dO) start at ``q``/``o``, keys at ``k``/``v``, and the fp32 statistics
    (lse, delta) of head ``h``, token ``t`` sit at ``st_bh + h * st_h + t``. Varlen (``varlen = (cu_q,
    cu_k, total_q)``): the sequence's offsets and lengths (:func:`varlen_seq`), statistics ``[Hq, total_q]``."""
    if IS_VARLEN:
        q0, k0, T, S = varlen_seq(varlen[0], varlen[1], b)
        offs = (q0 * q_strides[1], k0 * k_strides[1], k0 * v_strides[1], q0 * o_strides[1], q0, varlen[2], T, S)
    else:
        offs = (b * q_strides[0], b * k_strides[0], b * v_strides[0], b * o_strides[0], b * Hq * T, T, T, S)
    return offs


@triton.jit
def varlen_clip(n_full, n_end, live):
    """Loop bounds of a program past its sequence's end (``live`` False): nothing to visit."""
    n_end = tl.where(live, n_end, 0)
    return tl.minimum(n_full, n_end), n_end


# --------------------------------------------------------------------------------------------
# Key-block ranges (query-major walks: forward, dQ)
# --------------------------------------------------------------------------------------------


@triton.jit
def causal_block_range(m_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """Key blocks visited by a packed row tile: ``[0, n_full)`` need no mask, ``[n_full, n_end)`` do.

    Bottom-right causal: token t sees keys ``j <= t + S - T``. The tile's first token bounds the
    unmasked range, its last token the visited range (rows past the end see up to T-1's range).
    """
    if CAUSAL:
        t_lo = m_start // G
        t_hi = tl.minimum((m_start + BLOCK_M - 1) // G, T - 1)
        full_keys = tl.minimum(tl.maximum(t_lo + S - T + 1, 0), S)
        end_keys = tl.minimum(tl.maximum(t_hi + S - T + 1, 0), S)
        n_full = full_keys // BLOCK_N
        n_end = tl.cdiv(end_keys, BLOCK_N)
    else:
        n_full = S // BLOCK_N
        n_end = tl.cdiv(S, BLOCK_N)
    return n_full, n_end


@triton.jit
def window_bounds(tok, T, S, window):
    """Per query token, the first and last key of its sliding window ``window = (WIN_L, WIN_R)``:
    ``i + S - T - WIN_L <= j <= i + S - T + WIN_R`` (a bound of -1 is unbounded: -1 / S)."""
    pos = tok + (S - T)
    lo = tl.where(window[0] < 0, -1, pos - window[0])
    hi = tl.where(window[1] < 0, S, pos + window[1])
    return lo, hi


@triton.jit
def window_block_range(m_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, window):
    """Key blocks ``[n_start, n_end)`` a windowed packed row tile visits: every block holding a key one
    of its rows sees; blocks wholly outside the window are never loaded."""
    WIN_L, WIN_R = window
    t_lo = m_start // G
    t_hi = tl.minimum((m_start + BLOCK_M - 1) // G, T - 1)
    lo = tl.where(WIN_L < 0, 0, tl.maximum(t_lo + S - T - WIN_L, 0))
    hi = tl.where(WIN_R < 0, S, tl.minimum(tl.maximum(t_hi + S - T + WIN_R + 1, 0), S))
    n_start = lo // BLOCK_N
    n_end = tl.maximum(tl.cdiv(hi, BLOCK_N), n_start)
    return n_start, n_end


@triton.jit
def dense_key_range(m_start, T, S, G: tl.constexpr, TILE: tl.constexpr, CAUSAL: tl.constexpr, window,
                    HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr):
    """``(n_full, n_lo, n_end)`` of a dense row tile: blocks ``[0, n_full)`` run unmasked, ``[n_lo, n_end)``
    masked. Split (large) bodies use one masked loop (half the code size and compile time); a window
    visits only its band, all masked (a band of a few blocks is mostly diagonal: an unmasked middle
    loop would buy little for its code size). Varlen: a tile past its sequence's end visits nothing."""
    if HAS_WINDOW:
        n_lo, n_end = window_block_range(m_start, T, S, G, TILE.BLOCK_M, TILE.BLOCK_N, window)
        n_full = n_lo * 0
    else:
        n_full, n_end = causal_block_range(m_start, T, S, G, TILE.BLOCK_M, TILE.BLOCK_N, CAUSAL)
        if TILE.NSPLIT == 1:
            n_lo = n_full
        else:
            n_lo = n_full * 0
    if IS_VARLEN:
        n_full, n_end = varlen_clip(n_full, n_end, m_start < T * G)
    return n_full, n_lo, n_end


# --------------------------------------------------------------------------------------------
# Block-sparse walks (FlexAttention-style block masks)
# --------------------------------------------------------------------------------------------


@triton.jit
def sparse_row_tile(pid_m, T, G: tl.constexpr, MASK_BM, NSUB_M, BLOCK_M: tl.constexpr):
    """Block-sparse row tiles: program ``pid_m`` is sub-tile ``pid_m % NSUB_M`` of mask query block
    ``qb = pid_m // NSUB_M`` (packed rows ``[qb*MASK_BM*G, +MASK_BM*G)``, cut in ``BLOCK_M`` steps).
    Returns ``(qb, first packed row, end of the block's valid rows)``."""
    qb = pid_m // NSUB_M
    rows_per_block = MASK_BM * G
    m_start = qb * rows_per_block + (pid_m % NSUB_M) * BLOCK_M
    # Rows of the next query block belong to its own tiles (other block lists).
    row_end = tl.minimum((qb + 1) * rows_per_block, T * G)
    return qb, m_start, row_end


@triton.jit
def row_program(T, G: tl.constexpr, Hkv, mask_geom, TILE: tl.constexpr, SPARSE: tl.constexpr):
    """The row tile of a forward / dQ program -> ``(pid_m, split, b, hg, hkv, n_hg, NSUB_M, NSUB_N)``.

    Axis 0 is (batch*head group, row tile) flattened, row tiles fastest (programs that share K/V run
    together; axes 1 and 2 of a CUDA grid stop at 65535); axis 1 the column split. ``T``: the (max)
    query length sizing the grid. Dense: ``cdiv(T*G, BLOCK_M)`` row tiles, ``n_hg = Hkv`` head groups.
    Block-sparse (``mask_geom = (MASK_BM, MASK_BN, KV_REP)``): ``cdiv(T, MASK_BM) * NSUB_M`` row tiles
    (:func:`sparse_row_tile`), ``NSUB_M`` / ``NSUB_N`` kernel tiles per mask block (mask blocks need not be
    multiples of them; 1 when dense), ``n_hg = Hkv*KV_REP``. ``b``, ``hg`` and the kv head ``hkv`` are int64.
    """
    if SPARSE:
        MASK_BM, MASK_BN, KV_REP = mask_geom
        NSUB_M = tl.cdiv(MASK_BM * G, TILE.BLOCK_M)
        NSUB_N = tl.cdiv(MASK_BN, TILE.BLOCK_N)
        n_m = tl.cdiv(T, MASK_BM) * NSUB_M
    else:
        KV_REP = 1
        NSUB_M = 1
        NSUB_N = 1
        n_m = tl.cdiv(T * G, TILE.BLOCK_M)
    pid_m = tl.program_id(0) % n_m
    pid_bh = tl.program_id(0) // n_m
    if TILE.NSPLIT > 1:
        split = tl.program_id(1)
    else:
        split = 0
    n_hg = Hkv * KV_REP
    b = (pid_bh // n_hg).to(tl.int64)
    hg = (pid_bh % n_hg).to(tl.int64)
    return pid_m, split, b, hg, hg // KV_REP, n_hg, NSUB_M, NSUB_N


@triton.jit
def row_tile(pid_m, T, G: tl.constexpr, mask_geom, NSUB_M, BLOCK_M: tl.constexpr, SPARSE: tl.constexpr):
    """Rows of row tile ``pid_m`` (:func:`row_program`; ``T`` the sequence's own length) ->
    ``(qb, m_start, tok, grp, row_ok)``: the mask query block (block-sparse, else 0), the first packed row
    and :func:`packed_rows`."""
    if SPARSE:
        qb, m_start, row_end = sparse_row_tile(pid_m, T, G, mask_geom[0], NSUB_M, BLOCK_M)
    else:
        qb = 0
        m_start = pid_m * BLOCK_M
        row_end = T * G
    tok, grp, row_ok = packed_rows(m_start, row_end, G, BLOCK_M)
    return qb, m_start, tok, grp, row_ok


@triton.jit
def sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N: tl.constexpr):
    """Key sub-tile ``j`` of a ``kv_indices`` row: ``j // NSUB_N``-th listed block, its
    ``j % NSUB_N``-th ``BLOCK_N`` keys. Returns ``(first key, end of the block's valid keys)``."""
    blk_start = tl.load(idx_base + (j // NSUB_N).to(tl.int64) * sil) * MASK_BN
    return blk_start + (j % NSUB_N) * BLOCK_N, tl.minimum(blk_start + MASK_BN, S)


@triton.jit
def sparse_full_tiles(idx_base, sil, n_blk, limit, NSUB_N, MASK_BN, BLOCK_N: tl.constexpr, LANES: tl.constexpr):
    """Leading key sub-tiles of an ascending ``kv_indices`` row that lie entirely below ``limit``
    (keys every row of the tile sees: no mask needed). Sub-tiles are ordered by first key, so
    these are exactly a prefix. 0 when ``BLOCK_N`` does not divide the mask's key block (then
    every sub-tile is masked to its block)."""
    n = tl.where(MASK_BN == NSUB_N * BLOCK_N, n_blk, 0)
    total = n * 0
    for c in range(0, n, LANES):
        lanes = c + tl.arange(0, LANES)
        ok = lanes < n
        blk_start = tl.load(idx_base + lanes.to(tl.int64) * sil, mask=ok, other=0) * MASK_BN
        cnt = tl.minimum(tl.maximum(limit - blk_start, 0) // BLOCK_N, NSUB_N)
        total += tl.sum(tl.where(ok, cnt, 0), 0)
    return total


@triton.jit
def partial_keep(BITS, pid, r_loc, c_loc, MASK_BM, MASK_BN):
    """Token keep-bits of one listed mask block: ``pid >= 0`` indexes a partial block's bitmask in
    ``BITS`` (int8 ``[P, MASK_BM, MASK_BN]``, nonzero = keep); ``pid < 0`` is a full block (all
    kept). ``r_loc`` / ``c_loc``: query / key offsets inside the block, broadcast against each other
    (rows x keys, or keys x rows for the transposed dK/dV products). Out-of-block lanes read keep
    (their rows/keys are masked by the caller)."""
    # pid as a tensor: a scalar & tensor mask trips the interpreter's masked load.
    ok = ((c_loc * 0 + pid) >= 0) & (r_loc >= 0) & (r_loc < MASK_BM) & (c_loc >= 0) & (c_loc < MASK_BN)
    ptr = BITS + pid.to(tl.int64) * MASK_BM * MASK_BN + r_loc.to(tl.int64) * MASK_BN + c_loc
    return tl.load(ptr, mask=ok, other=1) != 0


@triton.jit
def sparse_kv_keep(partial, walk, j, tok, BLOCK_N: tl.constexpr):
    """``[BLOCK_M, BLOCK_N]`` keep-bits of key sub-tile ``j`` of a ``kv_indices`` row (forward, dQ):
    ``partial = (PART, BITS)``, ``walk`` as in :func:`key_step`; ``PART + part_off`` is the row's
    partial-block ids (aligned with its ``kv_indices`` lanes)."""
    PART, BITS = partial
    idx_base, sil, NSUB_N, MASK_BM, MASK_BN, qb, part_off = walk
    pid = tl.load(PART + part_off + (j // NSUB_N).to(tl.int64) * sil)
    c_loc = (j % NSUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
    return partial_keep(BITS, pid, (tok - qb * MASK_BM)[:, None], c_loc[None, :], MASK_BM, MASK_BN)


@triton.jit
def key_step(j, walk, S, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr):
    """Step ``j`` of a query-major key walk (forward, dQ): ``(first key, end of its valid keys)``. Dense:
    block ``j``, keys up to ``S``. ``SPARSE``: sub-tile ``j`` of a ``kv_indices`` row, ``walk = (idx_base,
    sil, NSUB_N, MASK_BM, MASK_BN, qb, part_off)`` (:func:`sparse_kv_tile`)."""
    if SPARSE:
        idx_base, sil, NSUB_N, MASK_BM, MASK_BN, qb, part_off = walk
        start_n, kend = sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N)
    else:
        start_n = j * BLOCK_N
        kend = S
    return start_n, kend


@triton.jit
def sparse_kv_walk(mask, mask_geom, b, hg, qb, m_start, T, S, G: tl.constexpr, NSUB_N, TILE: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_PARTIAL: tl.constexpr, LANES: tl.constexpr):
    """``(walk, n_full, n_end)`` of a block-sparse row tile in mask query block ``qb`` of head group ``hg``:
    the ``walk`` tuple of :func:`key_step` and its sub-tiles ``[0, n_full)`` that every row of the tile sees
    in full (they skip the masks; none for split bodies and with partial blocks, which need their bits),
    of ``n_end`` in all."""
    KVN, KVI, snb, snh, snq, sib, sih, siq, sil = mask
    MASK_BM, MASK_BN, KV_REP = mask_geom
    n_blk = tl.load(KVN + b * snb + hg * snh + qb.to(tl.int64) * snq)
    part_off = b * sib + hg * sih + qb.to(tl.int64) * siq
    if TILE.NSPLIT == 1:
        if CAUSAL:
            limit = tl.minimum(tl.maximum(m_start // G + S - T + 1, 0), S)
        else:
            limit = S
        if HAS_PARTIAL:
            limit = 0
        n_full = sparse_full_tiles(KVI + part_off, sil, n_blk, limit, NSUB_N, MASK_BN, TILE.BLOCK_N, LANES)
    else:
        n_full = n_blk * 0
    return (KVI + part_off, sil, NSUB_N, MASK_BM, MASK_BN, qb, part_off), n_full, n_blk * NSUB_N


@triton.jit
def key_walk(mask, mask_geom, b, hg, qb, m_start, T, S, G: tl.constexpr, NSUB_N, TILE: tl.constexpr,
             CAUSAL: tl.constexpr, window, HAS_WINDOW: tl.constexpr, HAS_PARTIAL: tl.constexpr,
             IS_VARLEN: tl.constexpr, SPARSE: tl.constexpr, LANES: tl.constexpr):
    """The key steps of a forward / dQ row tile -> ``(walk, n_full, n_lo, n_end)``: steps ``[0, n_full)``
    every row of the tile sees in full skip the masks, ``[n_lo, n_end)`` run masked. Block-sparse: the
    FlexAttention-style walk over sub-tiles of the listed key blocks, ascending (:func:`sparse_kv_walk`,
    ``n_lo = n_full``); dense: :func:`dense_key_range`, ``walk`` unused (0)."""
    if SPARSE:
        walk, n_full, n_end = sparse_kv_walk(mask, mask_geom, b, hg, qb, m_start, T, S, G, NSUB_N, TILE, CAUSAL,
                                             HAS_PARTIAL, LANES)
        n_lo = n_full
    else:
        walk = 0
        n_full, n_lo, n_end = dense_key_range(m_start, T, S, G, TILE, CAUSAL, window, HAS_WINDOW, IS_VARLEN)
    return walk, n_full, n_lo, n_end


# --------------------------------------------------------------------------------------------
# Row ranges and row walks (key-major: dK/dV)
# --------------------------------------------------------------------------------------------


@triton.jit
def causal_q_range(n_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Packed row blocks that see key block ``[n_start, +BLOCK_N)``: ``[m_lo, m_full)`` need the
    causal mask, ``[m_full, m_end)`` see every key of the block."""
    m_end = tl.cdiv(T * G, BLOCK_M)
    if CAUSAL:
        t_first = tl.maximum(n_start - S + T, 0)
        t_all = tl.maximum(tl.minimum(n_start + BLOCK_N, S) - 1 - S + T, 0)
        m_full = tl.minimum(tl.cdiv(t_all * G, BLOCK_M), m_end)
        m_lo = tl.minimum((t_first * G) // BLOCK_M, m_full)
    else:
        m_lo = 0
        m_full = 0
    return m_lo, m_full, m_end


@triton.jit
def window_q_range(n_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, window):
    """Packed row blocks ``[m_lo, m_end)`` with a token whose window reaches a key of
    ``[n_start, +BLOCK_N)``: token t sees key j iff ``j - WIN_R <= t + S - T <= j + WIN_L``."""
    WIN_L, WIN_R = window
    k_last = tl.minimum(n_start + BLOCK_N, S) - 1
    t_lo = tl.where(WIN_R < 0, 0, tl.maximum(n_start - WIN_R - (S - T), 0))
    t_end = tl.where(WIN_L < 0, T, tl.minimum(tl.maximum(k_last + WIN_L - (S - T) + 1, 0), T))
    m_lo = (t_lo * G) // BLOCK_M
    m_end = tl.maximum(tl.cdiv(t_end * G, BLOCK_M), m_lo)
    return m_lo, m_end


@triton.jit
def sparse_q_tile(idx_base, sil, j, NSUB_M, rows_per_block, row_limit, BLOCK_M: tl.constexpr):
    """Row sub-tile ``j`` of a ``q_indices`` row: the ``j % NSUB_M``-th ``BLOCK_M`` packed rows of
    the ``j // NSUB_M``-th listed query block. Returns ``(first packed row, end of its valid rows)``."""
    blk_start = tl.load(idx_base + (j // NSUB_M).to(tl.int64) * sil) * rows_per_block
    return blk_start + (j % NSUB_M) * BLOCK_M, tl.minimum(blk_start + rows_per_block, row_limit)


@triton.jit
def sparse_q_keep(partial, idx_base, part_off, sil, j, NSUB_M, m_start, c_loc, MASK_BM, MASK_BN,
                   G: tl.constexpr, BLOCK_M: tl.constexpr):
    """``[BLOCK_N, BLOCK_M]`` (keys x rows) keep-bits of row sub-tile ``j`` of a ``q_indices`` row
    for the dK/dV pass: ``partial = (PART, BITS)``, ``PART + part_off`` holds the row's partial-block ids
    (aligned with its ``q_indices`` lanes); ``c_loc``: the key tile's offsets inside its mask key block."""
    PART, BITS = partial
    lane = (j // NSUB_M).to(tl.int64) * sil
    pid = tl.load(PART + part_off + lane)
    q_first = tl.load(idx_base + lane) * MASK_BM
    tok = (m_start + tl.arange(0, BLOCK_M)) // G
    return partial_keep(BITS, pid, (tok - q_first)[None, :], c_loc[:, None], MASK_BM, MASK_BN)


@triton.jit
def sparse_masked_q_tiles(idx_base, sil, n_blk, first_full_row, rows_per_block, NSUB_M,
                           BLOCK_M: tl.constexpr, LANES: tl.constexpr):
    """Leading row sub-tiles of an ascending ``q_indices`` row whose first row lies before
    ``first_full_row`` (its token does not see the whole key tile: causal mask needed). Sub-tiles
    are ordered by first row, so these are exactly a prefix."""
    total = n_blk * 0
    for c in range(0, n_blk, LANES):
        lanes = c + tl.arange(0, LANES)
        ok = lanes < n_blk
        blk_start = tl.load(idx_base + lanes.to(tl.int64) * sil, mask=ok, other=0) * rows_per_block
        cnt = tl.minimum(tl.cdiv(tl.maximum(first_full_row - blk_start, 0), BLOCK_M), NSUB_M)
        total += tl.sum(tl.where(ok, cnt, 0), 0)
    return total


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


@triton.jit
def scores(f_own, m_own, f_tail, f, m, f2_own, m2_own, f2, m2, split, hide,
           HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, TILE: tl.constexpr, M_ROW_MASK: tl.constexpr,
           KEY_FIXED: tl.constexpr, V_IS_K: tl.constexpr, WITH_DP: tl.constexpr, DOT: tl.constexpr):
    """The score tile ``s = F·Mᵀ`` of one step (unscaled), and with ``WITH_DP`` the ``dP = F2·M2ᵀ`` tile.

    ``F`` is the program's *fixed* side (the rows of the output tile: q in the forward and dQ, k in
    dK/dV, whose products are formed transposed), ``M`` the side the loop *moves* over; ``F2`` / ``M2``
    the dP operands (dQ: dO and v; dK/dV: v and dO). ``f``, ``m``, ``f2``, ``m2`` are sides (module doc);
    ``*_own`` the program's own column chunk ``[split*BK, +BK)`` (``[split*BV, +BV)`` for dP), loaded by
    the caller; ``f_tail`` the fixed side's ``BT`` tail. The other splits' chunks are contracted here in
    ``BC``-wide pieces (with ``V_IS_K`` the key piece doubles as the value piece), then the tail.

    Loads of the moving side are row-masked when ``M_ROW_MASK``; fixed-side rows always. ``hide`` is 0,
    but the compiler cannot prove it: with ``TILE.STREAM`` it is added to the fixed side's loop-invariant
    piece loads, which stops Triton's LICM from hoisting them (they stream through the load pipeline
    instead of staying live in registers for the whole loop). Returns ``(s, dp, m_tail)``: ``m_tail`` is
    the moving side's tail tile (for the caller's gradient products; ``m_own`` when ``BT == 0``) and
    ``dp`` is ``s`` without ``WITH_DP``.
    """
    NSPLIT: tl.constexpr = TILE.NSPLIT
    BK: tl.constexpr = TILE.BK
    BT: tl.constexpr = TILE.BT
    BV: tl.constexpr = TILE.BV
    BC: tl.constexpr = TILE.BC
    MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
    MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
    MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV
    hide_f = 0
    if TILE.STREAM:
        hide_f = hide
    s = tl.dot(f_own, tl.trans(m_own), input_precision=DOT)
    if WITH_DP:
        dp = tl.dot(f2_own, tl.trans(m2_own), input_precision=DOT)
    else:
        dp = s
    N_OTHER: tl.constexpr = (NSPLIT - 1) * (BK // BC)
    for c in tl.static_range(N_OTHER):
        col = other_col(c, split, BK, BC)
        if KEY_FIXED:  # the query piece first, as it is needed first (fewer live registers in dK/dV)
            m_c = load_tile(m, col, HEAD_DK, BC, M_ROW_MASK, MASK_K)
            f_c = load_tile(f, col, HEAD_DK, BC, True, MASK_K, hide_f)
        else:
            f_c = load_tile(f, col, HEAD_DK, BC, True, MASK_K, hide_f)
            m_c = load_tile(m, col, HEAD_DK, BC, M_ROW_MASK, MASK_K)
        s = tl.dot(f_c, tl.trans(m_c), s, input_precision=DOT)
        if WITH_DP and V_IS_K:  # the key piece is also the value piece; dO columns past Dv read 0
            if KEY_FIXED:
                m2_c = load_tile(m2, col, HEAD_DV, BC, M_ROW_MASK, True)
                dp = tl.dot(f_c, tl.trans(m2_c), dp, input_precision=DOT)
            else:
                f2_c = load_tile(f2, col, HEAD_DV, BC, True, True, hide_f)
                dp = tl.dot(f2_c, tl.trans(m_c), dp, input_precision=DOT)
    if WITH_DP and not V_IS_K:
        N_OTHER_V: tl.constexpr = (NSPLIT - 1) * (BV // BC)
        for c in tl.static_range(N_OTHER_V):
            col = other_col(c, split, BV, BC)
            f2_c = load_tile(f2, col, HEAD_DV, BC, True, MASK_V, hide_f)
            m2_c = load_tile(m2, col, HEAD_DV, BC, M_ROW_MASK, MASK_V)
            dp = tl.dot(f2_c, tl.trans(m2_c), dp, input_precision=DOT)
    if BT > 0:
        m_tail = load_tile(m, NSPLIT * BK, HEAD_DK, BT, M_ROW_MASK, MASK_T)
        s = tl.dot(f_tail, tl.trans(m_tail), s, input_precision=DOT)
    else:
        m_tail = m_own
    return s, dp, m_tail


@triton.jit
def mask_scores(s, keys, key_ok, tok, T, S, CAUSAL: tl.constexpr, window, HAS_WINDOW: tl.constexpr, keep,
                HAS_KEEP: tl.constexpr):
    """``s [rows, keys]`` with invisible scores set to -inf: keys at or past their end (``key_ok``), and with
    ``CAUSAL`` keys after ``tok + S - T``, with ``HAS_WINDOW`` keys outside the window, with ``HAS_KEEP``
    keys whose partial-block bit ``keep`` is 0."""
    visible = key_ok[None, :]
    if CAUSAL:
        visible = visible & (keys[None, :] <= tok[:, None] + (S - T))
    if HAS_WINDOW:
        w_lo, w_hi = window_bounds(tok, T, S, window)  # per row: two compares per score
        visible = visible & (keys[None, :] >= w_lo[:, None]) & (keys[None, :] <= w_hi[:, None])
    if HAS_KEEP:  # partial block of a FlexAttention mask: per-token bits
        visible = visible & keep
    return tl.where(visible, s, float("-inf"))


@triton.jit
def sink_finish(acc, m_i, l_i, sink):
    """Fold a sink logit (log2 units, per row) into the finished online softmax: returns the scale of
    ``acc`` (1/l) and the row's lse in log2 units; the sink carries no value, so a row with no key
    gets output 0 and ``lse = sink``."""
    m_f = tl.maximum(m_i, sink)
    alpha = tl.exp2(m_i - m_f)
    l_f = l_i * alpha + tl.exp2(sink - m_f)
    return alpha / l_f, m_f + tl.log2(l_f)


# --------------------------------------------------------------------------------------------
# Backward preprocess
# --------------------------------------------------------------------------------------------


@triton.jit
def bwd_preprocess(O, DO, DELTA, o_strides, do_strides, T, Hq,
                   HEAD_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """``DELTA[b, h, t] = sum_d O * dO`` (fp32); grid ``(cdiv(T, BLOCK_T) * B*Hq,)``; strides
    ``(batch, token, head, dim)``."""
    n_t = tl.cdiv(T, BLOCK_T)  # axis 0 flattened (batch*head, token block): no 65535 limit
    pid_t = tl.program_id(0) % n_t
    pid_bh = tl.program_id(0) // n_t
    b = (pid_bh // Hq).to(tl.int64)
    h = (pid_bh % Hq).to(tl.int64)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    ok = tok < T
    o = (O + b * o_strides[0] + h * o_strides[2], tok.to(tl.int64) * o_strides[1], ok, o_strides[3])
    do = (DO + b * do_strides[0] + h * do_strides[2], tok.to(tl.int64) * do_strides[1], ok, do_strides[3])
    acc = tl.zeros([BLOCK_T], dtype=tl.float32)
    for c in tl.static_range(0, HEAD_DV, BLOCK_D):
        o_c = load_tile(o, c, HEAD_DV, BLOCK_D, True, c + BLOCK_D > HEAD_DV)
        do_c = load_tile(do, c, HEAD_DV, BLOCK_D, True, c + BLOCK_D > HEAD_DV)
        acc += tl.sum(o_c.to(tl.float32) * do_c.to(tl.float32), 1)
    tl.store(DELTA + (b * Hq + h) * T + tok, acc, mask=ok)
