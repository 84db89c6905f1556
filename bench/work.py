"""Work formulas of the benchmarks: FLOPs, compulsory bytes and (query, key) pairs per case.

Units everywhere: time in milliseconds (ms), throughput in TFLOP/s (10¹² floating-point operations per
second) and GB/s (10⁹ bytes per second), memory in bytes (reports show MiB = 2²⁰ bytes).

Work formulas (DESIGN §7). ``pairs`` is the number of (query, key) score entries actually computed,
summed over batch and query heads: ``B · Hq · T · S_eff`` where ``S_eff`` is the average number of keys
a query sees. Bottom-right causal (query ``i`` sees key ``j`` iff ``j <= i + S - T``) gives exactly
``Σ_i clamp(i + S - T + 1, 0, S)`` per head (``causal_pairs``), which is ``T·(T+1)/2`` for ``T = S``.

* forward:  ``2 · pairs · (Dk + Dv)``     (``S = Q·Kᵀ``: 2·Dk per pair; ``O = P·V``: 2·Dv per pair)
* backward: ``2 · pairs · (3·Dk + 2·Dv)`` (FlashAttention-2 style, recomputing the scores: ``S = Q·Kᵀ``
  2·Dk, ``dV = Pᵀ·dO`` 2·Dv, ``dP = dO·Vᵀ`` 2·Dv, ``dQ = dS·K`` 2·Dk, ``dK = dSᵀ·Q`` 2·Dk per pair).
  For ``Dk = Dv`` this is the usual 2.5 × forward.
* forward + backward: the sum, ``2 · pairs · (4·Dk + 3·Dv)``.

Softmax exponentials and scaling are not counted (they are not matmul FLOPs; the ceiling is a matmul).

Bytes are the compulsory HBM/DRAM traffic, every tensor read or written exactly once (``e`` = element
size, ``lse`` fp32; when ``v`` is a prefix view of ``k``, as in absorbed MLA, ``v`` costs nothing extra
and its gradient is part of ``dk``):

* forward:  ``e·(|q| + |k| + |v| + |o|) + 4·B·Hq·T``
* backward: reads ``q, k, v, o, dO, lse``, writes ``dq, dk, dv``: ``e·(2|q| + 2|k| + 2|v| + 2|o|) + 4·B·Hq·T``
* decode:   ``e·(Σ_b L_b · Dk + B·Tq·H·(Dk + Dv)) + 4·B·H·Tq`` (cache rows of every sequence, ``q``,
  ``out``, ``lse``; the block table is ignored).

GB/s and TFLOP/s are these counts divided by the median time; ``frac_flops`` / ``frac_bw`` divide them by
the ceilings measured in the same run (``measure_ceilings``: a large matmul and a large copy).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# ---------------------------------------------------------------------------------------------------
# Work formulas
# ---------------------------------------------------------------------------------------------------
MODES = ("fwd", "bwd", "fwd+bwd")


def causal_pairs(T: int, S: int) -> int:
    """(query, key) pairs of one head under bottom-right causal masking: ``Σ_i clamp(i + S − T + 1, 0, S)``.

    Rows ``i < T − S`` see nothing; row ``i >= max(0, T − S)`` sees ``i + S − T + 1`` keys (at most ``S``),
    an arithmetic series. ``T = S`` gives ``T·(T+1)/2``.
    """
    if T <= 0 or S <= 0:
        return 0
    i0 = max(0, T - S)
    first, last, count = i0 + S - T + 1, S, T - i0
    return (first + last) * count // 2


def visible_pairs(T: int, S: int, causal: bool) -> int:
    """Pairs of one head for a dense attention: ``T·S``, or ``causal_pairs(T, S)``."""
    return causal_pairs(T, S) if causal else max(T, 0) * max(S, 0)


def attention_flops(pairs: int | float, Dk: int, Dv: int, mode: str) -> float:
    """Matmul FLOPs of an attention over ``pairs`` score entries (summed over batch and heads).

    fwd ``2·pairs·(Dk+Dv)``; bwd ``2·pairs·(3·Dk+2·Dv)`` (scores recomputed); fwd+bwd the sum.
    """
    fwd = 2.0 * pairs * (Dk + Dv)
    bwd = 2.0 * pairs * (3 * Dk + 2 * Dv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def attention_bytes(B: int, T: int, S: int, Hq: int, Hkv: int, Dk: int, Dv: int, elt: int, mode: str,
                    v_view: bool = False) -> float:
    """Compulsory bytes of an attention pass (each tensor touched once; ``lse`` fp32).

    ``elt``: bytes per element of q/k/v/out. ``v_view``: ``v`` is a prefix view of ``k`` (no extra bytes).
    fwd ``e(|q|+|k|+|v|+|o|) + 4·B·Hq·T``; bwd ``e(2|q|+2|k|+2|v|+2|o|) + 4·B·Hq·T``; fwd+bwd the sum.
    """
    q = B * T * Hq * Dk * elt
    k = B * S * Hkv * Dk * elt
    v = 0 if v_view else B * S * Hkv * Dv * elt
    o = B * T * Hq * Dv * elt
    lse = 4 * B * Hq * T
    fwd = q + k + v + o + lse
    bwd = 2 * (q + k + v + o) + lse
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def block_mask_pairs(block_mask, causal: bool) -> float:
    """Pairs per (batch, head) kept by an ``mla.sparsity.BlockMask`` (averaged over its batch/head dims).

    Every token of a listed block is kept, except what bottom-right ``causal`` removes. Exact count.
    """
    T, S = block_mask.seq_lengths
    bm, bn = block_mask.BLOCK_SIZE
    grid = block_mask.to_dense()  # [Bm, Hm, nQ, nK]
    nk = grid.shape[-1]
    dev = grid.device
    i = torch.arange(T, device=dev)
    kstart = torch.arange(nk, device=dev) * bn
    kend = torch.clamp(kstart + bn, max=S)
    if causal:
        cnt = (torch.minimum(i[:, None] + (S - T) + 1, kend[None, :]) - kstart[None, :]).clamp(min=0)
    else:
        cnt = (kend - kstart)[None, :].expand(T, nk)
    rows = grid[:, :, i // bm, :]  # [Bm, Hm, T, nK]
    total = (rows.to(torch.float64) * cnt.to(torch.float64)).sum(dim=(-1, -2))
    return float(total.mean())


def topk_pairs(topk_indices: torch.Tensor, S: int, causal: bool, Hq: int) -> int:
    """Pairs computed for top-k indices ``[B, T, Hkv, K]`` (summed over batch and the ``Hq`` query heads).

    A lane counts when ``0 <= idx < S`` and, if ``causal``, ``idx <= i + S − T``.
    """
    B, T, Hkv, _ = topk_indices.shape
    idx = topk_indices.long()
    valid = (idx >= 0) & (idx < S)
    if causal:
        lim = torch.arange(T, device=idx.device) + (S - T)
        valid &= idx <= lim[None, :, None, None]
    return int(valid.sum()) * (Hq // Hkv)


def decode_pairs(seqlens: Sequence[int], Tq: int, H: int, causal: bool) -> int:
    """Pairs of a decode step: per sequence of length ``L`` query ``j < Tq`` sees ``L − Tq + j + 1`` keys
    (clamped to ``[0, L]``) when ``causal``, else ``L``; times ``H`` heads."""
    total = 0
    for L in seqlens:
        for j in range(Tq):
            total += min(max(L - Tq + j + 1, 0), L) if causal else L
    return total * H


def decode_bytes(seqlens: Sequence[int], Tq: int, H: int, Dk: int, Dv: int, elt: int) -> float:
    """Compulsory bytes of a decode step: ``e·(ΣL·Dk + B·Tq·H·(Dk+Dv)) + 4·B·H·Tq`` (cache, q, out, lse)."""
    B = len(seqlens)
    return float(elt * (sum(seqlens) * Dk + B * Tq * H * (Dk + Dv)) + 4 * B * H * Tq)


def matmul_flops(m: int, n: int, k: int) -> float:
    """``2·m·n·k``."""
    return 2.0 * m * n * k
