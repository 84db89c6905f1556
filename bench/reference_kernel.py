"""A minimal flash-attention forward: the yardstick of ``python -m bench.static_model``.

Written for this repository in the style of Triton's fused-attention tutorial (one program per
``BLOCK_M`` query rows of one head, online softmax in base 2, an unmasked loop over the key blocks
every row sees, then a masked loop over the diagonal / tail blocks; FlashAttention-2, Dao 2023,
arXiv 2307.08691). It has none of the project's features (no GQA packing, no value splits, no
block masks): it is the plain d128 forward against which the project's kernels are modeled, so
every static-model table carries a "modeled efficiency ÷ reference's" column. The modeled
configuration is the tutorial's Hopper d128 one: 128 x 128 tiles, 8 warps, 3 stages
(:data:`REFERENCE_CONFIG`).

Layout as the project's (docs/design.md §3): ``q [B, T, H, D]``, ``k, v [B, S, H, D]``, any strides.
Causal masking is top-left aligned and needs ``T == S`` (query ``i`` sees key ``j <= i``).
"""

from __future__ import annotations

from kernels._config import HAS_TRITON, CompileSpec

if HAS_TRITON:
    import triton
    import triton.language as tl

__all__ = ["REFERENCE_CONFIG", "reference_attention", "reference_spec"]

#: (BLOCK_M, BLOCK_N, num_warps, num_stages) modeled per architecture: the tutorial's d128 Hopper
#: config; on sm80 128 x 64 (128 x 128 with 3 stages spills 56 bytes there).
REFERENCE_CONFIG = {90: (128, 128, 8, 3), 80: (128, 64, 8, 3)}
REFERENCE_HEAD_DIM = 128
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if HAS_TRITON:

    @triton.jit
    def _ref_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, S, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr):
        """One key block: scores, online-softmax update, ``acc += P V``. ``MASKED`` blocks check
        the key range (and causality); the others are known to be fully visible."""
        if MASKED:
            in_range = (start_n + offs_n) < S
            k = tl.load(k_ptrs, mask=in_range[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None], other=0.0)
            keep = in_range[None, :]
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= (start_n + offs_n)[None, :])
            s = tl.where(keep, tl.dot(q, k) * qk_scale, float("-inf"))
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
            s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, l_i, m_new

    @triton.jit
    def _ref_attn_fwd(Q, K, V, O, LSE, sqb, sqt, sqh, skb, sks, skh, svb, svs, svh, sob, sot, soh,
                      H, T, S, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      CAUSAL: tl.constexpr):
        """Grid ``(cdiv(T, BLOCK_M), B * H)``; last dim contiguous; ``qk_scale = softmax_scale * log2(e)``;
        ``LSE [B, H, T]`` fp32 in natural log."""
        start_m = tl.program_id(0)
        b = tl.program_id(1) // H
        h = tl.program_id(1) % H
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        row_ok = offs_m < T
        q = tl.load(Q + b.to(tl.int64) * sqb + h * sqh + offs_m[:, None].to(tl.int64) * sqt + offs_d[None, :],
                    mask=row_ok[:, None], other=0.0)
        k_base = K + b.to(tl.int64) * skb + h * skh + offs_n[None, :].to(tl.int64) * sks + offs_d[:, None]
        v_base = V + b.to(tl.int64) * svb + h * svh + offs_n[:, None].to(tl.int64) * svs + offs_d[None, :]
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        # Blocks every row of the tile sees entirely: below the diagonal block (causal) or all full blocks.
        full_end = (start_m * BLOCK_M) // BLOCK_N * BLOCK_N if CAUSAL else S // BLOCK_N * BLOCK_N
        for start_n in range(0, full_end, BLOCK_N):
            acc, l_i, m_i = _ref_block(acc, l_i, m_i, q, k_base + start_n * sks,
                                       v_base + start_n * svs, start_n, offs_m, offs_n, S, qk_scale,
                                       False, CAUSAL)
        end = tl.minimum((start_m + 1) * BLOCK_M, S) if CAUSAL else S
        for start_n in range(full_end, end, BLOCK_N):
            acc, l_i, m_i = _ref_block(acc, l_i, m_i, q, k_base + start_n * sks,
                                       v_base + start_n * svs, start_n, offs_m, offs_n, S, qk_scale,
                                       True, CAUSAL)
        acc = acc / l_i[:, None]
        tl.store(O + b.to(tl.int64) * sob + h * soh + offs_m[:, None].to(tl.int64) * sot + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (b * H + h).to(tl.int64) * T + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
                 mask=row_ok)


