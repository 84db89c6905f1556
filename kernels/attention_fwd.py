"""Dense fused attention forward (online softmax), with GQA/MQA head packing and absorbed-MLA support.

Layout (DESIGN §3): ``q [B, T, Hq, Dk]``, ``k [B, S, Hkv, Dk]``, ``v [B, S, Hkv, Dv]``, any strides.

How the work is cut:

* **Packed rows.** One program owns ``BLOCK_M`` rows of the packed ``[T * G]`` axis of one
  ``(batch, kv head)``, ``G = Hq // Hkv``: row ``r`` is token ``r // G``, head ``r % G`` of the
  group. The K/V tile of a key block is therefore loaded once for all the heads of the group
  (with ``Hkv = 1`` and 128 heads this is what makes absorbed MLA compute-bound).
* **Head-dim plan** (:class:`HeadPlan`). Tiles must be powers of two, so ``Dk`` is covered by
  ``NSPLIT`` main chunks of ``BK`` columns plus an optional tail chunk of ``BT`` columns, and ``Dv``
  by ``NSPLIT`` chunks of ``BV`` columns. Program ``split`` of a row block accumulates value
  columns ``[split*BV, split*BV + BV)``: with ``NSPLIT > 1`` the value dimension is split across
  programs (each recomputes the scores) because a ``[64, 512]`` fp32 accumulator plus the score
  operands does not fit the register file (see docs/design.md §9).
  The score contraction uses the program's *own* chunk (``[split*BK, +BK)``, q held for the whole
  loop when ``Q_RESIDENT``), the other splits' chunks in ``BC``-wide pieces and the tail. The q
  pieces are loop-invariant: Triton may hoist them (q stays on chip), or with ``STREAM`` they are
  re-read every key block through the load pipeline (fewer registers, more shared memory); the
  autotuner picks. Split (large) bodies use one masked key loop instead of two, which halves
  their code size and compile time.
* **v aliasing k** (absorbed MLA: ``v = k[..., :Dv]``). The launcher detects it and sets
  ``V_IS_K``; the plan then uses ``BK == BV`` so the own score chunk *is* the value tile: it is
  loaded once and used by both dots.
* **Key-block visiting** lives in :func:`_fwd_block_range` (which blocks, which need masking) and
  :func:`_fwd_block_start` (block number -> first key); the block body is :func:`_fwd_block`.
  With the constexpr ``SPARSE`` switch the same kernel walks a FlexAttention-style block mask
  instead (``kv_indices`` sub-tiles, :func:`_sparse_kv_tile` / :func:`_sparse_full_tiles`, row tiles
  inside one mask query block, optionally one head per tile): :mod:`kernels.block_sparse` launches it.
* **Varlen** (constexpr ``IS_VARLEN``, :func:`attention_fwd_varlen`): FlashAttention's packed layout;
  the batch axis of the grid is the sequence, each program reads its sequence's offsets and lengths
  from ``cu_seqlens`` (:func:`_varlen_seq`) and exits its loops at once past the sequence's end.

Causal masking is bottom-right aligned (key ``j`` visible to query ``i`` iff ``j <= i + S - T``);
a row with no visible key gets output 0 and ``lse = +inf``.
"""

from __future__ import annotations

from dataclasses import dataclass

from kernels import tuning
from kernels._common import (
    LN2,
    LOG2E,
    MIN_TILE,
    compiled_launch,
    device_arch,
    dot_precision,
    dtype_name,
    fwd_outputs,
    is_prefix_alias,
    launch,
    next_pow2,
    prev_pow2,
)
from kernels._config import HAS_TRITON, CompileSpec, arch_family

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover
    triton = None
    tl = None

__all__ = [
    "FwdConfig",
    "fold_window",
    "HeadPlan",
    "attention_fwd",
    "compile_specs",
    "fwd_configs",
    "head_plan",
    "is_prefix_alias",
]



# --------------------------------------------------------------------------------------------
# Host-side planning (pure Python; shared with the backward module)
# --------------------------------------------------------------------------------------------




