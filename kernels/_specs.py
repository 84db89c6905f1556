"""Compile specs: every kernel configuration a launcher may pick, described for ahead-of-time compilation
(:class:`kernels._config.CompileSpec`, compiled by :mod:`kernels._compile`, ``bench.compile_report`` and the
compile check) for a GPU that may not be present.

Each spec is a representative launch on contiguous inputs, built with :func:`kernels._compile.spec_args`
(ints equal to 1 become constexpr, 16-divisible ints and aligned pointers get the divisibility hint,
as a real launch specializes them). :data:`SPEC_BUILDERS` maps each op module's short name to its
``compile_specs(arch)``.
"""

from __future__ import annotations

import itertools

from kernels._common import dot_precision, next_pow2, tile_constexprs
from kernels._compile import Pointer, spec_args, spec_divisible
from kernels._config import CompileSpec

__all__ = [
    "SPEC_BUILDERS",
    "block_sparse_specs",
    "block_sparse_spec",
    "bwd_spec",
    "dense_bwd_specs",
    "fwd_spec",
    "fwd_specs",
    "preprocess_spec",
]


# ============================================================================================
# Dense family: kernels.attention_fwd, kernels.attention_bwd, kernels.block_sparse
# ============================================================================================

#: Representative shapes for the compile check: (Dk, Dv, G = Hq/Hkv, v aliases k). The absorbed
#: MLA shape (576/512, one latent kv head) comes with the group sizes deployments run: 128 heads
#: (one GPU), 16 (DeepSeek-V3 at 8-way tensor parallelism), 1 (one head per shard), and with a
#: separate ``v`` (no alias: the dK/dV kernel then accumulates dV from its own tile).
SPEC_SHAPES = ((32, 32, 1, False), (64, 64, 1, False), (128, 128, 4, False), (192, 128, 1, False),
               (576, 512, 128, True), (576, 512, 16, True), (576, 512, 1, True), (576, 512, 128, False))
SPEC_DTYPES = ("fp16", "bf16", "fp32")
#: fp32 shapes also compiled with TF32 allowed (the report's ``tf32`` column must then say yes).
SPEC_TF32_SHAPES = ((64, 64, 1, False),)
#: Shapes also compiled with a sliding window and attention sinks (issue 14): d128 GQA and absorbed MLA.
SPEC_WINDOW_SHAPES = ((128, 128, 4, False), (576, 512, 128, True))
SPEC_WINDOW_DTYPES = ("fp16", "bf16")

_T = _S = 1024  # representative lengths (the launch passes T + 1, S + 1: not 16-divisible)


def _strides(n: int, h: int, d: int, row: int | None = None) -> tuple[int, int, int, int]:
    """(batch, token, head, dim) strides of a contiguous ``[B, n, h, d]`` tensor (``row``: head stride when
    the tensor is a prefix view of a wider one, as ``v = k[..., :Dv]``)."""
    row = d if row is None else row
    return (n * h * row, h * row, row, 1)


def _mask_values(sparse: bool) -> dict:
    """``mask`` / ``mask_geom`` of a launch: unused (None) in dense launches; block-sparse: a mask
    ``[1, Hq, n, 40]`` (batch broadcast, per-head lists) with 64 x 128 blocks."""
    if not sparse:
        return dict(mask=None, mask_geom=None)
    i32 = Pointer("i32")
    return dict(mask=(i32, i32, 0, 9, 1, 0, 9 * 40, 40, 1), mask_geom=(64, 128, 1))


def window_spec_values(window: bool = False, sinks: bool = False) -> dict:
    """Window / sink arguments of a representative launch: a DeepSeek-V4-like window (127, 0) when
    ``window``; ``sinks``: the forward's sink pointer."""
    vals = dict(window=(127, 0) if window else (-1, -1), HAS_WINDOW=window)
    if sinks:
        vals.update(SINKS=Pointer("fp32"), HAS_SINKS=True)
    return vals


def window_tile_suffix(window: bool, sinks: bool) -> str:
    """Report label suffix of a window / sink variant: ``/win``, ``/sink``."""
    return ("/win" if window else "") + ("/sink" if sinks else "")


