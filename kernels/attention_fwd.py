"""Dense fused attention forward (online softmax), with GQA/MQA head packing and absorbed-MLA support.

Layout (DESIGN §3): ``q [B, T, Hq, Dk]``, ``k [B, S, Hkv, Dk]``, ``v [B, S, Hkv, Dv]``, any strides.

How the work is cut:

* **Packed rows.** One program owns ``BLOCK_M`` rows of the packed ``[T * G]`` axis of one
  ``(batch, kv head)``, ``G = Hq // Hkv``: row ``r`` is token ``r // G``, head ``r % G`` of the
  group. The K/V tile of a key block is therefore loaded once for all the heads of the group
  (with ``Hkv = 1`` and 128 heads this is what makes absorbed MLA compute-bound).
* **Head-dim plan** (:class:`kernels._common.HeadPlan`). Tiles must be powers of two, so ``Dk`` is covered by
  ``NSPLIT`` main chunks of ``BK`` columns plus an optional tail chunk of ``BT`` columns, and ``Dv``
  by ``NSPLIT`` chunks of ``BV`` columns. Program ``split`` of a row block accumulates value
  columns ``[split*BV, split*BV + BV)``: with ``NSPLIT > 1`` the value dimension is split across
  programs (each recomputes the scores) because a ``[64, 512]`` fp32 accumulator plus the score
  operands does not fit the register file (see docs/design.md §9).
  The score contraction uses the program's *own* chunk (``[split*BK, +BK)``, q held for the whole
  loop when ``Q_RESIDENT``), the other splits' chunks in ``BC``-wide pieces and the tail. The q
  pieces are loop-invariant: Triton may hoist them (q stays on chip), or with ``STREAM`` they are
  re-read every key block through the load pipeline (fewer registers, more shared memory); the
  autotuner picks. With two splits and ``BC == BK`` (one other piece) and q resident, not streamed,
  the other chunk is *held*: loaded once before the loop like the own chunk, so all of q stays in
  shared memory as the wgmma operand and a step is three chained products (own, other, tail) with no
  per-step re-staging (sm90's absorbed 128-row tile, ``bc=256``). Split (large) bodies use one masked
  key loop instead of two, which halves their code size and compile time; the held body keeps both.
* **v aliasing k** (absorbed MLA: ``v = k[..., :Dv]``). The launcher detects it and sets
  ``V_IS_K``; the plan then uses ``BK == BV`` so the own score chunk *is* the value tile: it is
  loaded once and used by both dots.
* **Key-block visiting**: :func:`kernels._jit.dense_key_range` (which blocks, which need masking);
  :func:`_fwd_blocks` walks a range, masked or not, and :func:`_fwd_block` is the block body.
  With the constexpr ``SPARSE`` switch the same kernel walks a FlexAttention-style block mask
  instead (``kv_indices`` sub-tiles, :func:`kernels._jit.sparse_kv_walk` / ``key_step``, row tiles
  inside one mask query block, optionally one head per tile): :mod:`kernels.block_sparse` launches it.
* **Varlen** (constexpr ``IS_VARLEN``, :func:`attention_fwd_varlen`): FlashAttention's packed layout;
  the batch axis of the grid is the sequence, each program reads its sequence's offsets and lengths
  from ``cu_seqlens`` (:func:`kernels._jit.batch_offsets`) and exits its loops at once past the sequence's end.

Causal masking is bottom-right aligned (key ``j`` visible to query ``i`` iff ``j <= i + S - T``);
a row with no visible key gets output 0 and ``lse = +inf``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import tuning
from kernels._common import (
    LN2,
    LOG2E,
    FwdConfig,
    TileConfig,
    compiled_launch,
    device_arch,
    dot_precision,
    dtype_name,
    fold_window,
    fwd_outputs,
    fwd_qk_scale,
    head_class,
    is_prefix_alias,
    launch,
    needs_off64,
    next_pow2,
    specs_getattr,
    tile_constexprs,
    varlen_plan,
)
from kernels._jit import (
    batch_offsets,
    key_step,
    key_walk,
    load_tile,
    mask_scores,
    other_col,
    packed_side,
    row_program,
    row_tile,
    scores,
    sink_finish,
    sparse_kv_keep,
    store_tile,
)
from kernels._tables import fwd_configs
from kernels._tables import fwd_interp_config as interp_config

__all__ = [
    "FwdConfig",
    "attention_fwd",
    "attention_fwd_varlen",
    "fwd_configs",
    "interp_config",
]

# Names that moved to kernels._common / kernels._jit / kernels._specs, still readable here for their callers.
from kernels._common import HeadPlan, head_plan  # noqa: E402,F401

_sink_finish = sink_finish  # kernels.decode / kernels.topk_sparse import it from here

# Compile-spec names that moved to kernels._specs, still readable here.
__getattr__ = specs_getattr(__name__, "fwd_spec", "varlen_spec_values", "window_spec_values",
    "window_tile_suffix", "SPEC_SHAPES", "SPEC_DTYPES", "SPEC_TF32_SHAPES", "SPEC_WINDOW_SHAPES",
    "SPEC_WINDOW_DTYPES", compile_specs="fwd_specs")


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

_LN2 = tl.constexpr(LN2)
_LOG2E = tl.constexpr(LOG2E)
_LANES = tl.constexpr(64)  # kv_indices lanes read per step when counting unmasked sub-tiles


@triton.jit
def _fwd_block(
    acc, m_i, l_i, q_own, q_oth, q_tail, start_n, kend, q, tok, kv, T, S, qk_scale, split, hide,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    TILE: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    keep=None, HAS_KEEP: tl.constexpr = False, OFF64: tl.constexpr = False,
):
    """Online-softmax update of one row tile with the key block starting at ``start_n``; keys at or
    past ``kend`` (``S``, or the end of a block-sparse mask block) are masked out when ``MASKED``
    (and keys outside the sliding window with ``HAS_WINDOW``, keys whose bit in ``keep`` is 0 with
    ``HAS_KEEP``). ``OFF64``: key-step offsets in int64 (the launcher's :func:`kernels._common.needs_off64`).
    ``q``: the query side (``kernels._jit`` doc); ``kv = (k_base, k_strides, v_base,
    v_strides)``.

    ``hide`` is 0, but the compiler cannot prove it. The q re-loads (own chunk without
    ``TILE.RESIDENT``, the other splits' pieces with ``TILE.STREAM``) are loop-invariant; added to their
    base it stops Triton's LICM from hoisting them, so they stream through the pipeline (shared
    memory, L2 traffic) instead of staying live in registers for the whole loop.
    """
    k_base, k_strides, v_base, v_strides = kv
    MASK_K: tl.constexpr = HEAD_DK < TILE.NSPLIT * TILE.BK
    MASK_V: tl.constexpr = HEAD_DV < TILE.NSPLIT * TILE.BV
    keys = start_n + tl.arange(0, TILE.BLOCK_N)
    key_ok = keys < kend
    k = (k_base, keys.to(tl.int64) * k_strides[1], key_ok, k_strides[3])
    # Own K and V tiles: a loop-invariant pointer tile plus this step's offset (int32 unless OFF64).
    rows = tl.arange(0, TILE.BLOCK_N).to(tl.int64)
    if OFF64:
        start_n = start_n.to(tl.int64)
    k_own = load_tile((k_base, rows * k_strides[1], key_ok, k_strides[3]), split * TILE.BK, HEAD_DK, TILE.BK,
                      MASKED, MASK_K, 0, start_n * k_strides[1])  # also the value tile when v aliases k
    if not TILE.RESIDENT:
        q_own = load_tile(q, split * TILE.BK, HEAD_DK, TILE.BK, True, MASK_K, hide)
    if q_oth is not None:
        # Three products per step, their q operands loaded once (before the loop, in shared memory).
        qk = tl.dot(q_own, tl.trans(k_own), input_precision=DOT)
        k_oth = load_tile(k, other_col(0, split, TILE.BK, TILE.BC), HEAD_DK, TILE.BC, MASKED, MASK_K)
        qk = tl.dot(q_oth, tl.trans(k_oth), qk, input_precision=DOT)
        if TILE.BT > 0:
            k_tail = load_tile(k, TILE.NSPLIT * TILE.BK, HEAD_DK, TILE.BT, MASKED,
                               HEAD_DK < TILE.NSPLIT * TILE.BK + TILE.BT)
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=DOT)
    else:
        qk, _, _ = scores(q_own, k_own, q_tail, q, k, q_own, k_own, q, k, split, hide,
                          HEAD_DK, HEAD_DV, TILE, MASKED, False, V_IS_K, False, DOT)
    if MASKED:
        qk = mask_scores(qk, keys, key_ok, tok, T, S, CAUSAL, window, HAS_WINDOW, keep, HAS_KEEP)
    # qk_scale > 0 (the launchers check it: _common.fwd_qk_scale): scale the row max, not every score, and
    # fold the scale into the exponent's multiply-add (FlashAttention-2; -inf stays -inf).
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    if MASKED:
        # A row that has seen nothing yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_sub = m_new
    p = tl.exp2(qk * qk_scale - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_IS_K:
        v_t = k_own
    else:
        v_t = load_tile((v_base, rows * v_strides[1], key_ok, v_strides[3]), split * TILE.BV, HEAD_DV, TILE.BV,
                        MASKED, MASK_V, 0, start_n * v_strides[1])
    acc = tl.dot(p.to(v_t.dtype), v_t, acc * alpha[:, None], input_precision=DOT)
    return acc, m_new, l_i


@triton.jit
def _fwd_blocks(
    acc, m_i, l_i, lo, hi, q_own, q_oth, q_tail, q, tok, kv, T, S, qk_scale, split, opaque_zero, walk, partial,
    HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
    TILE: tl.constexpr, DOT: tl.constexpr, window, HAS_WINDOW: tl.constexpr,
    SPARSE: tl.constexpr, MASKED: tl.constexpr, HAS_PARTIAL: tl.constexpr, OFF64: tl.constexpr = False,
):
    """Key steps ``[lo, hi)`` of a row tile, all masked or none (``MASKED``): dense blocks ``i * BLOCK_N``,
    or (``SPARSE``) the sub-tiles of a ``kv_indices`` row, ``walk = (idx_base, sil, NSUB_N, MASK_BM,
    MASK_BN, qb, part_off)``, with the partial-block bits of ``partial`` when ``HAS_PARTIAL``."""
    for j in range(lo, hi):
        start_n, kend = key_step(j, walk, S, TILE.BLOCK_N, SPARSE)
        keep = None
        if HAS_PARTIAL:
            keep = sparse_kv_keep(partial, walk, j, tok, TILE.BLOCK_N)
        acc, m_i, l_i = _fwd_block(
            acc, m_i, l_i, q_own, q_oth, q_tail, start_n, kend, q, tok, kv, T, S, qk_scale, split, j * opaque_zero,
            HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, MASKED, DOT, window, HAS_WINDOW, keep, HAS_PARTIAL, OFF64,
        )
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE, MAXL, q_strides, k_strides, v_strides, o_strides,
    T, S, Hkv, qk_scale, n_mblocks, opaque_zero, mask, mask_geom,
    G: tl.constexpr, G_P: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
    V_IS_K: tl.constexpr, WRITE_MAXL: tl.constexpr, SPARSE: tl.constexpr, TILE: tl.constexpr, DOT: tl.constexpr,
    partial=None, HAS_PARTIAL: tl.constexpr = False,
    varlen=None, IS_VARLEN: tl.constexpr = False,
    SINKS=None, HAS_SINKS: tl.constexpr = False,
    window=(-1, -1), HAS_WINDOW: tl.constexpr = False,
    OFF64: tl.constexpr = False,
):
    """Grid ``(n_m * B*Hkv*KV_REP, NSPLIT)``; ``qk_scale = softmax_scale * log2(e)``; ``opaque_zero`` is 0
    (see :func:`_fwd_block`); strides ``(batch, token, head, dim)`` in elements; ``TILE``:
    :class:`kernels._common.Tile`.

    ``HAS_WINDOW`` (dense only): sliding window ``window = (WIN_L, WIN_R)`` (-1 unbounded; the launcher
    folds ``causal`` into ``WIN_R``); only the key blocks of :func:`kernels._jit.window_block_range` are
    visited, all masked. ``HAS_SINKS``: fp32 ``SINKS [Hq]`` logits join each row's softmax (no value);
    ``lse`` includes them.

    Dense (``SPARSE=False``, ``mask`` / ``mask_geom`` unused): ``n_m = cdiv(T*G, BLOCK_M)``, ``KV_REP = 1``.
    Block-sparse (``SPARSE=True``, ``mask = (KVN, KVI, snb, snh, snq, sib, sih, siq, sil)``, ``mask_geom = (MASK_BM,
    MASK_BN, KV_REP)``):
    ``n_m = cdiv(T, MASK_BM) * NSUB_M`` row tiles, each inside one mask query block
    (:func:`kernels._jit.sparse_row_tile`), visiting the ``NSUB_N`` key sub-tiles of every block listed in
    ``KVI[b, h, qb, :KVN[b, h, qb]]`` (mask strides ``sn*``/``si*``, 0 on broadcast dims; ``h`` is the
    head group). ``G`` heads are packed per row; ``KV_REP`` head groups share one kv head (``KV_REP =
    Hq/Hkv, G = 1`` when the mask has per-head lists and the group's heads cannot share a tile).
    ``HAS_PARTIAL`` (block-sparse only): ``partial = (PART, BITS)``: ``PART`` (int32, laid out like
    ``KVI``) gives each listed block's partial-block id, ``-1`` for a full block, and ``BITS`` the partial
    blocks' int8 ``[P, MASK_BM, MASK_BN]`` token bits (:func:`kernels._jit.partial_keep`); every sub-tile
    then runs masked. ``IS_VARLEN`` (dense only): FlashAttention's packed layout, ``varlen = (CU_Q, CU_K,
    TOTAL_Q)``: ``B`` sequences given by int32 ``[B+1]`` offsets, ``T``/``S`` passed as the max sequence
    lengths (they size the grid) and re-read per sequence; batch strides unused; ``LSE`` is
    ``[Hq, TOTAL_Q]``; programs past their sequence's end visit nothing and store nothing.
    """
    BLOCK_M: tl.constexpr = TILE.BLOCK_M
    NSPLIT: tl.constexpr = TILE.NSPLIT
    BK: tl.constexpr = TILE.BK
    BT: tl.constexpr = TILE.BT
    BV: tl.constexpr = TILE.BV
    pid_m, split, b, hg, hkv, n_hg, NSUB_M, NSUB_N = row_program(T, G, Hkv, mask_geom, TILE, SPARSE)
    # Batch offsets; statistics at st_bh + head * st_h + token.
    q_b, k_b, v_b, o_b, st_bh, st_h, T, S = batch_offsets(b, T, S, n_hg * G, q_strides, k_strides, v_strides,
                                                          o_strides, varlen, IS_VARLEN)
    qb, m_start, tok, grp, row_ok = row_tile(pid_m, T, G, mask_geom, NSUB_M, BLOCK_M, SPARSE)
    q = packed_side(Q + q_b + hg * G * q_strides[2], q_strides, tok, grp, row_ok)
    kv = (K + k_b + hkv * k_strides[2], k_strides, V + v_b + hkv * v_strides[2], v_strides)

    q_own = tl.zeros([BLOCK_M, BK], dtype=Q.dtype.element_ty)
    if TILE.RESIDENT:
        q_own = load_tile(q, split * BK, HEAD_DK, BK, True, HEAD_DK < NSPLIT * BK)
    # Two splits whose other chunk is one BC piece: with q resident (not streamed) that piece is held
    # too, loaded once here so the compiler keeps it in shared memory as a wgmma operand instead of
    # re-staging a hoisted register copy every step (None: contracted in pieces by ``scores``).
    HOLD_OTHER: tl.constexpr = TILE.RESIDENT and not TILE.STREAM and (NSPLIT - 1) * (BK // TILE.BC) == 1
    q_oth = None
    if HOLD_OTHER:
        q_oth = load_tile(q, other_col(0, split, BK, TILE.BC), HEAD_DK, TILE.BC, True, HEAD_DK < NSPLIT * BK)
    q_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=Q.dtype.element_ty)
    if BT > 0:
        q_tail = load_tile(q, NSPLIT * BK, HEAD_DK, BT, True, HEAD_DK < NSPLIT * BK + BT)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)

    # Key steps [0, n_full) every row of the tile sees in full skip the masks; [n_lo, n_end) run masked.
    walk, n_full, n_lo, n_end = key_walk(mask, mask_geom, b, hg, qb, m_start, T, S, G, NSUB_N, TILE, CAUSAL, window,
                                         HAS_WINDOW, HAS_PARTIAL, IS_VARLEN, SPARSE, _LANES)
    # Split bodies run one masked loop (half the code), except the dense held-q body (sm90's absorbed
    # tile, registers to spare), whose mask arithmetic is ~13% of a step's instructions.
    TWO_LOOPS: tl.constexpr = not HAS_WINDOW and (NSPLIT == 1 or (HOLD_OTHER and not SPARSE))
    if NSPLIT > 1 and TWO_LOOPS:
        n_lo = n_full
    if TWO_LOOPS:
        acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, 0, n_full, q_own, q_oth, q_tail, q, tok, kv, T, S, qk_scale, split,
                                    opaque_zero, walk, partial, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT,
                                    window, False, SPARSE, False, False, OFF64)
    acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, n_lo, n_end, q_own, q_oth, q_tail, q, tok, kv, T, S, qk_scale, split,
                                opaque_zero, walk, partial, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, TILE, DOT,
                                window, HAS_WINDOW, SPARSE, True, HAS_PARTIAL, OFF64)

    Hq = n_hg * G
    head = hg * G + grp.to(tl.int64)
    if HAS_SINKS:
        sink = tl.load(SINKS + head, mask=row_ok, other=0.0) * _LOG2E  # to log2 units
        o_scale, lse2 = sink_finish(acc, m_i, l_i, sink)
        out = acc * o_scale[:, None]
    else:
        # Empty rows (l == 0) have acc == 0: divide by 1 to write exact zeros.
        l_div = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_div[:, None]
        lse2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_div))
    o = packed_side(O + o_b + hg * G * o_strides[2], o_strides, tok, grp, row_ok)
    store_tile(o, split * BV, HEAD_DV, BV, HEAD_DV < NSPLIT * BV, out.to(O.dtype.element_ty))

    # Statistics are identical in every split: split 0 writes them.
    if split == 0:
        tl.store(LSE + st_bh + head * st_h + tok, lse2 * _LN2, mask=row_ok)
        if WRITE_MAXL:
            # Per-head max of the running maxima (m is in log2 units) over this tile's rows.
            heads = tl.arange(0, G_P)
            sel = (grp[:, None] == heads[None, :]) & row_ok[:, None]
            mh = tl.max(tl.where(sel, m_i[:, None], float("-inf")), 0) * _LN2
            dst = MAXL + ((b * Hq + hg * G + heads.to(tl.int64)) * n_mblocks + pid_m)
            tl.store(dst, mh, mask=heads < G)


#: The forward kernel under its public name: :mod:`kernels.block_sparse` launches it with ``SPARSE``.
attn_fwd_kernel = _attn_fwd_kernel


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def window_sink_kwargs(causal: bool, window_size, sinks=None) -> tuple[bool, dict]:
    """``(causal, kwargs)``: the window / sink keyword arguments of a dense kernel launch (``causal``
    folded into the window, :func:`kernels._common.fold_window`); sinks only when given."""
    causal, wl, wr, has_window = fold_window(causal, window_size)
    kw = dict(window=(wl, wr), HAS_WINDOW=has_window)
    if sinks is not None:
        kw.update(SINKS=sinks, HAS_SINKS=True)
    return causal, kw


def _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot: str, vl=None,
                     window_size=None, sinks=None) -> dict:
    """Keyword arguments of a dense forward launch (all but ``TILE``)."""
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if vl is not None:  # varlen: the grid's T and S are the max sequence lengths
        T, S = vl["T"], vl["S"]
    causal, ws = window_sink_kwargs(bool(causal), window_size, sinks)
    return dict(
        Q=q, K=k, V=v, O=out, LSE=lse, MAXL=maxl if maxl is not None else lse,
        q_strides=q.stride(), k_strides=k.stride(), v_strides=v.stride(), o_strides=out.stride(),
        T=T, S=S, Hkv=Hkv, qk_scale=fwd_qk_scale(softmax_scale), n_mblocks=n_mblocks, opaque_zero=0,
        mask=None, mask_geom=None,
        G=Hq // Hkv, G_P=next_pow2(Hq // Hkv), HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=causal, V_IS_K=bool(v_is_k),
        WRITE_MAXL=maxl is not None, SPARSE=False, DOT=dot, OFF64=needs_off64(k, v), **ws,
        **(vl["kw"] if vl is not None else {}),
    )


_AUTOTUNERS: dict = {}


def _autotuned(arch: int, dk: int, dv: int, v_is_k: bool, dtype: str, varlen: bool = False):
    """``triton.autotune`` over :func:`fwd_configs` for these head dims, dtype family and launch kind
    (dense or varlen; one tuner each), keyed on the group size, causality and max-logit switch (and the
    dtype, Triton adds it)."""
    key = (arch, dk, dv, v_is_k, dtype == "fp32", varlen)
    if key not in _AUTOTUNERS:
        configs = [
            triton.Config(tile_constexprs(c, dk, dv, v_is_k), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in fwd_configs(arch, dk, dv, dtype, v_is_k, varlen)
        ]
        _AUTOTUNERS[key] = triton.autotune(
            configs=configs, key=["G", "CAUSAL", "WRITE_MAXL", "IS_VARLEN", "HAS_WINDOW", "HAS_SINKS"]
        )(_attn_fwd_kernel)
    return _AUTOTUNERS[key]


def attention_fwd(q, k, v, softmax_scale: float, causal: bool, *, return_max_logit: bool = False,
                  out=None, lse=None, config: TileConfig | None = None, allow_tf32: bool | None = None,
                  window_size: tuple[int, int] | None = None, sinks=None):
    """Fused attention forward.

    Args:
        q: ``[B, T, Hq, Dk]``; k: ``[B, S, Hkv, Dk]``; v: ``[B, S, Hkv, Dv]``; fp16/bf16/fp32, same
            dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``), any strides,
            ``Hq % Hkv == 0``. ``v`` may be a prefix view of ``k`` (``k[..., :Dv]``): detected,
            the shared tile is loaded once. Inputs are assumed validated by the caller.
        softmax_scale: multiplies ``q·kᵀ``.
        causal: bottom-right aligned (query i sees key j iff ``j <= i + S - T``).
        return_max_logit: also return the per-(batch, head) maximum visible scaled score.
        out, lse: optional preallocated outputs (``[B, T, Hq, Dv]`` in q.dtype, any strides;
            contiguous fp32 ``[B, Hq, T]``); tests pass NaN-filled buffers.
        config: force one :class:`kernels._common.TileConfig` (tests/benchmarks); default: a pinned or deterministic
            choice (:mod:`kernels.tuning`), else autotune on GPU; a single small config under the
            interpreter.
        allow_tf32: fp32 inputs only: TF32 tensor-core products (10-bit mantissa) instead of IEEE
            fp32; ``None`` follows ``torch.backends.cuda.matmul.allow_tf32`` (see
            :func:`kernels._common.dot_precision`).
        window_size: ``(left, right)`` sliding window (FlashAttention semantics, ``-1`` unbounded, bottom-right
            aligned; combined with ``causal``); key blocks wholly outside it are not visited.
        sinks: contiguous fp32 ``[Hq]`` attention-sink logits or None; each joins its head's softmax
            denominator with no value.

    Returns:
        ``(out [B, T, Hq, Dv] q.dtype, lse fp32 [B, Hq, T] natural log (+inf for rows without
        keys; with sinks it includes the sink term and is finite), max_logit fp32 [B, Hq] (of the scores,
        -inf for heads without visible keys) or None)``.

    Raises:
        ValueError: a pinned config is not a candidate.
    """
    B, T, Hq, Dk = q.shape
    Dv = v.shape[3]
    out, lse, early = fwd_outputs(q, Dv, out, lse, return_max_logit)
    if early is not None:
        return early
    v_is_k = is_prefix_alias(k, v)
    dot = dot_precision(q.dtype, allow_tf32)
    ws = dict(window_size=window_size, sinks=sinks)

    if not compiled_launch(q):
        cfg = config or interp_config(Dk, Dv)
        return _launch(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, cfg, dot, **ws)
    if config is None:
        cands = fwd_configs(device_arch(q.device), Dk, Dv, dtype_name(q.dtype), v_is_k)
        config = tuning.choose("attention_fwd", head_class(Dk, Dv), cands)
    if config is not None:
        return _launch(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, config, dot, **ws)
    return _launch_autotuned(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, dot, **ws)


def attention_fwd_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, causal: bool, *, return_max_logit: bool = False, out=None, lse=None,
                         config: TileConfig | None = None, allow_tf32: bool | None = None):
    """Fused attention forward over packed variable-length sequences (FlashAttention's varlen layout).

    Args:
        q: ``[total_q, Hq, Dk]``; k: ``[total_k, Hkv, Dk]``; v: ``[total_k, Hkv, Dv]`` (any strides;
            ``v`` may be a prefix view of ``k``). Sequence ``b`` is rows ``[cu_seqlens_q[b],
            cu_seqlens_q[b+1])`` of q and ``[cu_seqlens_k[b], cu_seqlens_k[b+1])`` of k/v.
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]``, non-decreasing, from 0 to total (empty sequences
            allowed). max_seqlen_q, max_seqlen_k: at least every sequence's length (they size the grid).
        softmax_scale, causal: as :func:`attention_fwd`; causal is bottom-right aligned per sequence.
        return_max_logit: also return the per-(sequence, head) max visible scaled score ``[B, Hq]``.
        out, lse: optional outputs ``[total_q, Hq, Dv]`` (q.dtype) and contiguous fp32 ``[Hq, total_q]``.
        config, allow_tf32: as :func:`attention_fwd`. Inputs are assumed validated.

    Returns:
        ``(out [total_q, Hq, Dv], lse fp32 [Hq, total_q] (FlashAttention's varlen layout; +inf for rows
        without keys), max_logit [B, Hq] or None)``. Programs past a sequence's end exit at once.
    """
    total_q, Hq, Dk = q.shape
    Dv = v.shape[2]
    out = torch.empty((total_q, Hq, Dv), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((Hq, total_q), dtype=torch.float32, device=q.device) if lse is None else lse
    B = cu_seqlens_q.numel() - 1
    if total_q == 0 or Hq == 0 or B <= 0 or max_seqlen_q == 0:
        maxl = torch.full((max(B, 0), Hq), float("-inf"), device=q.device) if return_max_logit else None
        return out, lse, maxl
    vl = varlen_plan(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    q4, k4, v4 = q[None], k[None], v[None]
    v_is_k = is_prefix_alias(k4, v4)
    dot = dot_precision(q.dtype, allow_tf32)
    args = (q4, k4, v4, out[None], lse[None], softmax_scale, causal, v_is_k, return_max_logit)
    if not compiled_launch(q):
        res = _launch(*args, config or interp_config(Dk, Dv), dot, vl)
    else:
        if config is None:
            cands = fwd_configs(device_arch(q.device), Dk, Dv, dtype_name(q.dtype), v_is_k, varlen=True)
            config = tuning.choose("attention_fwd", head_class(Dk, Dv), cands)
        res = _launch(*args, config, dot, vl) if config is not None else _launch_autotuned(*args, dot, vl)
    return out, lse, res[2]


def _maxl_buffer(q, B: int, Hq: int, n_mblocks: int, fill: float, return_max_logit: bool):
    """Per-row-block max-logit partials ``[B, Hq, n_mblocks]`` (or None): NaN where every entry must be
    written (amax propagates NaN, so a missed one fails the tests), -inf where a larger autotuned
    ``BLOCK_M`` leaves blocks unwritten."""
    if not return_max_logit:
        return None
    return torch.full((B, Hq, n_mblocks), fill, dtype=torch.float32, device=q.device)


def _launch(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, cfg: TileConfig, dot: str,
            vl=None, window_size=None, sinks=None):
    B, T, Hq, Dk = q.shape
    if vl is not None:
        B, T = vl["B"], vl["T"]
    Hkv, Dv = k.shape[2], v.shape[3]
    n_mblocks = triton.cdiv(T * (Hq // Hkv), cfg.block_m)
    maxl = _maxl_buffer(q, B, Hq, n_mblocks, float("nan"), return_max_logit)
    kw = _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot, vl,
                          window_size, sinks)
    kw.update(tile_constexprs(cfg, Dk, Dv, v_is_k))
    launch(_attn_fwd_kernel, (n_mblocks * B * Hkv, kw["TILE"].NSPLIT), **kw,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)


def _launch_autotuned(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, dot: str, vl=None,
                      window_size=None, sinks=None):
    B, T, Hq, Dk = q.shape
    if vl is not None:
        B, T = vl["B"], vl["T"]
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    arch = device_arch(q.device)
    # The tuner picks BLOCK_M: size the per-row-block max buffer for the smallest candidate; the
    # blocks a larger BLOCK_M does not write stay -inf.
    dtype = dtype_name(q.dtype)
    n_mblocks = triton.cdiv(T * G, min(c.block_m for c in fwd_configs(arch, Dk, Dv, dtype, v_is_k, vl is not None)))
    maxl = _maxl_buffer(q, B, Hq, n_mblocks, float("-inf"), return_max_logit)
    kw = _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot, vl,
                          window_size, sinks)
    grid = lambda meta: (triton.cdiv(T * G, meta["TILE"].BLOCK_M) * B * Hkv, meta["TILE"].NSPLIT)  # noqa: E731
    launch(_autotuned(arch, Dk, Dv, v_is_k, dtype, vl is not None), grid, **kw)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)
