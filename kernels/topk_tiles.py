"""Shared ``@triton.jit`` pieces of the top-k sparse kernels (``kernels/topk_sparse.py``): column tiles of
the power-of-two column plan (``PLAN = (NSPLIT, BK, BT, BV)``, :func:`kernels.topk_configs.column_plan`),
resident / streamed fixed-side tiles, program coordinates, top-k lanes and the gathered score product.
Tensors ``[B, rows, H, D]`` with unit last stride are addressed with ``(batch, row, head)`` stride
tuples. DESIGN §9.1 explains the plan and the streaming levels.
"""

from __future__ import annotations

from kernels._common import MIN_TILE
from kernels._config import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    MIN_TILE_C = tl.constexpr(MIN_TILE)
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["chunk", "dk_tiles", "dv_tiles", "gathered_scores", "head_base", "lane_keys", "program_coords", "row_index",
           "segment", "stream_dk", "stream_dv", "tail_piece", "tile", "token_lanes", "token_rows"]


def _jit(fn):
    return triton.jit(fn) if HAS_TRITON else fn


@_jit
def tile(base, rows, col0, D: tl.constexpr, W: tl.constexpr, MASK: tl.constexpr):
    """``[R, W]`` tile: rows at element offsets ``rows`` from ``base``, columns ``col0 + [0, W)``
    (unit stride). Only the column overhang past ``D`` is masked (reads 0)."""
    cols = col0 + tl.arange(0, W)
    ptrs = base + rows[:, None] + cols[None, :]
    if MASK:
        x = tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x

@_jit
def chunk(base, rows, split, OTHER: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, W: tl.constexpr):
    """Column chunk ``split`` (or, with ``OTHER``, the other split's chunk) of width ``W``; with one
    split the "other" chunk is the own one (callers do not use it)."""
    if OTHER and NSPLIT > 1:
        col0 = (1 - split) * W
    else:
        col0 = split * W
    return tile(base, rows, col0, D, W, D < NSPLIT * W)

@_jit
def tail_piece(base, rows, split, OTHER: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, BK: tl.constexpr,
          BT: tl.constexpr):
    """Tail piece ``split`` (or the other one) of ``BT`` columns after the ``NSPLIT * BK`` chunk columns
    (``BT == 0``: no tail; a dummy the callers do not use)."""
    if OTHER and NSPLIT > 1:
        col0 = NSPLIT * BK + (1 - split) * BT
    else:
        col0 = NSPLIT * BK + split * BT
    W: tl.constexpr = BT if BT > 0 else MIN_TILE_C
    return tile(base, rows, col0, D, W, D < NSPLIT * (BK + BT))

@_jit
def dk_tiles(base, rows, split, D: tl.constexpr, PLAN: tl.constexpr):
    """The ``Dk``-side tiles of ``rows`` for column split ``split``: (own chunk, other chunk, own tail
    piece, other tail piece)."""
    own = chunk(base, rows, split, False, D, PLAN[0], PLAN[1])
    oth = chunk(base, rows, split, True, D, PLAN[0], PLAN[1])
    tail = tail_piece(base, rows, split, False, D, PLAN[0], PLAN[1], PLAN[2])
    toth = tail_piece(base, rows, split, True, D, PLAN[0], PLAN[1], PLAN[2])
    return own, oth, tail, toth

@_jit
def dv_tiles(base, rows, split, D: tl.constexpr, PLAN: tl.constexpr):
    """The ``Dv``-side tiles of ``rows`` for column split ``split``: (own chunk, other chunk)."""
    own = chunk(base, rows, split, False, D, PLAN[0], PLAN[3])
    oth = chunk(base, rows, split, True, D, PLAN[0], PLAN[3])
    return own, oth

@_jit
def stream_dk(res, base, rows, split, D: tl.constexpr, PLAN: tl.constexpr, STREAM: tl.constexpr):
    """A loop step's ``Dk``-side tiles of the fixed side: the resident ones ``res`` (:func:`dk_tiles`
    before the loop), with those ``STREAM`` re-reads loaded again (``>= 1``: the other chunk and tail
    piece, ``2``: all). ``base`` carries ``+ step * opaque_zero`` (0, which the compiler cannot see),
    so the re-read stays in the loop: L1 / L2 hits instead of registers for the whole loop."""
    own, oth, tail, toth = res
    if STREAM >= 2:
        own = chunk(base, rows, split, False, D, PLAN[0], PLAN[1])
        tail = tail_piece(base, rows, split, False, D, PLAN[0], PLAN[1], PLAN[2])
    if STREAM >= 1:
        oth = chunk(base, rows, split, True, D, PLAN[0], PLAN[1])
        toth = tail_piece(base, rows, split, True, D, PLAN[0], PLAN[1], PLAN[2])
    return own, oth, tail, toth

@_jit
def stream_dv(res, base, rows, split, D: tl.constexpr, PLAN: tl.constexpr, STREAM: tl.constexpr):
    """:func:`stream_dk` for the ``Dv``-side (own, other) chunks."""
    own, oth = res
    if STREAM >= 2:
        own = chunk(base, rows, split, False, D, PLAN[0], PLAN[3])
    if STREAM >= 1:
        oth = chunk(base, rows, split, True, D, PLAN[0], PLAN[3])
    return own, oth

