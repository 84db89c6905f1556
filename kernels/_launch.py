"""The one way kernels in this package are launched, and the fp32 matrix-product precision switch.

``launch(kernel, grid, *args, **kwargs)`` runs ``kernel[grid](*args, **kwargs)`` with the CUDA
device of the first tensor argument made current. Triton launches on
``torch.cuda.current_device()`` and its current stream, not on the tensors' device, so a model on
``cuda:1`` (e.g. transformers ``device_map`` over several GPUs) would otherwise run on GPU 0 with
GPU 1's pointers. Every launch in ``kernels/`` goes through it (``tests/test_launch.py`` scans the
package for direct ``kernel[grid](...)`` calls). On CPU tensors (Triton interpreter) it adds nothing.

``dot_precision(dtype, allow_tf32)`` is the ``input_precision`` of every ``tl.dot`` of a launch.
fp32 inputs get IEEE fp32 products unless TF32 is allowed: ``allow_tf32=None`` (every launcher's
default) follows ``torch.backends.cuda.matmul.allow_tf32`` (PyTorch's switch for fp32 matmuls,
``False`` by default), read at launch. TF32 keeps 10 mantissa bits: relative errors of ~1e-3 on
attention scores, too coarse for an fp32 reference path. fp16 / bf16 inputs always run on tensor
cores with fp32 accumulation (the value is then irrelevant; "tf32" is Triton's default).
"""

from __future__ import annotations

import torch

__all__ = ["dot_precision", "launch", "tf32_allowed"]


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


def _launch_device(args) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def launch(kernel, grid, *args, **kwargs):
    """``kernel[grid](*args, **kwargs)`` on the CUDA device of the first tensor in ``args``.

    ``kernel`` is a ``@triton.jit`` function or an autotuner; ``grid`` a tuple or a callable of the
    meta-parameters. Returns what the launch returns. CPU tensors (Triton interpreter) launch as is.
    """
    dev = _launch_device(args)
    if dev is None or dev.type != "cuda":
        return kernel[grid](*args, **kwargs)
    with torch.cuda.device(dev):
        return kernel[grid](*args, **kwargs)
