"""Triton kernels for latent attention: tensors in, tensors out.

This package holds only ``@triton.jit`` kernels and their launchers. It never imports
``mla`` (the dependency is one-way: ``mla -> kernels -> triton``) and defines no
``nn.Module`` or autograd logic.

Kernels launch on CUDA tensors, or on CPU tensors under the Triton interpreter when the
environment variable ``TRITON_INTERPRET=1`` was set before this package was imported
(that is how CI checks them without a GPU; see DESIGN §6).
"""

from kernels._config import HAS_TRITON, INTERPRET

__all__ = ["HAS_TRITON", "INTERPRET"]
