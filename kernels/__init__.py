"""Triton kernels for latent attention: tensors in, tensors out.

This package holds only ``@triton.jit`` kernels and their launchers. It never imports
``mla`` (the dependency is one-way: ``mla -> kernels -> triton``) and defines no
``nn.Module`` or autograd logic.

Kernels launch on CUDA tensors, or on CPU tensors under the Triton interpreter when the
environment variable ``TRITON_INTERPRET=1`` was set before this package was imported
(that is how CI checks them without a GPU; see DESIGN §6).

The package itself imports without Triton (``HAS_TRITON`` says whether it is installed); the op
modules (``kernels.attention_fwd``, ``attention_bwd``, ``block_sparse``, ...) and ``kernels._jit`` import
Triton at the top, so importing them without it raises ``ImportError`` (``mla`` imports them lazily and
falls back to its reference backend).
"""

from kernels._config import HAS_TRITON, INTERPRET

__all__ = ["HAS_TRITON", "INTERPRET"]
