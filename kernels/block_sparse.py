"""Block-sparse fused attention, forward and backward, on the dense kernels' bodies.

A block mask (``mla.sparsity.BlockMask``; the idea and field names are PyTorch FlexAttention's
BlockMask, https://pytorch.org/blog/flexattention/) lists, for each query block of ``BLOCK_M``
tokens, the ascending key blocks of ``BLOCK_N`` tokens it visits::

    kv_num_blocks  int32 [Bm, Hm, nQ]            nQ = ceil(T / BLOCK_M)
    kv_indices     int32 [Bm, Hm, nQ, max_kv]    first kv_num_blocks lanes valid, ascending
    q_num_blocks   int32 [Bm, Hm, nK]            the transpose, for the dK/dV pass; nK = ceil(S / BLOCK_N)
    q_indices      int32 [Bm, Hm, nK, max_q]

with ``Bm`` in ``{1, B}`` and ``Hm`` in ``{1, Hq}`` (size-1 dims broadcast: the kernels read them
with stride 0). Any strides. Inside a listed block every key is kept unless ``causal`` removes it
(bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + S - T``).

Method (our own code). The kernels are those of :mod:`kernels.attention_fwd` and
:mod:`kernels.attention_bwd` with the constexpr ``SPARSE`` switch on, so dense and block-sparse share
the block bodies (online softmax with fp32 statistics, head-dim chunking up to 576/512, the ``v``
prefix-of-``k`` alias, the transposed dK/dV products):

* **Forward and dQ** (query-major): a program owns a tile of ``BLOCK_M`` packed rows that lies inside
  one mask query block (``ceil(BLOCK_M_mask * G / BLOCK_M)`` tiles per block; rows past the block end
  are masked), and walks the ``BLOCK_N``-key sub-tiles of the listed key blocks in ascending order
  (``ceil(BLOCK_N_mask / BLOCK_N)`` per block; keys past the block end are masked). The leading
  sub-tiles that every row of the tile sees in full (counted from the list in a vectorised pre-pass)
  run without masks, the rest with the key-range and causal masks.
* **dK/dV** (key-major): a program owns a key tile inside one mask key block and walks the row tiles of
  the query blocks listed in ``q_indices`` (causally masked prefix first). Each output element is
  written by one program: no atomics, bitwise deterministic.
* **Head packing** (:func:`packing`). Row ``r`` of a tile is token ``r // G``, head ``r % G`` of a
  kv-head group, so one K/V tile feeds all heads of the group (``Hm == 1``: the heads share the block
  lists). With per-token masks (``BLOCK_M = 1``, absorbed MLA with ``Hkv = 1``) a tile holds the heads
  of one token. When ``Hm == Hq`` and ``G = Hq / Hkv > 1`` the heads of a group may have different
  lists, so heads are not packed: one query head per tile (``G = 1`` in the kernel, ``KV_REP = G``
  head groups per kv head; kv head ``= h // G``), and the dK/dV program of a kv head walks the lists
  of its ``G`` heads one after the other.
* Rows whose query block lists no key block (or whose listed keys are all causally hidden) get
  output 0, ``lse = +inf`` and zero gradients, never NaN. Keys outside listed blocks are never read.
* **Partial blocks** (a FlexAttention mask's ``kv_*`` blocks; constexpr ``HAS_PARTIAL``, off by
  default so the plain block-sparse configurations compile unchanged): ``kv_partial`` / ``q_partial``
  (int32, shaped like ``kv_indices`` / ``q_indices``) give each listed block's index in
  ``partial_bits`` (int8 ``[P, BLOCK_M, BLOCK_N]``, nonzero = keep), ``-1`` for a full block; every
  listed sub-tile then runs masked and ANDs the block's bits (read per tile, one byte per pair) into the
  key-range and causal masks, in the forward, dQ and dK/dV kernels alike.

Tiles (:func:`fwd_configs`, :func:`bwd_configs`) are the dense tables' entries fitted to the mask
(:func:`fit_rows`, :func:`fit_keys`): the key tile divides the mask's key block when it can (else
sub-tiles are masked to the block), the row tile shrinks to the packed rows of a query block
(never below 64 rows for fp16/bf16 on sm90, where wgmma needs them: per-token masks with fewer than 64
heads then pad the tile; never below 16 elsewhere). A backward tile fitted down to 64 rows on the M side of
its score product gets 4 warps on sm90 (:func:`_unreplicated`: 8 warps would compute the scores twice).
See :func:`compile_specs` for the compiled set.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import triton

from kernels import _common, tuning
from kernels._common import TileConfig, compiled_launch, device_arch, dot_precision, dtype_name, head_class, launch
from kernels._config import arch_family
from kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, bwd_delta, bwd_kernel_args, sink_grad
from kernels.attention_bwd import bwd_configs as dense_bwd_configs
from kernels.attention_bwd import interp_config as bwd_interp_config
from kernels.attention_fwd import attn_fwd_kernel
from kernels.attention_fwd import fwd_configs as dense_fwd_configs
from kernels.attention_fwd import interp_config as fwd_interp_config

__all__ = [
    "block_sparse_attention_bwd",
    "block_sparse_attention_fwd",
    "bwd_configs",
    "dedup",
    "fit_keys",
    "fit_rows",
    "fwd_configs",
    "packing",
]

# Compile-spec names that moved to kernels._specs, still readable here.
__getattr__ = _common.specs_getattr(__name__, "spec_configs", "SPEC_DTYPES", "SPEC_ROWS", "SPEC_BLOCK_N",
    "PARTIAL_SPEC_GEOMETRIES", compile_specs="block_sparse_specs", SPEC_SHAPES="BS_SPEC_SHAPES")


# --------------------------------------------------------------------------------------------
# Host-side planning
# --------------------------------------------------------------------------------------------


def packing(hq: int, hkv: int, hm: int) -> tuple[int, int]:
    """``(G, KV_REP)``: heads packed per tile row group and head groups per kv head.

    Packed (``(Hq/Hkv, 1)``) when the mask's head dim is 1 or there is one query head per kv head;
    otherwise (``Hm == Hq``, ``Hq/Hkv > 1``: the group's heads may have different block lists) one
    head per tile: ``(1, Hq/Hkv)``.
    """
    g = hq // hkv
    return (1, g) if (hm != 1 and g > 1) else (g, 1)


def fit_rows(tile: int, rows: int, min_tile: int) -> int:
    """Row tile for mask query blocks of ``rows`` packed rows (``BLOCK_M_mask * G``), from a table tile.

    A tile never spans two query blocks. To keep the set of compiled tiles small the result is one of
    ``tile``, 64 (if between ``min_tile`` and ``tile``) or ``min_tile``: the largest of them dividing
    ``rows`` when ``rows >= 64``, else the smallest that holds ``rows`` (padding the rest); ``tile``
    for long blocks that none divides (the last tile of a block is then partly padded).
    """
    cands = sorted({c for c in (tile, 64, min_tile) if min_tile <= c <= tile}, reverse=True)
    for c in cands:
        if rows >= c and rows % c == 0 and (c >= 64 or c == min_tile):
            return c
    if rows >= tile:
        return tile
    return min(c for c in cands if c >= rows)


def fit_keys(tile: int, block_n: int, min_tile: int) -> int | None:
    """Key tile for mask key blocks of ``block_n`` tokens, from a table tile: ``tile``, or 64 when
    ``tile`` is larger and 64 divides ``block_n``; ``None`` when neither divides (the launcher then
    takes :func:`_odd_config`: ``min_tile`` keys, sub-tiles masked to the block)."""
    for c in (tile, 64):
        if min_tile <= c <= tile and block_n % c == 0:
            return c
    return None


def _min_rows(arch: int, dtype: str) -> int:
    """Smallest query-side M tile (forward, dQ): 64 for fp16/bf16 on sm90+ (wgmma), 32 for fp32 (16-row
    fp32 dQ tiles of the absorbed shape spill), 16 otherwise."""
    if dtype == "fp32":
        return 32
    return 64 if arch_family(arch) == 90 else 16


#: Block-sparse deviations from the dense tables, keyed (kind, arch family, head class, dtype class):
#: the sparse walk needs a few more registers (index loads, row/key bounds). fp32 forward entries of
#: d64-d256 spill 8-40 bytes with 2 stages (triton 3.6 and 3.9) and fit with 1. The sm80 d576 dK/dV
#: entry spills 28 bytes with 4 warps (255 registers; 8 warps: 176). Known and left: fp32 dQ of
#: d128/d256 spills 8-24 bytes (sm80 32x16/32x32, sm90 32x16) under every warps/stages choice tried.
_OVERRIDES: dict[tuple[str, int, str, str], dict] = {
    ("dkdv", 80, "d576", "fp32"): dict(num_warps=8),
    **{("fwd", arch, hc, "fp32"): dict(num_stages=1) for arch in (80, 86, 90) for hc in ("d64", "d128", "d256")},
}


#: Largest forward key tile per head class (16-bit): the dense sm90 tables' 128-key tiles spill 68-352 bytes
#: with the sparse walk's extra registers (d128 128x128 s3, 192/128 128x128 s2, their 64-row fits).
_FWD_MAX_BLOCK_N = {"d128": 64, "d256": 64}


def _table(kind: str, arch: int, dk: int, dv: int, dtype: str, v_is_k: bool = True) -> list:
    """Dense table entries of ``kind`` with the block-sparse overrides applied."""
    cfgs = (dense_fwd_configs(arch, dk, dv, dtype, v_is_k) if kind == "fwd"
            else dense_bwd_configs(kind, arch, dk, dv, dtype, v_is_k))
    hc = head_class(dk, dv)
    if kind == "fwd" and dtype != "fp32" and hc in _FWD_MAX_BLOCK_N:
        cfgs = dedup(replace(c, block_n=min(c.block_n, _FWD_MAX_BLOCK_N[hc])) for c in cfgs)
    ov = _OVERRIDES.get((kind, arch_family(arch), hc, "fp32" if dtype == "fp32" else "16"))
    return [replace(c, **ov) for c in cfgs] if ov else cfgs


def dedup(items) -> list:
    """``items`` without repeats, in first-seen order (configs are hashable but their order matters)."""
    out = []
    for c in items:
        if c not in out:
            out.append(c)
    return out


def _fit(cfgs, fit_m, fit_n, odd_m: int, odd_n: int):
    """Table entries that already fit the mask (no tile spans two mask blocks, none padded) if any;
    else the first (preferred) entry fitted with ``fit_m(cfg)`` / ``fit_n(cfg)``; when no key tile
    divides the mask's key block, the first entry with ``odd_m x odd_n`` tiles (keys masked to
    the block). Keeps the set of compiled tiles small (:func:`compile_specs`)."""
    exact = [c for c in cfgs if fit_m(c) == c.block_m and fit_n(c) == c.block_n]
    if exact:
        return exact
    c = cfgs[0]
    n = fit_n(c)
    if n is None:
        return [replace(c, block_m=odd_m, block_n=odd_n)]
    return [replace(c, block_m=fit_m(c), block_n=n)]


def fwd_configs(arch: int, dk: int, dv: int, dtype: str, rows: int, block_n: int,
                v_is_k: bool = True) -> list[TileConfig]:
    """Forward candidates on ``arch`` for head dims (Dk, Dv), ``dtype`` ("fp16"/"bf16"/"fp32"), mask query
    blocks of ``rows`` packed rows and key blocks of ``block_n`` tokens (the dense table, fitted)."""
    mr = _min_rows(arch, dtype)
    cfgs = _fit(_table("fwd", arch, dk, dv, dtype, v_is_k), lambda c: fit_rows(c.block_m, rows, mr),
                lambda c: fit_keys(c.block_n, block_n, 16), mr, 16)
    if dtype == "fp32":  # FMA products, nothing to replicate
        return cfgs
    # The score dot feeds the value dot, so Triton lays its warps along M (16 rows per warp, a warpgroup
    # per 64 rows on sm90): a row tile fitted below 16 * num_warps would have every warp group compute
    # the same scores. Fewer warps instead (the absorbed shape on sm90: :data:`_FWD_D576_4WARPS`).
    if head_class(dk, dv) == "d576":
        if arch_family(arch) != 90:
            return cfgs
        return dedup(replace(c, num_warps=4, block_n=min(c.block_n, 32), **_FWD_D576_4WARPS)
                     if 16 * c.num_warps > c.block_m else c for c in cfgs)
    return dedup(replace(c, num_warps=max(4, min(c.num_warps, c.block_m // 16))) for c in cfgs)


#: sm90 fp16/bf16 d576 forward tiles fitted below 128 rows (the dense 128x32/v2/c256 8-warp tile on 64-row
#: mask blocks) run on 4 warps with q streamed in 64-column pieces, 2 stages, at most 32 keys a step
#: (triton 3.9, block-sparse variant): 64x32/v2/s 255 registers, 0 spills, 176 KiB with the v alias
#: (178 partial), modeled serial 0.34 (8 warps: 0.18, 3 of 4 dots replicated); without the alias the no-alias
#: table's 16 keys: 64x16/v2/s 0 spills, 156 KiB, 0.25. Spilled: q held or hoisted on 4 warps (8-104 bytes),
#: 64x32 without the alias (24-40 bytes streamed; 8 with 32-column pieces), 3 stages (244 KiB).
_FWD_D576_4WARPS = dict(num_stages=2, resident=True, stream=True, bc=64)


def bwd_configs(kind: str, arch: int, dk: int, dv: int, dtype: str, rows: int, block_n: int,
                v_is_k: bool = True) -> list[TileConfig]:
    """Backward candidates of ``kind`` ("dkdv" or "dq"), fitted like :func:`fwd_configs`. dK/dV keeps
    its key tile (the M side of its transposed products) >= 64 rows for fp16/bf16 on sm90."""
    mr = _min_rows(arch, dtype)
    cfgs = _table(kind, arch, dk, dv, dtype, v_is_k)
    if kind == "dq":
        return _unreplicated(kind, arch, dk, dv, dtype, _fit(cfgs, lambda c: fit_rows(c.block_m, rows, mr),
                                                     lambda c: fit_keys(c.block_n, block_n, 16), mr, 16))
    mn = 64 if arch_family(arch) == 90 and dtype != "fp32" else 16
    return _unreplicated(kind, arch, dk, dv, dtype, _fit(cfgs, lambda c: fit_rows(c.block_m, rows, 16),
                                                 lambda c: fit_keys(c.block_n, block_n, mn), 16, mn))


#: sm90 fp16/bf16 backward tiles whose chained product has fewer than 16 rows per warp, keyed (kind,
#: head class): caps on the 4-warp replacement where it spills (triton 3.9: d128 dQ 64x64 88 bytes,
#: d128 dK/dV 32x64 s3 16 bytes (s2: 0), d256 dK/dV 32x64 16 bytes and 16x64 s3 72 (s2: 0), d576 dK/dV
#: 32x64/v8/s/c32 8 bytes (16 rows: 0; 32 keys on 2 warps with 4 or 8 splits spill 4-888 bytes).
_UNREPLICATED_CAPS: dict[tuple[str, str], dict] = {
    ("dq", "d128"): dict(block_n=32),
    ("dkdv", "d128"): dict(num_stages=2),
    ("dkdv", "d256"): dict(block_m=16, num_stages=2),
    ("dkdv", "d576"): dict(block_m=16),
}


#: Largest sm90 fp16/bf16 dK/dV row tile (the N side of its score product: no replication) per head
#: class: the dense tables' 64x128 (d128) and 32x128 (192/128) spill 180-232 and 72 bytes with the
#: sparse walk's extra registers (triton 3.9).
_DKDV_MAX_BLOCK_M = {"d128": 32, "d256": 16}


def _unreplicated(kind: str, arch: int, dk: int, dv: int, dtype: str, cfgs: list[TileConfig]) -> list[TileConfig]:
    """Backward ``cfgs`` with at most one warp per 16 rows of the chained product's M side on sm90 fp16/bf16.

    The score product feeds the next product, so Triton lays it out with every warp along M (one
    warpgroup covers 64 rows): M = the key tile (dK/dV) or the row tile (dQ). A tile fitted down to 64
    rows with the table's 8 warps would compute its scores twice; it gets 4 warps, capped by
    :data:`_UNREPLICATED_CAPS` where that spills. dK/dV row tiles are capped by :data:`_DKDV_MAX_BLOCK_M`."""
    if arch_family(arch) != 90 or dtype == "fp32":
        return cfgs
    out = []
    for c in cfgs:
        if kind == "dkdv":
            c = replace(c, block_m=min(c.block_m, _DKDV_MAX_BLOCK_M.get(head_class(dk, dv), c.block_m)))
        m = c.block_n if kind == "dkdv" else c.block_m
        if 16 * c.num_warps > m:
            c = replace(c, num_warps=max(4, m // 16))
            caps = _UNREPLICATED_CAPS.get((kind, head_class(dk, dv)), {})
            c = replace(c, **{k: min(getattr(c, k), v) for k, v in caps.items()})
        out.append(c)
    return dedup(out)


def _interp_fwd(dk: int, dv: int, rows: int, block_n: int) -> TileConfig:
    c = fwd_interp_config(dk, dv)
    return replace(c, block_m=fit_rows(c.block_m, rows, 16), block_n=fit_keys(c.block_n, block_n, 16) or 16)


def _interp_bwd(dk: int, dv: int, rows: int, block_n: int) -> TileConfig:
    c = bwd_interp_config(dk, dv)
    return replace(c, block_m=fit_rows(c.block_m, rows, 16), block_n=fit_keys(c.block_n, block_n, 16) or 16)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def _mask_args(num, idx, name: str, n_blocks: int, B: int, Hq: int, device):
    """Kernel ``mask`` argument of one (count, index) pair: tensors and strides (0 on broadcast dims), and
    the mask's head dim.

    Raises ``ValueError``/``TypeError`` on host-checkable mismatches (shapes, dims, dtype, device).
    """
    for what, t, rank in ((f"{name}_num_blocks", num, 3), (f"{name}_indices", idx, 4)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            raise ValueError(f"block-sparse attention: {what} must be a {rank}-d int32 tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in (torch.int32, torch.int64, torch.int16):
            raise TypeError(f"block-sparse attention: {what} must be int32, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"block-sparse attention: {what} is on {t.device}, the inputs on {device}")
    Bm, Hm, nb = num.shape
    if tuple(idx.shape[:3]) != (Bm, Hm, nb) or nb != n_blocks or Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(
            f"block-sparse attention: {name}_num_blocks {tuple(num.shape)} / {name}_indices {tuple(idx.shape)} "
            f"do not fit batch {B}, {Hq} heads and {n_blocks} blocks (expected [1|{B}, 1|{Hq}, {n_blocks}(, w)])"
        )
    num = num if num.dtype == torch.int32 else num.to(torch.int32)
    idx = idx if idx.dtype == torch.int32 else idx.to(torch.int32)
    if idx.shape[3] == 0:  # no lane is ever read; give the kernel a valid pointer
        idx = torch.zeros((Bm, Hm, nb, 1), dtype=torch.int32, device=idx.device)
    sb = lambda t: t.stride(0) if Bm > 1 else 0  # noqa: E731
    sh = lambda t: t.stride(1) if Hm > 1 else 0  # noqa: E731
    return (num, idx, sb(num), sh(num), num.stride(2), sb(idx), sh(idx), idx.stride(2), idx.stride(3)), Hm


def _partial_args(part, idx, bits, name: str, bm: int, bn: int) -> dict:
    """Kernel keyword arguments of a mask's partial blocks (``{}`` without any): ``part`` int32 partial-block
    ids aligned with the walked index tensor ``idx`` (``-1`` = full block), ``bits`` int8/bool
    ``[P, BLOCK_M, BLOCK_N]`` token keep-bits, cut to the launched block size ``(bm, bn)`` (a block longer
    than the sequence holds all of it). ``idx`` must be contiguous: ``part`` is read with its strides.

    Raises ``ValueError`` when ``part`` does not have ``idx``'s shape or ``bits`` is not ``[P, >=bm, >=bn]``.
    """
    if bits is None or part is None or bits.shape[0] == 0:
        return {}
    if tuple(part.shape) != tuple(idx.shape) and not (idx.shape[3] == 1 and part.shape[3] == 0):
        raise ValueError(f"block-sparse attention: {name}_partial {tuple(part.shape)} must have the shape of "
                         f"{name}_indices {tuple(idx.shape)}")
    if bits.dim() != 3 or bits.shape[1] < bm or bits.shape[2] < bn:
        raise ValueError(f"block-sparse attention: partial_bits must be [P, BLOCK_M, BLOCK_N], got {tuple(bits.shape)}")
    if part.shape[3] == 0:  # no lane is ever read; give the kernel a valid pointer
        part = torch.full(idx.shape, -1, dtype=torch.int32, device=idx.device)
    bits = (bits.view(torch.int8) if bits.dtype == torch.bool else bits.to(torch.int8))[:, :bm, :bn].contiguous()
    return dict(partial=(part.to(torch.int32).contiguous(), bits), HAS_PARTIAL=True)


def _block_size(block_size, T: int, S: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_N)`` as given, and as launched: a block longer than the sequence holds all of it
    (there is one block then), so it is cut to ``T`` / ``S`` and no tile is spent past the end."""
    pair = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    if len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in pair):
        raise ValueError(f"block_size: expected positive ints (BLOCK_M, BLOCK_N), got {block_size!r}")
    bm, bn = pair
    return bm, bn, max(1, min(bm, T)), max(1, min(bn, S))


