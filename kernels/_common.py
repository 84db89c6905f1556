"""Host-side pieces every op module in ``kernels/`` shares: constants, integer helpers, dtype names,
output allocation, the compiled-or-interpreted switch, the fp32 dot-precision switch and the one
launch helper that makes the tensors' CUDA device current.

Why ``launch`` exists: Triton launches on ``torch.cuda.current_device()`` and its current stream, not
on the tensors' device, so a model on ``cuda:1`` (e.g. transformers ``device_map`` over several GPUs)
would otherwise run on GPU 0 with GPU 1's pointers. Every launch in ``kernels/`` goes through it
(``tests/test_gpu_readiness.py`` scans the package for direct ``kernel[grid](...)`` calls). On CPU
tensors (Triton interpreter) it adds nothing.

``dot_precision(dtype, allow_tf32)`` is the ``input_precision`` of every ``tl.dot`` of a launch.
fp32 inputs get IEEE fp32 products unless TF32 is allowed: ``allow_tf32=None`` (every launcher's
default) follows ``torch.backends.cuda.matmul.allow_tf32`` (PyTorch's switch for fp32 matmuls,
``False`` by default), read at launch. TF32 keeps 10 mantissa bits: relative errors of ~1e-3 on
attention scores, too coarse for an fp32 reference path. fp16 / bf16 inputs always run on tensor
cores with fp32 accumulation (the value is then irrelevant; "tf32" is Triton's default).

Nothing here imports ``mla`` (DESIGN §2: kernels never import the library above them).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import torch

from kernels._config import INTERPRET

__all__ = [
    "BwdConfig",
    "FwdConfig",
    "LN2",
    "LOG2E",
    "MIN_TILE",
    "HeadPlan",
    "Tile",
    "TileConfig",
    "cut_head_dims",
    "fold_window",
    "fwd_qk_scale",
    "head_class",
    "head_plan",
    "tile_constexprs",
    "varlen_plan",
    "bwd_outputs",
    "cdiv",
    "compiled_launch",
    "device_arch",
    "dot_precision",
    "dtype_name",
    "fwd_outputs",
    "is_prefix_alias",
    "launch",
    "needs_off64",
    "next_pow2",
    "prev_pow2",
    "specs_getattr",
    "tf32_allowed",
]

#: log2(e) and ln(2): the kernels run softmax in base 2 (``exp2``), statistics leave in natural log.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Smallest tile extent of a matrix-product operand (mma / wgmma need K >= 16 for 16-bit inputs).
MIN_TILE = 16

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def fwd_qk_scale(softmax_scale) -> float:
    """``softmax_scale * log2(e)`` for the forward kernels, which scale the row max instead of every score
    (``max(s) * c == max(s * c)`` needs ``c > 0``; masked ``-inf`` scores times 0 are NaN).
    Raises ``ValueError`` unless ``softmax_scale`` is a finite positive number."""
    s = float(softmax_scale)
    if not 0 < s < float("inf"):  # NaN fails too
        raise ValueError(f"softmax_scale: expected a finite positive float, got {softmax_scale}")
    return s * LOG2E


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (b > 0)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    """Smallest power of two >= ``x`` (1 for x <= 1)."""
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def prev_pow2(x: int) -> int:
    """Largest power of two <= ``x`` (x >= 1)."""
    return 1 << (int(x).bit_length() - 1)


def dtype_name(dtype) -> str:
    """Triton element type name ("fp16", "bf16", "fp32") of a torch dtype; a name passes through.

    Raises ``KeyError`` for other dtypes (the launchers' callers validate dtypes first)."""
    if isinstance(dtype, str):
        return dtype
    return _DTYPE_NAMES[dtype]


def is_prefix_alias(k, v) -> bool:
    """True when ``v`` is ``k[..., :Dv]``: same storage start and same B/S/H/D strides."""
    return (
        v.data_ptr() == k.data_ptr()
        and v.shape[:3] == k.shape[:3]
        and v.stride() == k.stride()
        and v.shape[3] <= k.shape[3]
    )


def needs_off64(k, v) -> bool:
    """Whether a ``[B, S, H, D]`` key/value pair's per-step element offsets (``key * token stride`` within one
    batch entry) can pass 2**31: the kernels then compute them in int64 (else int32, one multiply-add per
    address; the ``OFF64`` constexpr of :mod:`kernels.attention_fwd`)."""
    return k.shape[1] * max(k.stride(1), v.stride(1)) >= 2**31


def compiled_launch(q) -> bool:
    """True for a compiled GPU launch (CUDA tensors, no interpreter): tables, pins and autotuning
    apply; False under the Triton interpreter (one small configuration)."""
    return q.device.type == "cuda" and not INTERPRET


def device_arch(device) -> int:
    """Compute capability of a CUDA ``device`` as an int (sm_90 -> 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


def fwd_outputs(q, dv: int, out, lse, return_max_logit: bool):
    """``(out, lse, early)`` for every forward launcher: the given buffers or new ones (``out [B, T, Hq, Dv]``
    q.dtype, ``lse`` fp32 ``[B, Hq, T]``); ``early`` is the finished result ``(out, lse, max_logit)`` when
    there is nothing to launch (empty batch, sequence or heads), else None."""
    B, T, Hq = q.shape[:3]
    if out is None:
        out = torch.empty((B, T, Hq, dv), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    if B == 0 or T == 0 or Hq == 0:
        maxl = torch.full((B, Hq), float("-inf"), device=q.device) if return_max_logit else None
        return out, lse, (out, lse, maxl)
    return out, lse, None


def bwd_outputs(q, k, v, dq, dk, dv) -> tuple:
    """``(dq, dk, dv, done)`` for every backward launcher: the given buffers or new ones shaped like
    ``q, k, v``; ``done`` when nothing is left to launch (the empty cases are filled: no query means zero
    dk/dv, no key zero dq)."""
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    B, T, Hq = q.shape[:3]
    S = k.shape[1]
    if B == 0 or Hq == 0:
        return dq, dk, dv, True
    if T == 0 or S == 0:
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return dq, dk, dv, True
    return dq, dk, dv, False


def tf32_allowed(allow_tf32: bool | None = None) -> bool:
    """``allow_tf32`` if given, else ``torch.backends.cuda.matmul.allow_tf32`` (read now)."""
    if allow_tf32 is None:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    return bool(allow_tf32)


def dot_precision(dtype, allow_tf32: bool | None = None) -> str:
    """``tl.dot`` ``input_precision`` for inputs of ``dtype`` (torch dtype or "fp16"/"bf16"/"fp32"):
    "ieee" for fp32 unless TF32 is allowed (:func:`tf32_allowed`), "tf32" (Triton's default, ignored
    for 16-bit inputs) otherwise."""
    is_fp32 = dtype in (torch.float32, "fp32", "float32")
    return "tf32" if not is_fp32 or tf32_allowed(allow_tf32) else "ieee"


def _launch_device(args, kwargs) -> torch.device | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on the CUDA device of the first tensor argument (positional
    first, then keyword).

    ``kernel`` is a ``@triton.jit`` function or an autotuner; ``grid`` a tuple or a callable of the
    meta-parameters. Returns what the launch returns. CPU tensors (Triton interpreter) launch as is.
    """
    dev = _launch_device(args, kwargs)
    if dev is None or dev.type != "cuda":
        return kernel[grid](*args, **kwargs)
    with torch.cuda.device(dev):
        return kernel[grid](*args, **kwargs)


# --------------------------------------------------------------------------------------------
# Tile configurations and the head-dim plan (dense, block-sparse; shared with the other ops)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileConfig:
    """One tile configuration of a kernel: rows (``block_m``) and keys (``block_n``) per step, value
    splits, launch knobs.

    ``resident``: the fixed side's own tiles (forward / dQ: q (and dO), dK/dV: K/V) are loaded once,
    before the loop; else re-read every step. ``stream``: the other splits' pieces of the fixed side are
    re-read every step through the load pipeline (else Triton may hoist them and keep them in
    registers). ``bc``: width of those pieces (see :class:`HeadPlan`); a ``bc`` as wide as the chunk with
    two splits, resident and not streamed, makes the forward hold the other chunk too (loaded once).
    """

    block_m: int
    block_n: int
    nsplit: int = 1
    num_warps: int = 4
    num_stages: int = 2
    resident: bool = True
    stream: bool = False
    bc: int = 64

    @property
    def tile(self) -> str:
        """Report label: ``BLOCK_MxBLOCK_N``, ``/vN`` value splits, ``/r`` own tiles re-read, ``/s`` streamed,
        ``/cW`` pieces ``W`` wide (when not the default 64)."""
        return (f"{self.block_m}x{self.block_n}" + (f"/v{self.nsplit}" if self.nsplit > 1 else "")
                + ("" if self.resident else "/r") + ("/s" if self.stream else "")
                + (f"/c{self.bc}" if self.bc != 64 else ""))


#: The backward kernels' name of :class:`TileConfig` (same fields).
BwdConfig = TileConfig


def FwdConfig(block_m: int, block_n: int, nsplit: int = 1, num_warps: int = 4, num_stages: int = 2,  # noqa: N802
              q_resident: bool = True, stream: bool = False, bc: int = 64) -> TileConfig:
    """A forward :class:`TileConfig` (``q_resident`` is its ``resident``: the own q chunk loaded once)."""
    return TileConfig(block_m, block_n, nsplit, num_warps, num_stages, q_resident, stream, bc)


@dataclass(frozen=True)
class HeadPlan:
    """How the head dims are cut into power-of-two tiles (see :mod:`kernels.attention_fwd`).

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


def cut_head_dims(dk: int, dv: int, v_is_k: bool, nsplit: int, tail_per_split: bool = False
                  ) -> tuple[int, int, int, int]:
    """``(nsplit, bk, bt, bv)``: power-of-two tiles covering ``Dk``/``Dv`` with ``nsplit`` value splits
    (reduced so that no split is without value columns); ``v_is_k`` forces ``bk == bv`` (shared tile).
    ``Dk`` = ``nsplit`` chunks of ``bk`` + the tail: one ``bt`` piece (dense kernels, :func:`head_plan`)
    or, with ``tail_per_split``, one ``bt`` piece per split (top-k kernels,
    :func:`kernels.topk_configs.column_plan`; 576/512 with two splits: ``bt`` 32 instead of 64).
    ``bt == 0``: no tail. The callers check the arguments.
    """
    bv = max(MIN_TILE, next_pow2(cdiv(dv, nsplit)))
    nsplit = cdiv(dv, bv)  # never a split without value columns
    if v_is_k:
        bk = bv
    elif nsplit == 1:
        lo = max(MIN_TILE, prev_pow2(dk))
        rest = dk - lo
        # One padded tile beats a tile plus a tail when the padding is no larger (24 -> 32, not 16 + 16).
        bk = next_pow2(dk) if rest > 0 and lo + max(MIN_TILE, next_pow2(rest)) >= next_pow2(dk) else lo
    else:
        bk = max(MIN_TILE, prev_pow2(max(1, dk // nsplit)))
    rest = dk - nsplit * bk
    bt = max(MIN_TILE, next_pow2(cdiv(rest, nsplit) if tail_per_split else rest)) if rest > 0 else 0
    return nsplit, bk, bt, bv


def head_plan(dk: int, dv: int, v_is_k: bool, nsplit: int, bc: int = 64) -> HeadPlan:
    """Cut ``Dk``/``Dv`` for ``nsplit`` value splits; ``v_is_k`` forces ``bk == bv`` (shared tile).

    Raises ``ValueError`` for non-positive dims or ``nsplit < 1``.
    """
    if dk < 1 or dv < 1 or nsplit < 1:
        raise ValueError(f"head_plan: need dk, dv, nsplit >= 1, got dk={dk}, dv={dv}, nsplit={nsplit}")
    nsplit, bk, bt, bv = cut_head_dims(dk, dv, v_is_k, nsplit)
    return HeadPlan(nsplit=nsplit, bk=bk, bt=bt, bv=bv, bc=min(bc, bk, bv))


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


#: The ``TILE`` constexpr of the dense-family kernels: a :class:`TileConfig` with its :class:`HeadPlan`
#: (one named tuple, so a launch or an autotuner config sets the whole tile in one argument).
Tile = namedtuple("Tile", "BLOCK_M BLOCK_N NSPLIT BK BT BV BC RESIDENT STREAM")


def tile_constexprs(cfg: TileConfig, dk: int, dv: int, v_is_k: bool) -> dict:
    """``{"TILE": Tile(...)}`` of ``cfg`` for head dims (Dk, Dv): launch keyword / ``triton.Config`` kwargs."""
    plan = head_plan(dk, dv, v_is_k, cfg.nsplit, cfg.bc)
    return dict(TILE=Tile(cfg.block_m, cfg.block_n, plan.nsplit, plan.bk, plan.bt, plan.bv, plan.bc,
                          cfg.resident, cfg.stream))


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


def varlen_plan(q, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int) -> dict:
    """Launch plan of a varlen call: ``B`` sequences, grid sizes ``T``/``S`` (max lengths) and the
    kernels' varlen keyword arguments (``varlen = (cu_seqlens_q, cu_seqlens_k, total_q)``, int32 offsets)."""
    return dict(B=cu_seqlens_q.numel() - 1, T=int(max_seqlen_q), S=int(max_seqlen_k),
                kw=dict(varlen=(cu_seqlens_q, cu_seqlens_k, q.shape[0]), IS_VARLEN=True))


def specs_getattr(module: str, *same: str, **renamed: str):
    """Module ``__getattr__`` for compile-spec names that moved from an op module to :mod:`kernels._specs`
    (which imports the op modules, so they are read there on first use): the names in ``same`` keep their
    name, ``renamed`` maps a name in ``module`` to its name in ``kernels._specs``."""
    names = {**{n: n for n in same}, **renamed}

    def __getattr__(name):
        if name in names:
            from kernels import _specs

            return getattr(_specs, names[name])
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
