"""Shared kernel facts: Triton availability, interpreter mode, per-architecture limits,
and the ``CompileSpec`` record every kernel module uses to describe the configurations
its autotuner may pick (consumed by ``bench.compile_report`` and the compile-check tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

try:  # Triton is a Linux-only dependency; ``import mla`` must work without it.
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on machines without triton
    HAS_TRITON = False

#: True when kernels were decorated under ``TRITON_INTERPRET=1`` (they then run on CPU tensors).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: Usable shared memory per block, bytes (opt-in maximum): A100 (sm80) 164 KiB, H100/H200 (sm90) 227 KiB.
SMEM_LIMIT_BYTES = {80: 164 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def smem_limit(arch: int) -> int:
    """Shared memory available to one program on compute capability ``arch`` (e.g. 80, 90), in bytes."""
    return SMEM_LIMIT_BYTES.get(arch, 99 * 1024)


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile ahead of time for a GPU that may not be present.

    ``signature`` maps every kernel argument, in order, to a Triton type string
    (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the values of the
    constexpr arguments. ``arch`` is the compute capability (80 or 90). The remaining fields
    are labels for the report (``dtype`` of the inputs, ``head_dims`` = (Dk, Dv), ``tile`` such
    as ``"64x64"``).
    """

    kernel: str
    fn: Any
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    arch: int
    dtype: str
    head_dims: tuple[int, int]
    tile: str
    extra: dict[str, Any] = field(default_factory=dict)


#: Kernel modules that expose ``compile_specs(arch) -> list[CompileSpec]``; ``bench.compile_report``
#: and the compile check walk this list. A module that does not import yet is skipped (reported).
KERNEL_MODULES: tuple[str, ...] = (
    "kernels.attention_fwd",
    "kernels.attention_bwd",
    "kernels.block_sparse",
    "kernels.topk_sparse",
    "kernels.decode",
)