def varlen_spec_values(total_q: int) -> dict:
    """Spec values of the ``IS_VARLEN`` arguments (int32 offsets, packed query length)."""
    return dict(varlen=(Pointer("i32"), Pointer("i32"), total_q + 3), IS_VARLEN=True)


def _fwd_values(dtype: str, dk: int, dv: int, group: int, v_is_k: bool, causal: bool, allow_tf32: bool,
                sparse: bool) -> dict:
    hq, hkv = group * 2, 2
    ptr = Pointer(dtype)
    return dict(
        Q=ptr, K=ptr, V=ptr, O=ptr, LSE=Pointer("fp32"), MAXL=Pointer("fp32"),
        q_strides=_strides(_T, hq, dk), k_strides=_strides(_S, hkv, dk),
        v_strides=_strides(_S, hkv, dv, dk if v_is_k else dv), o_strides=_strides(_T, hq, dv),
        T=_T + 1, S=_S + 1, Hkv=hkv + 1, qk_scale=0.1, n_mblocks=7, opaque_zero=0, **_mask_values(sparse),
        G=group, G_P=next_pow2(group), HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, V_IS_K=v_is_k, WRITE_MAXL=True,
        SPARSE=sparse, DOT=dot_precision(dtype, allow_tf32),
    )


def _bwd_values(kind: str, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, causal: bool,
                allow_tf32: bool, sparse: bool) -> dict:
    hq, hkv = group * 2, 2
    ptr = Pointer(dtype)
    vals = dict(
        Q=ptr, K=ptr, V=ptr, DO=ptr, LSE=Pointer("fp32"), DELTA=Pointer("fp32"),
        q_strides=_strides(_T, hq, dk), k_strides=_strides(_S, hkv, dk),
        v_strides=_strides(_S, hkv, dv, dk if v_is_k else dv), do_strides=_strides(_T, hq, dv),
        T=_T + 1, S=_S + 1, Hkv=hkv + 1, qk_scale=0.1, sm_scale=0.07, opaque_zero=0, **_mask_values(sparse),
        G=group, HEAD_DK=dk, HEAD_DV=dv, CAUSAL=causal, V_IS_K=v_is_k, SPARSE=sparse,
        DOT=dot_precision(dtype, allow_tf32),
    )
    if kind == "dkdv":
        vals.update(DK=ptr, DV=ptr, dk_strides=_strides(_S, hkv, dk), dv_strides=_strides(_S, hkv, dv))
    else:
        vals.update(DQ=ptr, dq_strides=_strides(_T, hq, dk))
    return vals


def _kernel(kind: str):
    from kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel
    from kernels.attention_fwd import attn_fwd_kernel

    return {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}[kind]


def _spec(name: str, kind: str, values: dict, arch: int, dtype: str, dk: int, dv: int, cfg, tile: str,
          extra: dict) -> CompileSpec:
    fn = _kernel(kind)
    sig, consts, divisible = spec_args(fn, values)
    return CompileSpec(kernel=name, fn=fn, signature=sig, constexprs=consts, num_warps=cfg.num_warps,
                       num_stages=cfg.num_stages, arch=arch, dtype=dtype, head_dims=(dk, dv), tile=tile,
                       extra={**spec_divisible(divisible), "config": cfg, **extra})


def fwd_spec(arch: int, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, cfg, causal: bool = True,
             allow_tf32: bool = False, varlen: bool = False, window: bool = False, sinks: bool = False) -> CompileSpec:
    """CompileSpec of the forward kernel for contiguous inputs of the given shape and config
    (fp32: IEEE products unless ``allow_tf32``; ``varlen``: the ``IS_VARLEN`` packed-sequence variant;
    ``window`` / ``sinks``: the sliding-window / attention-sink variants, causal folded into the window)."""
    causal = causal and not window
    values = _fwd_values(dtype, dk, dv, group, v_is_k, causal, allow_tf32, False)
    values.update(tile_constexprs(cfg, dk, dv, v_is_k), **window_spec_values(window, sinks))
    if varlen:
        values.update(varlen_spec_values(_T))
    return _spec("attention_fwd" + ("_varlen" if varlen else ""), "fwd", values, arch, dtype, dk, dv, cfg,
                 cfg.tile + window_tile_suffix(window, sinks),
                 {"group": group, "v_is_k": v_is_k, "causal": causal, "allow_tf32": allow_tf32, "varlen": varlen,
                  "window": window, "sinks": sinks})


