"""Compile specifications of the top-k sparse and decode kernels (the dense family's: :mod:`kernels._specs`):
every configuration their launchers may pick, as :class:`kernels._config.CompileSpec` for
:mod:`kernels._compile` (``python -m bench.compile_report``, ``tests/test_compile_check.py``; DESIGN §9). The op modules
expose them as ``compile_specs(arch)``. Each spec's argument values are those of a representative contiguous launch,
specialised by :func:`kernels._compile.spec_args` as the JIT would (ints equal to 1 constexpr, 16-divisible
ints and aligned pointers ``tt.divisibility``).
"""

from __future__ import annotations

import torch

from kernels._common import cdiv, dot_precision, dtype_name, next_pow2
from kernels._compile import Pointer, spec_args, spec_divisible
from kernels._config import HAS_TRITON, CompileSpec
from kernels.topk_configs import KINDS, TopkConfig, plan_constexprs, topk_config

__all__ = ["SPEC_DTYPES", "SPEC_FP32_SHAPES", "SPEC_SHAPES", "decode_compile_specs", "decode_split_spec",
           "topk_compile_specs", "topk_spec"]


# --------------------------------------------------------------------------------------------
# top-k sparse attention (kernels/topk_sparse.py)
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
    T = S = 4097
    KT = 2048
    ptr, f32, i32 = Pointer(dtype), Pointer("fp32"), Pointer("i32")
    dvs = dk if v_is_k else dv  # v's row strides are k's when it is a view of k
    nkb = cdiv(S, cfg.block_n)
    vals = dict(
        Q=ptr, K=ptr, V=ptr, O=ptr, DO=ptr, DQ=ptr, DK=ptr, DV=ptr, IDX=i32, LSE=f32, MAXL=f32, DELTA=f32,
        DKA=f32, DVA=f32, partials=(f32, f32), index=(i32, i32, i32, Pointer("i64")),
        q_str=(T * hq * dk, hq * dk, dk), k_str=(S * hkv * dk, hkv * dk, dk), v_str=(S * hkv * dvs, hkv * dvs, dvs),
        do_str=(T * hq * dv, hq * dv, dv), idx_str=(T * hkv * KT, hkv * KT, KT), o_str=(T * hq * dv, hq * dv, dv),
        lse_str=(hq * T, T, 1), dq_str=(T * hq * dk, hq * dk, dk), dka_str=(S * hkv * dk, hkv * dk, dk),
        dva_str=(S * hkv * dv, hkv * dv, dv), dk_str=(S * hkv * dk, hkv * dk, dk), dv_str=(S * hkv * dv, hkv * dv, dv),
        dims=(T, S, hkv, nkb if kind == "dkdv_det" else KT),
        qk_scale=0.1, scales=(0.1, 0.07), opaque_zero=0,
        G=hq // hkv, HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, WRITE_MAXL=True,
        V_IS_K=v_is_k and not (kind == "dkdv_det" and cfg.load_v),
        WRITE_DQ=kind == "dq", ATOMIC_DKDV=part if kind == "dkdv_atomic" else 0, PARTS=part,
        DOT=dot_precision(dtype, False),
        OFF64=off64,
        **plan_constexprs(cfg, dk, dv, v_is_k),
        SINKS=Pointer("fp32"), HAS_SINKS=False,
    )
    return vals


