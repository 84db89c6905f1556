"""Dense fused attention backward: ``delta`` preprocessing, a dK/dV kernel and a dQ kernel.

Same layout, packing and head-dim plan as :mod:`kernels.attention_fwd` (read its docstring):

* ``_bwd_preprocess``: ``delta[b, h, t] = sum_d dO * O`` in fp32.
* ``_attn_bwd_dkdv_kernel``: one program per (key block, batch, kv head, split). K/V tiles of the
  block stay resident; the program walks the packed ``[T*G]`` query rows (all heads of the group,
  so GQA needs no atomics) and accumulates ``dV = Pᵀ·dO`` and ``dK = dSᵀ·Q``. All products are
  formed transposed (``[BLOCK_N, BLOCK_M]``) so the key block is the M side of every dot.
  With ``NSPLIT > 1`` split ``s`` owns dV columns ``[s*BV, +BV)`` and dK columns ``[s*BK, +BK)``
  (the last split also the dK tail); every split recomputes P and dP. The absorbed shape needs
  ``NSPLIT = 4`` to stay spill-free (a 2-way split would hold 2 x 256 + 64 fp32 accumulator
  columns), so its scores are computed 4 times: about 2.6x the minimal tensor-core work.
* ``_attn_bwd_dq_kernel``: one program per packed row block (and split), walking the same key
  blocks as the forward (:func:`kernels.attention_fwd._fwd_block_range`), ``dQ = dS·K``.
* Both take the forward's constexpr ``SPARSE`` switch (:mod:`kernels.block_sparse` launches it): dQ
  walks the ``kv_indices`` sub-tiles like the forward, dK/dV the row tiles of the query blocks listed
  in the transposed ``q_indices`` (causally masked prefix first), per head of the group when the mask
  has per-head lists (:func:`_sparse_q_tile`, :func:`_sparse_masked_q_tiles`).

``RESIDENT`` / ``STREAM`` (per config) choose whether the fixed side's tiles (dkdv: K/V, dq: q/dO)
are loaded once or re-read every step; see :func:`_dkdv_block` for why re-reads need ``hide``.

Each output element is written by exactly one program: no atomics, bitwise deterministic.
When ``v`` is a prefix view of ``k`` the shared tile is loaded once and feeds both the score and
the ``dP`` contraction; ``dk`` still holds only the score-path gradient and ``dv`` the value path.
Rows without visible keys have ``lse = +inf``, so ``P = exp2(s - lse) = 0`` and their gradients vanish.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels import tuning
from kernels._common import (
    LOG2E,
    bwd_outputs,
    compiled_launch,
    device_arch,
    dot_precision,
    dtype_name,
    is_prefix_alias,
    launch,
    next_pow2,
)
from kernels._config import HAS_TRITON, CompileSpec
from kernels.attention_fwd import (
    DENSE_MASK_ARGS,
    SPEC_DTYPES,
    SPEC_SHAPES,
    SPEC_TF32_SHAPES,
    SPEC_WINDOW_DTYPES,
    SPEC_WINDOW_SHAPES,
    arch_family,
    head_class,
    head_plan,
    window_sink_consts,
    window_spec_values,
    window_tile_suffix,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention_fwd import (
        _dense_key_range,
        _fwd_block_start,
        _load_tile,
        _other_col,
        _packed_rows_until,
        _partial_keep,
        _sparse_full_tiles,
        _sparse_kv_keep,
        _sparse_kv_tile,
        _sparse_row_tile,
        _store_tile,
        _varlen_clip,
        _varlen_seq,
        _window_bounds,
    )

__all__ = ["BwdConfig", "attention_bwd", "bwd_configs", "compile_specs", "sink_grad"]


@dataclass(frozen=True)
class BwdConfig:
    """Tile configuration of one backward kernel (dkdv or dq)."""

    block_m: int
    block_n: int
    nsplit: int = 1
    num_warps: int = 4
    num_stages: int = 2
    resident: bool = True  # own tiles of the fixed side (dkdv: K/V, dq: q/dO) loaded once
    stream: bool = False  # other splits' pieces of the fixed side re-read every step (no LICM hoist)
    bc: int = 64

    @property
    def tile(self) -> str:
        """Report label: ``BLOCK_MxBLOCK_N``, ``/vN`` splits, ``/r`` own tiles re-read, ``/s`` streamed."""
        return (f"{self.block_m}x{self.block_n}" + (f"/v{self.nsplit}" if self.nsplit > 1 else "")
                + ("" if self.resident else "/r") + ("/s" if self.stream else ""))


# dkdv: BLOCK_N keys fixed per program, BLOCK_M packed query rows per step; dq: the other way
# round. Chosen from the compile report like the forward tables (kernels/attention_fwd.py) and
# compiled by the compile check. The absorbed shape (d576) splits dK/dV (dQ) columns over 4
# programs of 128 columns: two 256-column accumulators plus the rope tail do not fit the registers.
_DKDV_TABLE: dict[int, dict[str, list[BwdConfig]]] = {
    90: {
        "d64": [BwdConfig(64, 128, num_warps=8, num_stages=2)],
        "d128": [BwdConfig(32, 128, num_warps=8, num_stages=2), BwdConfig(32, 64, num_warps=8, num_stages=2)],
        "d256": [BwdConfig(32, 64, num_warps=8, num_stages=2), BwdConfig(16, 64, num_warps=8, num_stages=2)],
        "d576": [BwdConfig(16, 64, nsplit=4, num_warps=8, num_stages=2)],
    },
    80: {
        "d64": [BwdConfig(32, 128, num_warps=8, num_stages=2)],
        "d128": [BwdConfig(32, 64, num_warps=8, num_stages=2), BwdConfig(16, 128, num_warps=8, num_stages=2)],
        "d256": [BwdConfig(16, 32, num_warps=4, num_stages=2)],
        "d576": [BwdConfig(16, 32, nsplit=4, num_warps=8, num_stages=2)],
    },
}
# 99 KiB parts (sm86, sm89, sm120): every sm80 dK/dV entry fits (at most 72 KiB on sm86).
_DKDV_TABLE[86] = _DKDV_TABLE[80]
_DQ_TABLE: dict[int, dict[str, list[BwdConfig]]] = {
    90: {
        "d64": [BwdConfig(128, 64, num_warps=8, num_stages=2)],
        "d128": [BwdConfig(128, 64, num_warps=8, num_stages=2), BwdConfig(128, 32, num_warps=8, num_stages=2)],
        "d256": [BwdConfig(128, 32, num_warps=8, num_stages=2), BwdConfig(64, 16, num_warps=4, num_stages=2)],
        # 64x32 spilled 88 bytes with 16 heads per kv head (DeepSeek at 8-way TP) and 16 without the alias
        "d576": [BwdConfig(64, 16, nsplit=4, num_warps=8, num_stages=1, stream=True)],
    },
    80: {
        "d64": [BwdConfig(128, 64, num_warps=8, num_stages=2)],
        "d128": [BwdConfig(32, 64, num_warps=4, num_stages=3), BwdConfig(64, 32, num_warps=4, num_stages=2)],
        "d256": [BwdConfig(32, 32, num_warps=4, num_stages=2)],
        # 64-row tiles spilled 24 bytes with 16 heads per kv head and need 170 KiB without the alias
        "d576": [BwdConfig(32, 16, nsplit=4, num_warps=8, num_stages=2, stream=True)],
    },
    # 99 KiB parts: sm80's entries fit (at most 84 KiB on sm86) except d576 (154 KiB): 32 rows.
    86: {
        "d64": [BwdConfig(128, 64, num_warps=8, num_stages=2)],
        "d128": [BwdConfig(32, 64, num_warps=4, num_stages=3), BwdConfig(64, 32, num_warps=4, num_stages=2)],
        "d256": [BwdConfig(32, 32, num_warps=4, num_stages=2)],
        "d576": [BwdConfig(32, 16, nsplit=4, num_warps=8, num_stages=2, stream=True)],
    },
}

# fp32 inputs (IEEE dots by default, TF32 when allowed): one conservative config per class (fp32
# on a GPU is for checks, not speed); no wgmma needed, so small M tiles are fine.
# IEEE products (FMAs holding operand rows in registers) need narrower tiles than TF32 did; chosen
# from the compile report (triton 3.9): clean except the d576 dQ and, on sm90, d576 in general.
# d576 dK/dV: 16-key steps (32 with 8 splits needs 206 KiB without the v alias); one stage on
# the 99 KiB parts.
_DKDV_TABLE_FP32: dict[int, dict[str, list[BwdConfig]]] = {
    fam: {
        "d64": [BwdConfig(32, 32, num_warps=4, num_stages=2)],
        "d128": [BwdConfig(16, 32, num_warps=8, num_stages=2)],
        "d256": [BwdConfig(16, 32, num_warps=8, num_stages=2 if fam == 90 else 1)],
        "d576": [BwdConfig(16, 16, nsplit=8, num_warps=4, num_stages=1 if fam == 86 else 2, stream=True)],
    }
    for fam in (80, 86, 90)
}
_DQ_TABLE_FP32: dict[int, dict[str, list[BwdConfig]]] = {
    fam: {
        "d64": [BwdConfig(32, 16, num_warps=4, num_stages=2)],
        "d128": [BwdConfig(32, 32, num_warps=8, num_stages=2)],
        "d256": [BwdConfig(32, 32, num_warps=8, num_stages=2)],
        "d576": [BwdConfig(32, 16, nsplit=8, num_warps=8, num_stages=1, stream=True)],
    }
    for fam in (80, 86, 90)
}

# The absorbed class without the v alias (a separate value buffer), keyed (kind, family, fp32), where
# the alias tables do not fit or spill (measured, triton 3.9): sm90 dK/dV 16x64/v4 spills 152 bytes
# (v8: clean); sm86 dK/dV and dQ need 103 KiB with two stages.
_NO_ALIAS: dict[tuple[str, int, bool], list[BwdConfig]] = {
    ("dkdv", 90, False): [BwdConfig(16, 64, nsplit=8, num_warps=8, num_stages=2)],
    ("dkdv", 86, False): [BwdConfig(16, 32, nsplit=4, num_warps=8, num_stages=1)],
    ("dq", 86, False): [BwdConfig(32, 16, nsplit=4, num_warps=8, num_stages=1, stream=True)],
}

_PRE_BLOCK_T = 64
_PRE_WARPS = 4


def _pre_block_d(dv: int) -> int:
    return min(128, max(16, next_pow2(dv)))


def bwd_configs(kind: str, arch: int, dk: int, dv: int, dtype: str = "fp16", v_is_k: bool = True) -> list[BwdConfig]:
    """Autotune candidates of backward kernel ``kind`` ("dkdv" or "dq") for ``arch``, (Dk, Dv) and
    ``dtype`` ("fp16"/"bf16", or "fp32" with its own smaller table), from the table of
    :func:`kernels._config.arch_family` (entries fit its shared memory; the first is the preferred
    one, used in deterministic mode). ``v_is_k=False`` in the absorbed class: :data:`_NO_ALIAS`
    where the alias tables do not fit or spill."""
    fam, cls = arch_family(arch), head_class(dk, dv)
    if dtype == "fp32":
        table = {"dkdv": _DKDV_TABLE_FP32, "dq": _DQ_TABLE_FP32}[kind]
    else:
        table = {"dkdv": _DKDV_TABLE, "dq": _DQ_TABLE}[kind]
    if cls == "d576" and not v_is_k and (kind, fam, dtype == "fp32") in _NO_ALIAS:
        return list(_NO_ALIAS[(kind, fam, dtype == "fp32")])
    return list(table[fam][cls])


def interp_config(dk: int, dv: int) -> BwdConfig:
    """The single interpreter configuration (value split in two above 256 to exercise that path)."""
    return BwdConfig(32, 32, nsplit=2 if dv > 256 else 1, num_warps=4, num_stages=1)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    _LOG2E = tl.constexpr(LOG2E)
    _LANES = tl.constexpr(64)  # q_indices lanes read per step when counting masked row tiles

    @triton.jit
    def _bwd_preprocess(
        O, DO, DELTA,
        sob, sot, soh, sod, sdob, sdot, sdoh, sdod,
        T, Hq,
        HEAD_DV: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``DELTA[b, h, t] = sum_d O * dO`` (fp32); grid ``(cdiv(T, BLOCK_T) * B*Hq,)``."""
        n_t = tl.cdiv(T, BLOCK_T)  # axis 0 flattened (batch*head, token block): no 65535 limit
        pid_t = tl.program_id(0) % n_t
        pid_bh = tl.program_id(0) // n_t
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = tok < T
        o_row = tok.to(tl.int64) * sot
        do_row = tok.to(tl.int64) * sdot
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c in tl.static_range(0, HEAD_DV, BLOCK_D):
            o = _load_tile(O + b * sob + h * soh, o_row, ok, c, sod, HEAD_DV, BLOCK_D, True, c + BLOCK_D > HEAD_DV)
            do = _load_tile(DO + b * sdob + h * sdoh, do_row, ok, c, sdod, HEAD_DV, BLOCK_D, True,
                            c + BLOCK_D > HEAD_DV)
            acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + (b * Hq + h) * T + tok, acc, mask=ok)

    @triton.jit
    def _bwd_q_range(n_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
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
    def _window_q_range(n_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        WIN_L, WIN_R):
        """Packed row blocks ``[m_lo, m_end)`` with a token whose window reaches a key of
        ``[n_start, +BLOCK_N)``: token t sees key j iff ``j - WIN_R <= t + S - T <= j + WIN_L``."""
        k_last = tl.minimum(n_start + BLOCK_N, S) - 1
        t_lo = tl.where(WIN_R < 0, 0, tl.maximum(n_start - WIN_R - (S - T), 0))
        t_end = tl.where(WIN_L < 0, T, tl.minimum(tl.maximum(k_last + WIN_L - (S - T) + 1, 0), T))
        m_lo = (t_lo * G) // BLOCK_M
        m_end = tl.maximum(tl.cdiv(t_end * G, BLOCK_M), m_lo)
        return m_lo, m_end

    @triton.jit
    def _dkdv_block(
        dk_acc, dk_tail, dv_acc, k_own, k_tail, v_own, keys, k_row, key_ok, m_start, row_end,
        q_base, k_base, v_base, do_base, LSE_BH, DELTA_BH,
        sqt, sqh, sqd, skd, svs, svd, sdot, sdoh, sdod,
        T, S, qk_scale, split, hide,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
        V_IS_K: tl.constexpr, BLOCK_M: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
        BV: tl.constexpr, BC: tl.constexpr, NSPLIT: tl.constexpr, MASKED: tl.constexpr,
        RESIDENT: tl.constexpr, STREAM: tl.constexpr, DOT: tl.constexpr,
        WIN_L, WIN_R, HAS_WINDOW: tl.constexpr,
        keep_t=None, HAS_KEEP: tl.constexpr = False, st_h=0, VARLEN: tl.constexpr = False,
    ):
        """Accumulate one packed query-row block into the key block's dK/dV (transposed products).
        Rows at or past ``row_end`` (``T*G``, or the end of a block-sparse mask query block) read
        ``lse = +inf`` and contribute nothing. ``VARLEN``: the statistics' head stride is ``st_h``
        (``total_q``), not ``T``.

        ``hide`` is 0, but opaque to the compiler. Added to the base of the loop-invariant K/V
        re-loads (own tiles without ``RESIDENT``, the other splits' pieces with ``STREAM``) it stops
        Triton's LICM from hoisting them: they stream through the pipeline instead of staying live
        in registers for the whole loop.
        """
        hide_other = 0
        if STREAM:
            hide_other = hide
        MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
        MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
        MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV
        if not RESIDENT:
            # Re-read the key block's tiles (cache hits) instead of holding them for the whole loop.
            k_own = _load_tile(k_base + hide, k_row, key_ok, split * BK, skd, HEAD_DK, BK, True, MASK_K)
            if BT > 0:
                k_tail = _load_tile(k_base + hide, k_row, key_ok, NSPLIT * BK, skd, HEAD_DK, BT, True, MASK_T)
            if V_IS_K:
                v_own = k_own
            else:
                v_own = _load_tile(v_base + hide, keys.to(tl.int64) * svs, key_ok, split * BV, svd, HEAD_DV, BV,
                                   True, MASK_V)
        tok, grp, row_ok = _packed_rows_until(m_start, row_end, G, BLOCK_M)
        q_row = tok.to(tl.int64) * sqt + grp.to(tl.int64) * sqh
        do_row = tok.to(tl.int64) * sdot + grp.to(tl.int64) * sdoh
        q_own = _load_tile(q_base, q_row, row_ok, split * BK, sqd, HEAD_DK, BK, True, MASK_K)
        do_own = _load_tile(do_base, do_row, row_ok, split * BV, sdod, HEAD_DV, BV, True, MASK_V)
        st = tl.dot(k_own, tl.trans(q_own), input_precision=DOT)
        dpt = tl.dot(v_own, tl.trans(do_own), input_precision=DOT)
        # Other splits' columns, re-loaded in BC-wide pieces (alias: one k piece feeds both sums).
        N_OTHER: tl.constexpr = (NSPLIT - 1) * (BK // BC)
        for c in tl.static_range(N_OTHER):
            col = _other_col(c, split, BK, BC)
            q_c = _load_tile(q_base, q_row, row_ok, col, sqd, HEAD_DK, BC, True, MASK_K)
            k_c = _load_tile(k_base + hide_other, k_row, key_ok, col, skd, HEAD_DK, BC, True, MASK_K)
            st = tl.dot(k_c, tl.trans(q_c), st, input_precision=DOT)
            if V_IS_K:
                do_c = _load_tile(do_base, do_row, row_ok, col, sdod, HEAD_DV, BC, True, True)
                dpt = tl.dot(k_c, tl.trans(do_c), dpt, input_precision=DOT)
        if not V_IS_K:
            N_OTHER_V: tl.constexpr = (NSPLIT - 1) * (BV // BC)
            for c in tl.static_range(N_OTHER_V):
                col = _other_col(c, split, BV, BC)
                do_c = _load_tile(do_base, do_row, row_ok, col, sdod, HEAD_DV, BC, True, MASK_V)
                v_c = _load_tile(v_base + hide_other, keys.to(tl.int64) * svs, key_ok, col, svd, HEAD_DV, BC, True,
                                 MASK_V)
                dpt = tl.dot(v_c, tl.trans(do_c), dpt, input_precision=DOT)
        q_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=q_own.dtype)
        if BT > 0:
            q_tail = _load_tile(q_base, q_row, row_ok, NSPLIT * BK, sqd, HEAD_DK, BT, True, MASK_T)
            st = tl.dot(k_tail, tl.trans(q_tail), st, input_precision=DOT)
        # Padding rows read lse = +inf: P = 0 there.
        if VARLEN:
            st_off = grp.to(tl.int64) * st_h + tok
        else:
            st_off = grp.to(tl.int64) * T + tok
        lse = tl.load(LSE_BH + st_off, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA_BH + st_off, mask=row_ok, other=0.0)
        st = st * qk_scale
        if MASKED:
            if CAUSAL:
                st = tl.where(keys[:, None] <= tok[None, :] + (S - T), st, float("-inf"))
            if HAS_WINDOW:
                w_lo, w_hi = _window_bounds(tok, T, S, WIN_L, WIN_R)
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
    def _sparse_q_tile(idx_base, sil, j, NSUB_M, rows_per_block, row_limit, BLOCK_M: tl.constexpr):
        """Row sub-tile ``j`` of a ``q_indices`` row: the ``j % NSUB_M``-th ``BLOCK_M`` packed rows of
        the ``j // NSUB_M``-th listed query block. Returns ``(first packed row, end of its valid rows)``."""
        blk_start = tl.load(idx_base + (j // NSUB_M).to(tl.int64) * sil) * rows_per_block
        return blk_start + (j % NSUB_M) * BLOCK_M, tl.minimum(blk_start + rows_per_block, row_limit)

    @triton.jit
    def _sparse_q_keep(PART, BITS, idx_base, part_off, sil, j, NSUB_M, m_start, c_loc, MASK_BM, MASK_BN,
                       G: tl.constexpr, BLOCK_M: tl.constexpr):
        """``[BLOCK_N, BLOCK_M]`` (keys x rows) keep-bits of row sub-tile ``j`` of a ``q_indices`` row
        for the dK/dV pass: ``PART + part_off`` holds the row's partial-block ids (aligned with its
        ``q_indices`` lanes); ``c_loc``: the key tile's offsets inside its mask key block."""
        lane = (j // NSUB_M).to(tl.int64) * sil
        pid = tl.load(PART + part_off + lane)
        q_first = tl.load(idx_base + lane) * MASK_BM
        tok = (m_start + tl.arange(0, BLOCK_M)) // G
        return _partial_keep(BITS, pid, (tok - q_first)[None, :], c_loc[:, None], MASK_BM, MASK_BN)

    @triton.jit
    def _sparse_masked_q_tiles(idx_base, sil, n_blk, first_full_row, rows_per_block, NSUB_M,
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

    @triton.jit
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        sqb, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdob, sdot, sdoh, sdod,
        sdkb, sdks, sdkh, sdkd, sdvb, sdvs, sdvh, sdvd,
        T, S, Hkv, qk_scale, sm_scale, opaque_zero,
        QN, QI, snb, snh, snk, sib, sih, sik, sil, MASK_BM, MASK_BN, KV_REP,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
        CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, RESIDENT: tl.constexpr,
        STREAM: tl.constexpr, SPARSE: tl.constexpr, DOT: tl.constexpr,
        PART=None, BITS=None, HAS_PARTIAL: tl.constexpr = False,
        CU_Q=None, CU_K=None, TOTAL_Q=0, IS_VARLEN: tl.constexpr = False,
        WIN_L=-1, WIN_R=-1, HAS_WINDOW: tl.constexpr = False,
    ):
        """Grid ``(n_n * B*Hkv, NSPLIT)``: dK/dV of one key tile of one kv head.

        ``HAS_WINDOW`` (dense only): sliding window ``WIN_L``/``WIN_R``; only the row blocks of
        :func:`_window_q_range` are walked, all masked.

        Dense: ``n_n = cdiv(S, BLOCK_N)``, every packed query row of the group is walked (block-mask
        arguments unused, ``KV_REP = 1``). Block-sparse: ``n_n = cdiv(S, MASK_BN) * NSUB_N`` key tiles,
        each inside one mask key block ``kb``; for each of the ``KV_REP`` head groups ``hg`` of the kv
        head (one after the other, no atomics) the rows of the query blocks listed in
        ``QI[b, hg, kb, :QN[b, hg, kb]]`` are walked in ``BLOCK_M`` steps. ``HAS_PARTIAL``: ``PART``
        (laid out like ``QI``) and ``BITS`` as in the forward; every row tile then runs masked.
        ``IS_VARLEN`` (dense only): packed sequences as in the forward kernel; key tiles past their
        sequence's end visit nothing and store nothing.
        """
        if SPARSE:
            # Sub-tiles per mask block (mask blocks need not be multiples of the kernel tiles).
            NSUB_M = tl.cdiv(MASK_BM * G, BLOCK_M)
            NSUB_N = tl.cdiv(MASK_BN, BLOCK_N)
            n_n = tl.cdiv(S, MASK_BN) * NSUB_N
        else:
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
        if IS_VARLEN:
            q0, k0, T, S = _varlen_seq(CU_Q, CU_K, b)
            q_b, k_b, v_b, do_b = q0 * sqt, k0 * sks, k0 * svs, q0 * sdot
            st_bh, st_h = q0, TOTAL_Q
        else:
            q_b, k_b, v_b, do_b = b * sqb, b * skb, b * svb, b * sdob
            st_bh, st_h = b * Hq * T, T
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
        k_base = K + k_b + hkv * skh
        v_base = V + v_b + hkv * svh
        k_row = keys.to(tl.int64) * sks
        k_own = tl.zeros([BLOCK_N, BK], dtype=K.dtype.element_ty)
        k_tail = tl.zeros([BLOCK_N, BT if BT > 0 else 16], dtype=K.dtype.element_ty)
        v_own = tl.zeros([BLOCK_N, BV], dtype=V.dtype.element_ty)
        if RESIDENT:
            k_own = _load_tile(k_base, k_row, key_ok, split * BK, skd, HEAD_DK, BK, True, MASK_K)
            if BT > 0:
                k_tail = _load_tile(k_base, k_row, key_ok, NSPLIT * BK, skd, HEAD_DK, BT, True, MASK_T)
            if V_IS_K:
                v_own = k_own  # the shared latent tile, loaded once
            else:
                v_own = _load_tile(v_base, keys.to(tl.int64) * svs, key_ok, split * BV, svd, HEAD_DV, BV, True,
                                   MASK_V)

        dk_acc = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
        dk_tail = tl.zeros([BLOCK_N, BT if BT > 0 else 16], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BV], dtype=tl.float32)

        if SPARSE:
            rows_per_block = MASK_BM * G
            # First packed row whose token sees the tile's last valid key (bottom-right causal).
            first_full_row = (tl.minimum(n_start + BLOCK_N, kend) - 1 - S + T) * G
            for r in range(0, KV_REP):
                hg = hkv * KV_REP + r
                q_base = Q + b * sqb + hg * G * sqh
                do_base = DO + b * sdob + hg * G * sdoh
                LSE_BH = LSE + (b * Hq + hg * G) * T
                DELTA_BH = DELTA + (b * Hq + hg * G) * T
                n_blk = tl.load(QN + b * snb + hg * snh + kb.to(tl.int64) * snk)
                idx_base = QI + b * sib + hg * sih + kb.to(tl.int64) * sik
                n_tiles = n_blk * NSUB_M
                if NSPLIT > 1 or HAS_PARTIAL:  # split bodies: one masked loop; partial blocks: bits everywhere
                    n_masked = n_tiles
                elif CAUSAL:
                    n_masked = _sparse_masked_q_tiles(idx_base, sil, n_blk, first_full_row, rows_per_block,
                                                      NSUB_M, BLOCK_M, _LANES)
                else:
                    n_masked = 0
                for j in range(0, n_masked):
                    m_start, row_end = _sparse_q_tile(idx_base, sil, j, NSUB_M, rows_per_block, T * G, BLOCK_M)
                    keep_t = None
                    if HAS_PARTIAL:
                        keep_t = _sparse_q_keep(PART, BITS, idx_base, b * sib + hg * sih + kb.to(tl.int64) * sik,
                                                sil, j, NSUB_M, m_start, keys - kb * MASK_BN, MASK_BM, MASK_BN,
                                                G, BLOCK_M)
                    dk_acc, dk_tail, dv_acc = _dkdv_block(
                        dk_acc, dk_tail, dv_acc, k_own, k_tail, v_own, keys, k_row, key_ok, m_start, row_end,
                        q_base, k_base, v_base, do_base, LSE_BH, DELTA_BH,
                        sqt, sqh, sqd, skd, svs, svd, sdot, sdoh, sdod, T, S, qk_scale, split, j * opaque_zero,
                        G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BK, BT, BV, BC, NSPLIT, True, RESIDENT,
                        STREAM, DOT, WIN_L, WIN_R, False, keep_t, HAS_PARTIAL,
                    )
                if NSPLIT == 1:  # row tiles that see the whole key tile skip the mask
                    for j in range(n_masked, n_tiles):
                        m_start, row_end = _sparse_q_tile(idx_base, sil, j, NSUB_M, rows_per_block, T * G,
                                                          BLOCK_M)
                        dk_acc, dk_tail, dv_acc = _dkdv_block(
                            dk_acc, dk_tail, dv_acc, k_own, k_tail, v_own, keys, k_row, key_ok, m_start, row_end,
                            q_base, k_base, v_base, do_base, LSE_BH, DELTA_BH,
                            sqt, sqh, sqd, skd, svs, svd, sdot, sdoh, sdod, T, S, qk_scale, split, j * opaque_zero,
                            G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BK, BT, BV, BC, NSPLIT, False, RESIDENT,
                            STREAM, DOT, WIN_L, WIN_R, False,
                        )
        else:
            q_base = Q + q_b + hkv * G * sqh
            do_base = DO + do_b + hkv * G * sdoh
            LSE_BH = LSE + st_bh + hkv * G * st_h
            DELTA_BH = DELTA + st_bh + hkv * G * st_h
            if HAS_WINDOW:  # the row blocks whose window reaches this key block, all masked
                m_lo, m_end = _window_q_range(n_start, T, S, G, BLOCK_M, BLOCK_N, WIN_L, WIN_R)
                m_full = m_end
            else:
                m_lo, m_full, m_end = _bwd_q_range(n_start, T, S, G, BLOCK_M, BLOCK_N, CAUSAL)
            if IS_VARLEN:
                m_full, m_end = _varlen_clip(m_full, m_end, n_start < S)
                m_lo = tl.minimum(m_lo, m_full)
            if NSPLIT > 1:  # large (split) bodies: one masked loop halves code size and compile time
                m_full = m_end
            for m in range(m_lo, m_full):
                dk_acc, dk_tail, dv_acc = _dkdv_block(
                    dk_acc, dk_tail, dv_acc, k_own, k_tail, v_own, keys, k_row, key_ok, m * BLOCK_M, T * G,
                    q_base, k_base, v_base, do_base, LSE_BH, DELTA_BH,
                    sqt, sqh, sqd, skd, svs, svd, sdot, sdoh, sdod, T, S, qk_scale, split, m * opaque_zero,
                    G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BK, BT, BV, BC, NSPLIT, True, RESIDENT,
                    STREAM, DOT, WIN_L, WIN_R, HAS_WINDOW, st_h=st_h, VARLEN=IS_VARLEN,
                )
            if NSPLIT == 1:  # row blocks that see the whole key block skip the mask
                for m in range(m_full, m_end):
                    dk_acc, dk_tail, dv_acc = _dkdv_block(
                        dk_acc, dk_tail, dv_acc, k_own, k_tail, v_own, keys, k_row, key_ok, m * BLOCK_M, T * G,
                        q_base, k_base, v_base, do_base, LSE_BH, DELTA_BH,
                        sqt, sqh, sqd, skd, svs, svd, sdot, sdoh, sdod, T, S, qk_scale, split, m * opaque_zero,
                        G, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BK, BT, BV, BC, NSPLIT, False, RESIDENT,
                        STREAM, DOT, WIN_L, WIN_R, False, st_h=st_h, VARLEN=IS_VARLEN,
                    )

        # Output offsets computed here, not held across the loop (register pressure).
        if IS_VARLEN:
            k0 = tl.load(CU_K + b).to(tl.int64)
            dk_b, dv_b = k0 * sdks, k0 * sdvs
        else:
            dk_b, dv_b = b * sdkb, b * sdvb
        dk_base = DK + dk_b + hkv * sdkh
        dk_row = keys.to(tl.int64) * sdks
        _store_tile(dk_base, dk_row, key_ok, split * BK, sdkd, HEAD_DK, BK, MASK_K,
                    (dk_acc * sm_scale).to(DK.dtype.element_ty))
        if BT > 0:
            if split == NSPLIT - 1:
                _store_tile(dk_base, dk_row, key_ok, NSPLIT * BK, sdkd, HEAD_DK, BT, MASK_T,
                            (dk_tail * sm_scale).to(DK.dtype.element_ty))
        _store_tile(DV + dv_b + hkv * sdvh, keys.to(tl.int64) * sdvs, key_ok, split * BV, sdvd, HEAD_DV, BV,
                    MASK_V, dv_acc.to(DV.dtype.element_ty))

    @triton.jit
    def _dq_block(
        dq_acc, dq_tail, q_own, q_tail, do_own, lse, delta, tok, row_ok, q_row, do_row, start_n, kend,
        q_base, k_base, v_base, do_base, sqd, sks, skd, svs, svd, sdod,
        T, S, qk_scale, split, hide,
        HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_N: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        BC: tl.constexpr, NSPLIT: tl.constexpr, MASKED: tl.constexpr, RESIDENT: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, WIN_L, WIN_R, HAS_WINDOW: tl.constexpr,
        keep=None, HAS_KEEP: tl.constexpr = False,
    ):
        """Accumulate one key block into a packed row block's dQ (``hide``: see :func:`_dkdv_block`,
        here for the q/dO re-loads); keys at or past ``kend`` are masked out when ``MASKED``."""
        hide_other = 0
        if STREAM:
            hide_other = hide
        MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
        MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
        MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV
        if not RESIDENT:
            # Re-read the row block's q/dO tiles (cache hits) instead of holding them for the whole loop.
            q_own = _load_tile(q_base + hide, q_row, row_ok, split * BK, sqd, HEAD_DK, BK, True, MASK_K)
            if BT > 0:
                q_tail = _load_tile(q_base + hide, q_row, row_ok, NSPLIT * BK, sqd, HEAD_DK, BT, True, MASK_T)
            do_own = _load_tile(do_base + hide, do_row, row_ok, split * BV, sdod, HEAD_DV, BV, True, MASK_V)
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < kend
        k_row = keys.to(tl.int64) * sks
        k_own = _load_tile(k_base, k_row, key_ok, split * BK, skd, HEAD_DK, BK, MASKED, MASK_K)
        if V_IS_K:
            v_own = k_own
        else:
            v_own = _load_tile(v_base, keys.to(tl.int64) * svs, key_ok, split * BV, svd, HEAD_DV, BV, MASKED,
                               MASK_V)
        s = tl.dot(q_own, tl.trans(k_own), input_precision=DOT)
        dp = tl.dot(do_own, tl.trans(v_own), input_precision=DOT)
        N_OTHER: tl.constexpr = (NSPLIT - 1) * (BK // BC)
        for c in tl.static_range(N_OTHER):
            col = _other_col(c, split, BK, BC)
            q_c = _load_tile(q_base + hide_other, q_row, row_ok, col, sqd, HEAD_DK, BC, True, MASK_K)
            k_c = _load_tile(k_base, k_row, key_ok, col, skd, HEAD_DK, BC, MASKED, MASK_K)
            s = tl.dot(q_c, tl.trans(k_c), s, input_precision=DOT)
            if V_IS_K:
                do_c = _load_tile(do_base + hide_other, do_row, row_ok, col, sdod, HEAD_DV, BC, True, True)
                dp = tl.dot(do_c, tl.trans(k_c), dp, input_precision=DOT)
        if not V_IS_K:
            N_OTHER_V: tl.constexpr = (NSPLIT - 1) * (BV // BC)
            for c in tl.static_range(N_OTHER_V):
                col = _other_col(c, split, BV, BC)
                do_c = _load_tile(do_base + hide_other, do_row, row_ok, col, sdod, HEAD_DV, BC, True, MASK_V)
                v_c = _load_tile(v_base, keys.to(tl.int64) * svs, key_ok, col, svd, HEAD_DV, BC, MASKED, MASK_V)
                dp = tl.dot(do_c, tl.trans(v_c), dp, input_precision=DOT)
        k_tail = tl.zeros([BLOCK_N, BT if BT > 0 else 16], dtype=k_own.dtype)
        if BT > 0:
            k_tail = _load_tile(k_base, k_row, key_ok, NSPLIT * BK, skd, HEAD_DK, BT, MASKED, MASK_T)
            s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=DOT)
        s = s * qk_scale
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= tok[:, None] + (S - T))
            if HAS_WINDOW:
                w_lo, w_hi = _window_bounds(tok, T, S, WIN_L, WIN_R)
                visible = visible & (keys[None, :] >= w_lo[:, None]) & (keys[None, :] <= w_hi[:, None])
            if HAS_KEEP:  # partial block of a FlexAttention mask: per-token bits
                visible = visible & keep
            s = tl.where(visible, s, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        ds = (p * (dp - delta[:, None])).to(k_own.dtype)
        dq_acc = tl.dot(ds, k_own, dq_acc, input_precision=DOT)
        if BT > 0:
            dq_tail = tl.dot(ds, k_tail, dq_tail, input_precision=DOT)
        return dq_acc, dq_tail

    @triton.jit
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ,
        sqb, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sdob, sdot, sdoh, sdod,
        sdqb, sdqt, sdqh, sdqd,
        T, S, Hkv, qk_scale, sm_scale, opaque_zero,
        KVN, KVI, snb, snh, snq, sib, sih, siq, sil, MASK_BM, MASK_BN, KV_REP,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
        CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr, RESIDENT: tl.constexpr,
        STREAM: tl.constexpr, SPARSE: tl.constexpr, DOT: tl.constexpr,
        PART=None, BITS=None, HAS_PARTIAL: tl.constexpr = False,
        CU_Q=None, CU_K=None, TOTAL_Q=0, IS_VARLEN: tl.constexpr = False,
        WIN_L=-1, WIN_R=-1, HAS_WINDOW: tl.constexpr = False,
    ):
        """Grid ``(n_m * B*Hkv*KV_REP, NSPLIT)``: dQ of one packed row tile of one head group; row
        tiles and key walk exactly as in the forward kernel (``kernels.attention_fwd._attn_fwd_kernel``)."""
        if SPARSE:
            # Sub-tiles per mask block (mask blocks need not be multiples of the kernel tiles).
            NSUB_M = tl.cdiv(MASK_BM * G, BLOCK_M)
            NSUB_N = tl.cdiv(MASK_BN, BLOCK_N)
            n_m = tl.cdiv(T, MASK_BM) * NSUB_M
        else:
            n_m = tl.cdiv(T * G, BLOCK_M)  # axis 0 flattened (batch*head group, row block), as in the forward
        pid_m = tl.program_id(0) % n_m
        pid_bh = tl.program_id(0) // n_m
        if NSPLIT > 1:
            split = tl.program_id(1)
        else:
            split = 0
        n_hg = Hkv * KV_REP
        b = (pid_bh // n_hg).to(tl.int64)
        hg = (pid_bh % n_hg).to(tl.int64)
        Hq = n_hg * G
        # Batch offsets; statistics at st_bh + head * st_h + token (varlen: as in the forward).
        if IS_VARLEN:
            q0, k0, T, S = _varlen_seq(CU_Q, CU_K, b)
            q_b, k_b, v_b, do_b = q0 * sqt, k0 * sks, k0 * svs, q0 * sdot
            st_bh, st_h = q0, TOTAL_Q
        else:
            q_b, k_b, v_b, do_b = b * sqb, b * skb, b * svb, b * sdob
            st_bh, st_h = b * Hq * T, T
        MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
        MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
        MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV

        if SPARSE:
            qb, m_start, row_end = _sparse_row_tile(pid_m, T, G, MASK_BM, NSUB_M, BLOCK_M)
        else:
            m_start = pid_m * BLOCK_M
            row_end = T * G
        tok, grp, row_ok = _packed_rows_until(m_start, row_end, G, BLOCK_M)
        q_base = Q + q_b + hg * G * sqh
        do_base = DO + do_b + hg * G * sdoh
        k_base = K + k_b + (hg // KV_REP) * skh
        v_base = V + v_b + (hg // KV_REP) * svh
        q_row = tok.to(tl.int64) * sqt + grp.to(tl.int64) * sqh
        do_row = tok.to(tl.int64) * sdot + grp.to(tl.int64) * sdoh
        q_own = tl.zeros([BLOCK_M, BK], dtype=Q.dtype.element_ty)
        q_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=Q.dtype.element_ty)
        do_own = tl.zeros([BLOCK_M, BV], dtype=DO.dtype.element_ty)
        if RESIDENT:
            q_own = _load_tile(q_base, q_row, row_ok, split * BK, sqd, HEAD_DK, BK, True, MASK_K)
            if BT > 0:
                q_tail = _load_tile(q_base, q_row, row_ok, NSPLIT * BK, sqd, HEAD_DK, BT, True, MASK_T)
            do_own = _load_tile(do_base, do_row, row_ok, split * BV, sdod, HEAD_DV, BV, True, MASK_V)
        head = st_bh + (hg * G + grp.to(tl.int64)) * st_h + tok
        # lse = +inf (no visible key) makes P = 0 on the whole row.
        lse = tl.load(LSE + head, mask=row_ok, other=float("inf")) * _LOG2E
        delta = tl.load(DELTA + head, mask=row_ok, other=0.0)

        dq_acc = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
        dq_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=tl.float32)
        if SPARSE:
            n_blk = tl.load(KVN + b * snb + hg * snh + qb.to(tl.int64) * snq)
            idx_base = KVI + b * sib + hg * sih + qb.to(tl.int64) * siq
            n_tiles = n_blk * NSUB_N
            if NSPLIT == 1:  # the prefix of sub-tiles every row sees in full skips the masks
                if CAUSAL:
                    limit = tl.minimum(tl.maximum(m_start // G + S - T + 1, 0), S)
                else:
                    limit = S
                if HAS_PARTIAL:  # partial blocks need their bits: no unmasked prefix
                    limit = 0
                n_lo = _sparse_full_tiles(idx_base, sil, n_blk, limit, NSUB_N, MASK_BN, BLOCK_N, _LANES)
                for j in range(0, n_lo):
                    start_n, kend = _sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N)
                    dq_acc, dq_tail = _dq_block(
                        dq_acc, dq_tail, q_own, q_tail, do_own, lse, delta, tok, row_ok, q_row, do_row,
                        start_n, kend, q_base, k_base, v_base, do_base, sqd, sks, skd, svs, svd, sdod,
                        T, S, qk_scale, split, j * opaque_zero, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_N, BK, BT,
                        BV, BC, NSPLIT, False, RESIDENT, STREAM, DOT, WIN_L, WIN_R, False,
                    )
            else:
                n_lo = 0
            for j in range(n_lo, n_tiles):
                start_n, kend = _sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N)
                keep = None
                if HAS_PARTIAL:
                    keep = _sparse_kv_keep(PART, BITS, b * sib + hg * sih + qb.to(tl.int64) * siq, sil, j, NSUB_N,
                                           tok, qb, MASK_BM, MASK_BN, BLOCK_N)
                dq_acc, dq_tail = _dq_block(
                    dq_acc, dq_tail, q_own, q_tail, do_own, lse, delta, tok, row_ok, q_row, do_row,
                    start_n, kend, q_base, k_base, v_base, do_base, sqd, sks, skd, svs, svd, sdod,
                    T, S, qk_scale, split, j * opaque_zero, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_N, BK, BT,
                    BV, BC, NSPLIT, True, RESIDENT, STREAM, DOT, WIN_L, WIN_R, False, keep, HAS_PARTIAL,
                )
        else:
            n_full, n_lo, n_end = _dense_key_range(m_start, T, S, G, BLOCK_M, BLOCK_N, CAUSAL, NSPLIT,
                                                   WIN_L, WIN_R, HAS_WINDOW)
            if IS_VARLEN:  # past its sequence's end a program visits nothing
                n_full, n_end = _varlen_clip(n_full, n_end, m_start < T * G)
            if NSPLIT == 1 and not HAS_WINDOW:  # blocks every row sees in full skip the masks
                for i in range(0, n_full):
                    dq_acc, dq_tail = _dq_block(
                        dq_acc, dq_tail, q_own, q_tail, do_own, lse, delta, tok, row_ok, q_row, do_row,
                        _fwd_block_start(i, BLOCK_N), S, q_base, k_base, v_base, do_base, sqd, sks, skd, svs, svd,
                        sdod, T, S, qk_scale, split, i * opaque_zero, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_N,
                        BK, BT, BV, BC, NSPLIT, False, RESIDENT, STREAM, DOT, WIN_L, WIN_R, False,
                    )
            for i in range(n_lo, n_end):
                dq_acc, dq_tail = _dq_block(
                    dq_acc, dq_tail, q_own, q_tail, do_own, lse, delta, tok, row_ok, q_row, do_row,
                    _fwd_block_start(i, BLOCK_N), S, q_base, k_base, v_base, do_base, sqd, sks, skd, svs, svd,
                    sdod, T, S, qk_scale, split, i * opaque_zero, HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_N,
                    BK, BT, BV, BC, NSPLIT, True, RESIDENT, STREAM, DOT, WIN_L, WIN_R, HAS_WINDOW,
                )

        if IS_VARLEN:  # computed here, not held across the loop (register pressure)
            dq_b = tl.load(CU_Q + b).to(tl.int64) * sdqt
        else:
            dq_b = b * sdqb
        dq_base = DQ + dq_b + hg * G * sdqh
        dq_row = tok.to(tl.int64) * sdqt + grp.to(tl.int64) * sdqh
        _store_tile(dq_base, dq_row, row_ok, split * BK, sdqd, HEAD_DK, BK, MASK_K,
                    (dq_acc * sm_scale).to(DQ.dtype.element_ty))
        if BT > 0:
            if split == NSPLIT - 1:
                _store_tile(dq_base, dq_row, row_ok, NSPLIT * BK, sdqd, HEAD_DK, BT, MASK_T,
                            (dq_tail * sm_scale).to(DQ.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _plan_constexprs(cfg: BwdConfig, dk: int, dv: int, v_is_k: bool) -> dict:
    plan = head_plan(dk, dv, v_is_k, cfg.nsplit, cfg.bc)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NSPLIT=plan.nsplit, BK=plan.bk, BT=plan.bt,
                BV=plan.bv, BC=plan.bc, RESIDENT=cfg.resident, STREAM=cfg.stream)


def attention_bwd(do, q, k, v, out, lse, softmax_scale: float, causal: bool, *,
                  dlse=None, dq=None, dk=None, dv=None, delta=None,
                  dkdv_config: BwdConfig | None = None, dq_config: BwdConfig | None = None,
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
        RuntimeError: Triton is not installed. ValueError: a pinned config is not a candidate.
    """
    import torch

    if not HAS_TRITON:
        raise RuntimeError("attention_bwd needs triton")
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
                         dkdv_config: BwdConfig | None = None, dq_config: BwdConfig | None = None,
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
    import torch

    from kernels.attention_fwd import varlen_plan

    if not HAS_TRITON:
        raise RuntimeError("attention_bwd_varlen needs triton")
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
        _bwd_preprocess, (triton.cdiv(T, _PRE_BLOCK_T) * B * Hq,),
        out, do, delta, *out.stride(), *do.stride(), T, Hq,
        HEAD_DV=Dv, BLOCK_T=_PRE_BLOCK_T, BLOCK_D=_pre_block_d(Dv), num_warps=_PRE_WARPS,
    )
    if dlse is not None:
        delta.sub_(dlse.float())


def _launch_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, softmax_scale, causal, v_is_k, compiled,
                dkdv_config, dq_config, dlse, dot: str, vl=None, window_size=None, sinks=None):
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = Hq // Hkv
    bwd_delta(out, do, delta, dlse)
    if vl is not None:  # varlen: [1, total, H, D] views; the grid's T and S are the max lengths
        B, T, S = vl["B"], vl["T"], vl["S"]

    common = (T, S, Hkv, float(softmax_scale) * LOG2E, float(softmax_scale), 0, lse, lse, *DENSE_MASK_ARGS)
    causal, ws = window_sink_consts(bool(causal), window_size, None, lse)
    ws = dict(WIN_L=ws["WIN_L"], WIN_R=ws["WIN_R"], HAS_WINDOW=ws["HAS_WINDOW"])
    consts = dict(G=G, HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=causal, V_IS_K=v_is_k, SPARSE=False, DOT=dot, **ws,
                  **(vl["kw"] if vl is not None else {}))
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())

    if compiled and dkdv_config is None:
        kern = _autotuned("dkdv", device_arch(q.device), Dk, Dv, v_is_k, dtype_name(q.dtype))
        grid = lambda meta: (triton.cdiv(S, meta["BLOCK_N"]) * B * Hkv, meta["NSPLIT"])  # noqa: E731
        launch(kern, grid, q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(), *common, **consts)
    else:
        cfg = dkdv_config or interp_config(Dk, Dv)
        pc = _plan_constexprs(cfg, Dk, Dv, v_is_k)
        launch(
            _attn_bwd_dkdv_kernel, (triton.cdiv(S, cfg.block_n) * B * Hkv, pc["NSPLIT"]),
            q, k, v, do, lse, delta, dk, dv, *strides, *dk.stride(), *dv.stride(), *common, **consts, **pc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    if compiled and dq_config is None:
        kern = _autotuned("dq", device_arch(q.device), Dk, Dv, v_is_k, dtype_name(q.dtype))
        grid = lambda meta: (triton.cdiv(T * G, meta["BLOCK_M"]) * B * Hkv, meta["NSPLIT"])  # noqa: E731
        launch(kern, grid, q, k, v, do, lse, delta, dq, *strides, *dq.stride(), *common, **consts)
    else:
        cfg = dq_config or interp_config(Dk, Dv)
        pc = _plan_constexprs(cfg, Dk, Dv, v_is_k)
        launch(
            _attn_bwd_dq_kernel, (triton.cdiv(T * G, cfg.block_m) * B * Hkv, pc["NSPLIT"]),
            q, k, v, do, lse, delta, dq, *strides, *dq.stride(), *common, **consts, **pc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )


_AUTOTUNERS: dict = {}


def _autotuned(kind: str, arch: int, dk: int, dv: int, v_is_k: bool, dtype: str):
    """``triton.autotune`` over :func:`bwd_configs` for kernel ``kind`` and these head dims, keyed on
    the group size and causality (the dtype is part of Triton's key). Every output element is
    overwritten on each trial run, so tuning needs no reset."""
    key = (kind, arch, dk, dv, v_is_k, dtype == "fp32")
    if key not in _AUTOTUNERS:
        fn = {"dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
        configs = [
            triton.Config(_plan_constexprs(c, dk, dv, v_is_k), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in bwd_configs(kind, arch, dk, dv, dtype, v_is_k)
        ]
        _AUTOTUNERS[key] = triton.autotune(configs=configs, key=["G", "CAUSAL", "IS_VARLEN", "HAS_WINDOW"])(fn)
    return _AUTOTUNERS[key]


def _spec_values(dtype: str, dk: int, dv: int, group: int, v_is_k: bool, causal: bool,
                 allow_tf32: bool = False) -> dict:
    """Argument values of a representative contiguous launch (for :func:`kernels._compile.spec_args`)."""
    from kernels._compile import Pointer

    hq, hkv, T, S = group * 2, 2, 1024, 1024
    dvs = dk if v_is_k else dv  # v's row strides are k's when it is a view of k
    ptr = Pointer(dtype)
    return dict(
        Q=ptr, K=ptr, V=ptr, DO=ptr, DQ=ptr, DK=ptr, DV=ptr, LSE=Pointer("fp32"), DELTA=Pointer("fp32"),
        sqb=T * hq * dk, sqt=hq * dk, sqh=dk, sqd=1,
        skb=S * hkv * dk, sks=hkv * dk, skh=dk, skd=1,
        svb=S * hkv * dvs, svs=hkv * dvs, svh=dvs, svd=1,
        sdob=T * hq * dv, sdot=hq * dv, sdoh=dv, sdod=1,
        sdqb=T * hq * dk, sdqt=hq * dk, sdqh=dk, sdqd=1,
        sdkb=S * hkv * dk, sdks=hkv * dk, sdkh=dk, sdkd=1,
        sdvb=S * hkv * dv, sdvs=hkv * dv, sdvh=dv, sdvd=1,
        T=T + 1, S=S + 1, Hkv=hkv + 1, qk_scale=0.1, sm_scale=0.07, opaque_zero=0,
        G=group, HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, V_IS_K=v_is_k, SPARSE=False,
        DOT=dot_precision(dtype, allow_tf32), **_dense_mask_values(), **window_spec_values(),
    )


def _dense_mask_values() -> dict:
    """Block-mask arguments of a dense launch (unused there; ``KV_REP = 1``), under both kernels' names."""
    from kernels._compile import Pointer

    vals = dict(zip(("snb", "snh", "snq", "sib", "sih", "siq", "sil", "MASK_BM", "MASK_BN", "KV_REP"),
                    DENSE_MASK_ARGS))
    vals.update(snk=vals["snq"], sik=vals["siq"])
    for name in ("KVN", "KVI", "QN", "QI"):
        vals[name] = Pointer("fp32")
    return vals


def bwd_spec(kind: str, arch: int, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, cfg: BwdConfig,
             causal: bool = True, allow_tf32: bool = False, varlen: bool = False,
             window: bool = False) -> CompileSpec:
    """CompileSpec of the dkdv or dq kernel for contiguous inputs of the given shape and config
    (fp32: IEEE products unless ``allow_tf32``; ``varlen``: the ``IS_VARLEN`` variant; ``window``: the
    sliding-window variant, causal folded in; sinks need no backward kernel change)."""
    from kernels._compile import spec_args
    from kernels.attention_fwd import varlen_spec_values

    fn = {"dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}[kind]
    values = _spec_values(dtype, dk, dv, group, v_is_k, causal and not window, allow_tf32)
    values.update(_plan_constexprs(cfg, dk, dv, v_is_k))
    if varlen:
        values.update(varlen_spec_values(values["T"]))
    values.update(window_spec_values(window))
    sig, consts, divisible = spec_args(fn, values)
    return CompileSpec(
        kernel=f"attention_bwd_{kind}" + ("_varlen" if varlen else ""), fn=fn, signature=sig, constexprs=consts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch, dtype=dtype, head_dims=(dk, dv),
        tile=cfg.tile + window_tile_suffix(window, False),
        extra={"divisible": divisible, "group": group, "v_is_k": v_is_k, "causal": causal and not window,
               "config": cfg, "allow_tf32": allow_tf32, "varlen": varlen, "window": window},
    )


def preprocess_spec(arch: int, dtype: str, dk: int, dv: int) -> CompileSpec:
    """CompileSpec of the delta preprocessing kernel (one configuration per Dv)."""
    from kernels._compile import Pointer, spec_args

    values = _spec_values(dtype, dk, dv, 1, False, False)
    bd = _pre_block_d(dv)
    values.update(
        O=Pointer(dtype), sob=values["sdob"], sot=values["sdot"], soh=values["sdoh"], sod=1, Hq=3,
        BLOCK_T=_PRE_BLOCK_T, BLOCK_D=bd,
    )
    sig, consts, divisible = spec_args(_bwd_preprocess, values)
    return CompileSpec(
        kernel="attention_bwd_preprocess", fn=_bwd_preprocess, signature=sig, constexprs=consts,
        num_warps=_PRE_WARPS, num_stages=1, arch=arch, dtype=dtype, head_dims=(dk, dv),
        tile=f"{_PRE_BLOCK_T}x{bd}", extra={"divisible": divisible},
    )


def compile_specs(arch: int) -> list[CompileSpec]:
    """Every backward configuration the autotuner may pick on ``arch`` (80, 86, 89, 90...): preprocess
    (once per Dv and dtype), dkdv and dq kernels, for the dtypes and shapes of the forward's
    :data:`kernels.attention_fwd.SPEC_SHAPES` (fp32 with IEEE products; TF32 allowed on
    ``SPEC_TF32_SHAPES``)."""
    if not HAS_TRITON:
        return []
    specs, seen = [], set()
    for dk, dv, group, v_is_k in SPEC_SHAPES:
        for dtype in SPEC_DTYPES:
            if (dk, dv, dtype) not in seen:
                seen.add((dk, dv, dtype))
                specs.append(preprocess_spec(arch, dtype, dk, dv))
            for kind in ("dkdv", "dq"):
                for cfg in bwd_configs(kind, arch, dk, dv, dtype, v_is_k):
                    specs.append(bwd_spec(kind, arch, dtype, dk, dv, group, v_is_k, cfg))
                    specs.append(bwd_spec(kind, arch, dtype, dk, dv, group, v_is_k, cfg, varlen=True))
    for dk, dv, group, v_is_k in SPEC_TF32_SHAPES:
        for kind in ("dkdv", "dq"):
            for cfg in bwd_configs(kind, arch, dk, dv, "fp32", v_is_k):
                specs.append(bwd_spec(kind, arch, "fp32", dk, dv, group, v_is_k, cfg, allow_tf32=True))
    for dk, dv, group, v_is_k in SPEC_WINDOW_SHAPES:
        for dtype in SPEC_WINDOW_DTYPES:
            for kind in ("dkdv", "dq"):
                for cfg in bwd_configs(kind, arch, dk, dv, dtype):
                    specs.append(bwd_spec(kind, arch, dtype, dk, dv, group, v_is_k, cfg, window=True))
    return specs