def fwd_specs(arch: int) -> list[CompileSpec]:
    """Every forward configuration the autotuner may pick on ``arch`` (80, 86, 89, 90...), for each
    dtype of :data:`SPEC_DTYPES` (fp32 with IEEE products) on the shapes of :data:`SPEC_SHAPES` (dense
    and varlen), plus fp32 with TF32 allowed on :data:`SPEC_TF32_SHAPES`, plus the window+sinks and
    sinks-only variants on :data:`SPEC_WINDOW_SHAPES`."""
    from kernels.attention_fwd import fwd_configs

    specs = []
    for dk, dv, group, v_is_k in SPEC_SHAPES:
        for dtype in SPEC_DTYPES:
            for cfg in fwd_configs(arch, dk, dv, dtype, v_is_k):
                specs.append(fwd_spec(arch, dtype, dk, dv, group, v_is_k, cfg))
            for cfg in fwd_configs(arch, dk, dv, dtype, v_is_k, varlen=True):
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


def bwd_spec(kind: str, arch: int, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, cfg,
             causal: bool = True, allow_tf32: bool = False, varlen: bool = False, window: bool = False) -> CompileSpec:
    """CompileSpec of the dkdv or dq kernel for contiguous inputs of the given shape and config
    (fp32: IEEE products unless ``allow_tf32``; ``varlen``: the ``IS_VARLEN`` variant; ``window``: the
    sliding-window variant, causal folded in; sinks need no backward kernel change)."""
    causal = causal and not window
    values = _bwd_values(kind, dtype, dk, dv, group, v_is_k, causal, allow_tf32, False)
    values.update(tile_constexprs(cfg, dk, dv, v_is_k), **window_spec_values(window))
    if varlen:
        values.update(varlen_spec_values(_T))
    return _spec(f"attention_bwd_{kind}" + ("_varlen" if varlen else ""), kind, values, arch, dtype, dk, dv, cfg,
                 cfg.tile + window_tile_suffix(window, False),
                 {"group": group, "v_is_k": v_is_k, "causal": causal, "allow_tf32": allow_tf32, "varlen": varlen,
                  "window": window})


def preprocess_spec(arch: int, dtype: str, dk: int, dv: int) -> CompileSpec:
    """CompileSpec of the delta preprocessing kernel (one configuration per Dv)."""
    from kernels._jit import bwd_preprocess
    from kernels._tables import PRE_BLOCK_T, PRE_WARPS, pre_block_d

    hq, bd = 2, pre_block_d(dv)
    values = dict(O=Pointer(dtype), DO=Pointer(dtype), DELTA=Pointer("fp32"), o_strides=_strides(_T, hq, dv),
                  do_strides=_strides(_T, hq, dv), T=_T + 1, Hq=3, HEAD_DV=dv, BLOCK_T=PRE_BLOCK_T, BLOCK_D=bd)
    sig, consts, divisible = spec_args(bwd_preprocess, values)
    return CompileSpec(
        kernel="attention_bwd_preprocess", fn=bwd_preprocess, signature=sig, constexprs=consts,
        num_warps=PRE_WARPS, num_stages=1, arch=arch, dtype=dtype, head_dims=(dk, dv),
        tile=f"{PRE_BLOCK_T}x{bd}", extra=spec_divisible(divisible),
    )


def dense_bwd_specs(arch: int) -> list[CompileSpec]:
    """Every backward configuration the autotuner may pick on ``arch`` (80, 86, 89, 90...): preprocess
    (once per Dv and dtype), dkdv and dq kernels, for the dtypes and shapes of :data:`SPEC_SHAPES` (fp32
    with IEEE products; TF32 allowed on :data:`SPEC_TF32_SHAPES`), and the window variants."""
    from kernels.attention_bwd import bwd_configs

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


# Block-sparse ---------------------------------------------------------------------------------

