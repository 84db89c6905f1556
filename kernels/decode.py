"""Split-KV Multi-Head Latent Attention decode over a paged latent cache (dense and top-k sparse).

Method (our own Triton code; the ideas are published, the code is not copied):

* **Split-KV** ("Flash-Decoding", Dao, Haziza, Massa, Sizov, 2023,
  https://crfm.stanford.edu/2023/10/12/flashdecoding.html): with one or a few query tokens per
  sequence there is too little parallelism over queries, so the key range of each sequence is cut
  into ``num_splits`` pieces processed by different programs. Each piece writes a partial output
  (normalised by its own softmax sum) and its log-sum-exp; a second, small kernel merges the pieces
  with weights ``exp(lse_s - lse)``. An empty piece carries ``lse = -inf`` and weighs exactly 0.
* **Heads packed into the tile rows** (FlashMLA, DeepSeek 2025, https://github.com/deepseek-ai/FlashMLA):
  in absorbed MLA every head of a sequence attends to the same single latent "KV head"
  (``[c_kv | k_rope]``, 512 + 64 values per token), so the ``Tq * H`` query rows of a sequence form
  the M dimension of one matrix product against a shared cache tile, and each cache tile is read
  once for all heads of a head group.
* **V is a prefix of K**: the value of a token is the first ``Dv`` columns of its cache row; a
  program's value columns are a block of the key tile it already loaded for the scores.
* **Register budget** (DESIGN §9.2): a ``[64, 512]`` fp32 accumulator per warpgroup alone takes 256
  registers per thread. So for Dv = 512 two programs share a (sequence, head group, split), each
  owning 256 value columns (``DV_SPLIT = 2``; adjacent program ids, so both read the tile in the same
  wave): each loads the whole key tile once (its own 256 latent columns double as V) and computes the
  full scores, i.e. the score FLOPs are done twice (about 1.5x the tensor-core work of one program;
  the cache is read from DRAM once, from L2 twice).
* **One warpgroup per 64 rows** (Hopper): Triton gives the score product of an M-row tile
  ``warpsPerCTA = [num_warps, 1]`` and a warpgroup covers 64 rows, so the sm90 tiles are 128 rows x 8
  warps or 64 rows x 4 warps; 64 rows x 8 warps would compute every score twice.
* **Addresses one step ahead**: the block-table lookup of step i + 1 runs during step i, so the
  cache copies of a step depend on a loop-carried offset only and the software pipeliner can issue
  them ``num_stages - 1`` steps ahead.
* **Masked lanes read a visible key**: a lane past the end of the range (or a -1 / out-of-range
  top-k index) loads the row of a key the query does see, and its score is set to -inf before the
  exponential. No block-table entry or page slot beyond a sequence's length is ever read (they may
  hold -1, garbage or NaN), and the cache loads need no masks (fewer registers).

Register / shared-memory measurements of every configuration and the variants rejected: DESIGN §9.2
(docs/design.md). Compile specs: :mod:`kernels._specs_topk`.
"""

from __future__ import annotations

import torch

from kernels._common import LOG2E, cdiv, dot_precision, launch, next_pow2
from kernels._config import HAS_TRITON, INTERPRET, arch_family

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention_fwd import _sink_finish
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["MAX_SPLITS", "choose_num_splits", "combine_config", "compile_specs", "decode_config",
           "mla_decode_fwd", "wave_efficiency"]

#: Upper bound on the number of key splits per sequence (chosen or given).
MAX_SPLITS = 256



# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _fp8_latent(KV, kv_off, col0, offs, ok, DV: tl.constexpr, MASKED: tl.constexpr, NB: tl.constexpr,
                    OUT_TY: tl.constexpr, FP8_NATIVE: tl.constexpr):
        """``code * scale`` [BLOCK_N, len(offs)] in ``OUT_TY`` of the fp8_ds_mla rows at byte offsets ``kv_off``:
        e4m3 codes at bytes ``offs = col0 + arange`` (``NB`` whole 128-blocks, ``col0 % 128 == 0``), their fp32
        scales (one per 128 values) at byte ``DV + 4 * (offs // 128)``. The scales are loaded once per key
        and block ([BLOCK_N] vectors, selected per column), not gathered per element (registers). The
        product is exact in fp32 and bf16 (3-bit mantissa times a power of two), so bf16 / fp32 compute it
        in their own dtype (fewer registers than fp32 for bf16); fp16 (5 exponent bits) goes via fp32.
        FP8_NATIVE (sm89+): Triton's e4m3 conversion (``cvt.rn.f16x2.e4m3x2``). Otherwise (sm80, where
        Triton has no e4m3 type) integer ops: the 7 magnitude bits shifted into an fp32's exponent and
        mantissa fields give the value times 2^-120 (exponent bias 127 vs 7; e4m3 subnormals land on fp32
        subnormals), exact after the multiply by 2^120; code 0x7f / 0xff is NaN as in e4m3fn."""
        if MASKED:
            codes = tl.load(KV + kv_off[:, None] + offs[None, :], mask=ok[None, :], other=0)
        else:
            codes = tl.load(KV + kv_off[:, None] + offs[None, :])
        sc_ptr = (KV + kv_off + DV).to(tl.pointer_type(tl.float32))
        blk0 = col0 // 128
        col_blk = offs // 128 - blk0
        CT: tl.constexpr = tl.float32 if OUT_TY == tl.float16 else OUT_TY
        sc = tl.load(sc_ptr + blk0).to(CT)[:, None] + tl.zeros([1, NB * 128], dtype=CT)
        for j in tl.static_range(1, NB):
            if MASKED:  # a block past DV: its codes load as 0, any finite scale of the row will do
                sj = tl.load(sc_ptr + tl.minimum(blk0 + j, DV // 128 - 1))
            else:
                sj = tl.load(sc_ptr + blk0 + j)
            sc = tl.where((col_blk == j)[None, :], sj.to(CT)[:, None], sc)
        if FP8_NATIVE:
            x = codes.to(tl.float8e4nv, bitcast=True).to(CT)
        else:
            u = codes.to(tl.uint32)
            x = (((u & 0x80) << 24) | ((u & 0x7F) << 20)).to(tl.float32, bitcast=True) * 1.329227995784916e36
            x = tl.where((u & 0x7F) == 0x7F, float("nan"), x).to(CT)
        return (x * sc).to(OUT_TY)

    @triton.jit
    def _cols(row_ptrs, offs, ok, MASKED: tl.constexpr):
        """``[R, len(offs)]`` tile at ``row_ptrs[:, None] + offs``; ``MASKED``: columns where ``ok`` is False
        read 0 (blocks that overhang ``Dv``), else no mask (fewer registers)."""
        if MASKED:
            x = tl.load(row_ptrs + offs[None, :], mask=ok[None, :], other=0.0)
        else:
            x = tl.load(row_ptrs + offs[None, :])
        return x

    @triton.jit
    def _key_rows(start, hi, bt_row, tk_row, key_end, kv_str, PAGE_SIZE: tl.constexpr, HAS_TOPK: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        """Key positions ``pos`` [BLOCK_N] of the step at ``start`` (dense: ``start + arange``; top-k: the
        index list's entries), ``key_ok`` (in range and visible) and the int64 offsets of their cache rows.
        Masked-out lanes (and every lane of a step at or past ``hi``) address a *visible* key instead (the
        last one of the range, or key 0 for top-k), so every load is in bounds and finite: no block-table
        entry or page slot past the sequence is ever read (they may hold -1, garbage, NaN), no cache load
        needs a mask (registers), and the lane's score is set to -inf, so its p is exactly 0."""
        offs_n = start + tl.arange(0, BLOCK_N)
        if HAS_TOPK:
            pos = tl.load(tk_row + offs_n, mask=offs_n < hi, other=-1)
            # 0 <= pos < key_end in one unsigned compare (a step runs only when key_end > 0)
            key_ok = pos.to(tl.uint32, bitcast=True) < key_end.to(tl.uint32, bitcast=True)
            pos_ld = tl.where(key_ok, pos, 0)
        else:
            pos = offs_n
            key_ok = pos < hi
            pos_ld = tl.minimum(pos, hi - 1)
        # A step past the range (the lookahead after the last one, or an empty range) reads no block-table
        # entry (the table may even have no column).
        if not HAS_TOPK and PAGE_SIZE % BLOCK_N == 0:
            # dense steps start at multiples of BLOCK_N: one page per step, one lookup
            page = tl.load(bt_row + start // PAGE_SIZE, mask=start < hi, other=0)
        else:  # per key: a step may span pages
            page = tl.load(bt_row + pos_ld // PAGE_SIZE, mask=(pos_ld * 0 + start) < hi, other=0)
        kv_off = page.to(tl.int64) * kv_str[0] + (pos_ld % PAGE_SIZE).to(tl.int64) * kv_str[1]
        return pos, key_ok, kv_off

    @triton.jit
    def _mla_decode_split_kernel(
        Q, KV, BLOCK_TABLE, SEQLENS, TOPK, OUT, LSE,
        sm_scale_log2, q_str, kv_str, tk_str, o_str, lse_str, dims,
        DK: tl.constexpr, DV: tl.constexpr, PAGE_SIZE: tl.constexpr,
        IS_CAUSAL: tl.constexpr, HAS_TOPK: tl.constexpr, DIRECT: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DV: tl.constexpr, DV_SPLIT: tl.constexpr,
        BLOCK_DR: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_FP8: tl.constexpr = False,
        FP8_NATIVE: tl.constexpr = True, SINKS=None, HAS_SINKS: tl.constexpr = False,
        WIN_L=-1, HAS_WINDOW: tl.constexpr = False,
    ):
        """One (sequence, head group[, query token], key split, value-column half) per program.

        Argument bundles: ``dims = (H, TQ, TOPK_K)``; ``q_str = (batch, packed row)`` strides of Q;
        ``kv_str = (page, slot, block-table row)`` strides of the paged cache (KV) and BLOCK_TABLE;
        ``tk_str = (batch, token)`` of TOPK; ``o_str = (batch, packed row, split)`` of OUT;
        ``lse_str = (batch, token, head, split)`` of LSE.

        Grid: (B * groups * DV_SPLIT, num_splits), program 0-axis id = (b * groups + group) * DV_SPLIT + value
        block: the programs that read the same cache tiles (a sequence's row blocks and value halves in one
        split) have adjacent ids, so they run in the same wave and the tiles are read from DRAM once. Dense:
        the ``TQ * H`` rows of a sequence are packed (row r = t * H + h), groups = cdiv(TQ * H, BLOCK_H).
        Top-k: every query token has its own key list, so the rows of a program are the heads of one token
        (groups = TQ * cdiv(H, BLOCK_H)).
        Q and OUT address packed rows with one row stride (``q_str[1]``, ``o_str[1]``; the launcher
        guarantees ``stride_t == H * stride_h``), OUT's split stride ``o_str[2]`` is 0 when DIRECT.
        The latent part of a key tile (``DV`` columns, padded to ``DV_SPLIT * BLOCK_DV``) is loaded
        once, as ``DV_SPLIT`` (1 or 2) column blocks: all serve as K (scores), the program's own block
        (``program_id(0) % DV_SPLIT``) also serves as V, so the program owns ``BLOCK_DV`` output columns (the
        accumulator of a [64, 512] tile does not fit the registers next to the rest). The rope part
        (``DK - DV`` columns, padded to ``BLOCK_DR``; 0 when ``DK == DV``) is one more product.
        DIRECT (one split): write the final output (input dtype) and lse ([B, H, TQ], +inf for an
        empty row). Otherwise write fp32 partial outputs normalised by their own sum and their lse
        (-inf for an empty split) for the combine kernel.
        KV_FP8: KV is the uint8 ``fp8_ds_mla`` pool (strides in bytes; ``mla.quant``): latent tiles are
        dequantized in registers (e4m3 -> fp32, times the block scale, rounded to Q's dtype) and the rope
        part is read as bf16; the rest of the kernel is unchanged. FP8_NATIVE: e4m3 conversion instructions
        (sm89+); otherwise integer bit operations (see ``_fp8_latent``).
        HAS_SINKS (DIRECT only; with splits the combine adds the sink once): fp32 ``SINKS [H]`` logits join
        each row's softmax with no value (``lse`` includes them).
        HAS_WINDOW (dense only): query t of a sequence of length L sees keys ``>= L - TQ + t - WIN_L``; the
        splits share only the keys from the program's first row's window start on (a step reads the last
        ``WIN_L + TQ`` positions, never the older pages).
        """
        H, TQ, TOPK_K = dims
        pid_m = tl.program_id(0) // DV_SPLIT  # the value halves of a row block are adjacent programs
        pid_v = tl.program_id(0) % DV_SPLIT
        pid_s = tl.program_id(1)
        n_split = tl.num_programs(1)

        if HAS_TOPK:
            n_hg = (H + BLOCK_H - 1) // BLOCK_H  # (tl.cdiv: slow nested call in the interpreter)
            b = pid_m // (TQ * n_hg)
            rem = pid_m % (TQ * n_hg)
            t0 = rem // n_hg
            row_base = t0 * H + (rem % n_hg) * BLOCK_H  # first packed row (t * H + h) of the program
            row_last = t0 * H + H - 1
        else:
            n_hg = (TQ * H + BLOCK_H - 1) // BLOCK_H
            b = pid_m // n_hg
            row_base = (pid_m % n_hg) * BLOCK_H
            row_last = TQ * H - 1
        b64 = b.to(tl.int64)
        seqlen = tl.load(SEQLENS + b)

        # this program's share of the key positions (dense) or of the top-k lanes
        if HAS_TOPK:
            n_keys = TOPK_K
            key_end = seqlen - TQ + t0 + 1 if IS_CAUSAL else seqlen  # keys j < key_end are visible
            n_keys = tl.where(key_end > 0, n_keys, 0)  # so inside the loop key 0 is visible
            k0 = 0
        else:
            k0 = 0
            if HAS_WINDOW:  # the first position any row of this program sees
                k0 = tl.maximum(seqlen - TQ + row_base // H - WIN_L, 0) // BLOCK_N * BLOCK_N  # steps start aligned
            n_keys = tl.maximum(seqlen - k0, 0)
        blocks_per_split = ((n_keys + BLOCK_N - 1) // BLOCK_N + n_split - 1) // n_split
        lo = k0 + pid_s * blocks_per_split * BLOCK_N
        hi = tl.minimum(lo + blocks_per_split * BLOCK_N, k0 + n_keys)

        # Query tile: rows past the last one (padding) re-read the last row (no mask) and see its keys,
        # so they compute the last row's output again (the epilogue stores it unmasked over that row).
        # The per-row offsets are int32 (a sequence's query block is small).
        # Columns: this program's value block (offs_v), with DV_SPLIT == 2 the other latent block
        # (offs_w; scores only), and the rope part (offs_r; scores only). Both programs of a pair
        # add the two latent blocks in a different order: their statistics agree to fp32 rounding.
        offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < DV
        q_rows = tl.minimum(row_base + tl.arange(0, BLOCK_H), row_last)
        q_ptr = Q + b64 * q_str[0] + (q_rows * q_str[1])[:, None]
        PAD: tl.constexpr = DV_SPLIT * BLOCK_DV != DV  # latent blocks overhang Dv: masked loads
        q_lat = _cols(q_ptr, offs_v, v_ok, PAD)
        if DV_SPLIT == 2:
            offs_w = (1 - pid_v) * BLOCK_DV + tl.arange(0, BLOCK_DV)
            w_ok = offs_w < DV
            q_oth = _cols(q_ptr, offs_w, w_ok, PAD)
        if BLOCK_DR > 0:
            offs_r = DV + tl.arange(0, BLOCK_DR)
            r_ok = offs_r < DK
            q_rope = tl.load(q_ptr + offs_r[None, :], mask=r_ok[None, :], other=0.0)
        bt_row = BLOCK_TABLE + b64 * kv_str[2]
        tk_row = TOPK
        if HAS_TOPK:
            tk_row = TOPK + b64 * tk_str[0] + t0.to(tl.int64) * tk_str[1]
        else:
            key_end = hi  # unused
        if IS_CAUSAL and not HAS_TOPK:
            # row r sees keys j < row_end[r] (bottom-right aligned); padding rows as the last row
            row_end = seqlen - TQ + q_rows // H + 1

        m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)

        # The cache rows of a step are addressed one step ahead (block-table lookup for step i + 1 while
        # step i computes): the copies of a step then depend on a loop-carried offset only, so the
        # software pipeliner can issue them num_stages - 1 steps ahead (a lookup inside the step would
        # serialise lookup -> copy every step, whatever num_stages).
        pos_c, ok_c, off_c = _key_rows(lo, hi, bt_row, tk_row, key_end, kv_str, PAGE_SIZE, HAS_TOPK, BLOCK_N)
        for start in range(lo, hi, BLOCK_N):
            pos, key_ok, kv_off = pos_c, ok_c, off_c
            pos_c, ok_c, off_c = _key_rows(start + BLOCK_N, hi, bt_row, tk_row, key_end, kv_str, PAGE_SIZE, HAS_TOPK,
                                           BLOCK_N)
            if KV_FP8:
                kv = _fp8_latent(KV, kv_off, pid_v * BLOCK_DV, offs_v, v_ok, DV, PAD, BLOCK_DV // 128, q_lat.dtype,
                                 FP8_NATIVE)
            else:
                kv = _cols(KV + kv_off[:, None], offs_v, v_ok, PAD)
            s = tl.dot(q_lat, tl.trans(kv), input_precision=DOT_PRECISION)
            if DV_SPLIT == 2:
                if KV_FP8:
                    kw = _fp8_latent(KV, kv_off, (1 - pid_v) * BLOCK_DV, offs_w, w_ok, DV, PAD, BLOCK_DV // 128,
                                     q_lat.dtype, FP8_NATIVE)
                else:
                    kw = _cols(KV + kv_off[:, None], offs_w, w_ok, PAD)
                s = tl.dot(q_oth, tl.trans(kw), s, input_precision=DOT_PRECISION)
            if BLOCK_DR > 0:
                if KV_FP8:  # bf16 rope values after the latent codes and the DV / 128 fp32 scales
                    r_ptr = (KV + kv_off + DV + DV // 32).to(tl.pointer_type(tl.bfloat16))
                    kr = tl.load(r_ptr[:, None] + (offs_r - DV)[None, :], mask=r_ok[None, :], other=0.0)
                    kr = kr.to(q_rope.dtype)
                else:
                    kr = tl.load(KV + kv_off[:, None] + offs_r[None, :], mask=r_ok[None, :], other=0.0)
                s = tl.dot(q_rope, tl.trans(kr), s, input_precision=DOT_PRECISION)
            if IS_CAUSAL and not HAS_TOPK:
                vis = key_ok[None, :] & (pos[None, :] < row_end[:, None])
            else:
                vis = key_ok[None, :]
            if HAS_WINDOW:
                win_lo = seqlen - TQ + q_rows // H - WIN_L
                vis = vis & (pos[None, :] >= win_lo[:, None])
            s = tl.where(vis, s * sm_scale_log2, float("-inf"))  # base-2 logits

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet stays 0
            alpha = tl.exp2(m_i - m_base)
            p = tl.exp2(s - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            acc = tl.dot(p.to(kv.dtype), kv, acc, input_precision=DOT_PRECISION)
            m_i = m_new

        # Epilogue addressing, int64 (partial buffers can be large). Rows past the last one (padding) store
        # to the last row what it holds already (they re-read its query), so the output store needs no row
        # mask, and no column mask unless the value blocks overhang Dv: with the masks the fp32 partial
        # store of a [128, 256] tile spilled 360 bytes.
        rows = row_base + tl.arange(0, BLOCK_H)
        row_ok = rows <= row_last
        rows64 = tl.minimum(rows, row_last).to(tl.int64)
        if HAS_SINKS and DIRECT:  # the sink closes each row's softmax: finite lse, empty rows give 0
            sink = tl.load(SINKS + rows64 % H) * 1.4426950408889634
            o_scale, lse2 = _sink_finish(acc, m_i, l_i, sink)
            o = acc * o_scale[:, None]
            lse = lse2 * 0.6931471805599453
            empty = l_i < 0.0  # never
        else:
            empty = l_i == 0.0
            o = acc / tl.where(empty, 1.0, l_i)[:, None]
            lse = (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453
        split64 = pid_s.to(tl.int64)
        o_ptr = OUT + b64 * o_str[0] + rows64 * o_str[1] + split64 * o_str[2]
        offs_o = pid_v.to(tl.int64) * BLOCK_DV + tl.arange(0, BLOCK_DV).to(tl.int64)
        o_ptrs = o_ptr[:, None] + offs_o[None, :]
        l_ptr = (LSE + b64 * lse_str[0] + (rows64 // H) * lse_str[1] + (rows64 % H) * lse_str[2]
                 + split64 * lse_str[3])
        l_mask = row_ok & ((rows * 0 + pid_v) == 0)  # both value halves hold the same statistics
        if DIRECT:
            o = o.to(OUT.dtype.element_ty)
            lse = tl.where(empty, float("inf"), lse)
        else:
            lse = tl.where(empty, float("-inf"), lse)
        if PAD:
            tl.store(o_ptrs, o, mask=(offs_o < DV)[None, :])
        else:
            tl.store(o_ptrs, o)
        tl.store(l_ptr, lse, mask=l_mask)

    @triton.jit
    def _mla_decode_combine_kernel(
        O_PART, LSE_PART, OUT, LSE,
        NUM_SPLITS, H, TQ, part_str, o_str, lse_str,
        DV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
        SINKS=None, HAS_SINKS: tl.constexpr = False,
    ):
        """Merge the splits of one query row (b, t, h) and one block of value columns.

        O_PART fp32 [rows, NUM_SPLITS, DV] (row = (b * TQ + t) * H + h), LSE_PART fp32 [rows, NUM_SPLITS];
        ``part_str`` = (O_PART row, O_PART split, LSE_PART row) strides, ``o_str`` = OUT's (batch, token,
        head), ``lse_str`` = LSE's (batch, head, token).
        out = sum_s exp(lse_s - lse) * o_s with lse = log sum_s exp(lse_s); all splits empty: 0 and +inf.
        HAS_SINKS: the sink logit ``SINKS[h]`` joins the log-sum-exp here, once (no value), not per split.
        """
        row = tl.program_id(0)
        pid_v = tl.program_id(1)
        row64 = row.to(tl.int64)
        b = row // (TQ * H)
        t = (row // H) % TQ
        h = row % H
        offs_s0 = tl.arange(0, BLOCK_S)
        lp = LSE_PART + row64 * part_str[2]

        # pass 1: the merged log-sum-exp (running max / sum over chunks of BLOCK_S splits)
        m = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
        ssum = tl.zeros([BLOCK_S], dtype=tl.float32)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            offs_s = s0 + offs_s0
            ls = tl.load(lp + offs_s, mask=offs_s < NUM_SPLITS, other=float("-inf"))
            m_new = tl.maximum(m, ls)
            base = tl.where(m_new == float("-inf"), 0.0, m_new)
            ssum = ssum * tl.exp(m - base) + tl.exp(ls - base)
            m = m_new
        m_all = tl.max(m, 0)
        base_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.sum(ssum * tl.exp(m - base_all), 0)
        empty = total == 0.0
        lse = tl.where(empty, float("-inf"), base_all + tl.log(tl.where(empty, 1.0, total)))
        if HAS_SINKS:
            sink = tl.load(SINKS + h)
            mx = tl.maximum(lse, sink)
            lse = mx + tl.log(tl.exp(lse - mx) + tl.exp(sink - mx))
            empty = lse != lse  # never: the sink keeps every row finite

        # pass 2: weighted sum of the partial outputs
        offs_v = pid_v * BLOCK_DV + tl.arange(0, BLOCK_DV)
        v_ok = offs_v < DV
        op = O_PART + row64 * part_str[0]
        acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
        lse_base = tl.where(empty, 0.0, lse)
        for s0 in range(0, NUM_SPLITS, BLOCK_S):
            offs_s = s0 + offs_s0
            s_ok = offs_s < NUM_SPLITS
            ls = tl.load(lp + offs_s, mask=s_ok, other=float("-inf"))
            w = tl.exp(ls - lse_base)
            o = tl.load(op + offs_s.to(tl.int64)[:, None] * part_str[1] + offs_v[None, :],
                        mask=s_ok[:, None] & v_ok[None, :], other=0.0)
            acc += tl.sum(w[:, None] * o, 0)

        o_ptr = OUT + b.to(tl.int64) * o_str[0] + t.to(tl.int64) * o_str[1] + h.to(tl.int64) * o_str[2]
        tl.store(o_ptr + offs_v, acc.to(OUT.dtype.element_ty), mask=v_ok)
        lse_out = tl.where(empty, float("inf"), lse)
        if pid_v == 0:
            tl.store(LSE + b.to(tl.int64) * lse_str[0] + h.to(tl.int64) * lse_str[1] + t.to(tl.int64) * lse_str[2],
                     lse_out)


# --------------------------------------------------------------------------------------------
# configuration
# --------------------------------------------------------------------------------------------
#: Tiles of the split kernel on a GPU, keyed by kernels._config.arch_family: at most 256 value columns
#: per program (DV_SPLIT = 2 programs share a 512-column latent), 32 keys per pipelined step; the query
#: tile stays in shared memory. Why (static model, bench/static_model.py; registers / shared bytes:
#: DESIGN §9.2): Triton lays the score product of an M-row tile out as warpsPerCTA [num_warps, 1] and a
#: Hopper warpgroup (4 warps) covers 64 rows, so a 64-row tile with 8 warps computes its scores twice
#: (0.39 useful MAC share); 64 rows need 4 warps, 8 warps need 128 rows (both 0.65 useful).
#: sm90, fewer than 128 rows per sequence (G = 16 tensor parallel, H = 64): 64 rows x 4 warps (one
#: warpgroup), 3 stages (72 KiB of query + 3 x 36 KiB of key tiles = 180 KiB): two steps of load slack.
#: sm90, 128 or more rows (H = 128): ``_GPU_WIDE_TILES``, 128 rows x 8 warps (two warpgroups of 64 rows):
#: each cache tile is read by half as many programs and two warpgroups share an SM; its 144 KiB of query
#: leave room for 2 stages only (216 KiB), so its loop waits for the step's loads at the top.
#: A [64, 512] accumulator per program (no value split) spills.
#: sm80 / 99 KiB parts (mma.sync): 64 rows x 8 warps, 2 stages (3 do not fit); the 99 KiB parts (sm86,
#: sm89, sm120) step 16 keys at a time (32 keys: 112 KiB, over their limit).
_GPU_ARCH_TILES = {80: dict(BLOCK_H=64, num_warps=8, BLOCK_N=32, num_stages=2),
                   86: dict(BLOCK_H=64, num_warps=8, BLOCK_N=16, num_stages=2),
                   90: dict(BLOCK_H=64, num_warps=4, BLOCK_N=32, num_stages=3)}
_GPU_WIDE_TILES = {90: dict(BLOCK_H=128, num_warps=8, BLOCK_N=32, num_stages=2)}
_GPU_MAX_BLOCK_DV = 256
#: FP8 (fp8_ds_mla) cache tiles, measured with ptxas like the above (bf16 queries, 576/512, the three
#: launch modes of ``compile_specs``): the dequantized tiles live in registers before the products. The
#: wgmma family (90) keeps its tiles (64 rows x 4 warps: 255 registers, 128 rows x 8 warps: 235, 0 spills); the
#: others (mma.sync, no wgmma; ~91 KiB shared, within the 99 KiB parts' limit) take 32 rows per program
#: (64 rows: 600-3,200 spilled bytes for 16 or 32 keys).
_GPU_FP8_TILES = {80: dict(BLOCK_H=32, BLOCK_N=32, num_stages=2), 90: {}}
#: Minimum number of key tiles a split should own before splitting further pays for the combine.
_MIN_TILES_PER_SPLIT = 2
#: Split heuristic costs, in key steps of one program (``choose_num_splits``): a program's fixed work
#: (query load, epilogue, launch slot) and the combine pass (a second launch, the fp32 partials written
#: and read back). Estimates, not measurements.
_PROGRAM_OVERHEAD_STEPS = 2
_COMBINE_STEPS = 8


def _dim_blocks(head_dim: int, head_dim_v: int, max_block_dv: int) -> dict:
    dv_p2 = max(16, next_pow2(head_dim_v))
    dv_split = 2 if dv_p2 > max_block_dv else 1
    block_dr = 0 if head_dim == head_dim_v else max(16, next_pow2(head_dim - head_dim_v))
    return dict(BLOCK_DV=dv_p2 // dv_split, DV_SPLIT=dv_split, BLOCK_DR=block_dr)


def _gpu_config(head_dim: int, head_dim_v: int, arch: int, dtype: torch.dtype | None, rows: int | None) -> dict:
    if dtype == torch.float32:
        # fp32 inputs (IEEE products on CUDA cores): a correctness path, not a fast one. Small tiles
        # so that shared memory fits (576/512: 69632 bytes on sm80/sm90); it spills (~3.7 KiB).
        return dict(BLOCK_H=16, BLOCK_N=16, **_dim_blocks(head_dim, head_dim_v, _GPU_MAX_BLOCK_DV),
                    num_warps=4, num_stages=1)
    family = arch_family(arch)
    wide = family in _GPU_WIDE_TILES and (rows is None or rows >= _GPU_WIDE_TILES[family]["BLOCK_H"])
    tiles = (_GPU_WIDE_TILES if wide else _GPU_ARCH_TILES)[family]
    return dict(**_dim_blocks(head_dim, head_dim_v, _GPU_MAX_BLOCK_DV), **tiles)


def decode_config(head_dim: int, head_dim_v: int, dtype: torch.dtype | None = None, arch: int = 90,
                  kv_fp8: bool = False, *, rows: int | None = None, interpret: bool | None = None) -> dict:
    """Tile configuration of the split kernel for head dims (``head_dim`` = Dk, ``head_dim_v`` = Dv).

    Returns a dict with ``BLOCK_H`` (query rows per program), ``BLOCK_N`` (keys per step),
    ``BLOCK_DV`` (value columns per program: ``Dv`` padded to a power of two >= 16, halved when
    ``DV_SPLIT`` is 2), ``DV_SPLIT`` (1 or 2 programs share the value columns),
    ``BLOCK_DR`` (``Dk - Dv`` padded to a power of two >= 16; 0 when ``Dk == Dv``), ``num_warps``
    and ``num_stages``. ``arch`` is the compute capability (80: A100-class shared memory; >= 90:
    Hopper). ``rows``: the query rows that share a cache tile (dense: ``Tq * H``; top-k: ``H``; None:
    as many as the widest tile has): on Hopper 128 or more take the 128-row tile (``_GPU_WIDE_TILES``),
    fewer the 64-row one. fp16 and bf16 share the tiles; fp32 (IEEE products, a correctness path) gets
    small ones. Under the Triton interpreter (``kernels._config.INTERPRET``) one small configuration is
    used (``interpret``, default ``kernels._config.INTERPRET``). ``kv_fp8``: tiles for the ``fp8_ds_mla``
    cache (``_GPU_FP8_TILES``).
    Raises ``ValueError`` unless ``1 <= head_dim_v <= head_dim``.
    """
    if head_dim < 1 or head_dim_v < 1 or head_dim_v > head_dim:
        raise ValueError(f"need 1 <= head_dim_v <= head_dim, got head_dim={head_dim}, head_dim_v={head_dim_v}")
    if INTERPRET if interpret is None else interpret:
        return dict(BLOCK_H=16, BLOCK_N=16, **_dim_blocks(head_dim, head_dim_v, 1024), num_warps=4, num_stages=1)
    cfg = _gpu_config(head_dim, head_dim_v, arch, dtype, rows)
    if kv_fp8 and dtype != torch.float32:
        cfg.update(_fp8_tiles(arch))
    return cfg


def _fp8_tiles(arch: int) -> dict:
    return _GPU_FP8_TILES[90 if arch_family(arch) == 90 else 80]


def combine_config(head_dim_v: int, num_splits: int) -> dict:
    """Tile of the combine kernel: ``BLOCK_S`` splits x ``BLOCK_DV`` value columns per step, ``num_warps``."""
    # 4 splits x up to 512 columns per step, 4 warps: 40-56 registers, no spills (8 splits x 512
    # spilled 8 bytes on sm90). One program per query row and 512-column block.
    block_s = min(64, next_pow2(num_splits)) if INTERPRET else 4  # interpreter: fewer, wider steps
    return dict(BLOCK_S=block_s, BLOCK_DV=max(16, min(512, next_pow2(head_dim_v))), num_warps=4)


def choose_num_splits(batch: int, num_heads: int, q_len: int, max_seqlen: int, num_sms: int, *,
                      block_h: int = 64, block_n: int = 64, dv_split: int = 1) -> int:
    """Number of key splits per sequence for the split-KV decode (Flash-Decoding's idea), chosen by waves.

    Without splitting there are ``base = batch * cdiv(q_len * num_heads, block_h) * dv_split`` programs,
    one per SM at a time (the 576/512 tiles take more than half of an SM's shared memory). With ``n``
    splits each program walks ``cdiv(T, n)`` key steps of ``block_n`` keys (``T = cdiv(max_seqlen,
    block_n)``) and the ``base * n`` programs run in ``waves = cdiv(base * n, num_sms)`` waves. The
    answer minimises the modeled time ``waves * (cdiv(T, n) + overhead) + combine`` in key steps:
    ``overhead`` = ``_PROGRAM_OVERHEAD_STEPS`` per program, plus ``_COMBINE_STEPS`` / 4 per program and
    ``_COMBINE_STEPS`` once when ``n > 1`` (the fp32 partials and the combine pass); ties go to fewer
    splits. So a batch that leaves the last wave mostly idle is split too (B = 40, H = 128 on 132 SMs with
    the 128-row tile: 80 programs keep 61 % of the SMs busy without splits, 3 splits: 240 programs in 2
    waves, 91 %), and a long single sequence is cut until its pieces fill the machine. ``n`` is at most
    ``MAX_SPLITS`` and leaves each split at least ``_MIN_TILES_PER_SPLIT`` key steps. (Wave quantisation
    as in FlashAttention-2's split heuristic; our own formulation and constants.) ``max_seqlen`` is an
    upper bound on the keys per sequence (top-k decode: K).

    Returns an int in ``[1, MAX_SPLITS]``. Raises ``ValueError`` for negative sizes, ``num_sms < 1`` or a
    tile (``block_h``, ``block_n``) below 1.
    """
    if min(batch, num_heads, q_len, max_seqlen) < 0 or num_sms < 1:
        raise ValueError(f"choose_num_splits: sizes must be >= 0 and num_sms >= 1, got batch={batch}, "
                         f"num_heads={num_heads}, q_len={q_len}, max_seqlen={max_seqlen}, num_sms={num_sms}")
    if min(block_h, block_n) < 1:
        raise ValueError(f"choose_num_splits: block_h and block_n must be >= 1, got block_h={block_h}, "
                         f"block_n={block_n}")
    base = batch * cdiv(q_len * num_heads, block_h) * max(1, dv_split)
    steps = cdiv(max_seqlen, block_n)
    if base == 0 or steps == 0:
        return 1
    limit = max(1, min(MAX_SPLITS, steps // _MIN_TILES_PER_SPLIT))

    def cost(n: int) -> float:
        per_program = cdiv(steps, n) + _PROGRAM_OVERHEAD_STEPS + (_COMBINE_STEPS / 4 if n > 1 else 0)
        return cdiv(base * n, num_sms) * per_program + (_COMBINE_STEPS if n > 1 else 0)

    return min(range(1, limit + 1), key=lambda n: (cost(n), n))


def wave_efficiency(programs: int, num_sms: int) -> float:
    """Busy fraction of ``num_sms`` SMs over the waves that ``programs`` equal programs (one per SM at a
    time) take: ``programs / (cdiv(programs, num_sms) * num_sms)``; 1.0 for no programs."""
    return programs / (cdiv(programs, num_sms) * num_sms) if programs else 1.0


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(cond: bool, msg: str, exc: type = ValueError) -> None:
    if not cond:
        raise exc(msg)


def _row_stride(x: torch.Tensor) -> int | None:
    """Stride between the packed rows ``t * H + h`` of a ``[B, T, H, D]`` tensor with unit last
    stride, or None when the rows are not equally spaced (or the last stride is not 1)."""
    _, T, H, D = x.shape
    if x.stride(-1) != 1 and D > 1:
        return None
    if H == 1:
        return x.stride(1)
    if T == 1 or x.stride(1) == H * x.stride(2):
        return x.stride(2)
    return None


def _check_inputs(q, kv_cache, block_table, cache_seqlens, dv: int, kv_fp8: bool, topk_indices):
    """Short check of a direct call, before any launch (``mla.functional.mla_decode`` validates fully
    first): ranks, dtypes, head dims, the fp8 row layout, batch sizes and devices. Returns ``topk_indices``
    as ``[B, Tq, K]`` (or None). Raises ``TypeError`` / ``ValueError`` naming the argument."""
    _check(q.dim() == 4, f"q must be [B, Tq, H, Dk], got shape {tuple(q.shape)}")
    _check(kv_cache.dim() == 4 and kv_cache.shape[2] == 1 and kv_cache.shape[1] >= 1,
           f"kv_cache must be [num_pages, page_size >= 1, 1, Dk], got shape {tuple(kv_cache.shape)}")
    B, Tq, _, Dk = q.shape
    _check(q.dtype in _DTYPES, f"q dtype must be fp16, bf16 or fp32, got {q.dtype}", TypeError)
    _check(0 < dv <= Dk, f"head_dim_v must be in [1, Dk={Dk}], got {dv}")
    if kv_fp8:
        _check(dv % 128 == 0, f"kv_fp8 needs head_dim_v a multiple of 128 (one scale per 128), got {dv}")
        row_bytes = cdiv(dv + dv // 32 + 2 * (Dk - dv), 16) * 16
        _check(kv_cache.dtype == torch.uint8, f"kv_fp8: kv_cache must be the uint8 byte pool, got {kv_cache.dtype}",
               TypeError)
        _check(kv_cache.shape[3] == row_bytes,
               f"kv_fp8: kv_cache rows must be {row_bytes} bytes for Dk={Dk}, Dv={dv}, got {kv_cache.shape[3]}")
        _check(kv_cache.stride(1) % 16 == 0 and kv_cache.stride(0) % 16 == 0 and kv_cache.data_ptr() % 16 == 0,
               f"kv_fp8: kv_cache must be 16-byte aligned with page/slot strides multiples of 16 bytes "
               f"(fp32 scales), got strides {kv_cache.stride()}")
    else:
        _check(kv_cache.dtype == q.dtype, f"kv_cache dtype must equal q's ({q.dtype}), got {kv_cache.dtype}",
               TypeError)
        _check(kv_cache.shape[3] == Dk, f"kv_cache last dim must be Dk={Dk}, got {kv_cache.shape[3]}")
    _check(kv_cache.stride(-1) == 1, f"kv_cache must have last stride 1, got strides {kv_cache.stride()}")
    if topk_indices is not None and topk_indices.dim() == 4:
        _check(topk_indices.shape[2] == 1,
               f"topk_indices [B, Tq, 1, K] needs dim 2 == 1, got shape {tuple(topk_indices.shape)}")
        topk_indices = topk_indices[:, :, 0]
    for name, t, shape in (("block_table", block_table, (B, None)), ("cache_seqlens", cache_seqlens, (B,)),
                           ("topk_indices", topk_indices, (B, Tq, None))):
        if t is None:
            continue
        want = "[" + ", ".join("*" if n is None else str(n) for n in shape) + "]"
        _check(t.dim() == len(shape) and all(n is None or n == m for n, m in zip(shape, t.shape)),
               f"{name} must be {want}, got shape {tuple(t.shape)}")
        _check(t.dtype == torch.int32, f"{name} must be int32, got {t.dtype}", TypeError)
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens),
                    ("topk_indices", topk_indices)):
        _check(t is None or t.device == q.device, f"{name} must be on {q.device}, got {getattr(t, 'device', None)}")
    return topk_indices


def mla_decode_fwd(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
                   cache_seqlens: torch.Tensor, softmax_scale: float, head_dim_v: int,
                   causal: bool = False, topk_indices: torch.Tensor | None = None,
                   num_splits: int | None = None, *, out: torch.Tensor | None = None,
                   lse: torch.Tensor | None = None, config: dict | None = None, kv_fp8: bool = False,
                   allow_tf32: bool | None = None, sinks: torch.Tensor | None = None, window_left: int = -1):
    """Multi-head latent attention decode over a paged latent cache (split-KV + combine).

    Args:
        q: ``[B, Tq, H, Dk]`` fp16 / bf16 / fp32, any strides (copied unless the last stride is 1
            and ``stride(1) == H * stride(2)``). ``Tq`` is small (1 ... 8; 2 with multi-token
            prediction).
        kv_cache: ``[num_pages, page_size, 1, Dk]``, dtype of ``q``, last stride 1. Each row is
            ``[c_kv (Dv values) | k_rope (Dk - Dv values)]``; the value of a token is the first
            ``head_dim_v`` columns of its row (read once: V is a prefix of the key tile).
        block_table: int32 ``[B, max_pages]``: page ids; key ``j`` of sequence ``b`` is
            ``kv_cache[block_table[b, j // page_size], j % page_size, 0]``. Entries past a sequence's
            length are never read (may be -1 or garbage), nor are unused page slots. Any page size
            >= 1; a key tile may span pages.
        cache_seqlens: int32 ``[B]``: keys ``0 .. cache_seqlens[b] - 1`` exist. The caller guarantees
            ``cache_seqlens[b] <= max_pages * page_size`` and valid page ids for those keys
            (checking it here would cost a device sync).
        softmax_scale: scores are ``q . k * softmax_scale`` (fp32 statistics).
        head_dim_v: ``Dv`` (512 in DeepSeek's absorbed MLA, with ``Dk`` = 576).
        causal: bottom-right aligned per sequence: query ``j`` of ``Tq`` sees keys
            ``0 .. L - Tq + j`` (``L = cache_seqlens[b]``), as in FlashAttention >= 2.1 / FlashMLA.
        topk_indices: optional int32 ``[B, Tq, K]`` (or ``[B, Tq, 1, K]``): per query token the key
            positions it attends to, shared by all heads (DeepSeek sparse attention). ``-1`` lanes,
            positions ``>= L`` and (with ``causal``) positions past the row's limit are skipped.
        num_splits: key splits per sequence (``None``: ``choose_num_splits`` from B, H, Tq, the key
            bound ``max_pages * page_size`` (or K) and the SM count; no host sync). With 1 the
            split kernel writes the result directly and no combine runs. At most ``MAX_SPLITS``.
        out: optional preallocated ``[B, Tq, H, Dv]`` output (dtype of ``q``, last stride 1 and
            ``stride(1) == H * stride(2)``); every element is written.
        lse: optional preallocated fp32 ``[B, H, Tq]`` log-sum-exp output (any strides).
        config: optional tile override (keys of ``decode_config``), for tests and tuning.
        kv_fp8: ``kv_cache`` is the uint8 ``fp8_ds_mla`` pool ``[num_pages, page_size, 1, row_bytes]``
            (DeepSeek-V3.2's FP8 cache: per row ``Dv`` e4m3 codes, ``Dv / 128`` fp32 power-of-two scales,
            ``Dk - Dv`` bf16 rope values, zero padding to a multiple of 16 bytes: 656 bytes for 576/512);
            ``Dv`` must be a multiple of 128. Tiles are dequantized in registers (``code * scale`` in fp32,
            rounded to ``q``'s dtype for the products); no dequantized copy of the cache is made.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32`` (:func:`kernels._common.dot_precision`).
        sinks: contiguous fp32 ``[H]`` attention-sink logits or None: added once per row, in the combine
            (or in the split kernel when it writes directly); ``lse`` includes them, a row without keys
            gives 0 and ``lse = sink``.
        window_left: sliding window (dense only, -1 = none): query ``j`` sees positions
            ``>= L - Tq + j - window_left``; only those positions (and their pages) are read.

    fp32 inputs use IEEE fp32 products (``input_precision="ieee"``) unless TF32 is allowed, fp16 /
    bf16 inputs tensor-core products with fp32 accumulation; the softmax statistics and the split
    merge are fp32.

    Returns:
        ``(out, lse)``: ``out [B, Tq, H, Dv]`` in ``q.dtype``; ``lse`` fp32 ``[B, H, Tq]``, natural
        log of the softmax denominator of the scaled scores. A row that sees no key (empty
        sequence, causal row before the cache, all top-k lanes skipped) gives 0 and ``lse = +inf``.

    Raises:
        ValueError / TypeError for inconsistent shapes, dtypes or devices (checked before launch);
        RuntimeError when Triton is missing or the tensors are on the CPU outside the interpreter.

    Method: FlashMLA's head packing (all heads share the latent cache tile) with Flash-Decoding's
    split-KV and log-sum-exp merge; see the module docstring. Our own code.
    """
    if not HAS_TRITON:
        raise RuntimeError("mla_decode_fwd needs triton")
    topk_indices = _check_inputs(q, kv_cache, block_table, cache_seqlens, int(head_dim_v), kv_fp8, topk_indices)
    B, Tq, H, Dk = q.shape
    Dv, dev, page_size = int(head_dim_v), q.device, kv_cache.shape[1]
    if not INTERPRET and dev.type != "cuda":
        raise RuntimeError("mla_decode_fwd runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")
    has_topk = topk_indices is not None
    topk_k = topk_indices.shape[2] if has_topk else 0
    if has_topk and topk_indices.stride(-1) != 1:
        topk_indices = topk_indices.contiguous()
    if _row_stride(q) is None:
        q = q.contiguous()
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    cache_seqlens = cache_seqlens.contiguous()
    if out is None:
        out = torch.empty((B, Tq, H, Dv), dtype=q.dtype, device=dev)
    _check(tuple(out.shape) == (B, Tq, H, Dv) and out.dtype == q.dtype and out.device == dev,
           f"out must be [{B}, {Tq}, {H}, {Dv}] {q.dtype} on {dev}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    _check(_row_stride(out) is not None, "out must have last stride 1 and stride(1) == H * stride(2) "
           f"(rows t * H + h equally spaced), got strides {out.stride()}")
    if lse is None:
        lse = torch.empty((B, H, Tq), dtype=torch.float32, device=dev)
    _check(tuple(lse.shape) == (B, H, Tq) and lse.dtype == torch.float32 and lse.device == dev,
           f"lse must be [{B}, {H}, {Tq}] float32 on {dev}, got {tuple(lse.shape)} {lse.dtype} on {lse.device}")
    if B == 0 or Tq == 0 or H == 0:
        return out, lse

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        arch, num_sms = props.major * 10 + props.minor, props.multi_processor_count
    else:  # interpreter
        arch, num_sms = 90, 8
    cfg = decode_config(Dk, Dv, q.dtype, arch, kv_fp8=kv_fp8, rows=H if has_topk else Tq * H)
    if config:
        cfg.update(config)
    _check(cfg["DV_SPLIT"] in (1, 2) and cfg["DV_SPLIT"] * cfg["BLOCK_DV"] >= Dv,
           f"config must cover Dv={Dv} with DV_SPLIT in (1, 2) blocks of BLOCK_DV, got {cfg}")
    if num_splits is None:
        kw = dict(block_h=cfg["BLOCK_H"], block_n=cfg["BLOCK_N"], dv_split=cfg["DV_SPLIT"])
        if has_topk:  # every query token is its own group of rows
            num_splits = choose_num_splits(B * Tq, H, 1, topk_k, num_sms, **kw)
        else:
            num_splits = choose_num_splits(B, H, Tq, block_table.shape[1] * page_size, num_sms, **kw)
    num_splits = int(num_splits)
    _check(1 <= num_splits <= MAX_SPLITS, f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")

    if has_topk:
        groups = B * Tq * cdiv(H, cfg["BLOCK_H"])
        tk, tk_strides = topk_indices, (topk_indices.stride(0), topk_indices.stride(1))
    else:
        groups = B * cdiv(Tq * H, cfg["BLOCK_H"])
        tk, tk_strides = cache_seqlens, (0, 0)  # unused pointer
    direct = num_splits == 1
    if direct:
        o_buf, l_buf = out, lse
        o_strides = (out.stride(0), _row_stride(out), 0)
        l_strides = (lse.stride(0), lse.stride(2), lse.stride(1), 0)
    else:
        o_buf = torch.empty((B, Tq, H, num_splits, Dv), dtype=torch.float32, device=dev)
        l_buf = torch.empty((B, Tq, H, num_splits), dtype=torch.float32, device=dev)
        o_strides = (o_buf.stride(0), o_buf.stride(2), o_buf.stride(3))
        l_strides = l_buf.stride()
    grid = (groups * cfg["DV_SPLIT"], num_splits)
    launch(
        _mla_decode_split_kernel, grid,
        Q=q, KV=kv_cache, BLOCK_TABLE=block_table, SEQLENS=cache_seqlens, TOPK=tk, OUT=o_buf, LSE=l_buf,
        sm_scale_log2=float(softmax_scale) * LOG2E, q_str=(q.stride(0), _row_stride(q)),
        kv_str=(kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0)), tk_str=tk_strides,
        o_str=o_strides, lse_str=l_strides, dims=(H, Tq, topk_k), DK=Dk, DV=Dv, PAGE_SIZE=page_size,
        IS_CAUSAL=bool(causal), HAS_TOPK=has_topk, DIRECT=direct,
        BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DV=cfg["BLOCK_DV"], DV_SPLIT=cfg["DV_SPLIT"],
        BLOCK_DR=cfg["BLOCK_DR"], DOT_PRECISION=dot_precision(q.dtype, allow_tf32),
        KV_FP8=bool(kv_fp8), FP8_NATIVE=bool(cfg.get("FP8_NATIVE", arch >= 89)),
        **({} if sinks is None or not direct else dict(SINKS=sinks, HAS_SINKS=True)),
        **({} if window_left < 0 or has_topk else dict(WIN_L=int(window_left), HAS_WINDOW=True)),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        ccfg = combine_config(Dv, num_splits)
        rows = B * Tq * H
        launch(
            _mla_decode_combine_kernel, (rows, cdiv(Dv, ccfg["BLOCK_DV"])),
            O_PART=o_buf, LSE_PART=l_buf, OUT=out, LSE=lse, NUM_SPLITS=num_splits, H=H, TQ=Tq,
            part_str=(num_splits * Dv, Dv, num_splits), o_str=tuple(out.stride()[:3]), lse_str=tuple(lse.stride()),
            DV=Dv, BLOCK_S=ccfg["BLOCK_S"], BLOCK_DV=ccfg["BLOCK_DV"], num_warps=ccfg["num_warps"],
            **({} if sinks is None else dict(SINKS=sinks, HAS_SINKS=True)),
        )
    return out, lse


def compile_specs(arch: int) -> list:
    """Every configuration the decode launcher may pick on ``arch``:
    :func:`kernels._specs_topk.decode_compile_specs`."""
    from kernels._specs_topk import decode_compile_specs

    return decode_compile_specs(arch)


def __getattr__(name: str):
    # compile-spec helpers kept importable from here (they live in kernels._specs_topk)
    if name == "_split_spec":
        from kernels._specs_topk import decode_split_spec

        return decode_split_spec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