def reference_attention(q, k, v, causal: bool = False, softmax_scale: float | None = None,
                        block_m: int = 128, block_n: int = 128, num_warps: int = 8, num_stages: int = 3):
    """Run the reference forward: ``(out [B, T, H, D] in q's dtype, lse [B, H, T] fp32)``.

    ``q [B, T, H, D]``, ``k, v [B, S, H, D]``: same dtype (fp16, bf16, fp32), same device, ``D`` a
    power of two >= 16, the last dim contiguous; ``softmax_scale`` defaults to ``D ** -0.5``. On CPU
    tensors it needs ``TRITON_INTERPRET=1``. Raises ``ValueError`` / ``TypeError`` naming the bad
    argument (shapes, dtypes, ``causal`` with ``T != S``, block sizes not powers of two >= 16).
    """
    import torch

    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"reference_attention: {name} must be a 4-D tensor [B, T|S, H, D], got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dtype != q.dtype:
            raise TypeError(f"reference_attention: {name} must be fp16/bf16/fp32 like q ({q.dtype}), got {x.dtype}")
        if x.stride(-1) != 1:
            raise ValueError(f"reference_attention: {name} must have a contiguous last dim, got strides {x.stride()}")
    B, T, H, D = q.shape
    S = k.shape[1]
    if k.shape != (B, S, H, D) or v.shape != (B, S, H, D):
        raise ValueError(f"reference_attention: k and v must be [B={B}, S, H={H}, D={D}], got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"reference_attention: head dim must be a power of two >= 16, got {D}")
    if causal and T != S:
        raise ValueError(f"reference_attention: causal needs T == S, got T={T}, S={S}")
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"reference_attention: {name} must be a power of two >= 16, got {blk}")
    if causal and block_m % block_n:
        raise ValueError(f"reference_attention: causal needs block_n to divide block_m, got {block_m}, {block_n}")
    scale = D ** -0.5 if softmax_scale is None else float(softmax_scale)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((B, H, T), float("nan"), dtype=torch.float32, device=q.device)
    if B * H * T == 0:
        return out, lse
    grid = (triton.cdiv(T, block_m), B * H)
    _ref_attn_fwd[grid](q, k, v, out, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
                        H, T, S, scale * LOG2E, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
                        num_warps=num_warps, num_stages=num_stages)
    return out, lse


def reference_spec(arch: int, dtype: str = "bf16", causal: bool = True) -> CompileSpec:
    """CompileSpec of the reference forward for contiguous d128 inputs (B=2, T=S=4096, H=16) with
    :data:`REFERENCE_CONFIG`, as a launch would specialise it."""
    from kernels._compile import Pointer, spec_args

    bm, bn, warps, stages = REFERENCE_CONFIG[90 if arch >= 90 else 80]
    d, H, T = REFERENCE_HEAD_DIM, 16, 4096
    ptr = Pointer(dtype)
    sb, st, sh = T * H * d, H * d, d
    values = dict(Q=ptr, K=ptr, V=ptr, O=ptr, LSE=Pointer("fp32"), sqb=sb, sqt=st, sqh=sh, skb=sb, sks=st, skh=sh,
                  svb=sb, svs=st, svh=sh, sob=sb, sot=st, soh=sh,
                  H=H, T=T, S=T, qk_scale=0.1, HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal)
    sig, consts, divisible = spec_args(_ref_attn_fwd, values)
    return CompileSpec(kernel="reference_fwd", fn=_ref_attn_fwd, signature=sig, constexprs=consts,
                       num_warps=warps, num_stages=stages, arch=arch, dtype=dtype, head_dims=(d, d),
                       tile=f"{bm}x{bn}", extra={"divisible": divisible, "group": 1, "causal": causal,
                                                 "block_m": bm, "block_n": bn})
