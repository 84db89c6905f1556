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

import torch

from kernels._config import INTERPRET

__all__ = [
    "LN2",
    "LOG2E",
    "MIN_TILE",
    "bwd_outputs",
    "cdiv",
    "compiled_launch",
    "device_arch",
    "dot_precision",
    "dtype_name",
    "fwd_outputs",
    "is_prefix_alias",
    "launch",
    "next_pow2",
    "prev_pow2",
    "tf32_allowed",
]

#: log2(e) and ln(2): the kernels run softmax in base 2 (``exp2``), statistics leave in natural log.
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

#: Smallest tile extent of a matrix-product operand (mma / wgmma need K >= 16 for 16-bit inputs).
MIN_TILE = 16

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


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
