"""Top-k sparse latent attention, forward and backward: every query token attends to its own list of keys.

``topk_indices: int32 [B, T, Hkv, K]`` lists, for each query token and kv head, the key positions its
``G = Hq // Hkv`` heads attend to (DeepSeek Sparse Attention, DeepSeek-V3.2, 2025; the same layout as
FlashMLA's sparse kernels, https://github.com/deepseek-ai/FlashMLA). Lanes holding ``-1`` (anywhere:
leading, trailing, all) are skipped; so are positions ``>= S`` and, with ``causal``, positions the token
may not see (bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + S - T``). A row that sees
no key gives output 0, ``lse = +inf`` and zero gradients, never NaN.

Kernels and launchers only (our own Triton code; the ideas are published, no code is copied): query-major
forward / dQ / atomic dK/dV programs with the kv group's heads packed into the tile rows, a key-major
deterministic dK/dV over :mod:`kernels.key_major_index`, the column plan and tile tables of
:mod:`kernels.topk_configs`, compile specs in :mod:`kernels._specs_topk`. Method, register / spill tables and
the reasons behind each tile: DESIGN §9.1 (docs/design.md).
"""

from __future__ import annotations

import torch

from kernels._common import (
    LN2,
    LOG2E,
    MIN_TILE,
    bwd_outputs,
    cdiv,
    device_arch,
    dot_precision,
    fwd_outputs,
    is_prefix_alias,
    launch,
    next_pow2,
)
from kernels._config import HAS_TRITON, INTERPRET
from kernels.attention_bwd import sink_grad
from kernels.key_major_index import MAX_DET_BLOCK_N, KeyMajorIndex, build_key_major_index
from kernels.topk_configs import KINDS, ColumnPlan, TopkConfig, column_plan, plan_constexprs, topk_config

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention_fwd import _sink_finish
    from kernels.topk_tiles import (
        chunk,
        dk_tiles,
        dv_tiles,
        gathered_scores,
        head_base,
        lane_keys,
        program_coords,
        row_index,
        segment,
        stream_dk,
        stream_dv,
        token_lanes,
        token_rows,
    )
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
    "KINDS",
    "MAX_DET_BLOCK_N",
    "ColumnPlan",
    "KeyMajorIndex",
    "TopkConfig",
    "build_key_major_index",
    "column_plan",
    "compile_specs",
    "topk_attention_bwd",
    "topk_attention_fwd",
    "topk_config",
]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
# Argument bundles (Triton tuples): ``*_str`` = the (batch, row, head) strides of a ``[B, rows, H, D]``
# tensor whose last stride is 1 (the launchers make it so), ``lse_str`` = (batch, head, token) strides,
# ``dims`` = (T, S, Hkv, K or key blocks), ``scales`` = (softmax_scale * log2(e), softmax_scale);
# ``PLAN`` = the column plan (NSPLIT, BK, BT, BV) of kernels.topk_configs.column_plan (constexpr).
if HAS_TRITON:
    _LOG2E_C = tl.constexpr(LOG2E)
    _LN2_C = tl.constexpr(LN2)
    MIN_TILE_C = tl.constexpr(MIN_TILE)

    @triton.jit
    def _topk_fwd_kernel(
        Q, K, V, IDX, O, LSE, MAXL,
        q_str, k_str, v_str, idx_str, o_str, lse_str, dims, qk_scale, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
        V_IS_K: tl.constexpr, WRITE_MAXL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PLAN: tl.constexpr, STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr,
        SINKS=None, HAS_SINKS: tl.constexpr = False,
    ):
        """Forward of one (batch, token, kv head, head block, value split); 1-D grid (``program_coords``).
        ``dims = (T, S, Hkv, K)``. ``HAS_SINKS``: fp32 ``SINKS [Hq]`` logits join each row's softmax (no
        value; ``lse`` includes them).

        ``qk_scale = softmax_scale * log2(e)``. The score uses the own key chunk (columns
        ``[split * BK, +BK)``; also the value tile when ``V_IS_K``), the other split's chunk and both tail
        pieces. The q tiles are loaded once, or re-read every step per ``STREAM`` (:func:`stream_dk`).
        Rows past the group re-read its last head (never stored). Writes ``O`` columns ``[split * BV,
        +BV)``; split 0 writes ``LSE`` (+inf for a row without keys) and, with ``WRITE_MAXL``, the row
        maximum of the scaled scores (-inf if none) into the contiguous fp32 ``[B, Hq, T]`` buffer ``MAXL``.
        """
        NSPLIT: tl.constexpr = PLAN[0]
        BV: tl.constexpr = PLAN[3]
        T, S, Hkv, KTOP = dims
        split, hb, hkv, b, t = program_coords(T, Hkv, G, BLOCK_M, NSPLIT)
        heads = hb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = heads < G
        hq = row_index(hkv * G, OFF64) + tl.minimum(heads, G - 1)
        q_base, q_rows = token_rows(Q, q_str, b, t, hq)
        k_base = head_base(K, k_str, b, hkv)
        v_base = head_base(V, v_str, b, hkv)
        idx_row = IDX + b * idx_str[0] + t * idx_str[1] + hkv * idx_str[2]
        q_res = dk_tiles(q_base, q_rows, split, HEAD_DK, PLAN)
        key_end, n_lanes = token_lanes(t, dims, CAUSAL)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)
        for start in range(0, n_lanes, BLOCK_N):
            q_t = stream_dk(q_res, q_base + start * opaque_zero, q_rows, split, HEAD_DK, PLAN, STREAM)
            kpos, ok = lane_keys(idx_row, start, KTOP, key_end, BLOCK_N)
            s, k_own, k_oth, k_tail = gathered_scores(q_t, k_base, row_index(kpos, OFF64) * k_str[1], split, HEAD_DK,
                                                       PLAN, DOT)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys yet stays at 0
            alpha = tl.exp2(m_i - m_base)
            p = tl.exp2(s - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v_t = k_own
            else:
                v_t = chunk(v_base, row_index(kpos, OFF64) * v_str[1], split, False, HEAD_DV, NSPLIT, BV)
            acc = tl.dot(p.to(v_t.dtype), v_t, acc * alpha[:, None], input_precision=DOT)
            m_i = m_new

        hq_st = row_index(hkv * G, OFF64) + heads
        if HAS_SINKS:  # the sink closes the softmax: every row has a finite lse, empty rows output 0
            sink = tl.load(SINKS + hq_st, mask=row_ok, other=0.0) * 1.4426950408889634
            o_scale, lse2 = _sink_finish(acc, m_i, l_i, sink)
            out = acc * o_scale[:, None]
        else:
            empty = l_i == 0.0
            l_div = tl.where(empty, 1.0, l_i)
            out = acc / l_div[:, None]
            lse2 = tl.where(empty, float("inf"), m_i + tl.log2(l_div))
        cols = split * BV + tl.arange(0, BV)
        o_ptrs = O + b * o_str[0] + t * o_str[1] + (hq_st * o_str[2])[:, None] + cols[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (cols < HEAD_DV)[None, :])
        st_ok = row_ok
        if NSPLIT > 1:
            st_ok = st_ok & ((heads * 0 + split) == 0)  # every split holds the same statistics
        l_ptrs = LSE + b * lse_str[0] + hq_st * lse_str[1] + t * lse_str[2]
        tl.store(l_ptrs, lse2 * _LN2_C, mask=st_ok)
        if WRITE_MAXL:
            tl.store(MAXL + (b * (Hkv * G) * T + t) + hq_st.to(tl.int64) * T, m_i * _LN2_C, mask=st_ok)

    @triton.jit
    def _topk_bwd_pre_kernel(
        O, DO, DLSE, DELTA, o_str, do_str, dlse_str, T, Hq,
        HEAD_DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``DELTA[b, h, t] = sum_d O * dO - dLSE`` in fp32 (contiguous ``[B, Hq, T]``); ``o_str`` /
        ``do_str``: (batch, token, head, dim) strides, ``dlse_str``: (batch, head, token);
        grid ``(B * Hq, cdiv(T, BLOCK_T))``."""
        pid_bh = tl.program_id(0)
        pid_t = tl.program_id(1)
        b = (pid_bh // Hq).to(tl.int64)
        h = (pid_bh % Hq).to(tl.int64)
        tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = tok < T
        tok64 = tok.to(tl.int64)
        acc = tl.zeros([BLOCK_T], dtype=tl.float32)
        for c0 in tl.static_range(0, HEAD_DV, BLOCK_D):
            cols = (c0 + tl.arange(0, BLOCK_D)).to(tl.int64)
            msk = ok[:, None] & (cols < HEAD_DV)[None, :]
            o = tl.load(O + b * o_str[0] + h * o_str[2] + (tok64 * o_str[1])[:, None] + (cols * o_str[3])[None, :],
                        mask=msk, other=0.0)
            do = tl.load(DO + b * do_str[0] + h * do_str[2] + (tok64 * do_str[1])[:, None]
                         + (cols * do_str[3])[None, :], mask=msk, other=0.0)
            acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            acc -= tl.load(DLSE + b * dlse_str[0] + h * dlse_str[1] + tok64 * dlse_str[2], mask=ok, other=0.0)
        tl.store(DELTA + (b * Hq + h) * T + tok64, acc, mask=ok)

    @triton.jit
    def _topk_bwd_q_kernel(
        Q, K, V, DO, IDX, LSE, DELTA, DQ, DKA, DVA,
        q_str, k_str, v_str, do_str, idx_str, lse_str, dq_str, dka_str, dva_str, dims, scales, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
        V_IS_K: tl.constexpr, WRITE_DQ: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PLAN: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr,
    ):
        """Query-major backward of one (batch, token, kv head, head block, column split); 1-D grid;
        ``dims = (T, S, Hkv, K)``.

        Recomputes ``P = exp2(s - lse)`` and ``dS = P (dP - delta)`` for the gathered lanes (all ``Dk``
        columns for s, all ``Dv`` for dP; q / dO tiles resident or re-read per ``STREAM`` as in the
        forward). ``WRITE_DQ``: accumulate ``dQ = dS K * softmax_scale`` for the program's chunk and tail
        piece and store it. ``ATOMIC_DKDV`` (bit 1: dV, bit 2: dK): add ``Pᵀ dO`` / ``dSᵀ Q * softmax_scale``
        of the program's columns into the fp32 buffers ``DVA`` / ``DKA`` with atomics (skipped lanes add
        nothing; dV alone needs no dP). Padding rows read ``lse = +inf``, so their P and dS are 0.
        """
        NSPLIT: tl.constexpr = PLAN[0]
        BK: tl.constexpr = PLAN[1]
        BT: tl.constexpr = PLAN[2]
        BV: tl.constexpr = PLAN[3]
        T, S, Hkv, KTOP = dims
        qk_scale, sm_scale = scales
        split, hb, hkv, b, t = program_coords(T, Hkv, G, BLOCK_M, NSPLIT)
        heads = hb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = heads < G
        hq = row_index(hkv * G, OFF64) + tl.minimum(heads, G - 1)
        q_base, q_rows = token_rows(Q, q_str, b, t, hq)
        do_base, do_rows = token_rows(DO, do_str, b, t, hq)
        k_base = head_base(K, k_str, b, hkv)
        v_base = head_base(V, v_str, b, hkv)
        idx_row = IDX + b * idx_str[0] + t * idx_str[1] + hkv * idx_str[2]
        q_res = dk_tiles(q_base, q_rows, split, HEAD_DK, PLAN)
        do_res = dv_tiles(do_base, do_rows, split, HEAD_DV, PLAN)
        lse = tl.load(LSE + b * lse_str[0] + hq * lse_str[1] + t * lse_str[2], mask=row_ok, other=float("inf"))
        lse = lse * _LOG2E_C
        delta = tl.load(DELTA + (b * (Hkv * G) * T + t) + hq.to(tl.int64) * T, mask=row_ok, other=0.0)
        key_end, n_lanes = token_lanes(t, dims, CAUSAL)

        dq_acc = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
        dq_tail = tl.zeros([BLOCK_M, BT if BT > 0 else MIN_TILE_C], dtype=tl.float32)
        cols_k = split * BK + tl.arange(0, BK)
        cols_v = split * BV + tl.arange(0, BV)
        cols_t = NSPLIT * BK + split * BT + tl.arange(0, BT if BT > 0 else MIN_TILE_C)
        for start in range(0, n_lanes, BLOCK_N):
            hide = start * opaque_zero
            q_t = stream_dk(q_res, q_base + hide, q_rows, split, HEAD_DK, PLAN, STREAM)
            do_own, do_oth = stream_dv(do_res, do_base + hide, do_rows, split, HEAD_DV, PLAN, STREAM)
            kpos, ok = lane_keys(idx_row, start, KTOP, key_end, BLOCK_N)
            kidx = row_index(kpos, OFF64)
            # scores first (P), then dP: fewer fp32 tiles live at once
            s, k_own, k_oth, k_tail = gathered_scores(q_t, k_base, kidx * k_str[1], split, HEAD_DK, PLAN, DOT)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            ds = p
            if WRITE_DQ or ATOMIC_DKDV >= 2:
                if V_IS_K:  # value chunks are the key chunks (columns past Dv meet zero dO columns)
                    v_own = k_own
                    v_oth = k_oth
                else:
                    v_own = chunk(v_base, kidx * v_str[1], split, False, HEAD_DV, NSPLIT, BV)
                    v_oth = v_own
                    if NSPLIT > 1:
                        v_oth = chunk(v_base, kidx * v_str[1], split, True, HEAD_DV, NSPLIT, BV)
                dp = tl.dot(do_own, tl.trans(v_own), input_precision=DOT)
                if NSPLIT > 1:
                    dp = tl.dot(do_oth, tl.trans(v_oth), dp, input_precision=DOT)
                ds = p * (dp - delta[:, None])
            if WRITE_DQ:
                dq_acc = tl.dot(ds.to(k_own.dtype), k_own, dq_acc, input_precision=DOT)
                if BT > 0:
                    dq_tail = tl.dot(ds.to(k_tail.dtype), k_tail, dq_tail, input_precision=DOT)
            if ATOMIC_DKDV % 2 == 1:
                dv_part = tl.dot(tl.trans(p.to(do_own.dtype)), do_own, input_precision=DOT)
                va = DVA + b * dva_str[0] + hkv * dva_str[2] + (kidx * dva_str[1])[:, None]
                # Pure accumulation: relaxed atomics (the default acq_rel orders memory for nothing).
                tl.atomic_add(va + cols_v[None, :], dv_part, mask=ok[:, None] & (cols_v < HEAD_DV)[None, :],
                              sem="relaxed")
            if ATOMIC_DKDV >= 2:
                dst = tl.trans(ds.to(q_t[0].dtype))
                dk_part = tl.dot(dst, q_t[0], input_precision=DOT) * sm_scale
                ka = DKA + b * dka_str[0] + hkv * dka_str[2] + (kidx * dka_str[1])[:, None]
                tl.atomic_add(ka + cols_k[None, :], dk_part, mask=ok[:, None] & (cols_k < HEAD_DK)[None, :],
                              sem="relaxed")
                if BT > 0:
                    dk_tail = tl.dot(dst, q_t[2], input_precision=DOT) * sm_scale
                    tl.atomic_add(ka + cols_t[None, :], dk_tail, mask=ok[:, None] & (cols_t < HEAD_DK)[None, :],
                                  sem="relaxed")

        if WRITE_DQ:
            hq_st = row_index(hkv * G, OFF64) + heads
            dq_ptr = DQ + b * dq_str[0] + t * dq_str[1] + (hq_st * dq_str[2])[:, None]
            tl.store(dq_ptr + cols_k[None, :], (dq_acc * sm_scale).to(DQ.dtype.element_ty),
                     mask=row_ok[:, None] & (cols_k < HEAD_DK)[None, :])
            if BT > 0:
                tl.store(dq_ptr + cols_t[None, :], (dq_tail * sm_scale).to(DQ.dtype.element_ty),
                         mask=row_ok[:, None] & (cols_t < HEAD_DK)[None, :])

    @triton.jit
    def _topk_bwd_kv_det_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, index, partials,
        q_str, k_str, v_str, do_str, lse_str, dk_str, dv_str, dims, scales, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PLAN: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr, PARTS: tl.constexpr,
    ):
        """Deterministic dK/dV of one work item and column split; grid ``(n_items, NSPLIT)``; ``PARTS``:
        bit 1 dV, bit 2 dK (separate launches keep each accumulator set small; dV alone needs no dP).
        ``dims = (T, S, Hkv, NKB)``; ``index = (ENT_T, ENT_LO, ENT_HI, ITEMS)`` (a
        :class:`kernels.key_major_index.KeyMajorIndex`), ``partials = (PK, PV)``.

        ``ITEMS[i] = (segment, first entry, end entry, slot)`` (int64), segment = (b * Hkv + hkv) * NKB +
        key block. The item walks the packed rows ``e * G + h`` of entries ``[first, end)`` (entry e: token
        ``ENT_T[e]``, key bits ``ENT_LO[e]`` / ``ENT_HI[e]`` for keys 0-31 / 32-63 of the block); the key
        block's K/V tiles are loaded once or re-read every step per ``STREAM`` (:func:`stream_dk`). All
        products are transposed (``[BLOCK_N, BLOCK_M]``, keys on M). ``slot < 0``: the item is its block's
        only one and writes dK/dV (input dtype) directly, zeros for a block nobody selected; else it writes
        fp32 partials ``PK[slot]`` ``[BLOCK_N, Dk]`` / ``PV[slot]`` ``[BLOCK_N, Dv]`` for
        ``_topk_reduce_kernel``. No atomics.
        """
        NSPLIT: tl.constexpr = PLAN[0]
        BK: tl.constexpr = PLAN[1]
        BT: tl.constexpr = PLAN[2]
        BV: tl.constexpr = PLAN[3]
        T, S, Hkv, NKB = dims
        qk_scale, sm_scale = scales
        ENT_T, ENT_LO, ENT_HI, ITEMS = index
        pid = tl.program_id(0)
        if NSPLIT > 1:
            split = tl.program_id(1)
        else:
            split = 0
        item = ITEMS + pid.to(tl.int64) * 4
        seg = tl.load(item)
        e_lo = tl.load(item + 1)
        e_hi = tl.load(item + 2)
        slot = tl.load(item + 3)
        if seg < 0:  # padding item: the index has a size fixed by the shapes (no host sync)
            return
        b, hkv, kb = segment(seg, Hkv, NKB)

        nn = tl.arange(0, BLOCK_N)
        keys = row_index(kb * BLOCK_N, OFF64) + nn
        key_ok = keys < S
        keys_ld = tl.minimum(keys, S - 1)
        k_base = head_base(K, k_str, b, hkv)
        v_base = head_base(V, v_str, b, hkv)
        k_rows = keys_ld * k_str[1]
        v_rows = keys_ld * v_str[1]
        k_res = dk_tiles(k_base, k_rows, split, HEAD_DK, PLAN)
        v_res = dv_tiles(v_base, v_rows, split, HEAD_DV, PLAN)
        shift = (nn % 32)[:, None]
        hi_word = (nn >= 32)[:, None]

        dk_acc = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
        dk_tail = tl.zeros([BLOCK_N, BT if BT > 0 else MIN_TILE_C], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BV], dtype=tl.float32)
        q_base = Q + b * q_str[0]
        do_base = DO + b * do_str[0]
        r_lo = e_lo * G
        r_hi = e_hi * G
        for r0 in range(r_lo, r_hi, BLOCK_M):
            k_t = stream_dk(k_res, k_base + r0 * opaque_zero, k_rows, split, HEAD_DK, PLAN, STREAM)
            if V_IS_K:
                v_own = k_t[0]
                v_oth = k_t[1]
            else:
                v_own, v_oth = stream_dv(v_res, v_base + r0 * opaque_zero, v_rows, split, HEAD_DV, PLAN, STREAM)
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < r_hi
            rows = tl.where(row_ok, rows, r_lo)
            e = rows // G
            hq = row_index(hkv * G + rows % G, OFF64)
            t = row_index(tl.load(ENT_T + e), OFF64)
            q_rows = t * q_str[1] + hq * q_str[2]
            do_rows = t * do_str[1] + hq * do_str[2]
            st, q_own, q_oth, q_tail = gathered_scores(k_t, q_base, q_rows, split, HEAD_DK, PLAN, DOT)
            lse = tl.load(LSE + b * lse_str[0] + hq * lse_str[1] + t * lse_str[2], mask=row_ok, other=float("inf"))
            lse = lse * _LOG2E_C
            word = tl.load(ENT_LO + e)
            if BLOCK_N > 32:
                word = tl.where(hi_word, tl.load(ENT_HI + e)[None, :], word[None, :])
            else:
                word = word[None, :]
            sel = ((word >> shift) & 1) != 0
            st = tl.where(sel, st * qk_scale, float("-inf"))
            pt = tl.exp2(st - lse[None, :])
            do_own = chunk(do_base, do_rows, split, False, HEAD_DV, NSPLIT, BV)
            if PARTS % 2 == 1:
                dv_acc = tl.dot(pt.to(do_own.dtype), do_own, dv_acc, input_precision=DOT)
            if PARTS >= 2:
                dpt = tl.dot(v_own, tl.trans(do_own), input_precision=DOT)
                if NSPLIT > 1:
                    do_oth = chunk(do_base, do_rows, split, True, HEAD_DV, NSPLIT, BV)
                    dpt = tl.dot(v_oth, tl.trans(do_oth), dpt, input_precision=DOT)
                delta = tl.load(DELTA + b * (Hkv * G) * T + (hq.to(tl.int64) * T + t), mask=row_ok, other=0.0)
                dst = (pt * (dpt - delta[None, :])).to(q_own.dtype)
                dk_acc = tl.dot(dst, q_own, dk_acc, input_precision=DOT)
                if BT > 0:
                    dk_tail = tl.dot(dst, q_tail, dk_tail, input_precision=DOT)

        cols_k = split * BK + tl.arange(0, BK)
        cols_v = split * BV + tl.arange(0, BV)
        cols_t = NSPLIT * BK + split * BT + tl.arange(0, BT if BT > 0 else MIN_TILE_C)
        kmask = (cols_k < HEAD_DK)[None, :]
        vmask = (cols_v < HEAD_DV)[None, :]
        tmask = (cols_t < HEAD_DK)[None, :]
        dk_acc = dk_acc * sm_scale
        dk_tail = dk_tail * sm_scale
        if slot < 0:
            keys_st = row_index(keys, OFF64)
            dk_ptr = DK + b * dk_str[0] + hkv * dk_str[2] + (keys_st * dk_str[1])[:, None]
            dv_ptr = DV + b * dv_str[0] + hkv * dv_str[2] + (keys_st * dv_str[1])[:, None]
            if PARTS >= 2:
                tl.store(dk_ptr + cols_k[None, :], dk_acc.to(DK.dtype.element_ty), mask=key_ok[:, None] & kmask)
                if BT > 0:
                    tl.store(dk_ptr + cols_t[None, :], dk_tail.to(DK.dtype.element_ty),
                             mask=key_ok[:, None] & tmask)
            if PARTS % 2 == 1:
                tl.store(dv_ptr + cols_v[None, :], dv_acc.to(DV.dtype.element_ty), mask=key_ok[:, None] & vmask)
        else:
            nn64 = nn.to(tl.int64)
            pk = partials[0] + slot * (BLOCK_N * HEAD_DK) + (nn64 * HEAD_DK)[:, None]
            pv = partials[1] + slot * (BLOCK_N * HEAD_DV) + (nn64 * HEAD_DV)[:, None]
            if PARTS >= 2:
                tl.store(pk + cols_k[None, :], dk_acc, mask=kmask)
                if BT > 0:
                    tl.store(pk + cols_t[None, :], dk_tail, mask=tmask)
            if PARTS % 2 == 1:
                tl.store(pv + cols_v[None, :], dv_acc, mask=vmask)

    @triton.jit
    def _topk_reduce_kernel(
        P, OUT, MULTI, out_str, S, Hkv, NKB,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Sum the fp32 partials of one key block in slot order and store them (output dtype);
        ``MULTI[m] = (segment, first slot, slot count)``, ``out_str`` = OUT's (batch, key, head) strides;
        grid ``(n_multi, cdiv(D, BLOCK_D))``."""
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rec = MULTI + pid_m.to(tl.int64) * 3
        seg = tl.load(rec)
        first = tl.load(rec + 1)
        count = tl.load(rec + 2)
        if seg < 0:  # padding row
            return
        b, hkv, kb = segment(seg, Hkv, NKB)
        nn = tl.arange(0, BLOCK_N)
        keys = kb * BLOCK_N + nn
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = (cols < D)[None, :]
        off = (nn.to(tl.int64) * D)[:, None] + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for i in range(0, count):
            acc += tl.load(P + (first + i) * (BLOCK_N * D) + off, mask=cmask, other=0.0)
        ptrs = OUT + b * out_str[0] + hkv * out_str[2] + (keys.to(tl.int64) * out_str[1])[:, None] + cols[None, :]
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=(keys < S)[:, None] & cmask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def _str3(x: torch.Tensor) -> tuple[int, int, int]:
    """The first three strides of ``x`` (a kernel's stride bundle; the last dim has unit stride)."""
    return x.stride(0), x.stride(1), x.stride(2)


def _prep_kv(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k, v, v_is_k) with unit last strides; a prefix alias survives the copy."""
    alias = is_prefix_alias(k, v)
    if alias and k.stride(-1) != 1:
        k = k.contiguous()
        v = k[..., : v.shape[-1]]
    elif not alias:
        k, v = _unit_last(k), _unit_last(v)
    return k, v, alias


_I32_LIMIT = 2**31


def _extent(x: torch.Tensor, dims) -> int:
    """Largest element offset + 1 of ``x`` over ``dims`` (its other dims at index 0)."""
    return 1 + sum((x.shape[d] - 1) * abs(x.stride(d)) for d in dims if x.shape[d] > 0)


def _off64(row_tensors, key_tensors, det: bool = False) -> bool:
    """Whether a kernel needs int64 row offsets: query-side tensors ``[B, T, H, D]`` (query-major kernels
    address one token, dims 2-3; the deterministic dK/dV kernel gathers tokens, dims 1-3), key-side
    tensors ``[B, S, H, D]`` and ``[B, H, T]`` statistics (dims 1-2 / 1-3). Batch offsets are always int64."""
    for x in row_tensors:
        if _extent(x, range(1 if det else 2, x.dim())) >= _I32_LIMIT:
            return True
    return any(_extent(x, range(1, x.dim())) >= _I32_LIMIT for x in key_tensors)


def _arch(device: torch.device) -> int:
    """Compute capability of a CUDA device; 90 under the interpreter (its small configuration ignores it)."""
    return device_arch(device) if device.type == "cuda" else 90


def _check_launch(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """``(B, T, Hq, Dk, S, Hkv, Dv)`` after checking that the launch can run here."""
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton")
    if not INTERPRET and q.device.type != "cuda":
        raise RuntimeError(f"{name} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    return (*q.shape, k.shape[1], k.shape[2], v.shape[3])


def topk_attention_fwd(q, k, v, topk_indices, softmax_scale: float, causal: bool, *, return_max_logit=False,
                       out=None, lse=None, config: TopkConfig | None = None, allow_tf32: bool | None = None,
                       sinks=None):
    """Top-k sparse attention forward (DeepSeek Sparse Attention layout; see the module docstring).

    Args:
        q: ``[B, T, Hq, Dk]``; k: ``[B, S, Hkv, Dk]``; v: ``[B, S, Hkv, Dv]``: fp16 / bf16 / fp32, one
            dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``), any strides (a non-unit last
            stride costs a copy), ``Hq % Hkv == 0``. ``v`` may be a prefix view of ``k``
            (``k[..., :Dv]``, absorbed MLA): detected with ``kernels._common.is_prefix_alias``, the
            shared tile is loaded once.
        topk_indices: int32 ``[B, T, Hkv, K]``: per query token and kv head the keys its heads attend to.
            ``-1`` lanes (anywhere), entries ``< 0`` or ``>= S`` and, with ``causal``, keys past the
            token's limit are skipped. A key listed twice in a row counts twice (a caller error).
        softmax_scale: scores are ``q · k * softmax_scale``.
        causal: bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + S - T``.
        return_max_logit: also return the per-(batch, head) maximum visible scaled score.
        out: optional preallocated ``[B, T, Hq, Dv]`` output in q.dtype (any strides; every element
            is written). lse: optional preallocated fp32 ``[B, Hq, T]`` (any strides).
        config: force a :class:`TopkConfig` (tests, tuning); default :func:`topk_config`.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32`` (:func:`kernels._common.dot_precision`).
        sinks: contiguous fp32 ``[Hq]`` attention-sink logits or None (join each row's softmax with no
            value; ``lse`` includes them, so a row without keys gets out 0 and ``lse = sink``).

    Inputs are assumed validated by the caller (``mla.functional``). fp32 inputs use IEEE fp32 products
    (unless TF32 is allowed), fp16 / bf16 tensor-core products with fp32 accumulation; softmax
    statistics are fp32.

    Returns:
        ``(out [B, T, Hq, Dv] q.dtype, lse fp32 [B, Hq, T] natural log, max_logit fp32 [B, Hq] or None)``.
        A row that sees no key gives out 0 and ``lse = +inf``; a head that sees no key at all gives
        ``max_logit = -inf``.

    Raises:
        RuntimeError: Triton is missing, or CPU tensors outside the interpreter.
    """
    B, T, Hq, Dk, S, Hkv, Dv = _check_launch("topk_attention_fwd", q, k, v)
    KTOP = topk_indices.shape[3]
    dev = q.device
    out, lse, early = fwd_outputs(q, Dv, out, lse, return_max_logit)
    if early is not None:
        return early
    G = Hq // Hkv
    k, v, v_is_k = _prep_kv(k, v)
    q = _unit_last(q)
    idx = _unit_last(topk_indices)
    o_buf = out if out.stride(-1) == 1 or Dv == 1 else torch.empty_like(out, memory_format=torch.contiguous_format)
    cfg = config or topk_config("fwd", _arch(dev), Dk, Dv, G, q.dtype, v_is_k=v_is_k)
    pc = plan_constexprs(cfg, Dk, Dv, v_is_k)
    maxl = torch.empty((B, Hq, T), dtype=torch.float32, device=dev) if return_max_logit else None
    grid = (B * T * Hkv * cdiv(G, cfg.block_m) * pc["PLAN"][0],)
    launch(
        _topk_fwd_kernel, grid,
        Q=q, K=k, V=v, IDX=idx, O=o_buf, LSE=lse, MAXL=maxl if maxl is not None else lse,
        q_str=_str3(q), k_str=_str3(k), v_str=_str3(v), idx_str=_str3(idx), o_str=_str3(o_buf),
        lse_str=_str3(lse), dims=(T, S, Hkv, KTOP), qk_scale=float(softmax_scale) * LOG2E, opaque_zero=0,
        G=G, HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=bool(causal), V_IS_K=v_is_k, WRITE_MAXL=return_max_logit,
        DOT=dot_precision(q.dtype, allow_tf32), OFF64=_off64((q, o_buf), (k, v, lse)), **pc,
        **({} if sinks is None else dict(SINKS=sinks, HAS_SINKS=True)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if o_buf is not out:
        out.copy_(o_buf)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)


def topk_attention_bwd(do, q, k, v, out, lse, topk_indices, softmax_scale: float, causal: bool, *, dlse=None,
                       deterministic=True, dq=None, dk=None, dv=None, configs: dict | None = None,
                       key_index: KeyMajorIndex | None = None, allow_tf32: bool | None = None, sinks=None):
    """Top-k sparse attention backward: ``(dq, dk, dv)`` like ``q, k, v`` (plus ``dsinks`` fp32 ``[Hq]`` when
    the forward's ``sinks`` are given: :func:`kernels.attention_bwd.sink_grad`, deterministic).

    Args:
        do: ``[B, T, Hq, Dv]`` gradient of ``out``; q, k, v, topk_indices, softmax_scale, causal: as given
            to :func:`topk_attention_fwd`; out, lse: its results (``lse`` fp32 ``[B, Hq, T]``, any strides).
        dlse: optional fp32 ``[B, Hq, T]`` gradient of ``lse`` (enters as ``delta - dlse``, since
            ``d lse / dS = P``).
        deterministic: ``True`` (default): dK/dV from the key-major transposed index (a device sort, no
            host sync; bitwise reproducible, no atomics). ``False``: fp32 atomics from the query-major
            pass into an fp32 scratch (faster, no index, last-bit differences between runs).
        dq, dk, dv: optional preallocated outputs (shapes and dtypes of q, k, v, any strides); every
            element is written (tests poison them with NaN).
        configs: optional ``{kind: TopkConfig}`` overrides ("dq", "dkdv_atomic", "dkdv_det"; tests).
        key_index: optional prebuilt :func:`build_key_major_index` result (same indices, ``S``, causal,
            the dkdv_det config's ``block_n``), e.g. cached across layers that share indices.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32``.

    ``dk`` holds only the score-path gradient and ``dv`` the value path, also when ``v`` is a prefix view
    of ``k`` (autograd adds them through the view). Rows without keys (``lse = +inf``) get zero gradients;
    keys nobody selected get zero dK/dV. A key listed twice in a row is a caller error (the
    deterministic mode counts it once, the atomic mode twice).

    Raises:
        RuntimeError: Triton is missing, or CPU tensors outside the interpreter.
    """
    B, T, Hq, Dk, S, Hkv, Dv = _check_launch("topk_attention_bwd", q, k, v)
    dev = q.device
    dq, dk, dv, done = bwd_outputs(q, k, v, dq, dk, dv)
    if done and sinks is not None:  # no kernel: no key (P_sink = 1, delta = 0) or no query
        no_key = dlse is not None and S == 0
        return dq, dk, dv, (dlse.float().sum((0, 2)) if no_key else torch.zeros(Hq, device=dev))
    if done:
        return dq, dk, dv
    G = Hq // Hkv
    KTOP = topk_indices.shape[3]
    arch = _arch(dev)
    configs = configs or {}
    k, v, v_is_k = _prep_kv(k, v)
    q, do = _unit_last(q), _unit_last(do)
    idx = _unit_last(topk_indices)
    dot = dot_precision(q.dtype, allow_tf32)
    scale = float(softmax_scale)

    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=dev)
    has_dlse = dlse is not None
    dl = dlse if has_dlse else delta
    bd = min(128, max(16, next_pow2(Dv)))
    launch(
        _topk_bwd_pre_kernel, (B * Hq, cdiv(T, 64)),
        O=out, DO=do, DLSE=dl, DELTA=delta, o_str=tuple(out.stride()), do_str=tuple(do.stride()),
        dlse_str=_str3(dl), T=T, Hq=Hq, HEAD_DV=Dv, HAS_DLSE=has_dlse, BLOCK_T=64, BLOCK_D=bd, num_warps=4,
    )

    def unit(x):  # kernel-side output buffer with unit last stride
        return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else torch.empty(x.shape, dtype=x.dtype, device=dev)

    dq_buf, dk_buf, dv_buf = unit(dq), unit(dk), unit(dv)
    # the tensors and strides both query-major launches and the deterministic dK/dV share
    common = dict(Q=q, K=k, V=v, DO=do, LSE=lse, DELTA=delta, q_str=_str3(q), k_str=_str3(k), v_str=_str3(v),
                  do_str=_str3(do), lse_str=_str3(lse), scales=(scale * LOG2E, scale), opaque_zero=0,
                  G=G, HEAD_DK=Dk, HEAD_DV=Dv, V_IS_K=v_is_k, DOT=dot)

    def launch_q(cfg, write_dq, atomic, dka, dva):
        pc = plan_constexprs(cfg, Dk, Dv, v_is_k)
        grid = (B * T * Hkv * cdiv(G, cfg.block_m) * pc["PLAN"][0],)
        launch(
            _topk_bwd_q_kernel, grid,
            IDX=idx, DQ=dq_buf, DKA=dka, DVA=dva, idx_str=_str3(idx), dq_str=_str3(dq_buf), dka_str=_str3(dka),
            dva_str=_str3(dva), dims=(T, S, Hkv, KTOP), CAUSAL=bool(causal), WRITE_DQ=write_dq,
            ATOMIC_DKDV=atomic, OFF64=_off64((q, do, dq_buf), (k, v, dka, dva, lse)), **common, **pc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    cfg_dq = configs.get("dq") or topk_config("dq", arch, Dk, Dv, G, q.dtype, v_is_k=v_is_k)
    launch_q(cfg_dq, True, 0, dk_buf, dv_buf)

    if not deterministic:
        cfg = configs.get("dkdv_atomic") or topk_config("dkdv_atomic", arch, Dk, Dv, G, q.dtype, v_is_k=v_is_k)
        if dk_buf.dtype == torch.float32:
            dka, dva = dk_buf.zero_(), dv_buf.zero_()
        else:
            dka = torch.zeros(dk_buf.shape, dtype=torch.float32, device=dev)
            dva = torch.zeros(dv_buf.shape, dtype=torch.float32, device=dev)
        for part in ((1, 2) if cfg.split_dkdv else (3,)):
            launch_q(cfg, False, part, dka, dva)
        if dka is not dk_buf:
            dk_buf.copy_(dka)
            dv_buf.copy_(dva)
    else:
        cfg = configs.get("dkdv_det") or topk_config("dkdv_det", arch, Dk, Dv, G, q.dtype, v_is_k=v_is_k)
        if not 1 <= cfg.block_n <= MAX_DET_BLOCK_N:
            raise ValueError(f"dkdv_det config: block_n must be in [1, {MAX_DET_BLOCK_N}], got {cfg.block_n}")
        kmi = key_index
        if kmi is None:
            # fp32 partials bounded by max(256 MiB, 4x an fp32 dK/dV): longer work items, not more memory
            budget = max(256 << 20, 4 * B * S * Hkv * (Dk + Dv) * 4)
            kmi = build_key_major_index(idx, S, bool(causal), cfg.block_n, G, cfg.rows_per_item,
                                        max_slots=budget // (cfg.block_n * (Dk + Dv) * 4))
        elif kmi.block_n != cfg.block_n:
            raise ValueError(f"key_index.block_n={kmi.block_n} does not match the dkdv_det config's "
                             f"block_n={cfg.block_n}")
        pc = plan_constexprs(cfg, Dk, Dv, v_is_k)
        n_slots = max(1, kmi.n_slots)
        pk = torch.empty((n_slots, cfg.block_n, Dk), dtype=torch.float32, device=dev)
        pv = torch.empty((n_slots, cfg.block_n, Dv), dtype=torch.float32, device=dev)
        ent_t = kmi.ent_t if kmi.ent_t.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
        ent_lo = kmi.ent_lo if kmi.ent_lo.numel() else ent_t
        ent_hi = kmi.ent_hi if kmi.ent_hi.numel() else ent_t
        off64 = _off64((q, do), (k, v, dk_buf, dv_buf, lse), det=True)
        for part in ((1, 2) if cfg.split_dkdv else (3,)):
            launch(
                _topk_bwd_kv_det_kernel, (kmi.items.shape[0], pc["PLAN"][0]),
                DK=dk_buf, DV=dv_buf, index=(ent_t, ent_lo, ent_hi, kmi.items), partials=(pk, pv),
                dk_str=_str3(dk_buf), dv_str=_str3(dv_buf), dims=(T, S, Hkv, kmi.num_key_blocks),
                OFF64=off64, PARTS=part, **{**common, "V_IS_K": v_is_k and not cfg.load_v}, **pc,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        n_multi = kmi.multi.shape[0]
        if n_multi:
            for part, dst, D in ((pk, dk_buf, Dk), (pv, dv_buf, Dv)):
                bd = min(64, max(16, next_pow2(D)))
                launch(
                    _topk_reduce_kernel, (n_multi, cdiv(D, bd)),
                    P=part, OUT=dst, MULTI=kmi.multi, out_str=_str3(dst), S=S, Hkv=Hkv, NKB=kmi.num_key_blocks,
                    D=D, BLOCK_N=cfg.block_n, BLOCK_D=bd, num_warps=4,
                )
    for buf, dst in ((dq_buf, dq), (dk_buf, dk), (dv_buf, dv)):
        if buf is not dst:
            dst.copy_(buf)
    if sinks is not None:  # the kernels need nothing (lse includes the sink); deterministic torch sum
        return dq, dk, dv, sink_grad(sinks, lse, delta)
    return dq, dk, dv



def compile_specs(arch: int) -> list:
    """Every configuration the top-k launchers may pick on ``arch``: :func:`kernels._specs_topk.topk_compile_specs`."""
    from kernels._specs_topk import topk_compile_specs

    return topk_compile_specs(arch)


def __getattr__(name: str):
    # compile-spec names kept importable from here (they live in kernels._specs_topk)
    if name in ("topk_spec", "SPEC_SHAPES", "SPEC_DTYPES", "SPEC_FP32_SHAPES"):
        from kernels import _specs_topk as _specs

        return getattr(_specs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