#: Representative shapes of the block-sparse specs (as the dense ones; d32 shares d64's tiles).
BS_SPEC_SHAPES = ((64, 64, 1, False), (128, 128, 4, False), (192, 128, 1, False), (576, 512, 128, True))
#: Mask geometries whose fitted configurations are compiled: packed rows per query block
#: (``BLOCK_M_mask * G``) x key block size. ``fit_rows`` / ``fit_keys`` depend only on which of
#: the candidate tiles divide the block and on a few thresholds, so this grid reaches every tile they
#: can produce from the tables.
SPEC_ROWS = (1, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 1024)
SPEC_BLOCK_N = (8, 16, 24, 32, 48, 64, 96, 128, 256)
#: FlexAttention masks (partial-block bits, ``HAS_PARTIAL``): their BLOCK_SIZE (128 by default; 64) in
#: packed rows x keys, compiled for every shape and dtype.
PARTIAL_SPEC_GEOMETRIES = ((128, 128), (64, 64))


def block_sparse_spec(kind: str, arch: int, dtype: str, dk: int, dv: int, group: int, v_is_k: bool, cfg,
                      partial: bool = False) -> CompileSpec:
    """One block-sparse spec (``kind`` "fwd", "dkdv" or "dq", causal); ``partial``: the ``HAS_PARTIAL``
    variant (FlexAttention partial-block bits)."""
    if kind == "fwd":
        values = _fwd_values(dtype, dk, dv, group, v_is_k, True, False, True)
    else:
        values = _bwd_values(kind, dtype, dk, dv, group, v_is_k, True, False, True)
    if partial:
        values.update(partial=(Pointer("i32"), Pointer("i8")), HAS_PARTIAL=True)
    values.update(tile_constexprs(cfg, dk, dv, v_is_k))
    return _spec(f"block_sparse_{kind}" + ("_partial" if partial else ""), kind, values, arch, dtype, dk, dv, cfg,
                 cfg.tile, {"group": group, "v_is_k": v_is_k, "causal": True, "partial": partial,
                            "wgmma": cfg.num_warps % 4 == 0})  # a 2-warp tile has no warpgroup: mma.sync


def spec_configs(kind: str, arch: int, dk: int, dv: int, dtype: str, group: int) -> list:
    """Distinct fitted configurations of ``kind`` over the geometries :data:`SPEC_ROWS` x :data:`SPEC_BLOCK_N`."""
    from kernels.block_sparse import bwd_configs, dedup, fwd_configs

    out = []
    for rows, bn in itertools.product(SPEC_ROWS, SPEC_BLOCK_N):
        if kind == "fwd":
            out += fwd_configs(arch, dk, dv, dtype, rows, bn)
        else:
            out += bwd_configs(kind, arch, dk, dv, dtype, rows, bn)
    return dedup(out)


def block_sparse_specs(arch: int) -> list[CompileSpec]:
    """Every block-sparse configuration the launchers may pick on ``arch`` (80, 86, 89, 90...) for the
    representative head dims of :data:`BS_SPEC_SHAPES`, each dtype, fitted to every mask geometry; plus
    the partial-block (FlexAttention) variant for :data:`PARTIAL_SPEC_GEOMETRIES`."""
    from kernels.block_sparse import bwd_configs, dedup, fwd_configs

    specs = []
    for dk, dv, group, v_is_k in BS_SPEC_SHAPES:
        for dtype in SPEC_DTYPES:
            for kind in ("fwd", "dkdv", "dq"):
                for cfg in spec_configs(kind, arch, dk, dv, dtype, group):
                    specs.append(block_sparse_spec(kind, arch, dtype, dk, dv, group, v_is_k, cfg))
                partial = []
                for rows, bn in PARTIAL_SPEC_GEOMETRIES:
                    partial += (fwd_configs(arch, dk, dv, dtype, rows * group, bn) if kind == "fwd"
                                else bwd_configs(kind, arch, dk, dv, dtype, rows * group, bn))
                for cfg in dedup(partial):
                    specs.append(block_sparse_spec(kind, arch, dtype, dk, dv, group, v_is_k, cfg, partial=True))
    return specs


#: ``compile_specs(arch)`` of each op module whose specs live here, by short module name
#: (:func:`kernels._compile.collect_specs` looks here first).
SPEC_BUILDERS = {
    "attention_fwd": fwd_specs,
    "attention_bwd": dense_bwd_specs,
    "block_sparse": block_sparse_specs,
}
