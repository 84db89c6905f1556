"""Guards around one benchmark measurement: error notes and CUDA recovery, module device/dtype moves,
memory release, and the accuracy check against the reference (``rel_err``, ``tolerance``)."""

from __future__ import annotations

import gc
import math

import torch

from bench.env import Env

# ---------------------------------------------------------------------------------------------------
# Errors, memory, accuracy
# ---------------------------------------------------------------------------------------------------
_FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert",
               "misaligned address", "illegal instruction", "CUDA-capable device", "launch timed out")


def describe_error(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def after_error(env: Env, e: BaseException) -> str:
    """Clean up after a failed measurement; returns the note for the row.

    Out-of-memory frees the cache; an unrecoverable CUDA error marks the context broken so later cases
    are skipped with a reason instead of failing one by one.
    """
    note = describe_error(e)
    if env.is_cuda:
        if any(s in str(e) for s in _FATAL_CUDA):
            env.cuda_broken = note
        else:
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # the error surfaced late: the context is gone
                env.cuda_broken = describe_error(e2)
        free_memory(env)
    return note


def to_device_dtype(module, device, dtype):
    """``module.to(device, dtype)`` keeping every ``inv_freq`` RoPE buffer in float32 (as transformers does):
    a bfloat16 ``inv_freq`` shifts rotary angles by radians at long positions. Returns the module."""
    saved = [(m, m.inv_freq.detach().float().clone()) for m in module.modules()
             if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    module.to(device=device, dtype=dtype)
    for m, f in saved:
        m.inv_freq = f.to(device)
    return module


def force_reference(module) -> bool:
    """Switch every submodule with a ``backend`` attribute to ``"reference"``; True if one was not already."""
    changed = False
    for m in module.modules():
        if isinstance(getattr(m, "backend", None), str) and m.backend != "reference":
            m.backend = "reference"
            changed = True
    return changed


def free_memory(env: Env) -> None:
    """Collect garbage and release cached CUDA memory."""
    gc.collect()
    if env.is_cuda and not env.cuda_broken:
        try:
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` computed in float32 chunks (inf when x is not finite)."""
    x = x.detach().reshape(-1)
    ref = ref.detach().reshape(-1)
    num = den = 0.0
    step = 1 << 24
    for s in range(0, x.numel(), step):
        a, b = x[s: s + step].float(), ref[s: s + step].float()
        if not torch.isfinite(a).all():
            return math.inf
        num += float(((a - b) ** 2).sum())
        den += float((b**2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error above which a benchmark output is flagged ``mismatch`` (2× DESIGN §6's tolerance)."""
    return {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-6}.get(dtype, 2e-2)
