"""deepseek-latent-attention: fused Triton kernels and PyTorch modules for Multi-Head Latent Attention.

Entry points:

* ``mla.latent_attention`` (``mla.functional``): dense / block-sparse / top-k latent attention with
  backend dispatch (Triton kernels on CUDA, pure PyTorch reference elsewhere).
* Modules: ``LatentAttention`` (``nn.MultiheadAttention``-style), ``MultiHeadLatentAttention``
  (DeepSeek-V2/V3 MLA with transformers weight names), ``LatentSparseAttention`` (block / top-k hybrid),
  ``TransformerBlock``, ``MLACausalLM``.
* ``MLAConfig`` and ``mla.registry`` presets (``tiny``, ``deepseek-v2-lite``, ``deepseek-v3``,
  ``deepseek-v3.2``, ``glm-5``).

``import mla`` works without Triton installed (reference backend only).
"""

from mla import registry
from mla.attention import (
    AttentionStats,
    LatentAttention,
    LatentSparseAttention,
    LightningIndexer,
    MultiHeadLatentAttention,
)
from mla.block import MLACausalLM, RMSNorm, SwiGLU, TransformerBlock
from mla.cache import LatentCache
from mla.config import MLAConfig
from mla.functional import attention_with_stats, latent_attention, latent_attention_varlen
from mla.sparsity import BlockMask

__version__ = "0.1.0"

__all__ = [
    "latent_attention",
    "latent_attention_varlen",
    "attention_with_stats",
    "BlockMask",
    "LatentAttention",
    "MultiHeadLatentAttention",
    "LatentSparseAttention",
    "LightningIndexer",
    "AttentionStats",
    "TransformerBlock",
    "MLACausalLM",
    "RMSNorm",
    "SwiGLU",
    "LatentCache",
    "MLAConfig",
    "registry",
]
