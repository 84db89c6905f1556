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

#: Shared memory one thread block may use, bytes: the opt-in maximum per block
#: (``cudaDevAttrMaxSharedMemoryPerBlockOptin``, what Triton checks a launch against), from the
#: "Technical Specifications per Compute Capability" table of the CUDA C++ Programming Guide:
#: A100 / Jetson Orin (8.0, 8.7) 163 KiB; RTX 30xx / A10 / A40 (8.6) and RTX 40xx / L4 / L40
#: (8.9) 99 KiB; H100 / H200 (9.0) and B200 / GB200 / B300 (10.0, 10.3) 227 KiB; RTX 50xx /
#: RTX PRO Blackwell (12.0) and DGX Spark (12.1) 99 KiB.
SMEM_LIMIT_BYTES = {
    80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
    100: 227 * 1024, 103: 227 * 1024, 120: 99 * 1024, 121: 99 * 1024,
}

#: Compute capabilities the compile report and the compile check cover by default (each arch
#: class the tables distinguish: 163 KiB Ampere, 99 KiB consumer parts, Hopper's wgmma).
DEFAULT_ARCHS = (80, 86, 89, 90)


def smem_limit(arch: int) -> int:
    """Shared memory available to one program on compute capability ``arch`` (e.g. 80, 90), in bytes.
    An architecture missing from :data:`SMEM_LIMIT_BYTES` gets the smallest limit listed (99 KiB)."""
    return SMEM_LIMIT_BYTES.get(arch, min(SMEM_LIMIT_BYTES.values()))


def arch_family(arch: int) -> int:
    """Key of the config tables for compute capability ``arch``: 90 (wgmma and 227 KiB: sm90, and
    sm100 whose shared memory is the same), 80 (163 KiB: A100-class), or 86 (99 KiB: sm86, sm89,
    sm120 and unknown parts). Tables are sized so that every entry of a family fits its
    smallest member's shared memory."""
    limit = smem_limit(arch)
    if arch >= 90 and limit >= SMEM_LIMIT_BYTES[90]:
        return 90
    if limit >= SMEM_LIMIT_BYTES[80]:
        return 80
    return 86


@dataclass(frozen=True)
class CompileSpec:
    """One kernel configuration to compile ahead of time for a GPU that may not be present.

    ``signature`` maps every kernel argument, in order, to a Triton type string
    (``"*fp16"``, ``"i32"``, ``"fp32"``, ``"constexpr"``), a tuple argument to the tuple of its elements'
    types; ``constexprs`` gives the values of the constexpr arguments (tuple elements by their path
    ``(name, i)``). ``arch`` is the compute capability (80, 86, 89, 90...). The remaining fields
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