def topk_spec(kind: str, arch: int, dtype: str, dk: int, dv: int, hq: int, hkv: int, v_is_k: bool,
              causal: bool = True, cfg: TopkConfig | None = None, off64: bool = False,
              part: int = 3) -> CompileSpec:
    """CompileSpec of one top-k kernel (``kind`` in ``KINDS``) for a contiguous launch of that shape;
    ``off64``: the int64 row-offset variant (tensors with a batch entry of 2^31 elements or more);
    ``part``: dK/dV kinds: 1 = the dV launch, 2 = the dK launch, 3 = both in one."""
    cfg = cfg or topk_config(kind, arch, dk, dv, hq // hkv, dtype, interpret=False, v_is_k=v_is_k)
    from kernels import topk_sparse as tk

    fn = {"fwd": tk._topk_fwd_kernel, "dq": tk._topk_bwd_q_kernel, "dkdv_atomic": tk._topk_bwd_q_kernel,
          "dkdv_det": tk._topk_bwd_kv_det_kernel}[kind]
    values = _spec_values(kind, dtype, dk, dv, hq, hkv, v_is_k, causal, cfg, off64, part)
    sig, consts, divisible = spec_args(fn, values)
    suffix = {1: "_dv", 2: "_dk", 3: ""}[part if kind.startswith("dkdv") else 3]
    return CompileSpec(
        kernel=f"topk_{kind}{suffix}", fn=fn, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, arch=arch, dtype=dtype, head_dims=(dk, dv), tile=cfg.tile,
        extra={**spec_divisible(divisible), "group": hq // hkv, "v_is_k": v_is_k, "causal": causal, "config": cfg,
               "heads": hq, "off64": off64, "kind": kind, "part": part, "wgmma": cfg.wgmma},
    )


def _aux_specs(arch: int, dtype: str, dv: int) -> list[CompileSpec]:
    from kernels import topk_sparse as tk

    T, hq, S = 4097, 128, 4097
    out = []
    bd = min(128, max(16, next_pow2(dv)))
    vals = dict(O=Pointer(dtype), DO=Pointer(dtype), DLSE=Pointer("fp32"), DELTA=Pointer("fp32"),
                o_str=(T * hq * dv, hq * dv, dv, 1), do_str=(T * hq * dv, hq * dv, dv, 1),
                dlse_str=(hq * T, T, 1), T=T, Hq=hq, HEAD_DV=dv, HAS_DLSE=True, BLOCK_T=64, BLOCK_D=bd)
    sig, consts, div = spec_args(tk._topk_bwd_pre_kernel, vals)
    out.append(CompileSpec(kernel="topk_bwd_pre", fn=tk._topk_bwd_pre_kernel, signature=sig, constexprs=consts,
                           num_warps=4, num_stages=1, arch=arch, dtype=dtype, head_dims=(dv, dv), tile=f"64x{bd}",
                           extra=spec_divisible(div)))
    bd = min(64, max(16, next_pow2(dv)))
    vals = dict(P=Pointer("fp32"), OUT=Pointer(dtype), MULTI=Pointer("i64"), out_str=(S * dv, dv, dv), S=S,
                Hkv=1, NKB=cdiv(S, 64), D=dv, BLOCK_N=64, BLOCK_D=bd)
    sig, consts, div = spec_args(tk._topk_reduce_kernel, vals)
    out.append(CompileSpec(kernel="topk_reduce", fn=tk._topk_reduce_kernel, signature=sig, constexprs=consts,
                           num_warps=4, num_stages=1, arch=arch, dtype=dtype, head_dims=(dv, dv), tile=f"64x{bd}",
                           extra=spec_divisible(div)))
    return out


def topk_compile_specs(arch: int) -> list[CompileSpec]:
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


# --------------------------------------------------------------------------------------------
# paged MLA decode (kernels/decode.py)
# --------------------------------------------------------------------------------------------
def decode_split_spec(arch: int, dtype: torch.dtype, dk: int, dv: int, num_heads: int, q_len: int,
                      causal: bool, topk: bool, direct: bool, page_size: int = 64, num_splits: int = 16,
                      topk_k: int = 2048, max_pages: int = 33, kv_fp8: bool = False, sinks: bool = False,
                      window: bool = False) -> CompileSpec:
    """CompileSpec of the decode split kernel for one launch mode (a contiguous launch of that shape)."""
    from kernels import decode

    fn = decode._mla_decode_split_kernel
    cfg = decode.decode_config(dk, dv, dtype, arch, kv_fp8=kv_fp8, rows=num_heads if topk else num_heads * q_len,
                               interpret=False)
    ty = dtype_name(dtype)
    H, T = num_heads, q_len
    S = 1 if direct else num_splits
    # row of the cache in elements of KV: dk values, or the fp8_ds_mla bytes (656 for 576/512)
    row = -(-(dv + dv // 32 + 2 * (dk - dv)) // 16) * 16 if kv_fp8 else dk
    values = dict(Q=Pointer(ty), KV=Pointer("u8" if kv_fp8 else ty), BLOCK_TABLE=Pointer("i32"),
                  SEQLENS=Pointer("i32"), TOPK=Pointer("i32"), OUT=Pointer(ty if direct else "fp32"),
                  LSE=Pointer("fp32"), sm_scale_log2=0.1, SINKS=Pointer("fp32"))
    # a contiguous launch: q [B, T, H, dk], cache pages of page_size rows, partials [B, T, H, S, dv]
    values.update(q_str=(T * H * dk, dk), kv_str=(page_size * row, row, max_pages), tk_str=(T * topk_k, topk_k),
                  dims=(H, T, topk_k if topk else 0), WIN_L=127 if window else -1)
    if direct:  # out [B, T, H, dv], lse [B, H, T]
        values.update(o_str=(T * H * dv, dv, 0), lse_str=(H * T, 1, T, 0))
    else:
        values.update(o_str=(T * H * S * dv, S * dv, dv), lse_str=(T * H * S, H * S, S, 1))
    values.update(DK=dk, DV=dv, PAGE_SIZE=page_size, IS_CAUSAL=causal, HAS_TOPK=topk, DIRECT=direct,
                  BLOCK_H=cfg["BLOCK_H"], BLOCK_N=cfg["BLOCK_N"], BLOCK_DV=cfg["BLOCK_DV"],
                  DV_SPLIT=cfg["DV_SPLIT"], BLOCK_DR=cfg["BLOCK_DR"],
                  DOT_PRECISION=dot_precision(dtype, False), KV_FP8=kv_fp8, FP8_NATIVE=arch >= 89,
                  HAS_SINKS=sinks and direct, HAS_WINDOW=window)
    signature, constexprs, divisible = spec_args(fn, values)
    mode = ("topk" if topk else "dense") + ("-causal" if causal else "") + ("-direct" if direct else "-split")
    mode += ("-fp8kv" if kv_fp8 else "") + ("-sinks" if sinks and direct else "") + ("-window" if window else "")
    return CompileSpec(
        kernel="mla_decode_split", fn=fn, signature=signature, constexprs=constexprs,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], arch=arch, dtype=ty, head_dims=(dk, dv),
        tile=f"{cfg['BLOCK_H']}x{cfg['BLOCK_N']}xV{cfg['DV_SPLIT']}*{cfg['BLOCK_DV']}+R{cfg['BLOCK_DR']}",
        extra={**spec_divisible(divisible), "num_heads": H, "q_len": T, "mode": mode, "page_size": page_size},
    )


def _combine_spec(arch: int, dtype: torch.dtype, dv: int, num_heads: int = 128, q_len: int = 1,
                  num_splits: int = 16, sinks: bool = False) -> CompileSpec:
    from kernels import decode

    fn = decode._mla_decode_combine_kernel
    cfg = decode.combine_config(dv, num_splits)
    ty = dtype_name(dtype)
    H, T, S = num_heads, q_len, num_splits
    values = dict(O_PART=Pointer("fp32"), LSE_PART=Pointer("fp32"), OUT=Pointer(ty), LSE=Pointer("fp32"),
                  SINKS=Pointer("fp32"), NUM_SPLITS=S, H=H, TQ=T, part_str=(S * dv, dv, S),
                  o_str=(T * H * dv, H * dv, dv), lse_str=(H * T, T, 1),
                  DV=dv, BLOCK_S=cfg["BLOCK_S"], BLOCK_DV=cfg["BLOCK_DV"], HAS_SINKS=sinks)
    signature, constexprs, divisible = spec_args(fn, values)
    return CompileSpec(
        kernel="mla_decode_combine", fn=fn, signature=signature, constexprs=constexprs,
        num_warps=cfg["num_warps"], num_stages=1, arch=arch, dtype=ty, head_dims=(dv, dv),
        tile=f"S{cfg['BLOCK_S']}xV{cfg['BLOCK_DV']}" + ("/sink" if sinks else ""),
        extra={**spec_divisible(divisible), "num_heads": H, "q_len": T, "num_splits": S},
    )


def decode_compile_specs(arch: int) -> list[CompileSpec]:
    """Every configuration the decode launcher may pick on a GPU, for ahead-of-time compile checks.

    ``arch`` is the compute capability (80, 86, 89, 90...). For fp16 and bf16: the split kernel for
    the absorbed DeepSeek shape (Dk, Dv) = (576, 512) with H = 128 in its launch modes (dense Tq = 1
    with split partials; dense causal Tq = 2 written directly; top-k causal Tq = 1 with split
    partials), H = 16 (dense causal Tq = 2, split partials), H = 1 (dense causal, Tq = 1), and a
    generic shape (80, 64) (dense causal, Tq = 2: masked rope block); the combine kernel for Dv = 512
    and 64; with attention sinks the direct 576/512 split kernel and the Dv = 512 combine; the FP8 cache
    (bf16 queries) in the three H = 128 modes and H = 16. For fp32 (IEEE products): the absorbed split
    kernel, dense and top-k, and its combine.
    The tile depends on the rows per sequence (``Tq * H``, top-k ``H``: ``decode_config(rows=)``); H and Tq
    also change the launch specialisation. Signatures
    are specialised as a contiguous launch is (ints equal to 1 constexpr; ``extra["divisible"]``
    names the 16-divisible ints and aligned pointers, as ``kernels._compile.compile_spec``
    expects); without those hints the loads are not vectorised and the 576/512 kernel spills.
    Returns an empty list without Triton.
    """
    if not HAS_TRITON:
        return []
    specs = []
    for dtype in (torch.float16, torch.bfloat16):
        specs.append(decode_split_spec(arch, dtype, 576, 512, 128, 1, causal=False, topk=False, direct=False))
        specs.append(decode_split_spec(arch, dtype, 576, 512, 128, 2, causal=True, topk=False, direct=True))
        specs.append(decode_split_spec(arch, dtype, 576, 512, 128, 1, causal=True, topk=True, direct=False))
        specs.append(decode_split_spec(arch, dtype, 576, 512, 16, 2, causal=True, topk=False, direct=False))
        specs.append(decode_split_spec(arch, dtype, 576, 512, 1, 1, causal=True, topk=False, direct=False))
        specs.append(decode_split_spec(arch, dtype, 80, 64, 8, 2, causal=True, topk=False, direct=False))
        specs.append(_combine_spec(arch, dtype, 512))
        specs.append(_combine_spec(arch, dtype, 64, num_heads=8, q_len=2))
        # attention sinks (issue 14): added in the direct split kernel, or once in the combine
        specs.append(decode_split_spec(arch, dtype, 576, 512, 128, 2, causal=True, topk=False, direct=True,
                                       sinks=True, window=True))
        specs.append(decode_split_spec(arch, dtype, 576, 512, 128, 1, causal=True, topk=False, direct=False,
                                       window=True))
        specs.append(_combine_spec(arch, dtype, 512, sinks=True))
    # FP8 (fp8_ds_mla) cache, bf16 queries: DeepSeek-V3.2's serving format, in the three 576/512 launch modes
    for causal, topk, direct, q_len in ((False, False, False, 1), (True, False, True, 2), (True, True, False, 1)):
        specs.append(decode_split_spec(arch, torch.bfloat16, 576, 512, 128, q_len, causal=causal, topk=topk,
                                 direct=direct, kv_fp8=True))
    # ... and with 16 heads (the sm90 64-row tile)
    specs.append(decode_split_spec(arch, torch.bfloat16, 576, 512, 16, 2, causal=True, topk=False, direct=False,
                                   kv_fp8=True))
    # fp32 (IEEE products): the absorbed shape, dense and top-k, and its combine.
    specs.append(decode_split_spec(arch, torch.float32, 576, 512, 128, 1, causal=False, topk=False, direct=False))
    specs.append(decode_split_spec(arch, torch.float32, 576, 512, 128, 1, causal=True, topk=True, direct=False))
    specs.append(_combine_spec(arch, torch.float32, 512))
    return specs
