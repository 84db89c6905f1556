"""Top-k sparse latent attention, forward and backward: every query token attends to its own list of keys.

``topk_indices: int32 [B, T, Hkv, K]`` lists, for each query token and kv head, the key positions its
``G = Hq // Hkv`` heads attend to (DeepSeek Sparse Attention, DeepSeek-V3.2, 2025; the same layout as
FlashMLA's sparse kernels, https://github.com/deepseek-ai/FlashMLA). Lanes holding ``-1`` (anywhere:
leading, trailing, all) are skipped; so are positions ``>= S`` and, with ``causal``, positions the token
may not see (bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + S - T``). A row that sees
no key gives output 0, ``lse = +inf`` and zero gradients, never NaN.

Method (our own Triton code; the ideas are published, no code is copied):

* **Query-major kernels** (forward, dQ, atomic dK/dV): one program per (batch, token, kv head, head
  block, column split). The heads of the kv group are packed into the M rows of the tile (FlashMLA's
  head packing; NSA, Yuan et al. 2025, arXiv 2502.11089, packs GQA heads the same way) because they
  share the token's key list; the key rows are gathered ``BLOCK_N`` lanes at a time and every gathered
  tile feeds all packed heads. Online softmax with fp32 statistics (FlashAttention-2, Dao 2023,
  arXiv 2307.08691). Masked lanes load a *visible* key instead (key 0, which any row that sees
  anything also sees) and get a score of ``-inf``: loads need no row masks, and nothing a row may not
  see is read.
* **Column plan** (:func:`column_plan`): tiles are powers of two, so ``Dk`` is cut into ``NSPLIT``
  (1 or 2) chunks of ``BK`` columns plus a tail of ``NSPLIT`` pieces of ``BT`` columns, ``Dv`` into
  ``NSPLIT`` chunks of ``BV``. Program ``split`` owns chunk ``split`` and tail piece ``split``: output
  columns ``[split * BV, +BV)`` (forward), dQ columns (dQ) or dK / dV columns (dK/dV), and recomputes
  the full scores (the other chunk and tail piece are extra products). For the absorbed shape
  (Dk = 576 = 2 x 256 + 2 x 32, Dv = 512) a ``[64, 512]`` fp32 accumulator next to the score operands
  does not fit the register file (docs/design.md §9), so two programs share a
  (token, head block); splitting the tail keeps both programs' accumulators equal.
* **v a prefix view of k** (absorbed MLA: ``v = k[..., :Dv]``, detected with
  :func:`kernels._common.is_prefix_alias`): the plan takes ``BK == BV`` and the program's own key
  chunk is also its value tile, loaded once. ``dk`` still holds only the score-path gradient and ``dv``
  the value path (autograd adds them through the view).
* **dK/dV, deterministic mode** (the default): a key-major transposed index is built on the device with
  a sort (:func:`build_key_major_index`): for each (batch, kv head, key block of ``BLOCK_N`` keys) the
  sorted list of query tokens that selected at least one of its keys, each with a ``BLOCK_N``-bit mask
  of which keys (CSR offsets per key block). One program owns a key block (its K/V tile stays resident,
  as in FlashAttention-2's dK/dV kernel) and walks the packed (token, head) rows of its list; the bit
  mask selects the (row, key) pairs. A key block selected by many queries (sinks, the recent window:
  the normal case under causal top-k) is cut into work items of at most ``rows_per_item`` rows; those
  write fp32 partials that a second kernel sums in a fixed order. No atomics: bitwise reproducible.
  The index has sizes bounded by the shapes (padding items are skipped), so the backward has no host
  sync and can be captured in a CUDA graph. Cost: the sort, ~12 bytes per bound (key block, token)
  pair, fp32 partials for the split key blocks (bounded: work items grow rather than exceed max(256 MiB,
  4x an fp32 dK/dV)), and wasted products on unselected keys of a selected block.
* **dK/dV, atomic mode**: the query-major program forms ``dK = dSᵀ Q`` and ``dV = Pᵀ dO`` for its
  gathered lanes and adds them with fp32 atomics into an fp32 scratch (then cast). Exact products only,
  no index build, not bitwise reproducible (fp32 addition order).
* ``delta = rowsum(dO * O) - dlse`` (``dlse``: gradient of ``lse``, since ``d lse / dS = P``) comes from
  a small preprocessing kernel.

Configurations (:func:`topk_config`; every one is listed by :func:`compile_specs`; no autotuning: the
choice depends on the kind, arch family, head-dim class, group size G = Hq / Hkv and dtype). Tile
``MxN`` = rows x lanes (query-major) or rows per step x keys (deterministic dK/dV), ``/v2`` two column
splits, ``/s2`` fixed-side tiles re-read every step, ``/p`` dV and dK in two launches. Measured with
``triton.compile`` + the bundled ptxas (``python -m bench.compile_report --kernels topk_sparse``), fp16
(bf16 alike), registers with triton 3.9 / 3.6, spill bytes, shared bytes:

=====================  ===========================================  ==========================================
kind                   sm90 (227 KiB), all with wgmma               sm80 (164 KiB)
=====================  ===========================================  ==========================================
576/512 forward        64x32/v2 4w: 218-237 / 220-232, 0, 147584    G>16: 64x32/v2 8w: 177 / 175, 0, 114816
                                                                    G<=16: 16x32/v2 4w: 128 / 128, 0, 56448
576/512 dQ             64x32/v2 4w: 255 / 255, 0 (3.6: 980), 213120 16x32/v2/s2 4w: 168 / 168, 0, 72832
576/512 dK/dV atomic   64x16/v2/p 4w: dV 166 / 186, dK 255 / 255,   16x16/v2/s2/p 4w: dV 122 / 110,
                       0, 159808 / 229440                           dK 147 / 164, 0, 61504 / 69696
576/512 dK/dV determ.  16x64/v2/p 8w: dV 196 / 164, dK 222 / 204,   16x16/v2/s2/p 4w: dV 128 / 128,
                       0, 127168 / 143616                           dK 162 / 160, 0, 45696 / 53952
192/128 (G = 1)        fwd 64x64 157 / 172, dQ 64x32 191 / 178,     fwd 16x64 80 / 96, dQ 16x32 96 / 96,
                       atomic 64x32 170 / 186, determ. 16x64        atomic 16x32 255 / 128, determ. 16x64
                       250 / 255; 0 spills, <= 131200               255 / 254; 0 spills, <= 51456
64/64 (G = 4, 32)      fwd 64x64, dQ / atomic 64x32, determ.        G<=16 16-row, G>16 64-row tiles, determ.
                       16x64, 4w: 86-128 regs, 0, <= 53376          16x64: 56-180 regs, 0, <= 32896
=====================  ===========================================  ==========================================

The only configuration that is not clean is the sm90 576/512 dQ kernel under triton 3.6: ptxas keeps
the ~70 loop-invariant 64-bit wgmma descriptors of the resident q / dO tiles live and spills them (they
are reloaded from L1 every step; triton 3.9 rematerialises them: 255 registers, 0 spills). Notes:

* sm90: every tile has M >= 64 so that wgmma is used; a token with fewer heads than rows (G < 64) pads
  the rows (these shapes are bound by the gathered key traffic). 4 warps on 64 rows: Triton gives a
  chained product (scores -> P -> next dot) all warps along M, so 8 warps on a 64-row tile compute the
  score tile twice. The deterministic dK launch uses 8 warps anyway (its dK accumulators spill on one
  warpgroup), accepting that duplication.
* sm80: mma.sync takes its operands from registers, so the absorbed backward uses 16-row tiles and
  re-reads its fixed-side tiles every step (L1 hits); 64-row variants spill kilobytes.
* fp32 inputs use IEEE fp32 products on CUDA cores unless TF32 is allowed (a correctness path with
  small tiles; compiled by the compile check for the absorbed shapes, where it spills: README).
  Under the Triton interpreter one small configuration is used.
* The atomic dK/dV variant accumulates with relaxed atomics (``sem="relaxed"``: PTX ``red``/``atom``
  ``.relaxed``); the default acq_rel would order memory for nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kernels._common import (
    LN2,
    LOG2E,
    MIN_TILE,
    bwd_outputs,
    cdiv,
    dot_precision,
    dtype_name,
    fwd_outputs,
    is_prefix_alias,
    launch,
    next_pow2,
    prev_pow2,
)
from kernels._config import HAS_TRITON, INTERPRET, CompileSpec, arch_family
from kernels.attention_bwd import sink_grad

if HAS_TRITON:
    import triton
    import triton.language as tl

    from kernels.attention_fwd import _sink_finish
else:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = [
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

#: The deterministic dK/dV kernel's key-block bit masks are two int32 words: at most 64 keys per block.
MAX_DET_BLOCK_N = 64


# --------------------------------------------------------------------------------------------
# host-side planning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ColumnPlan:
    """How the head dims are cut into power-of-two tiles (module docstring, "Column plan").

    ``Dk`` = ``nsplit`` chunks of ``bk`` columns + a tail of ``nsplit`` pieces of ``bt`` columns (0: no
    tail); ``Dv`` = ``nsplit`` chunks of ``bv`` columns. Split ``s`` owns chunk ``s`` and tail piece
    ``s``. Chunks may overhang the dims (masked loads).
    """

    nsplit: int
    bk: int
    bt: int
    bv: int


def column_plan(dk: int, dv: int, v_is_k: bool, nsplit: int) -> ColumnPlan:
    """Cut ``Dk`` / ``Dv`` for ``nsplit`` (1 or 2) column splits (1 when ``Dv`` fits one 16-column tile);
    ``v_is_k`` forces ``bk == bv`` so that the own key chunk is the value tile.

    Raises ``ValueError`` for non-positive sizes, ``nsplit`` outside {1, 2}, or ``v_is_k`` with ``dv > dk``.
    """
    if dk < 1 or dv < 1 or nsplit not in (1, 2):
        raise ValueError(f"column_plan: need dk, dv >= 1 and nsplit in (1, 2), got dk={dk}, dv={dv}, "
                         f"nsplit={nsplit}")
    if v_is_k and dv > dk:
        raise ValueError(f"column_plan: v aliasing k needs dv <= dk, got dk={dk}, dv={dv}")
    bv = max(MIN_TILE, next_pow2(cdiv(dv, nsplit)))
    nsplit = cdiv(dv, bv)  # never a split without value columns
    if v_is_k:
        bk = bv
    elif nsplit == 1:
        lo = max(MIN_TILE, prev_pow2(dk))
        rest = dk - lo
        # one padded tile beats a tile plus a tail when the padding is no larger (24 -> 32, not 16 + 16)
        bk = next_pow2(dk) if rest > 0 and lo + max(MIN_TILE, next_pow2(rest)) >= next_pow2(dk) else lo
        bk = max(MIN_TILE, bk)
    else:
        bk = max(MIN_TILE, prev_pow2(max(1, dk // nsplit)))
    rest = dk - nsplit * bk  # the tail: one piece of bt columns per split
    bt = max(MIN_TILE, next_pow2(cdiv(rest, nsplit))) if rest > 0 else 0
    return ColumnPlan(nsplit=nsplit, bk=bk, bt=bt, bv=bv)


@dataclass(frozen=True)
class TopkConfig:
    """Tile configuration of one top-k kernel.

    ``block_m``: query-major kernels: packed head rows per program; deterministic dK/dV: packed
    (token, head) rows per step. ``block_n``: query-major: top-k lanes per step; deterministic dK/dV:
    keys per program (<= 64). ``nsplit``: column splits (1 or 2; grid axis). ``stream``: how the fixed
    side of the loop (query-major: the q / dO tiles; deterministic dK/dV: the key block's K / V tiles) is
    held: 0 = loaded once before the loop, 1 = the other split's chunk re-read every step, 2 = every
    tile re-read every step (L1 / L2 hits instead of registers or shared memory for the whole loop).
    ``rows_per_item``: deterministic dK/dV: most packed rows one program walks (longer lists are split
    over several programs and reduced in a fixed order; doubled while the shape-derived bound on the fp32
    partials exceeds the launcher's budget). ``split_dkdv``: dK/dV kinds: dV and dK in two
    launches (each holds one accumulator set; the dV launch needs no dP).
    """

    block_m: int
    block_n: int
    nsplit: int = 1
    num_warps: int = 4
    num_stages: int = 2
    stream: int = 0
    rows_per_item: int = 4096
    split_dkdv: bool = False

    @property
    def tile(self) -> str:
        """Report label ``MxN`` (``/vN`` column splits, ``/sN`` stream level, ``/p`` dV and dK launched apart)."""
        return (f"{self.block_m}x{self.block_n}" + (f"/v{self.nsplit}" if self.nsplit > 1 else "")
                + (f"/s{self.stream}" if self.stream else "") + ("/p" if self.split_dkdv else ""))


KINDS = ("fwd", "dq", "dkdv_atomic", "dkdv_det")

# GPU tables for fp16 / bf16: (arch family, kind, head class, group class) -> config. Head class
# "big" = the absorbed 576/512 class (a head dim > 256), "small" = the rest; group class "g16" =
# at most 16 heads per kv head. Every entry is compiled by compile_specs (sm80 and sm90 with triton 3.9
# and 3.6, sm86 / sm89 with 3.9): see the module docstring for the measurements.
_C = TopkConfig
_GPU_TABLE: dict[tuple[int, str, str, str], TopkConfig] = {}
for _g in ("g16", "g"):
    _GPU_TABLE.update({
        # sm90: every query-major tile has 64 rows (wgmma's M; small groups pad), 4 warps = one
        # warpgroup: a chained product (scores -> P -> next dot) gets all warps along M from Triton,
        # so 8 warps on 64 rows would compute the scores twice.
        (90, "fwd", "big", _g): _C(64, 32, nsplit=2, num_warps=4, num_stages=2),
        (90, "dq", "big", _g): _C(64, 32, nsplit=2, num_warps=4, num_stages=2),
        (90, "dkdv_atomic", "big", _g): _C(64, 16, nsplit=2, num_warps=4, num_stages=2, split_dkdv=True),
        # keys on M (64) with two warpgroups: the score tiles are computed twice, but the dK
        # accumulators are split over 256 threads (with 4 warps they spill)
        (90, "dkdv_det", "big", _g): _C(16, 64, nsplit=2, num_warps=8, num_stages=2, split_dkdv=True),
        (90, "fwd", "small", _g): _C(64, 64, num_warps=4, num_stages=2),
        (90, "dq", "small", _g): _C(64, 32, num_warps=4, num_stages=2),
        (90, "dkdv_atomic", "small", _g): _C(64, 32, num_warps=4, num_stages=2),
        (90, "dkdv_det", "small", _g): _C(16, 64, num_warps=4, num_stages=2),
        # sm80 (mma.sync takes its operands from registers): 16-row tiles and re-read fixed-side
        # tiles in the 576/512 backward (64-row variants spill kilobytes)
        (80, "dq", "big", _g): _C(16, 32, nsplit=2, num_warps=4, num_stages=2, stream=2),
        (80, "dkdv_atomic", "big", _g): _C(16, 16, nsplit=2, num_warps=4, num_stages=2, stream=2, split_dkdv=True),
        (80, "dkdv_det", "big", _g): _C(16, 16, nsplit=2, num_warps=4, num_stages=2, stream=2, split_dkdv=True),
        (80, "dkdv_det", "small", _g): _C(16, 64, num_warps=4, num_stages=2),
    })
_GPU_TABLE.update({
    (80, "fwd", "big", "g"): _C(64, 32, nsplit=2, num_warps=8, num_stages=2),
    (80, "fwd", "big", "g16"): _C(16, 32, nsplit=2, num_warps=4, num_stages=2),
    (80, "fwd", "small", "g"): _C(64, 64, num_warps=4, num_stages=2),
    (80, "fwd", "small", "g16"): _C(16, 64, num_warps=4, num_stages=2),
    (80, "dq", "small", "g"): _C(64, 32, num_warps=4, num_stages=2),
    (80, "dq", "small", "g16"): _C(16, 32, num_warps=4, num_stages=2),
    (80, "dkdv_atomic", "small", "g"): _C(64, 32, num_warps=4, num_stages=2),
    # 8 warps: with relaxed atomics 4 warps hit 255 registers and spill 16 bytes (192/128, one head
    # per kv head; 40 on sm86)
    (80, "dkdv_atomic", "small", "g16"): _C(16, 32, num_warps=8, num_stages=2),
})
# 99 KiB parts (sm86, sm89, sm120): the sm80 entries (at most 72 KiB on sm86) except the 64-row
# absorbed forward (112 KiB): 16 keys per step (92 KiB, 0 spills).
_GPU_TABLE.update({(86,) + key[1:]: cfg for key, cfg in _GPU_TABLE.items() if key[0] == 80})
_GPU_TABLE[(86, "fwd", "big", "g")] = _C(64, 16, nsplit=2, num_warps=8, num_stages=2)
# The absorbed class without the v alias (a separate value buffer), any group, where the alias
# entries do not fit (triton 3.9): sm90 dQ 64x32 needs 272 KiB, the atomic dK 256 KiB; sm86
# forward / dQ need 100-103 KiB. Known and left: the sm90 deterministic dK spills 152 bytes there
# (one stage: 1072, streamed: 278 KiB of shared memory).
_NO_ALIAS: dict[tuple[int, str], TopkConfig] = {
    (90, "dq"): _C(64, 16, nsplit=2, num_warps=4, num_stages=2),
    (90, "dkdv_atomic"): _C(64, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    (86, "fwd"): _C(64, 16, nsplit=2, num_warps=8, num_stages=1),
    (86, "dq"): _C(16, 32, nsplit=2, num_warps=4, num_stages=1, stream=2),
}
# fp32 inputs (IEEE products on CUDA cores): a correctness path with small tiles (compiled by the
# compile check for the absorbed shapes; their spills are listed in the README).
_GPU_TABLE_FP32: dict[tuple[str, str], TopkConfig] = {
    ("fwd", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1),
    ("dq", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1),
    ("dkdv_atomic", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    ("dkdv_det", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    ("fwd", "small"): _C(16, 32, num_warps=4, num_stages=1),
    ("dq", "small"): _C(16, 16, num_warps=4, num_stages=1),
    ("dkdv_atomic", "small"): _C(16, 16, num_warps=4, num_stages=1),
    ("dkdv_det", "small"): _C(16, 32, num_warps=4, num_stages=1),
}


def _head_class(dk: int, dv: int) -> str:
    return "big" if max(dk, dv) > 256 else "small"


def topk_config(kind: str, arch: int, dk: int, dv: int, group: int, dtype="fp16", *, interpret=None,
                v_is_k: bool = True) -> TopkConfig:
    """The configuration the launchers pick for ``kind`` (one of ``KINDS``: "fwd", "dq", "dkdv_atomic",
    "dkdv_det") on compute capability ``arch`` with head dims (``dk``, ``dv``), ``group`` = Hq // Hkv heads
    per kv head, and ``dtype`` (torch dtype or "fp16"/"bf16"/"fp32").

    Under the Triton interpreter (``interpret``, default ``kernels._config.INTERPRET``) one small
    configuration: 16 x 16 tiles, the value dim split in two above 256 columns (to exercise that path),
    work items of 64 rows. On a GPU an entry of the per-arch tables (see the module docstring).
    In the absorbed class without the ``v`` alias (a separate value tile) :data:`_NO_ALIAS` replaces
    the entries that do not fit or spill there.
    Raises ``ValueError`` for an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"topk_config: kind must be one of {KINDS}, got {kind!r}")
    if INTERPRET if interpret is None else interpret:
        return TopkConfig(16, 16, nsplit=2 if dv > 256 else 1, num_warps=4, num_stages=1, rows_per_item=64)
    cls = _head_class(dk, dv)
    if dtype_name(dtype) == "fp32":
        cfg = _GPU_TABLE_FP32[(kind, cls)]
        if (kind, cls) == ("dq", "big") and arch_family(arch) == 86:
            return replace(cfg, stream=2)  # q / dO pieces re-read: 84 KiB (resident: 100 KiB, over 99)
        return cfg
    fam = arch_family(arch)
    if cls == "big" and not v_is_k and (fam, kind) in _NO_ALIAS:
        return _NO_ALIAS[(fam, kind)]
    return _GPU_TABLE[(fam, kind, cls, "g16" if group <= 16 else "g")]


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
if HAS_TRITON:
    _LOG2E_C = tl.constexpr(LOG2E)
    _LN2_C = tl.constexpr(LN2)
    MIN_TILE_C = tl.constexpr(MIN_TILE)

    @triton.jit
    def _tile(base, rows, col0, D: tl.constexpr, W: tl.constexpr, MASK: tl.constexpr):
        """``[R, W]`` tile: rows at element offsets ``rows`` from ``base``, columns ``col0 + [0, W)``
        (unit stride). Only the column overhang past ``D`` is masked (reads 0)."""
        cols = col0 + tl.arange(0, W)
        ptrs = base + rows[:, None] + cols[None, :]
        if MASK:
            x = tl.load(ptrs, mask=(cols < D)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
        return x

    @triton.jit
    def _chunk(base, rows, split, OTHER: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, W: tl.constexpr):
        """Column chunk ``split`` (or, with ``OTHER``, the other split's chunk) of width ``W``; with one
        split the "other" chunk is the own one (callers do not use it)."""
        if OTHER and NSPLIT > 1:
            col0 = (1 - split) * W
        else:
            col0 = split * W
        return _tile(base, rows, col0, D, W, D < NSPLIT * W)

    @triton.jit
    def _tail(base, rows, split, OTHER: tl.constexpr, D: tl.constexpr, NSPLIT: tl.constexpr, BK: tl.constexpr,
              BT: tl.constexpr):
        """Tail piece ``split`` (or the other one) of ``BT`` columns after the ``NSPLIT * BK`` chunk columns
        (``BT == 0``: no tail; a dummy the callers do not use)."""
        if OTHER and NSPLIT > 1:
            col0 = NSPLIT * BK + (1 - split) * BT
        else:
            col0 = NSPLIT * BK + split * BT
        W: tl.constexpr = BT if BT > 0 else MIN_TILE_C
        return _tile(base, rows, col0, D, W, D < NSPLIT * (BK + BT))

    @triton.jit
    def _idx(x, OFF64: tl.constexpr):
        """Row index as int64 (``OFF64``) or int32: the launcher sets ``OFF64`` when an offset inside one
        batch entry of some tensor can pass 2^31; int32 offsets need fewer registers."""
        if OFF64:
            y = x.to(tl.int64)
        else:
            y = x.to(tl.int32)
        return y

    @triton.jit
    def _program_coords(T, Hkv, G: tl.constexpr, BLOCK_M: tl.constexpr, NSPLIT: tl.constexpr):
        """1-D grid of the query-major kernels: pid = (((b * T + t) * Hkv + hkv) * N_HB + hb) * NSPLIT + split.
        Neighbouring programs share a token's key list (L2 reuse of the gathered rows)."""
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

    @triton.jit
    def _lane_keys(idx_row, start, KTOP, key_end, BLOCK_N: tl.constexpr):
        """Lanes ``start + [0, BLOCK_N)`` of a top-k row: (key to load, lane visible). A skipped lane
        (-1, past K, >= S, causally hidden) loads key 0 instead (visible whenever the row sees anything)."""
        lanes = start + tl.arange(0, BLOCK_N)
        pos = tl.load(idx_row + lanes, mask=lanes < KTOP, other=-1)
        ok = (pos >= 0) & (pos < key_end)
        return tl.where(ok, pos, 0), ok

    @triton.jit
    def _gathered_scores(q_own, q_oth, q_tail, q_toth, k_base, k_rows, split,
                         HEAD_DK: tl.constexpr, NSPLIT: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                         DOT: tl.constexpr):
        """Unscaled ``q kᵀ`` over all ``Dk`` columns against the gathered key rows: own chunk, other chunk,
        own and other tail piece. Returns (scores, own key chunk, other key chunk, own key tail)."""
        k_own = _chunk(k_base, k_rows, split, False, HEAD_DK, NSPLIT, BK)
        s = tl.dot(q_own, tl.trans(k_own), input_precision=DOT)
        k_oth = k_own
        if NSPLIT > 1:
            k_oth = _chunk(k_base, k_rows, split, True, HEAD_DK, NSPLIT, BK)
            s = tl.dot(q_oth, tl.trans(k_oth), s, input_precision=DOT)
        k_tail = k_own
        if BT > 0:
            k_tail = _tail(k_base, k_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
            s = tl.dot(q_tail, tl.trans(k_tail), s, input_precision=DOT)
            if NSPLIT > 1:
                k_toth = _tail(k_base, k_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
                s = tl.dot(q_toth, tl.trans(k_toth), s, input_precision=DOT)
        return s, k_own, k_oth, k_tail

    @triton.jit
    def _topk_fwd_kernel(
        Q, K, V, IDX, O, LSE, MAXL,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sib, sit, sih, sob, sot, soh, slb, slh, slt,
        T, S, Hkv, KTOP, qk_scale, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
        V_IS_K: tl.constexpr, WRITE_MAXL: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr,
        SINKS=None, HAS_SINKS: tl.constexpr = False,
    ):
        """Forward of one (batch, token, kv head, head block, value split); 1-D grid (``_program_coords``).
        ``HAS_SINKS``: fp32 ``SINKS [Hq]`` logits join each row's softmax (no value; ``lse`` includes them).

        ``qk_scale = softmax_scale * log2(e)``. The score uses the own key chunk (columns
        ``[split * BK, +BK)``; also the value tile when ``V_IS_K``), the other split's chunk and both tail
        pieces. The q tiles are loaded once (``STREAM == 0``), or re-read every step at
        ``+ step * opaque_zero`` (``opaque_zero`` is 0, which the compiler cannot see: the re-read stays in
        the loop): the other chunk (``STREAM >= 1``) and all of them (``STREAM == 2``). Rows past the group
        re-read its last head (never stored). Writes ``O`` columns ``[split * BV, +BV)``; split 0 writes
        ``LSE`` (+inf for a row without keys) and, with ``WRITE_MAXL``, the row maximum of the scaled
        scores (-inf if none) into the contiguous fp32 ``[B, Hq, T]`` buffer ``MAXL``.
        """
        split, hb, hkv, b, t = _program_coords(T, Hkv, G, BLOCK_M, NSPLIT)
        heads = hb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = heads < G
        hq = _idx(hkv * G, OFF64) + tl.minimum(heads, G - 1)
        q_base = Q + b * sqb + t * sqt
        q_rows = hq * sqh
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh
        idx_row = IDX + b * sib + t * sit + hkv * sih

        q_own0 = _chunk(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK)
        q_oth0 = _chunk(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK)
        q_tail0 = _tail(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
        q_toth0 = _tail(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
        if CAUSAL:
            key_end = t + S - T + 1  # keys j < key_end are visible (bottom-right aligned)
        else:
            key_end = S + t * 0
        n_lanes = tl.where(key_end > 0, KTOP, 0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BV], dtype=tl.float32)
        for start in range(0, n_lanes, BLOCK_N):
            qb = q_base + start * opaque_zero
            if STREAM >= 2:
                q_own = _chunk(qb, q_rows, split, False, HEAD_DK, NSPLIT, BK)
                q_tail = _tail(qb, q_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
            else:
                q_own = q_own0
                q_tail = q_tail0
            if STREAM >= 1:
                q_oth = _chunk(qb, q_rows, split, True, HEAD_DK, NSPLIT, BK)
                q_toth = _tail(qb, q_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
            else:
                q_oth = q_oth0
                q_toth = q_toth0
            kpos, ok = _lane_keys(idx_row, start, KTOP, key_end, BLOCK_N)
            s, k_own, k_oth, k_tail = _gathered_scores(q_own, q_oth, q_tail, q_toth, k_base,
                                                       _idx(kpos, OFF64) * sks, split, HEAD_DK, NSPLIT, BK, BT,
                                                       DOT)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row without keys yet stays at 0
            alpha = tl.exp2(m_i - m_base)
            p = tl.exp2(s - m_base[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if V_IS_K:
                v_t = k_own
            else:
                v_t = _chunk(v_base, _idx(kpos, OFF64) * svs, split, False, HEAD_DV, NSPLIT, BV)
            acc = tl.dot(p.to(v_t.dtype), v_t, acc * alpha[:, None], input_precision=DOT)
            m_i = m_new

        hq_st = _idx(hkv * G, OFF64) + heads
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
        o_ptrs = O + b * sob + t * sot + (hq_st * soh)[:, None] + cols[None, :]
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (cols < HEAD_DV)[None, :])
        st_ok = row_ok
        if NSPLIT > 1:
            st_ok = st_ok & ((heads * 0 + split) == 0)  # every split holds the same statistics
        l_ptrs = LSE + b * slb + hq_st * slh + t * slt
        tl.store(l_ptrs, lse2 * _LN2_C, mask=st_ok)
        if WRITE_MAXL:
            tl.store(MAXL + (b * (Hkv * G) * T + t) + hq_st.to(tl.int64) * T, m_i * _LN2_C, mask=st_ok)

    @triton.jit
    def _topk_bwd_pre_kernel(
        O, DO, DLSE, DELTA,
        sob, sot, soh, sod, sdob, sdot, sdoh, sdod, sdlb, sdlh, sdlt,
        T, Hq,
        HEAD_DV: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """``DELTA[b, h, t] = sum_d O * dO - dLSE`` in fp32 (contiguous ``[B, Hq, T]``);
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
            o = tl.load(O + b * sob + h * soh + (tok64 * sot)[:, None] + (cols * sod)[None, :], mask=msk, other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + (tok64 * sdot)[:, None] + (cols * sdod)[None, :], mask=msk,
                         other=0.0)
            acc += tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if HAS_DLSE:
            acc -= tl.load(DLSE + b * sdlb + h * sdlh + tok64 * sdlt, mask=ok, other=0.0)
        tl.store(DELTA + (b * Hq + h) * T + tok64, acc, mask=ok)

    @triton.jit
    def _topk_bwd_q_kernel(
        Q, K, V, DO, IDX, LSE, DELTA, DQ, DKA, DVA,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sdob, sdot, sdoh, sib, sit, sih, slb, slh, slt,
        sdqb, sdqt, sdqh, sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
        T, S, Hkv, KTOP, qk_scale, sm_scale, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, CAUSAL: tl.constexpr,
        V_IS_K: tl.constexpr, WRITE_DQ: tl.constexpr, ATOMIC_DKDV: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr,
    ):
        """Query-major backward of one (batch, token, kv head, head block, column split); 1-D grid.

        Recomputes ``P = exp2(s - lse)`` and ``dS = P (dP - delta)`` for the gathered lanes (all ``Dk``
        columns for s, all ``Dv`` for dP; q / dO tiles resident or re-read per ``STREAM`` as in the
        forward). ``WRITE_DQ``: accumulate ``dQ = dS K * softmax_scale`` for the program's chunk and tail
        piece and store it. ``ATOMIC_DKDV`` (bit 1: dV, bit 2: dK): add ``Pᵀ dO`` / ``dSᵀ Q * softmax_scale``
        of the program's columns into the fp32 buffers ``DVA`` / ``DKA`` with atomics (skipped lanes add
        nothing; dV alone needs no dP). Padding rows read ``lse = +inf``, so their P and dS are 0.
        """
        split, hb, hkv, b, t = _program_coords(T, Hkv, G, BLOCK_M, NSPLIT)
        heads = hb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = heads < G
        hq = _idx(hkv * G, OFF64) + tl.minimum(heads, G - 1)
        q_base = Q + b * sqb + t * sqt
        q_rows = hq * sqh
        do_base = DO + b * sdob + t * sdot
        do_rows = hq * sdoh
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh
        idx_row = IDX + b * sib + t * sit + hkv * sih

        q_own0 = _chunk(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK)
        q_oth0 = _chunk(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK)
        q_tail0 = _tail(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
        q_toth0 = _tail(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
        do_own0 = _chunk(do_base, do_rows, split, False, HEAD_DV, NSPLIT, BV)
        do_oth0 = _chunk(do_base, do_rows, split, True, HEAD_DV, NSPLIT, BV)
        lse = tl.load(LSE + b * slb + hq * slh + t * slt, mask=row_ok, other=float("inf")) * _LOG2E_C
        delta = tl.load(DELTA + (b * (Hkv * G) * T + t) + hq.to(tl.int64) * T, mask=row_ok, other=0.0)
        if CAUSAL:
            key_end = t + S - T + 1
        else:
            key_end = S + t * 0
        n_lanes = tl.where(key_end > 0, KTOP, 0)

        dq_acc = tl.zeros([BLOCK_M, BK], dtype=tl.float32)
        dq_tail = tl.zeros([BLOCK_M, BT if BT > 0 else MIN_TILE_C], dtype=tl.float32)
        cols_k = split * BK + tl.arange(0, BK)
        cols_v = split * BV + tl.arange(0, BV)
        cols_t = NSPLIT * BK + split * BT + tl.arange(0, BT if BT > 0 else MIN_TILE_C)
        for start in range(0, n_lanes, BLOCK_N):
            hide = start * opaque_zero
            if STREAM >= 2:
                q_own = _chunk(q_base + hide, q_rows, split, False, HEAD_DK, NSPLIT, BK)
                q_tail = _tail(q_base + hide, q_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
                do_own = _chunk(do_base + hide, do_rows, split, False, HEAD_DV, NSPLIT, BV)
            else:
                q_own = q_own0
                q_tail = q_tail0
                do_own = do_own0
            if STREAM >= 1:
                q_oth = _chunk(q_base + hide, q_rows, split, True, HEAD_DK, NSPLIT, BK)
                q_toth = _tail(q_base + hide, q_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
                do_oth = _chunk(do_base + hide, do_rows, split, True, HEAD_DV, NSPLIT, BV)
            else:
                q_oth = q_oth0
                q_toth = q_toth0
                do_oth = do_oth0
            kpos, ok = _lane_keys(idx_row, start, KTOP, key_end, BLOCK_N)
            kidx = _idx(kpos, OFF64)
            # scores first (P), then dP: fewer fp32 tiles live at once
            s, k_own, k_oth, k_tail = _gathered_scores(q_own, q_oth, q_tail, q_toth, k_base, kidx * sks, split,
                                                       HEAD_DK, NSPLIT, BK, BT, DOT)
            s = tl.where(ok[None, :], s * qk_scale, float("-inf"))
            p = tl.exp2(s - lse[:, None])
            ds = p
            if WRITE_DQ or ATOMIC_DKDV >= 2:
                if V_IS_K:  # value chunks are the key chunks (columns past Dv meet zero dO columns)
                    v_own = k_own
                    v_oth = k_oth
                else:
                    v_own = _chunk(v_base, kidx * svs, split, False, HEAD_DV, NSPLIT, BV)
                    v_oth = v_own
                    if NSPLIT > 1:
                        v_oth = _chunk(v_base, kidx * svs, split, True, HEAD_DV, NSPLIT, BV)
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
                va = DVA + b * sdvb + hkv * sdvh + (kidx * sdvs)[:, None]
                # Pure accumulation: relaxed atomics (the default acq_rel orders memory for nothing).
                tl.atomic_add(va + cols_v[None, :], dv_part, mask=ok[:, None] & (cols_v < HEAD_DV)[None, :],
                              sem="relaxed")
            if ATOMIC_DKDV >= 2:
                dst = tl.trans(ds.to(q_own.dtype))
                dk_part = tl.dot(dst, q_own, input_precision=DOT) * sm_scale
                ka = DKA + b * sdkb + hkv * sdkh + (kidx * sdks)[:, None]
                tl.atomic_add(ka + cols_k[None, :], dk_part, mask=ok[:, None] & (cols_k < HEAD_DK)[None, :],
                              sem="relaxed")
                if BT > 0:
                    dk_tail = tl.dot(dst, q_tail, input_precision=DOT) * sm_scale
                    tl.atomic_add(ka + cols_t[None, :], dk_tail, mask=ok[:, None] & (cols_t < HEAD_DK)[None, :],
                                  sem="relaxed")

        if WRITE_DQ:
            hq_st = _idx(hkv * G, OFF64) + heads
            dq_ptr = DQ + b * sdqb + t * sdqt + (hq_st * sdqh)[:, None]
            tl.store(dq_ptr + cols_k[None, :], (dq_acc * sm_scale).to(DQ.dtype.element_ty),
                     mask=row_ok[:, None] & (cols_k < HEAD_DK)[None, :])
            if BT > 0:
                tl.store(dq_ptr + cols_t[None, :], (dq_tail * sm_scale).to(DQ.dtype.element_ty),
                         mask=row_ok[:, None] & (cols_t < HEAD_DK)[None, :])

    @triton.jit
    def _topk_bwd_kv_det_kernel(
        Q, K, V, DO, LSE, DELTA, ENT_T, ENT_LO, ENT_HI, ITEMS, DK, DV, PK, PV,
        sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sdob, sdot, sdoh, slb, slh, slt,
        sdkb, sdks, sdkh, sdvb, sdvs, sdvh,
        T, S, Hkv, NKB, qk_scale, sm_scale, opaque_zero,
        G: tl.constexpr, HEAD_DK: tl.constexpr, HEAD_DV: tl.constexpr, V_IS_K: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NSPLIT: tl.constexpr,
        BK: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr,
        STREAM: tl.constexpr, DOT: tl.constexpr, OFF64: tl.constexpr, PARTS: tl.constexpr,
    ):
        """Deterministic dK/dV of one work item and column split; grid ``(n_items, NSPLIT)``; ``PARTS``:
        bit 1 dV, bit 2 dK (separate launches keep each accumulator set small; dV alone needs no dP).

        ``ITEMS[i] = (segment, first entry, end entry, slot)`` (int64), segment = (b * Hkv + hkv) * NKB +
        key block. The item walks the packed rows ``e * G + h`` of entries ``[first, end)`` (entry e: token
        ``ENT_T[e]``, key bits ``ENT_LO[e]`` / ``ENT_HI[e]`` for keys 0-31 / 32-63 of the block); the key
        block's K/V tiles (own chunk, other chunk, tail pieces) are loaded once (``STREAM == 0``) or
        re-read every step (other chunk: ``STREAM >= 1``, all: ``STREAM == 2``; see the forward). All
        products are transposed (``[BLOCK_N, BLOCK_M]``, keys on M). ``slot < 0``: the item is its block's
        only one and writes dK/dV (input dtype) directly, zeros for a block nobody selected; else it writes
        fp32 partials ``PK[slot]`` ``[BLOCK_N, Dk]`` / ``PV[slot]`` ``[BLOCK_N, Dv]`` for
        ``_topk_reduce_kernel``. No atomics.
        """
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
        bh = seg // NKB
        kb = seg % NKB
        b = bh // Hkv
        hkv = bh % Hkv

        nn = tl.arange(0, BLOCK_N)
        keys = _idx(kb * BLOCK_N, OFF64) + nn
        key_ok = keys < S
        keys_ld = tl.minimum(keys, S - 1)
        k_base = K + b * skb + hkv * skh
        v_base = V + b * svb + hkv * svh
        k_rows = keys_ld * sks
        v_rows = keys_ld * svs
        k_own0 = _chunk(k_base, k_rows, split, False, HEAD_DK, NSPLIT, BK)
        k_oth0 = _chunk(k_base, k_rows, split, True, HEAD_DK, NSPLIT, BK)
        k_tail0 = _tail(k_base, k_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
        k_toth0 = _tail(k_base, k_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
        v_own0 = _chunk(v_base, v_rows, split, False, HEAD_DV, NSPLIT, BV)
        v_oth0 = _chunk(v_base, v_rows, split, True, HEAD_DV, NSPLIT, BV)
        shift = (nn % 32)[:, None]
        hi_word = (nn >= 32)[:, None]

        dk_acc = tl.zeros([BLOCK_N, BK], dtype=tl.float32)
        dk_tail = tl.zeros([BLOCK_N, BT if BT > 0 else MIN_TILE_C], dtype=tl.float32)
        dv_acc = tl.zeros([BLOCK_N, BV], dtype=tl.float32)
        q_base = Q + b * sqb
        do_base = DO + b * sdob
        r_lo = e_lo * G
        r_hi = e_hi * G
        for r0 in range(r_lo, r_hi, BLOCK_M):
            kb_ = k_base + r0 * opaque_zero
            vb_ = v_base + r0 * opaque_zero
            if STREAM >= 2:
                k_own = _chunk(kb_, k_rows, split, False, HEAD_DK, NSPLIT, BK)
                k_tail = _tail(kb_, k_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
            else:
                k_own = k_own0
                k_tail = k_tail0
            if STREAM >= 1:
                k_oth = _chunk(kb_, k_rows, split, True, HEAD_DK, NSPLIT, BK)
                k_toth = _tail(kb_, k_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
            else:
                k_oth = k_oth0
                k_toth = k_toth0
            if V_IS_K:
                v_own = k_own
                v_oth = k_oth
            else:
                if STREAM >= 2:
                    v_own = _chunk(vb_, v_rows, split, False, HEAD_DV, NSPLIT, BV)
                else:
                    v_own = v_own0
                if STREAM >= 1:
                    v_oth = _chunk(vb_, v_rows, split, True, HEAD_DV, NSPLIT, BV)
                else:
                    v_oth = v_oth0
            rows = r0 + tl.arange(0, BLOCK_M)
            row_ok = rows < r_hi
            rows = tl.where(row_ok, rows, r_lo)
            e = rows // G
            hq = _idx(hkv * G + rows % G, OFF64)
            t = _idx(tl.load(ENT_T + e), OFF64)
            q_rows = t * sqt + hq * sqh
            do_rows = t * sdot + hq * sdoh
            q_own = _chunk(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK)
            st = tl.dot(k_own, tl.trans(q_own), input_precision=DOT)
            if NSPLIT > 1:
                q_oth = _chunk(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK)
                st = tl.dot(k_oth, tl.trans(q_oth), st, input_precision=DOT)
            q_tail = q_own
            if BT > 0:
                q_tail = _tail(q_base, q_rows, split, False, HEAD_DK, NSPLIT, BK, BT)
                st = tl.dot(k_tail, tl.trans(q_tail), st, input_precision=DOT)
                if NSPLIT > 1:
                    q_toth = _tail(q_base, q_rows, split, True, HEAD_DK, NSPLIT, BK, BT)
                    st = tl.dot(k_toth, tl.trans(q_toth), st, input_precision=DOT)
            lse = tl.load(LSE + b * slb + hq * slh + t * slt, mask=row_ok, other=float("inf")) * _LOG2E_C
            word = tl.load(ENT_LO + e)
            if BLOCK_N > 32:
                word = tl.where(hi_word, tl.load(ENT_HI + e)[None, :], word[None, :])
            else:
                word = word[None, :]
            sel = ((word >> shift) & 1) != 0
            st = tl.where(sel, st * qk_scale, float("-inf"))
            pt = tl.exp2(st - lse[None, :])
            do_own = _chunk(do_base, do_rows, split, False, HEAD_DV, NSPLIT, BV)
            if PARTS % 2 == 1:
                dv_acc = tl.dot(pt.to(do_own.dtype), do_own, dv_acc, input_precision=DOT)
            if PARTS >= 2:
                dpt = tl.dot(v_own, tl.trans(do_own), input_precision=DOT)
                if NSPLIT > 1:
                    do_oth = _chunk(do_base, do_rows, split, True, HEAD_DV, NSPLIT, BV)
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
            keys_st = _idx(keys, OFF64)
            dk_ptr = DK + b * sdkb + hkv * sdkh + (keys_st * sdks)[:, None]
            dv_ptr = DV + b * sdvb + hkv * sdvh + (keys_st * sdvs)[:, None]
            if PARTS >= 2:
                tl.store(dk_ptr + cols_k[None, :], dk_acc.to(DK.dtype.element_ty), mask=key_ok[:, None] & kmask)
                if BT > 0:
                    tl.store(dk_ptr + cols_t[None, :], dk_tail.to(DK.dtype.element_ty),
                             mask=key_ok[:, None] & tmask)
            if PARTS % 2 == 1:
                tl.store(dv_ptr + cols_v[None, :], dv_acc.to(DV.dtype.element_ty), mask=key_ok[:, None] & vmask)
        else:
            nn64 = nn.to(tl.int64)
            pk = PK + slot * (BLOCK_N * HEAD_DK) + (nn64 * HEAD_DK)[:, None]
            pv = PV + slot * (BLOCK_N * HEAD_DV) + (nn64 * HEAD_DV)[:, None]
            if PARTS >= 2:
                tl.store(pk + cols_k[None, :], dk_acc, mask=kmask)
                if BT > 0:
                    tl.store(pk + cols_t[None, :], dk_tail, mask=tmask)
            if PARTS % 2 == 1:
                tl.store(pv + cols_v[None, :], dv_acc, mask=vmask)

    @triton.jit
    def _topk_reduce_kernel(
        P, OUT, MULTI, sob, sos, soh, S, Hkv, NKB,
        D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """Sum the fp32 partials of one key block in slot order and store them (output dtype);
        ``MULTI[m] = (segment, first slot, slot count)``; grid ``(n_multi, cdiv(D, BLOCK_D))``."""
        pid_m = tl.program_id(0)
        pid_d = tl.program_id(1)
        rec = MULTI + pid_m.to(tl.int64) * 3
        seg = tl.load(rec)
        first = tl.load(rec + 1)
        count = tl.load(rec + 2)
        if seg < 0:  # padding row
            return
        bh = seg // NKB
        kb = seg % NKB
        b = bh // Hkv
        hkv = bh % Hkv
        nn = tl.arange(0, BLOCK_N)
        keys = kb * BLOCK_N + nn
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = (cols < D)[None, :]
        off = (nn.to(tl.int64) * D)[:, None] + cols[None, :]
        acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for i in range(0, count):
            acc += tl.load(P + (first + i) * (BLOCK_N * D) + off, mask=cmask, other=0.0)
        ptrs = OUT + b * sob + hkv * soh + (keys.to(tl.int64) * sos)[:, None] + cols[None, :]
        tl.store(ptrs, acc.to(OUT.dtype.element_ty), mask=(keys < S)[:, None] & cmask)

# --------------------------------------------------------------------------------------------
# key-major transposed index (deterministic dK/dV)
# --------------------------------------------------------------------------------------------
@dataclass
class KeyMajorIndex:
    """Transposed top-k index for the deterministic dK/dV kernel (see :func:`build_key_major_index`).

    Every tensor has a size fixed by the shapes (an upper bound), so building and using the index
    needs no host sync and can run inside CUDA-graph capture; the tails past the real content are padding.
    ``ent_t`` int32 ``[E_cap]``: query token of entry e; ``ent_lo`` / ``ent_hi`` int32 ``[E_cap]``: bits of
    the selected keys 0-31 / 32-63 of the entry's key block. Entries are sorted by (batch, kv head, key
    block, token); ``offsets`` int64 ``[B * Hkv * NKB + 1]``: CSR offsets per key block ("segment").
    ``items`` int64 ``[n_items_cap, 4]``: (segment, first entry, end entry, slot) work items of at most
    ``chunk`` entries each, every segment at least one (empty ones write zeros); ``slot`` is -1 for a
    segment's only item, else its partial-buffer slot; padding items have segment -1 (the kernel skips
    them). ``multi`` int64 ``[n_multi_cap, 3]``: (segment, first slot, slot count) for the segments split
    over several items, padding rows segment -1. ``n_slots``: partial slots to allocate (a bound).
    """

    block_n: int
    num_key_blocks: int
    ent_t: torch.Tensor
    ent_lo: torch.Tensor
    ent_hi: torch.Tensor
    offsets: torch.Tensor
    items: torch.Tensor
    multi: torch.Tensor
    n_slots: int
    chunk: int

    @property
    def num_entries(self) -> int:
        """Distinct (key block, token) pairs (reads the device: a diagnostic, not for hot paths)."""
        return int(self.offsets[-1])

    def nbytes(self) -> int:
        """Device memory of the index (without the partial buffers)."""
        return sum(x.numel() * x.element_size()
                   for x in (self.ent_t, self.ent_lo, self.ent_hi, self.offsets, self.items, self.multi))


def _to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _key_major_caps(B: int, T: int, S: int, Hkv: int, K: int, causal: bool, block_n: int, chunk: int):
    """Upper bounds ``(entries, items, slots, split segments)`` of :func:`build_key_major_index` from the
    shapes alone. Entries: a row lists at most ``min(K, NKB)`` key blocks. Per segment ``n_e`` entries
    (``n_e <=`` the tokens that can see the block: ``T``, or with ``causal`` those with ``t + S - T >=
    kb * block_n``) give ``max(1, ceil(n_e / chunk)) <= 1 + n_e // chunk`` items, and a split segment
    (``n_e > chunk``) ``ceil(n_e / chunk) <= 2 * (n_e // chunk)`` slots; both bounds are summed over the
    per-segment limits and over the entry total, and the smaller is taken."""
    nkb = max(1, cdiv(S, block_n))
    bh = B * Hkv
    n_seg = bh * nkb
    e_cap = bh * T * min(K, nkb)
    items_seg = slots_seg = multi_seg = 0
    for kb in range(nkb):
        vis = T - max(0, kb * block_n - (S - T)) if causal else T
        vis = max(0, min(T, vis))
        per = max(1, cdiv(vis, chunk))
        items_seg += per
        if per > 1:
            slots_seg += per
            multi_seg += 1
    q = e_cap // chunk
    items = min(n_seg + q, bh * items_seg)
    slots = min(2 * q, bh * slots_seg, items)
    multi = min(e_cap // (chunk + 1), bh * multi_seg, n_seg)
    return e_cap, items, slots, multi


def build_key_major_index(topk_indices: torch.Tensor, S: int, causal: bool, block_n: int,
                          group: int = 1, rows_per_item: int = 4096, max_slots: int | None = None) -> KeyMajorIndex:
    """Transpose ``topk_indices`` (int32 ``[B, T, Hkv, K]``) into the key-major lists of the
    deterministic dK/dV kernel, on the indices' device, without a host sync.

    Lanes that select nothing (``-1``, ``< 0``, ``>= S``, causally hidden with ``causal``) are dropped;
    a key listed twice in one row counts once. Per (batch, kv head, key block of ``block_n`` keys):
    the tokens that selected at least one of its keys, ascending, each with a bit mask of those keys.
    Built with one sort of int64 keys ``((bh * NKB + kb) * T + t) * block_n + j % block_n`` (dropped
    lanes sort last); entries, counts and work items come from scans and scatters into buffers sized by
    :func:`_key_major_caps` (integer sums: the result does not depend on the sort's stability or on
    scatter order, so it is deterministic). Work items hold at most ``chunk = max(1, rows_per_item //
    group)`` entries (``group`` heads each); when ``max_slots`` is given, ``chunk`` is doubled until the
    bound on partial slots fits in it (longer items instead of more fp32 partial memory).

    Memory: during the build about 6 int64 temporaries per lane (``B * T * Hkv * K`` lanes: ~48 bytes
    each, e.g. 3.2 GB for T = 32k, K = 2048); afterwards 12 bytes per entry bound and 32 per work item
    bound. Raises ``ValueError`` for ``block_n`` outside ``[1, 64]``.
    """
    if not 1 <= block_n <= MAX_DET_BLOCK_N:
        raise ValueError(f"build_key_major_index: block_n must be in [1, {MAX_DET_BLOCK_N}], got {block_n}")
    B, T, Hkv, K = topk_indices.shape
    dev = topk_indices.device
    nkb = max(1, cdiv(S, block_n))
    n_seg = B * Hkv * nkb
    chunk = max(1, rows_per_item // max(1, group))
    e_cap, i_cap, s_cap, m_cap = _key_major_caps(B, T, S, Hkv, K, causal, block_n, chunk)
    while max_slots is not None and s_cap > max(1, max_slots) and chunk < T:
        chunk *= 2
        e_cap, i_cap, s_cap, m_cap = _key_major_caps(B, T, S, Hkv, K, causal, block_n, chunk)
    i64 = dict(dtype=torch.int64, device=dev)
    j = topk_indices.long()
    t = torch.arange(T, device=dev).view(1, T, 1, 1)
    valid = (j >= 0) & (j < S)
    if causal:
        valid &= j <= t + (S - T)
    bh = (torch.arange(B, device=dev).view(B, 1, 1, 1) * Hkv + torch.arange(Hkv, device=dev).view(1, 1, Hkv, 1))
    jc = j.clamp(min=0)
    end = n_seg * T * block_n  # past every real key: dropped lanes sort last
    comp = torch.where(valid, ((bh * nkb + jc // block_n) * T + t) * block_n + jc % block_n, end)
    comp = torch.sort(comp.flatten()).values
    real = comp < end
    prev = torch.cat([comp.new_full((1,), -1), comp[:-1]])
    fresh = real & (comp != prev)  # first copy of a (row, key) pair
    grp = comp // block_n  # entry key: segment * T + token
    start = real & (grp != prev.div(block_n, rounding_mode="floor"))  # first lane of a new entry
    ent = torch.cumsum(start.long(), 0) - 1
    # Lanes that are not the first of an entry (or are dropped) scatter into a spare slot past the end.
    e_dst = torch.where(start, ent, e_cap)
    ent_t = torch.zeros(e_cap + 1, **i64).scatter_(0, e_dst, grp % T)[:e_cap].to(torch.int32)
    bit = comp % block_n
    one = torch.ones((), **i64)
    b_dst = torch.where(fresh, ent, e_cap)
    lo = torch.zeros(e_cap + 1, **i64).scatter_add_(0, b_dst, torch.where(bit < 32, one << bit.clamp(max=31), 0))
    hi = torch.zeros(e_cap + 1, **i64).scatter_add_(0, b_dst, torch.where(bit >= 32, one << (bit - 32).clamp(min=0), 0))
    seg_of = torch.where(start, grp // T, n_seg)
    n_e = torch.zeros(n_seg + 1, **i64).scatter_add_(0, seg_of, start.long())[:n_seg]
    offsets = torch.cat([torch.zeros(1, **i64), n_e.cumsum(0)])
    per = torch.clamp((n_e + chunk - 1) // chunk, min=1)
    cum = per.cumsum(0)
    first_item = cum - per
    pos = torch.arange(i_cap, device=dev)
    item_seg = torch.searchsorted(cum, pos, right=True)  # == n_seg for padding items
    pad = item_seg >= n_seg
    sg = item_seg.clamp(max=n_seg - 1)
    rank = pos - first_item[sg]
    e_lo = torch.where(pad, 0, offsets[sg] + rank * chunk)
    e_hi = torch.where(pad, 0, torch.minimum(e_lo + chunk, offsets[sg + 1]))
    split_item = (per[sg] > 1) & ~pad
    slot = torch.where(split_item, split_item.long().cumsum(0) - 1, -1)
    items = torch.stack([torch.where(pad, -1, item_seg), e_lo, e_hi, slot], dim=1).contiguous()
    # Split segments in segment order: the k-th one goes to row k (rows past the count stay padding).
    split_seg = per > 1
    m_dst = torch.where(split_seg, split_seg.long().cumsum(0) - 1, m_cap)
    first_slot = slot[first_item.clamp(max=i_cap - 1)]
    multi = torch.full((m_cap + 1, 3), -1, **i64)
    rows = torch.stack([torch.arange(n_seg, device=dev), first_slot, per], dim=1)
    multi = multi.index_copy(0, m_dst.clamp(max=m_cap), rows)[:m_cap]
    return KeyMajorIndex(
        block_n=block_n, num_key_blocks=nkb, ent_t=ent_t, ent_lo=_to_int32_bits(lo[:e_cap]),
        ent_hi=_to_int32_bits(hi[:e_cap]), offsets=offsets, items=items, multi=multi.contiguous(), n_slots=s_cap,
        chunk=chunk,
    )


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


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
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def _check_launch(name: str, q: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(f"{name} needs triton")
    if not INTERPRET and q.device.type != "cuda":
        raise RuntimeError(f"{name} runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1)")


def _plan_consts(kind: str, cfg: TopkConfig, dk: int, dv: int, v_is_k: bool) -> dict:
    plan = column_plan(dk, dv, v_is_k, cfg.nsplit)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NSPLIT=plan.nsplit, BK=plan.bk, BT=plan.bt, BV=plan.bv,
                STREAM=int(cfg.stream))


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
    _check_launch("topk_attention_fwd", q)
    B, T, Hq, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = v.shape[3]
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
    pc = _plan_consts("fwd", cfg, Dk, Dv, v_is_k)
    maxl = torch.empty((B, Hq, T), dtype=torch.float32, device=dev) if return_max_logit else None
    grid = (B * T * Hkv * cdiv(G, cfg.block_m) * pc["NSPLIT"],)
    launch(
        _topk_fwd_kernel, grid,
        q, k, v, idx, o_buf, lse, maxl if maxl is not None else lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), idx.stride(0), idx.stride(1), idx.stride(2),
        o_buf.stride(0), o_buf.stride(1), o_buf.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
        T, S, Hkv, KTOP, float(softmax_scale) * LOG2E, 0,
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
    _check_launch("topk_attention_bwd", q)
    B, T, Hq, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    Dv = v.shape[3]
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
        out, do, dl, delta, *out.stride(), *do.stride(), dl.stride(0), dl.stride(1), dl.stride(2), T, Hq,
        HEAD_DV=Dv, HAS_DLSE=has_dlse, BLOCK_T=64, BLOCK_D=bd, num_warps=4,
    )

    def unit(x):  # kernel-side output buffer with unit last stride
        return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else torch.empty(x.shape, dtype=x.dtype, device=dev)

    dq_buf, dk_buf, dv_buf = unit(dq), unit(dk), unit(dv)
    q_strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                 v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                 idx.stride(0), idx.stride(1), idx.stride(2), lse.stride(0), lse.stride(1), lse.stride(2))
    common = dict(G=G, HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=bool(causal), V_IS_K=v_is_k, DOT=dot)

    def launch_q(cfg, write_dq, atomic, dka, dva):
        pc = _plan_consts("dq", cfg, Dk, Dv, v_is_k)
        grid = (B * T * Hkv * cdiv(G, cfg.block_m) * pc["NSPLIT"],)
        launch(
            _topk_bwd_q_kernel, grid,
            q, k, v, do, idx, lse, delta, dq_buf, dka, dva, *q_strides,
            dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2), dka.stride(0), dka.stride(1), dka.stride(2),
            dva.stride(0), dva.stride(1), dva.stride(2),
            T, S, Hkv, KTOP, scale * LOG2E, scale, 0,
            WRITE_DQ=write_dq, ATOMIC_DKDV=atomic, OFF64=_off64((q, do, dq_buf), (k, v, dka, dva, lse)),
            **common, **pc,
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
        pc = _plan_consts("dkdv_det", cfg, Dk, Dv, v_is_k)
        n_slots = max(1, kmi.n_slots)
        pk = torch.empty((n_slots, cfg.block_n, Dk), dtype=torch.float32, device=dev)
        pv = torch.empty((n_slots, cfg.block_n, Dv), dtype=torch.float32, device=dev)
        ent_t = kmi.ent_t if kmi.ent_t.numel() else torch.zeros(1, dtype=torch.int32, device=dev)
        ent_lo = kmi.ent_lo if kmi.ent_lo.numel() else ent_t
        ent_hi = kmi.ent_hi if kmi.ent_hi.numel() else ent_t
        off64 = _off64((q, do), (k, v, dk_buf, dv_buf, lse), det=True)
        for part in ((1, 2) if cfg.split_dkdv else (3,)):
            launch(
                _topk_bwd_kv_det_kernel, (kmi.items.shape[0], pc["NSPLIT"]),
                q, k, v, do, lse, delta, ent_t, ent_lo, ent_hi, kmi.items, dk_buf, dv_buf, pk, pv,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
                lse.stride(0), lse.stride(1), lse.stride(2),
                dk_buf.stride(0), dk_buf.stride(1), dk_buf.stride(2), dv_buf.stride(0), dv_buf.stride(1),
                dv_buf.stride(2),
                T, S, Hkv, kmi.num_key_blocks, scale * LOG2E, scale, 0,
                G=G, HEAD_DK=Dk, HEAD_DV=Dv, V_IS_K=v_is_k, DOT=dot, OFF64=off64, PARTS=part, **pc,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        n_multi = kmi.multi.shape[0]
        if n_multi:
            for part, dst, D in ((pk, dk_buf, Dk), (pv, dv_buf, Dv)):
                bd = min(64, max(16, next_pow2(D)))
                launch(
                    _topk_reduce_kernel, (n_multi, cdiv(D, bd)),
                    part, dst, kmi.multi, dst.stride(0), dst.stride(1), dst.stride(2), S, Hkv,
                    kmi.num_key_blocks, D=D, BLOCK_N=cfg.block_n, BLOCK_D=bd, num_warps=4,
                )
    for buf, dst in ((dq_buf, dq), (dk_buf, dk), (dv_buf, dv)):
        if buf is not dst:
            dst.copy_(buf)
    if sinks is not None:  # the kernels need nothing (lse includes the sink); deterministic torch sum
        return dq, dk, dv, sink_grad(sinks, lse, delta)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------
# ahead-of-time compile specifications (DESIGN §6.3)
# --------------------------------------------------------------------------------------------
#: Representative shapes of the compile check: (Dk, Dv, Hq, Hkv, v aliases k).
SPEC_SHAPES = ((576, 512, 128, 1, True), (576, 512, 16, 1, True), (576, 512, 1, 1, True),
               (576, 512, 128, 1, False), (192, 128, 16, 16, False), (64, 64, 8, 2, False), (64, 64, 32, 1, False))
SPEC_DTYPES = ("fp16", "bf16")
#: fp32 (IEEE products) is compiled for the absorbed shapes only: its tiles do not depend on the group.
SPEC_FP32_SHAPES = ((576, 512, 128, 1, True), (576, 512, 128, 1, False))


def _spec_values(kind: str, dtype: str, dk: int, dv: int, hq: int, hkv: int, v_is_k: bool, causal: bool,
                 cfg: TopkConfig, off64: bool = False, part: int = 3) -> dict:
    """Argument values of a representative contiguous launch (T = S = 4096 + 1, K = 2048)."""
    from kernels._compile import Pointer

    T = S = 4097
    KT = 2048
    ptr, f32, i32 = Pointer(dtype), Pointer("fp32"), Pointer("i32")
    dvs = dk if v_is_k else dv  # v's row strides are k's when it is a view of k
    vals = dict(
        Q=ptr, K=ptr, V=ptr, O=ptr, DO=ptr, DQ=ptr, DK=ptr, DV=ptr, IDX=i32, LSE=f32, MAXL=f32, DELTA=f32,
        DKA=f32, DVA=f32, PK=f32, PV=f32, ENT_T=i32, ENT_LO=i32, ENT_HI=i32, ITEMS=Pointer("i64"),
        sqb=T * hq * dk, sqt=hq * dk, sqh=dk, skb=S * hkv * dk, sks=hkv * dk, skh=dk,
        svb=S * hkv * dvs, svs=hkv * dvs, svh=dvs, sdob=T * hq * dv, sdot=hq * dv, sdoh=dv,
        sib=T * hkv * KT, sit=hkv * KT, sih=KT, sob=T * hq * dv, sot=hq * dv, soh=dv,
        slb=hq * T, slh=T, slt=1, sdqb=T * hq * dk, sdqt=hq * dk, sdqh=dk,
        sdkb=S * hkv * dk, sdks=hkv * dk, sdkh=dk, sdvb=S * hkv * dv, sdvs=hkv * dv, sdvh=dv,
        T=T, S=S, Hkv=hkv, KTOP=KT, NKB=cdiv(S, cfg.block_n),
        qk_scale=0.1, sm_scale=0.07, opaque_zero=0,
        G=hq // hkv, HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, V_IS_K=v_is_k, WRITE_MAXL=True,
        WRITE_DQ=kind == "dq", ATOMIC_DKDV=part if kind == "dkdv_atomic" else 0, PARTS=part,
        DOT=dot_precision(dtype, False),
        OFF64=off64,
        **_plan_consts(kind, cfg, dk, dv, v_is_k),
        SINKS=Pointer("fp32"), HAS_SINKS=False,
    )
    return vals


class _ParamView:
    """``fn.params`` / ``fn.__name__`` of a kernel for :func:`kernels._compile.spec_args`, also under the
    interpreter (whose ``InterpretedFunction`` has no ``params``): constexpr-ness from the annotations."""

    def __init__(self, fn):
        import inspect
        from types import SimpleNamespace

        raw = getattr(fn, "fn", fn)
        self.fn = raw  # the Python function: kernels._compile.spec_args reads its defaults
        self.__name__ = raw.__name__
        self.params = [SimpleNamespace(name=n, is_constexpr="constexpr" in str(p.annotation))
                       for n, p in inspect.signature(raw).parameters.items()]


def topk_spec(kind: str, arch: int, dtype: str, dk: int, dv: int, hq: int, hkv: int, v_is_k: bool,
              causal: bool = True, cfg: TopkConfig | None = None, off64: bool = False,
              part: int = 3) -> CompileSpec:
    """CompileSpec of one top-k kernel (``kind`` in ``KINDS``) for a contiguous launch of that shape;
    ``off64``: the int64 row-offset variant (tensors with a batch entry of 2^31 elements or more);
    ``part``: dK/dV kinds: 1 = the dV launch, 2 = the dK launch, 3 = both in one."""
    from kernels._compile import spec_args

    cfg = cfg or topk_config(kind, arch, dk, dv, hq // hkv, dtype, interpret=False, v_is_k=v_is_k)
    fn = {"fwd": _topk_fwd_kernel, "dq": _topk_bwd_q_kernel, "dkdv_atomic": _topk_bwd_q_kernel,
          "dkdv_det": _topk_bwd_kv_det_kernel}[kind]
    values = _spec_values(kind, dtype, dk, dv, hq, hkv, v_is_k, causal, cfg, off64, part)
    sig, consts, divisible = spec_args(fn if hasattr(fn, "params") else _ParamView(fn), values)
    suffix = {1: "_dv", 2: "_dk", 3: ""}[part if kind.startswith("dkdv") else 3]
    return CompileSpec(
        kernel=f"topk_{kind}{suffix}", fn=fn, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, arch=arch, dtype=dtype, head_dims=(dk, dv), tile=cfg.tile,
        extra={"divisible": divisible, "group": hq // hkv, "v_is_k": v_is_k, "causal": causal, "config": cfg,
               "heads": hq, "off64": off64, "kind": kind, "part": part},
    )


def _aux_specs(arch: int, dtype: str, dv: int) -> list[CompileSpec]:
    from kernels._compile import Pointer, spec_args

    T, hq, S = 4097, 128, 4097
    out = []
    bd = min(128, max(16, next_pow2(dv)))
    vals = dict(O=Pointer(dtype), DO=Pointer(dtype), DLSE=Pointer("fp32"), DELTA=Pointer("fp32"),
                sob=T * hq * dv, sot=hq * dv, soh=dv, sod=1, sdob=T * hq * dv, sdot=hq * dv, sdoh=dv, sdod=1,
                sdlb=hq * T, sdlh=T, sdlt=1, T=T, Hq=hq, HEAD_DV=dv, HAS_DLSE=True, BLOCK_T=64, BLOCK_D=bd)
    sig, consts, div = spec_args(_ParamView(_topk_bwd_pre_kernel), vals)
    out.append(CompileSpec(kernel="topk_bwd_pre", fn=_topk_bwd_pre_kernel, signature=sig, constexprs=consts,
                           num_warps=4, num_stages=1, arch=arch, dtype=dtype, head_dims=(dv, dv), tile=f"64x{bd}",
                           extra={"divisible": div}))
    bd = min(64, max(16, next_pow2(dv)))
    vals = dict(P=Pointer("fp32"), OUT=Pointer(dtype), MULTI=Pointer("i64"), sob=S * dv, sos=dv, soh=dv, S=S,
                Hkv=1, NKB=cdiv(S, 64), D=dv, BLOCK_N=64, BLOCK_D=bd)
    sig, consts, div = spec_args(_ParamView(_topk_reduce_kernel), vals)
    out.append(CompileSpec(kernel="topk_reduce", fn=_topk_reduce_kernel, signature=sig, constexprs=consts,
                           num_warps=4, num_stages=1, arch=arch, dtype=dtype, head_dims=(dv, dv), tile=f"64x{bd}",
                           extra={"divisible": div}))
    return out


def compile_specs(arch: int) -> list[CompileSpec]:
    """Every configuration the top-k launchers may pick on ``arch`` (80, 86, 89, 90...): forward, dQ,
    atomic and deterministic dK/dV kernels on :data:`SPEC_SHAPES` (absorbed 576/512 on one latent kv
    head with 128, 16 and 1 heads, v a prefix of k, and with 128 heads and a separate v; 192/128 with
    one head per kv head; 64/64 GQA) for fp16 and bf16, and on :data:`SPEC_FP32_SHAPES` for fp32
    (IEEE products); causal; plus the delta preprocessing and partial-reduce kernels. Signatures are
    specialised as a contiguous launch is (``extra["divisible"]``). Empty without Triton."""
    if not HAS_TRITON:
        return []
    specs = []
    for dtype in SPEC_DTYPES + ("fp32",):
        for dk, dv, hq, hkv, alias in SPEC_FP32_SHAPES if dtype == "fp32" else SPEC_SHAPES:
            for kind in KINDS:
                cfg = topk_config(kind, arch, dk, dv, hq // hkv, dtype, interpret=False, v_is_k=alias)
                parts = (1, 2) if kind.startswith("dkdv") and cfg.split_dkdv else (3,)
                for part in parts:
                    specs.append(topk_spec(kind, arch, dtype, dk, dv, hq, hkv, alias, cfg=cfg, part=part))
        for dv in (512, 128):
            specs.extend(_aux_specs(arch, dtype, dv))
    return specs