def _check_stat(name: str, t, B: int, Hq: int, T: int) -> None:
    if tuple(t.shape) != (B, Hq, T):
        raise ValueError(f"block-sparse attention: {name} must be [B, Hq, T] = {[B, Hq, T]}, got {list(t.shape)}")


_AUTOTUNERS: dict = {}


def _autotuned(kind: str, configs, dk: int, dv: int, v_is_k: bool):
    """``triton.autotune`` over fitted ``configs`` of kernel ``kind`` ("fwd", "dkdv", "dq")."""
    key = (kind, tuple(configs), dk, dv, v_is_k)
    if key not in _AUTOTUNERS:
        tconfigs = [triton.Config(_common.tile_constexprs(c, dk, dv, v_is_k), num_warps=c.num_warps,
                                  num_stages=c.num_stages) for c in configs]
        keys = ["G", "CAUSAL", "mask_geom", "HAS_PARTIAL"] + (["WRITE_MAXL"] if kind == "fwd" else [])
        _AUTOTUNERS[key] = triton.autotune(configs=tconfigs, key=keys)(_KERNELS[kind])
    return _AUTOTUNERS[key]


_KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}


def block_sparse_attention_fwd(q, k, v, kv_num_blocks, kv_indices, block_size: tuple[int, int],
                               softmax_scale: float, causal: bool, *, return_max_logit: bool = False,
                               out=None, lse=None, config: TileConfig | None = None, allow_tf32: bool | None = None,
                               kv_partial=None, partial_bits=None, sinks=None):
    """Block-sparse fused attention forward.

    Args:
        q: ``[B, T, Hq, Dk]``; k: ``[B, S, Hkv, Dk]``; v: ``[B, S, Hkv, Dv]``; fp16/bf16/fp32, same
            dtype and device (CUDA, or CPU under ``TRITON_INTERPRET=1``), any strides, ``Hq % Hkv == 0``;
            ``v`` may be a prefix view of ``k`` (detected, loaded once). Assumed validated.
        kv_num_blocks: int32 ``[Bm, Hm, ceil(T / BLOCK_M)]``; kv_indices: int32
            ``[Bm, Hm, ceil(T / BLOCK_M), max_kv]``, ascending in each row, first ``kv_num_blocks``
            lanes valid, entries in ``[0, ceil(S / BLOCK_N))``; ``Bm`` in {1, B}, ``Hm`` in {1, Hq};
            any strides (``mla.sparsity.BlockMask`` fields).
        block_size: the mask's ``(BLOCK_M, BLOCK_N)`` in tokens (any positive ints).
        softmax_scale: multiplies ``q·kᵀ``. causal: bottom-right aligned, applied inside listed blocks.
        return_max_logit: also return the per-(batch, head) maximum visible scaled score.
        out, lse: optional preallocated outputs (``[B, T, Hq, Dv]`` q.dtype any strides; contiguous fp32
            ``[B, Hq, T]``). config: force one :class:`kernels._common.TileConfig` (used as given);
            default: a pinned or deterministic choice among :func:`fwd_configs` (:mod:`kernels.tuning`),
            else autotune over them on GPU; one small fitted config under the interpreter.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32`` (:func:`kernels._common.dot_precision`).
        kv_partial, partial_bits: optional partial blocks (a FlexAttention mask's ``kv_*`` blocks):
            ``kv_partial`` int32 with ``kv_indices``' shape, per listed block the index of its token
            bitmask in ``partial_bits`` (int8/bool ``[P, BLOCK_M, BLOCK_N]``, nonzero = keep), ``-1`` for
            a full block. With them every listed sub-tile is masked by its bits (``HAS_PARTIAL``).
        sinks: contiguous fp32 ``[Hq]`` attention-sink logits or None (each joins its head's softmax
            denominator with no value; ``lse`` then includes it).

    Returns:
        ``(out [B, T, Hq, Dv] q.dtype, lse fp32 [B, Hq, T] (+inf where a row sees no key, unless sinks),
        max_logit fp32 [B, Hq] (-inf for heads that see nothing) or None)``.

    Raises:
        ValueError / TypeError: mask tensors that do not fit
        the inputs (shape, broadcast dims, dtype, device) or a non-positive block size.
    """
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bm0, _, bm, bn = _block_size(block_size, T, S)
    if partial_bits is not None:
        kv_indices = kv_indices.contiguous()  # kv_partial is read with its strides
    margs, Hm = _mask_args(kv_num_blocks, kv_indices, "kv", math.ceil(T / bm0), B, Hq, q.device)
    part = _partial_args(kv_partial, margs[1], partial_bits, "kv", bm, bn)
    out, lse, early = _common.fwd_outputs(q, Dv, out, lse, return_max_logit)
    if early is not None:
        return early
    G, kv_rep = packing(Hq, Hkv, Hm)
    rows = bm * G
    v_is_k = _common.is_prefix_alias(k, v)
    compiled = compiled_launch(q)
    n_qblocks = math.ceil(T / bm)
    dot = dot_precision(q.dtype, allow_tf32)

    def launch_args(maxl, n_mblocks):
        kw = dict(
            Q=q, K=k, V=v, O=out, LSE=lse, MAXL=maxl if maxl is not None else lse,
            q_strides=q.stride(), k_strides=k.stride(), v_strides=v.stride(), o_strides=out.stride(),
            T=T, S=S, Hkv=Hkv, qk_scale=_common.fwd_qk_scale(softmax_scale), n_mblocks=n_mblocks, opaque_zero=0,
            mask=margs, mask_geom=(bm, bn, kv_rep),
            G=G, G_P=_common.next_pow2(G), HEAD_DK=Dk, HEAD_DV=Dv, CAUSAL=bool(causal), V_IS_K=bool(v_is_k),
            WRITE_MAXL=maxl is not None, SPARSE=True, DOT=dot, OFF64=_common.needs_off64(k, v), **part,
        )
        if sinks is not None:
            kw.update(SINKS=sinks, HAS_SINKS=True)
        return kw

    grid_rows = lambda block_m: n_qblocks * triton.cdiv(rows, block_m)  # noqa: E731
    configs = fwd_configs(device_arch(q.device), Dk, Dv, dtype_name(q.dtype), rows, bn, v_is_k) if compiled else []
    if compiled and config is None:
        config = tuning.choose("block_sparse_fwd", head_class(Dk, Dv), configs)
    if compiled and config is None:
        n_mblocks = grid_rows(min(c.block_m for c in configs))
        # Blocks a larger BLOCK_M does not write stay -inf.
        maxl = (torch.full((B, Hq, n_mblocks), float("-inf"), dtype=torch.float32, device=q.device)
                if return_max_logit else None)
        grid = lambda meta: (grid_rows(meta["TILE"].BLOCK_M) * B * Hkv * kv_rep, meta["TILE"].NSPLIT)  # noqa: E731
        launch(_autotuned("fwd", configs, Dk, Dv, v_is_k), grid, **launch_args(maxl, n_mblocks))
    else:
        cfg = config or _interp_fwd(Dk, Dv, rows, bn)
        n_mblocks = grid_rows(cfg.block_m)
        # NaN: every entry must be written (amax propagates NaN, so a missed one fails the tests).
        maxl = (torch.full((B, Hq, n_mblocks), float("nan"), dtype=torch.float32, device=q.device)
                if return_max_logit else None)
        tile = _common.tile_constexprs(cfg, Dk, Dv, v_is_k)
        launch(attn_fwd_kernel, (n_mblocks * B * Hkv * kv_rep, tile["TILE"].NSPLIT), **launch_args(maxl, n_mblocks),
               **tile, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse, (maxl.amax(dim=-1) if maxl is not None else None)


def block_sparse_attention_bwd(do, q, k, v, out, lse, kv_num_blocks, kv_indices, q_num_blocks, q_indices,
                               block_size: tuple[int, int], softmax_scale: float, causal: bool, *,
                               dlse=None, dq=None, dk=None, dv=None, delta=None,
                               dkdv_config: TileConfig | None = None, dq_config: TileConfig | None = None,
                               allow_tf32: bool | None = None, kv_partial=None, q_partial=None, partial_bits=None,
                               sinks=None):
    """Block-sparse fused attention backward (deterministic: no atomics).

    Args:
        do: ``[B, T, Hq, Dv]`` upstream gradient; q, k, v, out, lse: as given to / returned by
            :func:`block_sparse_attention_fwd` (any strides; lse fp32 ``[B, Hq, T]``).
        kv_num_blocks, kv_indices: the forward's mask (the dQ pass walks them);
        q_num_blocks: int32 ``[Bm, Hm, ceil(S / BLOCK_N)]``, q_indices: int32
            ``[Bm, Hm, ceil(S / BLOCK_N), max_q]``: its transpose, ascending (the dK/dV pass walks them).
        block_size, softmax_scale, causal: as in the forward.
        dlse: optional fp32 ``[B, Hq, T]`` gradient of ``lse``; enters as ``delta - dlse``.
        dq, dk, dv: optional preallocated outputs (shapes of q, k, v; q.dtype; any strides).
        delta: optional fp32 ``[B, Hq, T]`` scratch. dkdv_config, dq_config: force tile configurations
            (used as given); default: a pinned or deterministic choice (:mod:`kernels.tuning`), else
            autotune on GPU; small fitted configs under the interpreter.
        allow_tf32: fp32 inputs only: TF32 products instead of IEEE fp32; ``None`` follows
            ``torch.backends.cuda.matmul.allow_tf32``.
        kv_partial, q_partial, partial_bits: the forward's partial blocks; ``q_partial`` has
            ``q_indices``' shape (ids of the transposed lists).
        sinks: the forward's fp32 ``[Hq]`` sinks or None (the kernels need nothing: ``lse`` includes them).

    Returns:
        ``(dq, dk, dv)`` in the input dtype, plus ``dsinks`` fp32 ``[Hq]`` with ``sinks``
        (:func:`kernels.attention_bwd.sink_grad`, deterministic). Keys no query block visits get zero
        dk/dv; rows that see no key get zero dq. With ``v`` a prefix view of ``k``, ``dk`` holds the score-path gradient
        and ``dv`` the value path (autograd sums them through the view).

    Raises:
        ValueError / TypeError: as in the forward.
    """
    B, T, Hq, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    bm0, bn0, bm, bn = _block_size(block_size, T, S)
    if partial_bits is not None:  # the partial ids are read with the index tensors' strides
        kv_indices, q_indices = kv_indices.contiguous(), q_indices.contiguous()
    kv_args, Hm = _mask_args(kv_num_blocks, kv_indices, "kv", math.ceil(T / bm0), B, Hq, q.device)
    q_args, Hm_q = _mask_args(q_num_blocks, q_indices, "q", math.ceil(S / bn0), B, Hq, q.device)
    kv_part = _partial_args(kv_partial, kv_args[1], partial_bits, "kv", bm, bn)
    q_part = _partial_args(q_partial, q_args[1], partial_bits, "q", bm, bn)
    _check_stat("lse", lse, B, Hq, T)
    if dlse is not None:
        _check_stat("dlse", dlse, B, Hq, T)
    if Hm_q != Hm:
        raise ValueError(f"block-sparse attention: q_num_blocks has head dim {Hm_q}, kv_num_blocks {Hm}")
    dq, dk, dv, done = _common.bwd_outputs(q, k, v, dq, dk, dv)
    if done and sinks is not None:  # no kernel: no key (P_sink = 1, delta = 0) or no query
        no_key = dlse is not None and S == 0
        return dq, dk, dv, (dlse.float().sum((0, 2)) if no_key else torch.zeros(Hq, device=q.device))
    if done:
        return dq, dk, dv
    G, kv_rep = packing(Hq, Hkv, Hm)
    rows = bm * G
    v_is_k = _common.is_prefix_alias(k, v)
    lse = lse.contiguous()  # offsets assume [B, Hq, T] contiguous
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device) if delta is None else delta
    compiled = compiled_launch(q)
    kw = bwd_kernel_args(q, k, v, do, lse, delta, softmax_scale, causal, v_is_k, dot_precision(q.dtype, allow_tf32),
                         T, S)
    kw.update(SPARSE=True, G=G)  # G: heads packed per row (1 with per-head lists)
    n_q, n_k = math.ceil(T / bm), math.ceil(S / bn)
    bwd_delta(out, do, delta, dlse)

    def run(kind, fixed, kern_kw, grid_of, tile_dim):
        """One backward kernel: ``fixed`` (or a pinned / deterministic choice) as given, else autotuned."""
        configs = []
        if compiled and fixed is None:
            configs = bwd_configs(kind, device_arch(q.device), Dk, Dv, dtype_name(q.dtype), rows, bn, v_is_k)
            fixed = tuning.choose(f"block_sparse_{kind}", head_class(Dk, Dv), configs)
        if compiled and fixed is None:
            grid = lambda meta: (grid_of(getattr(meta["TILE"], tile_dim)), meta["TILE"].NSPLIT)  # noqa: E731
            launch(_autotuned(kind, configs, Dk, Dv, v_is_k), grid, **kern_kw)
            return
        cfg = fixed or _interp_bwd(Dk, Dv, rows, bn)
        tile = _common.tile_constexprs(cfg, Dk, Dv, v_is_k)
        launch(_KERNELS[kind], (grid_of(getattr(cfg, tile_dim.lower())), tile["TILE"].NSPLIT), **kern_kw, **tile,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    geom = (bm, bn, kv_rep)
    run("dkdv", dkdv_config, dict(kw, DK=dk, DV=dv, dk_strides=dk.stride(), dv_strides=dv.stride(), mask=q_args,
                                  mask_geom=geom, **q_part),
        lambda block_n: n_k * triton.cdiv(bn, block_n) * B * Hkv, "BLOCK_N")
    run("dq", dq_config, dict(kw, DQ=dq, dq_strides=dq.stride(), mask=kv_args, mask_geom=geom, **kv_part),
        lambda block_m: n_q * triton.cdiv(rows, block_m) * B * Hkv * kv_rep, "BLOCK_M")
    if sinks is not None:
        return dq, dk, dv, sink_grad(sinks, lse, delta)
    return dq, dk, dv