@dataclass(frozen=True)
class HeadPlan:
    """How the head dims are cut into power-of-two tiles (see module docstring).

    ``Dk`` is covered by ``nsplit`` chunks of ``bk`` columns plus a tail of ``bt`` columns
    (``bt == 0``: no tail); ``Dv`` by ``nsplit`` chunks of ``bv`` columns. ``bc`` is the width of
    the pieces in which the other splits' score chunks are contracted.
    """

    nsplit: int
    bk: int
    bt: int
    bv: int
    bc: int

    @property
    def n_other(self) -> int:
        """Number of ``bc``-wide score pieces outside the program's own chunk and the tail."""
        return (self.nsplit - 1) * (self.bk // self.bc)


def head_plan(dk: int, dv: int, v_is_k: bool, nsplit: int, bc: int = 64) -> HeadPlan:
    """Cut ``Dk``/``Dv`` for ``nsplit`` value splits; ``v_is_k`` forces ``bk == bv`` (shared tile).

    Raises ``ValueError`` for non-positive dims or ``nsplit < 1``.
    """
    if dk < 1 or dv < 1 or nsplit < 1:
        raise ValueError(f"head_plan: need dk, dv, nsplit >= 1, got dk={dk}, dv={dv}, nsplit={nsplit}")
    bv = max(MIN_TILE, next_pow2(-(-dv // nsplit)))
    nsplit = -(-dv // bv)  # never a split without value columns
    if v_is_k:
        bk = bv
    elif nsplit == 1:
        lo = max(MIN_TILE, prev_pow2(dk))
        rest = dk - lo
        bt = max(MIN_TILE, next_pow2(rest)) if rest > 0 else 0
        # One padded tile beats two dots when the padding is no larger (24 -> 32, not 16 + 16).
        bk = next_pow2(dk) if rest > 0 and lo + bt >= next_pow2(dk) else lo
    else:
        bk = max(MIN_TILE, prev_pow2(max(1, dk // nsplit)))
    rest = dk - nsplit * bk
    bt = max(MIN_TILE, next_pow2(rest)) if rest > 0 else 0
    return HeadPlan(nsplit=nsplit, bk=bk, bt=bt, bv=bv, bc=min(bc, bk, bv))


@dataclass(frozen=True)
class FwdConfig:
    """One forward tile configuration: rows per program, keys per step, value splits, launch knobs."""

    block_m: int
    block_n: int
    nsplit: int = 1
    num_warps: int = 4
    num_stages: int = 2
    q_resident: bool = True  # own q chunk (and tail) loaded once, before the key loop
    stream: bool = False  # other splits' q pieces re-read every key block (else LICM may hoist them)
    bc: int = 64

    @property
    def tile(self) -> str:
        """Report label: ``BLOCK_MxBLOCK_N``, ``/vN`` value splits, ``/r`` q re-read, ``/s`` streamed."""
        return (f"{self.block_m}x{self.block_n}" + (f"/v{self.nsplit}" if self.nsplit > 1 else "")
                + ("" if self.q_resident else "/r") + ("/s" if self.stream else ""))


def head_class(dk: int, dv: int) -> str:
    """Bucket of the head dims that selects a config table: d64, d128, d256 or d576."""
    d = max(dk, dv)
    if d <= 64:
        return "d64"
    if d <= 128:
        return "d128"
    if d <= 256:
        return "d256"
    return "d576"


# Tables per architecture family and head class, chosen from the compile report (registers,
# spills, shared memory of every candidate; bench/compile_report.py) and kept small: every entry
# is compiled by the compile check (tests/test_compile_check.py) for sm80, sm86, sm89 and sm90.
# Keys are kernels._config.arch_family values (90: Hopper+, 80: 163 KiB, 86: 99 KiB parts). Triton/ptxas
# register allocation is erratic near 255 registers, so entries keep a margin where one exists.
# d576 (absorbed MLA) splits the value dim in two: one program per 256 value columns.
_FWD_TABLE: dict[int, dict[str, list[FwdConfig]]] = {
    90: {
        "d64": [FwdConfig(128, 64, num_warps=8, num_stages=3), FwdConfig(64, 64, num_warps=4, num_stages=3)],
        "d128": [FwdConfig(128, 64, num_warps=8, num_stages=2), FwdConfig(128, 32, num_warps=8, num_stages=3)],
        "d256": [FwdConfig(128, 64, num_warps=8, num_stages=2), FwdConfig(128, 32, num_warps=8, num_stages=3)],
        "d576": [
            FwdConfig(64, 32, nsplit=2, num_warps=8, num_stages=2),  # other half of q may stay on chip
            FwdConfig(64, 32, nsplit=2, num_warps=8, num_stages=2, stream=True),  # ... or stream from L2
        ],
    },
    80: {
        "d64": [FwdConfig(128, 64, num_warps=8, num_stages=3), FwdConfig(64, 64, num_warps=4, num_stages=3)],
        "d128": [FwdConfig(128, 32, num_warps=8, num_stages=3)],
        "d256": [FwdConfig(128, 32, num_warps=8, num_stages=3)],
        "d576": [
            FwdConfig(64, 32, nsplit=2, num_warps=8, num_stages=2),
            FwdConfig(64, 64, nsplit=2, num_warps=8, num_stages=2),
        ],
    },
    # 99 KiB parts (sm86, sm89, sm120): the sm80 entries that fit, smaller ones where none does
    # (shared bytes measured for sm86: d64 64x64 40 KiB, d256 at 256/256 68 KiB, d576 92 KiB; the
    # sm80 128x64 d64 tile spills 16 bytes there and d576 64x32/v2 needs 112 KiB).
    86: {
        "d64": [FwdConfig(64, 64, num_warps=4, num_stages=3)],
        "d128": [FwdConfig(128, 32, num_warps=8, num_stages=3)],
        # 4 warps: with 8 ptxas caps 64x32 at 128 registers and spills 8 bytes at 192/128 (mma.sync)
        "d256": [FwdConfig(64, 32, num_warps=4, num_stages=2)],
        "d576": [FwdConfig(64, 16, nsplit=2, num_warps=8, num_stages=2)],
    },
}

# fp32 inputs (IEEE dots by default, TF32 when allowed): twice the bytes per operand; one
# conservative config per class, the same on every architecture (fp32 attention on a GPU is for
# checks, not speed).
# IEEE products lower to FMAs that keep whole operand rows in registers: 32-row tiles (or 8 warps)
# for d128/d256 (64-row tiles spill 0.3-3.8 KiB on sm80/sm90, triton 3.9).
_FWD_TABLE_FP32: dict[int, dict[str, list[FwdConfig]]] = {
    fam: {
        "d64": [FwdConfig(64, 32, num_warps=8, num_stages=2)],
        "d128": [FwdConfig(32, 32, num_warps=8, num_stages=1)],
        "d256": [FwdConfig(32, 32, num_warps=8, num_stages=1)],
        # one stage on the 99 KiB parts (two: 110-118 KiB)
        "d576": [FwdConfig(32, 16, nsplit=4, num_warps=4, num_stages=1 if fam == 86 else 2, stream=True)],
    }
    for fam in (80, 86, 90)
}

# The absorbed class without the v alias (a separate 512-column value buffer per pipeline stage),
# keyed (family, fp32): where the alias tables do not fit (sm80 64x64/v2: 184 KiB; sm86 64x16/v2:
# 100 KiB; sm86 fp32: 118 KiB) the entries that do. sm90 keeps its table (at most 208 KiB).
_FWD_NO_ALIAS: dict[tuple[int, bool], list[FwdConfig]] = {
    (80, False): [FwdConfig(64, 32, nsplit=2, num_warps=8, num_stages=2)],
    (86, False): [FwdConfig(64, 16, nsplit=2, num_warps=8, num_stages=1)],
}


#: The one configuration used under the interpreter (autotuning there would run every config).
_INTERP_CONFIG = FwdConfig(32, 32, nsplit=1, num_warps=4, num_stages=1)


def fwd_configs(arch: int, dk: int, dv: int, dtype: str = "fp16", v_is_k: bool = True) -> list[FwdConfig]:
    """Autotune candidates for ``arch`` and head dims (Dk, Dv); ``dtype`` "fp16"/"bf16" or "fp32"
    (IEEE or TF32 dots: twice the shared memory and operand registers, its own smaller table).
    The table is the one of :func:`kernels._config.arch_family` (every entry fits that family's
    shared memory); the first entry is the preferred one (deterministic mode, :mod:`kernels.tuning`).
    ``v_is_k=False`` with the absorbed head class (a separate ``v`` tile): :data:`_FWD_NO_ALIAS`.
    """
    fam, cls = arch_family(arch), head_class(dk, dv)
    if cls == "d576" and not v_is_k and (fam, dtype == "fp32") in _FWD_NO_ALIAS:
        return list(_FWD_NO_ALIAS[(fam, dtype == "fp32")])
    table = _FWD_TABLE_FP32 if dtype == "fp32" else _FWD_TABLE
    return list(table[fam][cls])


def interp_config(dk: int, dv: int) -> FwdConfig:
    """The single interpreter configuration (value dim split in two above 256 to exercise that path)."""
    return FwdConfig(
        _INTERP_CONFIG.block_m, _INTERP_CONFIG.block_n, nsplit=2 if dv > 256 else 1, num_warps=4, num_stages=1
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

if HAS_TRITON:
    _LN2 = tl.constexpr(LN2)
    _LOG2E = tl.constexpr(LOG2E)
    _LANES = tl.constexpr(64)  # kv_indices lanes read per step when counting unmasked sub-tiles

    @triton.jit
    def _packed_rows(m_start, T, G: tl.constexpr, BLOCK_M: tl.constexpr):
        """Rows ``m_start + [0, BLOCK_M)`` of the packed [T*G] axis -> (token, head in group, valid)."""
        rows = m_start + tl.arange(0, BLOCK_M)
        return rows // G, rows % G, rows < T * G

    @triton.jit
    def _packed_rows_until(m_start, row_end, G: tl.constexpr, BLOCK_M: tl.constexpr):
        """Like :func:`_packed_rows`, but rows at or past ``row_end`` (end of the tile's mask query
        block, or ``T*G``) are invalid."""
        rows = m_start + tl.arange(0, BLOCK_M)
        return rows // G, rows % G, rows < row_end

    @triton.jit
    def _sparse_row_tile(pid_m, T, G: tl.constexpr, MASK_BM, NSUB_M, BLOCK_M: tl.constexpr):
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
    def _sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N: tl.constexpr):
        """Key sub-tile ``j`` of a ``kv_indices`` row: ``j // NSUB_N``-th listed block, its
        ``j % NSUB_N``-th ``BLOCK_N`` keys. Returns ``(first key, end of the block's valid keys)``."""
        blk_start = tl.load(idx_base + (j // NSUB_N).to(tl.int64) * sil) * MASK_BN
        return blk_start + (j % NSUB_N) * BLOCK_N, tl.minimum(blk_start + MASK_BN, S)

    @triton.jit
    def _sparse_full_tiles(idx_base, sil, n_blk, limit, NSUB_N, MASK_BN, BLOCK_N: tl.constexpr,
                           LANES: tl.constexpr):
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
    def _varlen_seq(CU_Q, CU_K, b):
        """FlashAttention varlen: sequence ``b`` owns rows ``[cu_q[b], cu_q[b+1])`` of the packed query
        axis and ``[cu_k[b], cu_k[b+1])`` of the key axis. Returns ``(q0, k0, T_b, S_b)`` (offsets int64)."""
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        return q0.to(tl.int64), k0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, tl.load(CU_K + b + 1) - k0

    @triton.jit
    def _varlen_clip(n_full, n_end, live):
        """Loop bounds of a program past its sequence's end (``live`` False): nothing to visit."""
        n_end = tl.where(live, n_end, 0)
        return tl.minimum(n_full, n_end), n_end

    @triton.jit
    def _partial_keep(BITS, pid, r_loc, c_loc, MASK_BM, MASK_BN):
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
    def _sparse_kv_keep(PART, BITS, part_off, sil, j, NSUB_N, tok, qb, MASK_BM, MASK_BN, BLOCK_N: tl.constexpr):
        """``[BLOCK_M, BLOCK_N]`` keep-bits of key sub-tile ``j`` of a ``kv_indices`` row (forward, dQ):
        ``PART + part_off`` is the row's partial-block ids (aligned with its ``kv_indices`` lanes)."""
        pid = tl.load(PART + part_off + (j // NSUB_N).to(tl.int64) * sil)
        c_loc = (j % NSUB_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        return _partial_keep(BITS, pid, (tok - qb * MASK_BM)[:, None], c_loc[None, :], MASK_BM, MASK_BN)

    @triton.jit
    def _load_tile(base, row_off, row_ok, col0, col_stride, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROW_MASK: tl.constexpr, COL_MASK: tl.constexpr):
        """[R, BLOCK_D] tile: rows at int64 offsets ``row_off``, columns ``col0 + [0, BLOCK_D)``.

        Masks only where the caller cannot rule out overhang (statically known full tiles keep
        vectorized, unpredicated loads); masked elements read 0.
        """
        cols = col0 + tl.arange(0, BLOCK_D)
        ptrs = base + row_off[:, None] + cols.to(tl.int64)[None, :] * col_stride
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
    def _store_tile(base, row_off, row_ok, col0, col_stride, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    COL_MASK: tl.constexpr, x):
        cols = col0 + tl.arange(0, BLOCK_D)
        ptrs = base + row_off[:, None] + cols.to(tl.int64)[None, :] * col_stride
        if COL_MASK:
            tl.store(ptrs, x, mask=row_ok[:, None] & (cols[None, :] < D))
        else:
            tl.store(ptrs, x, mask=row_ok[:, None])

    @triton.jit
    def _other_col(c, split, BK: tl.constexpr, BC: tl.constexpr):
        """First column of score piece ``c`` outside the own chunk ``split`` (chunks skip ``split``)."""
        PER: tl.constexpr = BK // BC
        j = c // PER
        j = j + (j >= split).to(tl.int32)
        return j * BK + (c % PER) * BC

    @triton.jit
    def _fwd_block_range(m_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
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
    def _fwd_block_start(i, BLOCK_N: tl.constexpr):
        """First key of the i-th visited block (dense: block i; block-sparse would read kv_indices)."""
        return i * BLOCK_N

    @triton.jit
    def _window_bounds(tok, T, S, WIN_L, WIN_R):
        """Per query token, the first and last key of its sliding window
        ``i + S - T - WIN_L <= j <= i + S - T + WIN_R`` (a bound of -1 is unbounded: -1 / S)."""
        pos = tok + (S - T)
        lo = tl.where(WIN_L < 0, -1, pos - WIN_L)
        hi = tl.where(WIN_R < 0, S, pos + WIN_R)
        return lo, hi

    @triton.jit
    def _window_key_range(t_lo, t_hi, T, S, WIN_L, WIN_R):
        """Keys ``[lo, hi)`` that query tokens ``t_lo..t_hi`` may see under the window (empty: hi <= lo)."""
        lo = tl.where(WIN_L < 0, 0, tl.maximum(t_lo + S - T - WIN_L, 0))
        hi = tl.where(WIN_R < 0, S, tl.minimum(tl.maximum(t_hi + S - T + WIN_R + 1, 0), S))
        return lo, hi

    @triton.jit
    def _window_block_range(m_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            WIN_L, WIN_R):
        """Key blocks ``[n_start, n_end)`` a windowed packed row tile visits: every block holding a key one
        of its rows sees; blocks wholly outside the window are never loaded."""
        t_lo = m_start // G
        t_hi = tl.minimum((m_start + BLOCK_M - 1) // G, T - 1)
        lo, hi = _window_key_range(t_lo, t_hi, T, S, WIN_L, WIN_R)
        n_start = lo // BLOCK_N
        n_end = tl.maximum(tl.cdiv(hi, BLOCK_N), n_start)
        return n_start, n_end

    @triton.jit
    def _dense_key_range(m_start, T, S, G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         CAUSAL: tl.constexpr, NSPLIT: tl.constexpr, WIN_L, WIN_R, HAS_WINDOW: tl.constexpr):
        """``(n_full, n_lo, n_end)`` of a dense row tile: blocks ``[0, n_full)`` run unmasked, ``[n_lo, n_end)``
        masked. Split (large) bodies use one masked loop (half the code size and compile time); a window
        visits only its band, all masked (a band of a few blocks is mostly diagonal: an unmasked middle
        loop would buy little for its code size)."""
        if HAS_WINDOW:
            n_lo, n_end = _window_block_range(m_start, T, S, G, BLOCK_M, BLOCK_N, WIN_L, WIN_R)
            n_full = n_lo * 0
        else:
            n_full, n_end = _fwd_block_range(m_start, T, S, G, BLOCK_M, BLOCK_N, CAUSAL)
            if NSPLIT == 1:
                n_lo = n_full
            else:
                n_lo = n_full * 0
        return n_full, n_lo, n_end

    @triton.jit
    def _sink_finish(acc, m_i, l_i, sink):
        """Fold a sink logit (log2 units, per row) into the finished online softmax: returns the scale of
        ``acc`` (1/l) and the row's lse in log2 units; the sink carries no value, so a row with no key
        gets output 0 and ``lse = sink``."""
        m_f = tl.maximum(m_i, sink)
        alpha = tl.exp2(m_i - m_f)
        l_f = l_i * alpha + tl.exp2(sink - m_f)
        return alpha / l_f, m_f + tl.log2(l_f)

    @triton.jit
    def _fwd_block(
        acc, m_i, l_i, q_own, q_tail, start_n, kend,
        q_base, q_row, row_ok, tok, k_base, v_base,
        sqd, sks, skd, svs, svd, T, S, qk_scale, split, hide,
        HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
        BV: tl.constexpr, BC: tl.constexpr, N_OTHER: tl.constexpr, NSPLIT: tl.constexpr,
        Q_RESIDENT: tl.constexpr, STREAM: tl.constexpr, MASKED: tl.constexpr, DOT: tl.constexpr,
        WIN_L, WIN_R, HAS_WINDOW: tl.constexpr,
        keep=None, HAS_KEEP: tl.constexpr = False,
    ):
        """Online-softmax update of one row tile with the key block starting at ``start_n``; keys at or
        past ``kend`` (``S``, or the end of a block-sparse mask block) are masked out when ``MASKED``
        (and keys outside the sliding window ``WIN_L``/``WIN_R`` with ``HAS_WINDOW``).

        ``hide`` is 0, but the compiler cannot prove it. The q re-loads (own chunk without
        ``Q_RESIDENT``, the other splits' pieces with ``STREAM``) are loop-invariant; added to their
        base it stops Triton's LICM from hoisting them, so they stream through the pipeline (shared
        memory, L2 traffic) instead of staying live in registers for the whole loop.
        """
        hide_other = 0
        if STREAM:
            hide_other = hide
        keys = start_n + tl.arange(0, BLOCK_N)
        key_ok = keys < kend
        k_row = keys.to(tl.int64) * sks
        # Own score chunk; when v aliases k it is also the value tile (loaded once).
        # Static facts about overhang: which tiles need column masks.
        MASK_K: tl.constexpr = HEAD_DK < NSPLIT * BK
        MASK_T: tl.constexpr = HEAD_DK < NSPLIT * BK + BT
        MASK_V: tl.constexpr = HEAD_DV < NSPLIT * BV
        k_own = _load_tile(k_base, k_row, key_ok, split * BK, skd, HEAD_DK, BK, MASKED, MASK_K)
        if not Q_RESIDENT:
            q_own = _load_tile(q_base + hide, q_row, row_ok, split * BK, sqd, HEAD_DK, BK, True, MASK_K)
        qk = tl.dot(q_own, tl.trans(k_own), input_precision=DOT)
        for c in tl.static_range(N_OTHER):
            col = _other_col(c, split, BK, BC)
            q_c = _load_tile(q_base + hide_other, q_row, row_ok, col, sqd, HEAD_DK, BC, True, MASK_K)
            k_c = _load_tile(k_base, k_row, key_ok, col, skd, HEAD_DK, BC, MASKED, MASK_K)
            qk = tl.dot(q_c, tl.trans(k_c), qk, input_precision=DOT)
        if BT > 0:
            k_tail = _load_tile(k_base, k_row, key_ok, NSPLIT * BK, skd, HEAD_DK, BT, MASKED, MASK_T)
            qk = tl.dot(q_tail, tl.trans(k_tail), qk, input_precision=DOT)
        qk = qk * qk_scale
        if MASKED:
            visible = key_ok[None, :]
            if CAUSAL:
                visible = visible & (keys[None, :] <= tok[:, None] + (S - T))
            if HAS_WINDOW:
                w_lo, w_hi = _window_bounds(tok, T, S, WIN_L, WIN_R)  # per row: two compares per score
                visible = visible & (keys[None, :] >= w_lo[:, None]) & (keys[None, :] <= w_hi[:, None])
            if HAS_KEEP:  # partial block of a FlexAttention mask: per-token bits
                visible = visible & keep
            qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        if MASKED:
            # A row that has seen nothing yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        p = tl.exp2(qk - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_IS_K:
            v_t = k_own
        else:
            v_t = _load_tile(v_base, keys.to(tl.int64) * svs, key_ok, split * BV, svd, HEAD_DV, BV, MASKED, MASK_V)
        acc = tl.dot(p.to(v_t.dtype), v_t, acc * alpha[:, None], input_precision=DOT)
        return acc, m_new, l_i

    @triton.jit
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, MAXL,
        sqb, sqt, sqh, sqd, skb, sks, skh, skd, svb, svs, svh, svd, sob, sot, soh, sod,
        T, S, Hkv, qk_scale, n_mblocks, opaque_zero,
        KVN, KVI, snb, snh, snq, sib, sih, siq, sil, MASK_BM, MASK_BN, KV_REP,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr,
        G_P: tl.constexpr, CAUSAL: tl.constexpr, V_IS_K: tl.constexpr, WRITE_MAXL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BC: tl.constexpr,
        Q_RESIDENT: tl.constexpr, STREAM: tl.constexpr, SPARSE: tl.constexpr, DOT: tl.constexpr,
        PART=None, BITS=None, HAS_PARTIAL: tl.constexpr = False,
        CU_Q=None, CU_K=None, TOTAL_Q=0, IS_VARLEN: tl.constexpr = False,
        SINKS=None, WIN_L=-1, WIN_R=-1, HAS_WINDOW: tl.constexpr = False, HAS_SINKS: tl.constexpr = False,
    ):
        """Grid ``(n_m * B*Hkv*KV_REP, NSPLIT)``; ``qk_scale = softmax_scale * log2(e)``;
        ``opaque_zero`` is 0 (see :func:`_fwd_block`).

        ``HAS_WINDOW`` (dense only): sliding window ``WIN_L``/``WIN_R`` (-1 unbounded; the launcher folds
        ``causal`` into ``WIN_R``); only the key blocks of :func:`_window_block_range` are visited, all
        masked. ``HAS_SINKS``: fp32 ``SINKS [Hq]`` logits join each row's softmax (no value); ``lse``
        includes them.

        Dense (``SPARSE=False``): ``n_m = cdiv(T*G, BLOCK_M)``; the block-mask arguments are unused
        and ``KV_REP`` is 1. Block-sparse (``SPARSE=True``): ``n_m = cdiv(T, MASK_BM) * NSUB_M`` row
        tiles, each inside one mask query block (:func:`_sparse_row_tile`), visiting the ``NSUB_N``
        key sub-tiles of every block listed in ``KVI[b, h, qb, :KVN[b, h, qb]]`` (mask strides
        ``sn*``/``si*``, 0 on broadcast dims; ``h`` is the head group). ``G`` heads are packed per
        row; ``KV_REP`` head groups share one kv head (``KV_REP = Hq/Hkv, G = 1`` when the mask has
        per-head lists and the group's heads cannot share a tile). ``HAS_PARTIAL`` (block-sparse only):
        ``PART`` (int32, laid out like ``KVI``) gives each listed block's partial-block id, ``-1`` for a
        full block, and ``BITS`` the partial blocks' int8 ``[P, MASK_BM, MASK_BN]`` token bits
        (:func:`_partial_keep`); every sub-tile then runs masked. ``IS_VARLEN`` (dense only):
        FlashAttention's packed layout, ``B`` sequences given by ``CU_Q``/``CU_K`` (int32 ``[B+1]``),
        ``T``/``S`` passed as the max sequence lengths (they size the grid) and re-read per sequence
        (:func:`_varlen_seq`); batch strides unused; ``LSE`` is ``[Hq, TOTAL_Q]``; programs past their
        sequence's end visit nothing and store nothing.
        """
        # Axis 0 is (batch*head group, row block) flattened, row blocks fastest (programs that share
        # K/V run together); axes 1 and 2 of a CUDA grid stop at 65535.
        if SPARSE:
            # Sub-tiles per mask block (mask blocks need not be multiples of the kernel tiles).
            NSUB_M = tl.cdiv(MASK_BM * G, BLOCK_M)
            NSUB_N = tl.cdiv(MASK_BN, BLOCK_N)
            n_m = tl.cdiv(T, MASK_BM) * NSUB_M
        else:
            n_m = tl.cdiv(T * G, BLOCK_M)
        pid_m = tl.program_id(0) % n_m
        pid_bh = tl.program_id(0) // n_m
        if NSPLIT > 1:
            split = tl.program_id(1)
        else:
            split = 0  # static: column offsets fold away
        n_hg = Hkv * KV_REP
        b = (pid_bh // n_hg).to(tl.int64)
        hg = (pid_bh % n_hg).to(tl.int64)
        # Batch offsets; statistics at st_bh + head * st_h + token.
        if IS_VARLEN:
            q0, k0, T, S = _varlen_seq(CU_Q, CU_K, b)
            q_b, k_b, v_b, o_b = q0 * sqt, k0 * sks, k0 * svs, q0 * sot
            st_bh, st_h = q0, TOTAL_Q
        else:
            q_b, k_b, v_b, o_b = b * sqb, b * skb, b * svb, b * sob
            st_bh, st_h = b * n_hg * G * T, T
        if SPARSE:
            qb, m_start, row_end = _sparse_row_tile(pid_m, T, G, MASK_BM, NSUB_M, BLOCK_M)
        else:
            m_start = pid_m * BLOCK_M
            row_end = T * G
        tok, grp, row_ok = _packed_rows_until(m_start, row_end, G, BLOCK_M)
        q_base = Q + q_b + hg * G * sqh
        q_row = tok.to(tl.int64) * sqt + grp.to(tl.int64) * sqh
        k_base = K + k_b + (hg // KV_REP) * skh
        v_base = V + v_b + (hg // KV_REP) * svh
        N_OTHER: tl.constexpr = (NSPLIT - 1) * (BK // BC)

        q_own = tl.zeros([BLOCK_M, BK], dtype=Q.dtype.element_ty)
        if Q_RESIDENT:
            q_own = _load_tile(q_base, q_row, row_ok, split * BK, sqd, HEAD_DK, BK, True, HEAD_DK < NSPLIT * BK)
        q_tail = tl.zeros([BLOCK_M, BT if BT > 0 else 16], dtype=Q.dtype.element_ty)
        if BT > 0:
            q_tail = _load_tile(q_base, q_row, row_ok, NSPLIT * BK, sqd, HEAD_DK, BT, True,
                                HEAD_DK < NSPLIT * BK + BT)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)

        if SPARSE:
            # FlexAttention-style walk: sub-tiles of the listed key blocks, ascending; the prefix
            # that every row of the tile sees in full skips the masks.
            n_blk = tl.load(KVN + b * snb + hg * snh + qb.to(tl.int64) * snq)
            idx_base = KVI + b * sib + hg * sih + qb.to(tl.int64) * siq
            n_tiles = n_blk * NSUB_N
            if NSPLIT == 1:
                if CAUSAL:
                    limit = tl.minimum(tl.maximum(m_start // G + S - T + 1, 0), S)
                else:
                    limit = S
                if HAS_PARTIAL:  # partial blocks need their bits: no unmasked prefix
                    limit = 0
                n_lo = _sparse_full_tiles(idx_base, sil, n_blk, limit, NSUB_N, MASK_BN, BLOCK_N, _LANES)
                for j in range(0, n_lo):
                    start_n, kend = _sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N)
                    acc, m_i, l_i = _fwd_block(
                        acc, m_i, l_i, q_own, q_tail, start_n, kend,
                        q_base, q_row, row_ok, tok, k_base, v_base, sqd, sks, skd, svs, svd, T, S, qk_scale,
                        split, j * opaque_zero,
                        HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BLOCK_N, BK, BT, BV, BC, N_OTHER, NSPLIT,
                        Q_RESIDENT, STREAM, False, DOT, WIN_L, WIN_R, False,
                    )
            else:
                n_lo = 0
            for j in range(n_lo, n_tiles):
                start_n, kend = _sparse_kv_tile(idx_base, sil, j, NSUB_N, MASK_BN, S, BLOCK_N)
                keep = None
                if HAS_PARTIAL:
                    keep = _sparse_kv_keep(PART, BITS, b * sib + hg * sih + qb.to(tl.int64) * siq, sil, j, NSUB_N,
                                           tok, qb, MASK_BM, MASK_BN, BLOCK_N)
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q_own, q_tail, start_n, kend,
                    q_base, q_row, row_ok, tok, k_base, v_base, sqd, sks, skd, svs, svd, T, S, qk_scale,
                    split, j * opaque_zero,
                    HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BLOCK_N, BK, BT, BV, BC, N_OTHER, NSPLIT,
                    Q_RESIDENT, STREAM, True, DOT, WIN_L, WIN_R, False, keep, HAS_PARTIAL,
                )
        else:
            n_full, n_lo, n_end = _dense_key_range(m_start, T, S, G, BLOCK_M, BLOCK_N, CAUSAL, NSPLIT,
                                                   WIN_L, WIN_R, HAS_WINDOW)
            if IS_VARLEN:  # past its sequence's end a program visits nothing
                n_full, n_end = _varlen_clip(n_full, n_end, m_start < T * G)
            if NSPLIT == 1 and not HAS_WINDOW:  # blocks every row sees in full skip the masks
                for i in range(0, n_full):
                    acc, m_i, l_i = _fwd_block(
                        acc, m_i, l_i, q_own, q_tail, _fwd_block_start(i, BLOCK_N), S,
                        q_base, q_row, row_ok, tok, k_base, v_base, sqd, sks, skd, svs, svd, T, S, qk_scale,
                        split, i * opaque_zero,
                        HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BLOCK_N, BK, BT, BV, BC, N_OTHER, NSPLIT,
                        Q_RESIDENT, STREAM, False, DOT, WIN_L, WIN_R, False,
                    )
            for i in range(n_lo, n_end):
                acc, m_i, l_i = _fwd_block(
                    acc, m_i, l_i, q_own, q_tail, _fwd_block_start(i, BLOCK_N), S,
                    q_base, q_row, row_ok, tok, k_base, v_base, sqd, sks, skd, svs, svd, T, S, qk_scale,
                    split, i * opaque_zero,
                    HEAD_DK, HEAD_DV, CAUSAL, V_IS_K, BLOCK_M, BLOCK_N, BK, BT, BV, BC, N_OTHER, NSPLIT,
                    Q_RESIDENT, STREAM, True, DOT, WIN_L, WIN_R, HAS_WINDOW,
                )

        Hq = n_hg * G
        head = hg * G + grp.to(tl.int64)
        if HAS_SINKS:
            sink = tl.load(SINKS + head, mask=row_ok, other=0.0) * _LOG2E  # to log2 units
            o_scale, lse2 = _sink_finish(acc, m_i, l_i, sink)
            out = acc * o_scale[:, None]
        else:
            # Empty rows (l == 0) have acc == 0: divide by 1 to write exact zeros.
            l_div = tl.where(l_i == 0.0, 1.0, l_i)
            out = acc / l_div[:, None]
            lse2 = tl.where(l_i == 0.0, float("inf"), m_i + tl.log2(l_div))
        o_base = O + o_b + hg * G * soh
        o_row = tok.to(tl.int64) * sot + grp.to(tl.int64) * soh
        _store_tile(o_base, o_row, row_ok, split * BV, sod, HEAD_DV, BV, HEAD_DV < NSPLIT * BV,
                    out.to(O.dtype.element_ty))

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


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------



#: Block-mask integer arguments of a dense launch: strides snb..sil, MASK_BM, MASK_BN (unused), and
#: ``KV_REP = 1`` (Triton specializes it to a constant, so the head-group math folds away).
DENSE_MASK_ARGS = (0,) * 9 + (1,)


def fold_window(causal: bool, window_size) -> tuple[bool, int, int, bool]:
    """``(causal, win_l, win_r, has_window)`` for the kernels: ``causal`` folded into the window's right
    bound (FlashAttention: causal is ``right = 0``); a window that is plain causal or unbounded becomes
    the ``CAUSAL`` switch or nothing, so those launches compile to the kernels without a window."""
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return False, -1, -1, False
    if left < 0 and right == 0:
        return True, -1, -1, False
    return False, left, right, True


def window_sink_consts(causal: bool, window_size, sinks, dummy) -> tuple[bool, dict]:
    """``(causal, kwargs)``: the window / sink arguments appended to a dense kernel launch (``dummy``: any
    tensor, passed as the unused ``SINKS`` pointer)."""
    causal, wl, wr, has_window = fold_window(causal, window_size)
    return causal, dict(SINKS=dummy if sinks is None else sinks, WIN_L=wl, WIN_R=wr,
                        HAS_WINDOW=has_window, HAS_SINKS=sinks is not None)


def _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot: str, vl=None,
                     window_size=None, sinks=None):
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    if vl is not None:  # varlen: the grid's T and S are the max sequence lengths
        T, S = vl["T"], vl["S"]
    args = (
        q, k, v, out, lse, maxl if maxl is not None else lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        T, S, Hkv, float(softmax_scale) * LOG2E, n_mblocks, 0,
        lse, lse, *DENSE_MASK_ARGS,
    )
    causal, extra = window_sink_consts(bool(causal), window_size, sinks, lse)
    consts = dict(
        G=Hq // Hkv, G_P=next_pow2(Hq // Hkv), HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=causal, V_IS_K=bool(v_is_k),
        WRITE_MAXL=maxl is not None, SPARSE=False, DOT=dot, **extra, **(vl["kw"] if vl is not None else {}),
    )
    return args, consts


def _plan_constexprs(cfg: FwdConfig, dk: int, dv: int, v_is_k: bool) -> dict:
    plan = head_plan(dk, dv, v_is_k, cfg.nsplit, cfg.bc)
    return dict(
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NSPLIT=plan.nsplit, BK=plan.bk, BT=plan.bt,
        BV=plan.bv, BC=plan.bc, Q_RESIDENT=cfg.q_resident, STREAM=cfg.stream,
    )


_AUTOTUNERS: dict = {}


def _autotuned(arch: int, dk: int, dv: int, v_is_k: bool, dtype: str):
    """``triton.autotune`` over :func:`fwd_configs` for these head dims and dtype family (one tuner
    each), keyed on the group size, causality and max-logit switch (and the dtype, Triton adds it)."""
    key = (arch, dk, dv, v_is_k, dtype == "fp32")
    if key not in _AUTOTUNERS:
        configs = [
            triton.Config(_plan_constexprs(c, dk, dv, v_is_k), num_warps=c.num_warps, num_stages=c.num_stages)
            for c in fwd_configs(arch, dk, dv, dtype, v_is_k)
        ]
        _AUTOTUNERS[key] = triton.autotune(
            configs=configs, key=["G", "CAUSAL", "WRITE_MAXL", "IS_VARLEN", "HAS_WINDOW", "HAS_SINKS"]
        )(_attn_fwd_kernel)
    return _AUTOTUNERS[key]


def attention_fwd(q, k, v, softmax_scale: float, causal: bool, *, return_max_logit: bool = False,
                  out=None, lse=None, config: FwdConfig | None = None, allow_tf32: bool | None = None,
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
        config: force one :class:`FwdConfig` (tests/benchmarks); default: a pinned or deterministic
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
        RuntimeError: Triton is not installed. ValueError: a pinned config is not a candidate.
    """
    if not HAS_TRITON:
        raise RuntimeError("attention_fwd needs triton")
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


def varlen_plan(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> dict:
    """Launch plan of a varlen call: ``B`` sequences, grid sizes ``T``/``S`` (max lengths) and the
    kernels' ``IS_VARLEN`` keyword arguments (``cu_seqlens`` int32 ``[B+1]``, ``TOTAL_Q``)."""
    return dict(B=cu_seqlens_q.numel() - 1, T=int(max_seqlen_q), S=int(max_seqlen_k),
                kw=dict(CU_Q=cu_seqlens_q, CU_K=cu_seqlens_k, TOTAL_Q=q.shape[0], IS_VARLEN=True))


def attention_fwd_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                         softmax_scale: float, causal: bool, *, return_max_logit: bool = False, out=None, lse=None,
                         config: FwdConfig | None = None, allow_tf32: bool | None = None):
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
    import torch

    if not HAS_TRITON:
        raise RuntimeError("attention_fwd_varlen needs triton")
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
            cands = fwd_configs(device_arch(q.device), Dk, Dv, dtype_name(q.dtype))
            config = tuning.choose("attention_fwd", head_class(Dk, Dv), cands)
        res = _launch(*args, config, dot, vl) if config is not None else _launch_autotuned(*args, dot, vl)
    return out, lse, res[2]


def _launch(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, cfg: FwdConfig, dot: str,
            vl=None, window_size=None, sinks=None):
    import torch

    B, T, Hq, Dk = q.shape
    if vl is not None:
        B, T = vl["B"], vl["T"]
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    n_mblocks = triton.cdiv(T * G, cfg.block_m)
    # NaN: every entry must be written (amax propagates NaN, so a missed one fails the tests).
    maxl = (
        torch.full((B, Hq, n_mblocks), float("nan"), dtype=torch.float32, device=q.device)
        if return_max_logit else None
    )
    args, consts = _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot, vl,
                                    window_size, sinks)
    consts.update(_plan_constexprs(cfg, Dk, Dv, v_is_k))
    grid = (n_mblocks * B * Hkv, consts["NSPLIT"])
    launch(_attn_fwd_kernel, grid, *args, **consts, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)


def _launch_autotuned(q, k, v, out, lse, softmax_scale, causal, v_is_k, return_max_logit, dot: str, vl=None,
                      window_size=None, sinks=None):
    import torch

    B, T, Hq, Dk = q.shape
    if vl is not None:
        B, T = vl["B"], vl["T"]
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    arch = device_arch(q.device)
    # The tuner picks BLOCK_M: size the per-row-block max buffer for the smallest candidate; the
    # blocks a larger BLOCK_M does not write stay -inf.
    dtype = dtype_name(q.dtype)
    n_mblocks = triton.cdiv(T * G, min(c.block_m for c in fwd_configs(arch, Dk, Dv, dtype, v_is_k)))
    maxl = (
        torch.full((B, Hq, n_mblocks), float("-inf"), dtype=torch.float32, device=q.device)
        if return_max_logit else None
    )
    args, consts = _fwd_launch_args(q, k, v, out, lse, maxl, softmax_scale, causal, v_is_k, n_mblocks, dot, vl,
                                    window_size, sinks)
    grid = lambda meta: (triton.cdiv(T * G, meta["BLOCK_M"]) * B * Hkv, meta["NSPLIT"])  # noqa: E731
    launch(_autotuned(arch, Dk, Dv, v_is_k, dtype), grid, *args, **consts)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)


# --------------------------------------------------------------------------------------------
# Compile specs
# --------------------------------------------------------------------------------------------


#: Representative shapes for the compile check: (Dk, Dv, G = Hq/Hkv, v aliases k). The absorbed
#: MLA shape (576/512, one latent kv head) comes with the group sizes deployments run: 128 heads
#: (one GPU), 16 (DeepSeek-V3 at 8-way tensor parallelism), 1 (one head per shard), and with a
#: separate ``v`` (no alias: the dK/dV kernel then accumulates dV from its own tile).
SPEC_SHAPES = ((32, 32, 1, False), (64, 64, 1, False), (128, 128, 4, False), (192, 128, 1, False),
               (576, 512, 128, True), (576, 512, 16, True), (576, 512, 1, True), (576, 512, 128, False))
SPEC_DTYPES = ("fp16", "bf16", "fp32")
#: fp32 shapes also compiled with TF32 allowed (the report's ``tf32`` column must then say yes).
SPEC_TF32_SHAPES = ((64, 64, 1, False),)
_SPEC_MAXL = True
#: Shapes also compiled with a sliding window and attention sinks (issue 14): d128 GQA and absorbed MLA.
SPEC_WINDOW_SHAPES = ((128, 128, 4, False), (576, 512, 128, True))
SPEC_WINDOW_DTYPES = ("fp16", "bf16")


def window_spec_values(window: bool = False, sinks: bool = False) -> dict:
    """Window / sink arguments of a representative launch (:func:`kernels._compile.spec_args`): a
    DeepSeek-V4-like window (127, 0) when ``window``; every dense kernel takes the names it has."""
    from kernels._compile import Pointer

    return dict(SINKS=Pointer("fp32"), WIN_L=127 if window else -1, WIN_R=0 if window else -1,
                HAS_WINDOW=window, HAS_SINKS=sinks)


def window_tile_suffix(window: bool, sinks: bool) -> str:
    """Report label suffix of a window / sink variant: ``/win``, ``/sink``."""
    return ("/win" if window else "") + ("/sink" if sinks else "")


def fwd_spec(arch: int, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, cfg: FwdConfig,
             causal: bool = True, allow_tf32: bool = False, varlen: bool = False, window: bool = False,
             sinks: bool = False) -> CompileSpec:
    """CompileSpec of the forward kernel for contiguous inputs of the given shape and config
    (fp32: IEEE products unless ``allow_tf32``; ``varlen``: the ``IS_VARLEN`` packed-sequence variant;
    ``window`` / ``sinks``: the sliding-window / attention-sink variants, causal folded into the window)."""
    from kernels._compile import Pointer, spec_args

    hq, hkv, T, S = group * 2, 2, 1024, 1024
    ptr = Pointer(dtype)
    values = dict(
        Q=ptr, K=ptr, V=ptr, O=ptr, LSE=Pointer("fp32"), MAXL=Pointer("fp32"),
        sqb=T * hq * dk, sqt=hq * dk, sqh=dk, sqd=1,
        skb=S * hkv * dk, sks=hkv * dk, skh=dk, skd=1,
        svb=S * hkv * (dk if v_is_k else dv), svs=hkv * (dk if v_is_k else dv), svh=dk if v_is_k else dv, svd=1,
        sob=T * hq * dv, sot=hq * dv, soh=dv, sod=1,
        T=T + 1, S=S + 1, Hkv=hkv + 1, qk_scale=0.1, n_mblocks=7, opaque_zero=0,
        KVN=Pointer("fp32"), KVI=Pointer("fp32"),
        **dict(zip(("snb", "snh", "snq", "sib", "sih", "siq", "sil", "MASK_BM", "MASK_BN", "KV_REP"),
                   DENSE_MASK_ARGS)),
        G=group, G_P=next_pow2(group), HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, V_IS_K=v_is_k,
        WRITE_MAXL=_SPEC_MAXL, SPARSE=False, DOT=dot_precision(dtype, allow_tf32),
        **_plan_constexprs(cfg, dk, dv, v_is_k),
        **(varlen_spec_values(T) if varlen else {}),
    )
    values.update(window_spec_values(window, sinks))
    if window:
        values["CAUSAL"] = False
    sig, consts, divisible = spec_args(_attn_fwd_kernel, values)
    return CompileSpec(
        kernel="attention_fwd" + ("_varlen" if varlen else ""), fn=_attn_fwd_kernel, signature=sig, constexprs=consts,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch, dtype=dtype, head_dims=(dk, dv),
        tile=cfg.tile + window_tile_suffix(window, sinks),
        extra={"divisible": divisible, "group": group, "v_is_k": v_is_k, "causal": causal and not window,
               "config": cfg, "allow_tf32": allow_tf32, "varlen": varlen, "window": window, "sinks": sinks},
    )


def varlen_spec_values(total_q: int) -> dict:
    """Spec values of the ``IS_VARLEN`` arguments (int32 offsets, packed query length)."""
    from kernels._compile import Pointer

    return dict(CU_Q=Pointer("i32"), CU_K=Pointer("i32"), TOTAL_Q=total_q + 3, IS_VARLEN=True)


def compile_specs(arch: int) -> list[CompileSpec]:
    """Every forward configuration the autotuner may pick on ``arch`` (80, 86, 89, 90...), for each
    dtype of :data:`SPEC_DTYPES` (fp32 with IEEE products) on the shapes of :data:`SPEC_SHAPES` (dense
    and varlen), plus fp32 with TF32 allowed on :data:`SPEC_TF32_SHAPES`, plus the window+sinks and
    sinks-only variants on :data:`SPEC_WINDOW_SHAPES`."""
    if not HAS_TRITON:
        return []
    specs = []
    for dk, dv, group, v_is_k in SPEC_SHAPES:
        for dtype in SPEC_DTYPES:
            for cfg in fwd_configs(arch, dk, dv, dtype, v_is_k):
                specs.append(fwd_spec(arch, dtype, dk, dv, group, v_is_k, cfg))
                specs.append(fwd_spec(arch, dtype, dk, dv, group, v_is_k, cfg, varlen=True))
    for dk, dv, group, v_is_k in SPEC_TF32_SHAPES:
        for cfg in fwd_configs(arch, dk, dv, "fp32", v_is_k):
            specs.append(fwd_spec(arch, "fp32", dk, dv, group, v_is_k, cfg, allow_tf32=True))
    for dk, dv, group, v_is_k in SPEC_WINDOW_SHAPES:
        for dtype in SPEC_WINDOW_DTYPES:
            for cfg in fwd_configs(arch, dk, dv, dtype):
                specs.append(fwd_spec(arch, dtype, dk, dv, group, v_is_k, cfg, window=True, sinks=True))
                specs.append(fwd_spec(arch, dtype, dk, dv, group, v_is_k, cfg, sinks=True))
    return specs