@_jit
def row_index(x, OFF64: tl.constexpr):
    """Row index as int64 (``OFF64``) or int32: the launcher sets ``OFF64`` when an offset inside one
    batch entry of some tensor can pass 2^31; int32 offsets need fewer registers."""
    if OFF64:
        y = x.to(tl.int64)
    else:
        y = x.to(tl.int32)
    return y

@_jit
def program_coords(T, Hkv, G: tl.constexpr, BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr):
    """1-D grid of the query-major kernels: pid = (((b * T + t) * Hkv + hkv) * N_HB + hb) * NSPLIT + split.
    Neighbouring programs share a token's key list (L2 reuse of the gathered rows). Returns (split, head
    block, hkv, b, t)."""
    pid = tl.program_id(0)
    N_HB: tl.constexpr = (G + BLOCK_M - 1) // BLOCK_M
    if NSPLIT > 1:
        split = pid % NSPLIT
        pid = pid // NSPLIT
    else:
        split = 0
    if N_HB > 1:
        hb = pid % N_HB
        pid = pid // N_HB
    else:
        hb = 0
    hkv = pid % Hkv
    bt = pid // Hkv
    return split, hb, hkv.to(tl.int64), (bt // T).to(tl.int64), (bt % T).to(tl.int64)

@_jit
def head_base(X, x_str, b, h):
    """Start of head ``h`` of batch entry ``b`` in a ``[B, rows, H, D]`` tensor (strides ``x_str``)."""
    return X + b * x_str[0] + h * x_str[2]

@_jit
def token_rows(X, x_str, b, t, heads):
    """(start of token ``t`` of batch entry ``b``, row offsets of ``heads``) in a ``[B, T, H, D]`` tensor."""
    return X + b * x_str[0] + t * x_str[1], heads * x_str[2]

@_jit
def token_lanes(t, dims, CAUSAL: tl.constexpr):
    """(``key_end``: keys ``j < key_end`` are visible to token ``t``, bottom-right aligned when ``CAUSAL``;
    lanes to walk: ``K``, or 0 when the token sees no key), ``dims = (T, S, Hkv, K)``."""
    T, S, Hkv, KTOP = dims
    if CAUSAL:
        key_end = t + S - T + 1
    else:
        key_end = S + t * 0
    return key_end, tl.where(key_end > 0, KTOP, 0)


@_jit
def lane_keys(idx_row, start, KTOP, key_end, BLOCK_N: tl.constexpr):
    """Lanes ``start + [0, BLOCK_N)`` of a top-k row: (key to load, lane visible). A skipped lane
    (-1, past K, >= S, causally hidden) loads key 0 instead (visible whenever the row sees anything)."""
    lanes = start + tl.arange(0, BLOCK_N)
    pos = tl.load(idx_row + lanes, mask=lanes < KTOP, other=-1)
    ok = (pos >= 0) & (pos < key_end)
    return tl.where(ok, pos, 0), ok

@_jit
def gathered_scores(fixed, g_base, g_rows, split, D: tl.constexpr, PLAN: tl.constexpr, DOT: tl.constexpr):
    """Unscaled ``fixed · gᵀ`` over all ``Dk`` columns, ``fixed`` = (own chunk, other chunk, own tail,
    other tail) of the loop's fixed side, ``g`` the rows ``g_rows`` gathered this step (query-major
    kernels: q against key rows; deterministic dK/dV: keys against query rows, i.e. the scores
    transposed). Returns (scores, own, other, own tail) of the gathered tiles."""
    NSPLIT: tl.constexpr = PLAN[0]
    BK: tl.constexpr = PLAN[1]
    BT: tl.constexpr = PLAN[2]
    f_own, f_oth, f_tail, f_toth = fixed
    g_own = chunk(g_base, g_rows, split, False, D, NSPLIT, BK)
    s = tl.dot(f_own, tl.trans(g_own), input_precision=DOT)
    g_oth = g_own
    if NSPLIT > 1:
        g_oth = chunk(g_base, g_rows, split, True, D, NSPLIT, BK)
        s = tl.dot(f_oth, tl.trans(g_oth), s, input_precision=DOT)
    g_tail = g_own
    if BT > 0:
        g_tail = tail_piece(g_base, g_rows, split, False, D, NSPLIT, BK, BT)
        s = tl.dot(f_tail, tl.trans(g_tail), s, input_precision=DOT)
        if NSPLIT > 1:
            g_toth = tail_piece(g_base, g_rows, split, True, D, NSPLIT, BK, BT)
            s = tl.dot(f_toth, tl.trans(g_toth), s, input_precision=DOT)
    return s, g_own, g_oth, g_tail

@_jit
def segment(seg, Hkv, NKB):
    """(batch, kv head, key block) of a key-major segment id ``(b * Hkv + hkv) * NKB + key block``."""
    bh = seg // NKB
    return bh // Hkv, bh % Hkv, seg % NKB
