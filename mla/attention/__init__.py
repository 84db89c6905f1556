"""Attention modules: ``LatentAttention``, ``MultiHeadLatentAttention`` and ``LatentSparseAttention``.

All three are thin over ``mla.functional``: they project, rotate and reshape, then call
``attention_with_stats`` (fused kernels on CUDA, the reference path on CPU) and report what ran in an
``AttentionStats``.

* ``MultiHeadLatentAttention`` is DeepSeek-V2/V3 MLA (arXiv 2405.04434 §2.1, 2412.19437 §2.1) with the
  parameter names of transformers' ``DeepseekV3Attention``, so its state dicts load unchanged. Two
  forms give the same result: ``naive`` expands per-head K/V from the latent with ``kv_b_proj``;
  ``absorbed`` folds ``W_UK`` into the query and ``W_UV`` into the output and attends in latent space
  over the compressed cache (``k = [c_kv | k_rope]`` with one kv head, ``v = c_kv``).
* ``LatentSparseAttention`` is MLA whose keys per query are chosen by a local window + attention sinks
  + top-k blocks scored in latent space (``mode="block"``, in the spirit of Native Sparse Attention,
  arXiv 2502.11089), or by a lightning indexer's top-k tokens (``mode="topk"``, DeepSeek Sparse
  Attention in DeepSeek-V3.2).
"""

from mla.attention.common import FORMS, AttentionStats, RMSNorm, causal_density
from mla.attention.latent import LatentAttention
from mla.attention.mla import MultiHeadLatentAttention, packed_position_ids
from mla.attention.sparse import LatentSparseAttention, LightningIndexer, indexer_kl_loss

__all__ = [
    "AttentionStats",
    "LatentAttention",
    "MultiHeadLatentAttention",
    "LatentSparseAttention",
    "LightningIndexer",
    "RMSNorm",
    "indexer_kl_loss",
    "causal_density",
    "packed_position_ids",
    "FORMS",
]
