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

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mla.cache import LatentCache, PagedLatentCache
from mla.config import MLAConfig, require_config
from mla.functional import (
    attention_probs,
    attention_with_stats,
    latent_attention_varlen,
    mla_decode,
    resolve_backend,
)
from mla.rope import RotaryEmbedding, apply_rotary, yarn_softmax_scale
from mla.sparsity import BlockMask, select_topk_blocks, topk_indices_from_scores

__all__ = [
    "AttentionStats",
    "LatentAttention",
    "MultiHeadLatentAttention",
    "LatentSparseAttention",
    "LightningIndexer",
    "RMSNorm",
    "indexer_kl_loss",
    "causal_density",
]

FORMS = ("auto", "naive", "absorbed")


@dataclass
class AttentionStats:
    """What an attention call did.

    backend: ``"triton"`` or ``"reference"``. latent_dim: per-head contraction dim of the scores.
    density: fraction of the ``T × S`` (query, key) pairs attended (1.0 dense non-causal).
    max_logit: float32 ``[H]`` maximum scaled score per head over the batch (detached), the quantity
    QK-clip style stability tools watch; None when not computed. form: MLA execution form or None.
    visited_blocks / visited_tokens: sparse modules only (key blocks listed / keys selected, summed).
    indexer_loss: ``LatentSparseAttention(mode="topk")`` KL loss of the indexer when requested.

    ``density``, ``visited_blocks`` and ``visited_tokens`` are computed on the device and kept as
    tensors (a forward or decode step never waits for the GPU to report them); they become Python
    numbers when read, which syncs once. The raw values are ``density_raw``, ``visited_blocks_raw``,
    ``visited_tokens_raw`` (float / int or 0-dim tensors).
    """

    backend: str
    latent_dim: int
    density_raw: float | torch.Tensor
    max_logit: torch.Tensor | None = None
    form: str | None = None
    visited_blocks_raw: int | torch.Tensor | None = None
    visited_tokens_raw: int | torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None

    @property
    def density(self) -> float:
        d = self.density_raw
        return float(d) if isinstance(d, torch.Tensor) else d

    @property
    def visited_blocks(self) -> int | None:
        v = self.visited_blocks_raw
        return int(v) if isinstance(v, torch.Tensor) else v

    @property
    def visited_tokens(self) -> int | None:
        v = self.visited_tokens_raw
        return int(v) if isinstance(v, torch.Tensor) else v


def causal_density(T: int, S: int) -> float:
    """Fraction of ``T × S`` pairs a bottom-right causal mask keeps: ``Σ_i clamp(i + S - T + 1, 0, S) / (T·S)``."""
    if T == 0 or S == 0:
        return 0.0
    # Row i sees max(0, i + S - T + 1) keys (never more than S): closed form, no loop over T.
    total = T * (S - T + 1) + T * (T - 1) // 2 if S >= T else S * (S + 1) // 2
    return total / (T * S)


def _causal_density_t(T: int, S: torch.Tensor) -> torch.Tensor:
    """``causal_density(T, S)`` for a 0-dim integer tensor ``S`` (float64 0-dim tensor, no host sync)."""
    S = S.double()
    total = torch.where(S >= T, T * (S - T + 1) + T * (T - 1) // 2, S * (S + 1) / 2)
    return torch.where(S > 0, total / (T * S).clamp(min=1), torch.zeros_like(S))


def _head_max(max_logit: torch.Tensor | None) -> torch.Tensor | None:
    return None if max_logit is None else max_logit.detach().float().amax(dim=0)


def _check_input_dtype(name: str, t: torch.Tensor, param_dtype: torch.dtype) -> None:
    """TypeError when input ``t`` and the module's parameters differ in dtype outside autocast (which casts
    both); otherwise the first projection fails with a matmul error that names neither."""
    if t.dtype != param_dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(
            f"{name}: dtype {t.dtype} does not match the module's parameters ({param_dtype}); convert one of "
            f"them ({name}.to({param_dtype}) or module.to({t.dtype}))"
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 like transformers'
    ``DeepseekV3RMSNorm``: ``weight * x / sqrt(mean(x²) + eps)``. Input ``[..., dim]``, output same dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dt)


# ---------------------------------------------------------------------------------------------------
# LatentAttention: the nn.MultiheadAttention-style layer of the README
# ---------------------------------------------------------------------------------------------------
class LatentAttention(nn.Module):
    """Multi-head attention whose scores are computed in a per-head latent space.

    Queries and keys are projected per head to ``latent_dim = round(latent_dim_ratio · head_dim)``
    channels; values are the input reshaped to heads (projected by ``v_proj`` unless
    ``value_proj=False``); the scores ``softmax(q_l · k_lᵀ / sqrt(latent_dim))`` contract the values and
    ``out_proj`` mixes the heads.

    Args:
        embed_dim: model width E; ``num_heads`` must divide it (``head_dim = E / num_heads``).
        num_heads: H.
        latent_dim_ratio: ``latent_dim / head_dim`` in (0, 1].
        dropout: dropout on the attention output before ``out_proj`` (the fused kernels do not drop
            probabilities, unlike ``nn.MultiheadAttention``).
        bias: biases of the projections.
        kdim, vdim: feature sizes of key / value inputs (default E); ``value_proj=False`` needs ``vdim == E``.
        batch_first: inputs ``[B, T, E]`` (default) or ``[T, B, E]``.
        backend: ``"auto"``, ``"reference"`` or ``"triton"`` (see ``mla.functional.latent_attention``).

    ``forward(query [B,T,E], key [B,S,kdim], value [B,S,vdim], attn_mask=None, key_padding_mask=None,
    need_weights=False, is_causal=False, average_attn_weights=False)`` returns ``(out [B,T,E], weights,
    stats)``: ``weights`` is ``[B, H, T, S]`` float32 (rows sum to 1; ``[B, T, S]`` when averaged) or
    None; ``stats`` an ``AttentionStats``. ``attn_mask`` follows ``nn.MultiheadAttention``: bool True =
    *not* allowed, float = added; shapes ``[T, S]``, ``[B·H, T, S]`` or ``[B, H, T, S]``.
    ``key_padding_mask`` ``[B, S]``: True (or -inf) = padding. ``is_causal``: bottom-right causal mask.
    Masks other than causal run on the reference path.

    Raises:
        ValueError: bad sizes at construction; inputs of the wrong rank/width/batch in ``forward``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        latent_dim_ratio: float = 0.25,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        kdim: int | None = None,
        vdim: int | None = None,
        value_proj: bool = True,
        batch_first: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        if embed_dim < 1 or num_heads < 1 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        if not 0 < latent_dim_ratio <= 1:
            raise ValueError(f"latent_dim_ratio: expected a value in (0, 1], got {latent_dim_ratio}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        self.latent_dim = max(1, round(latent_dim_ratio * self.head_dim))
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        if not value_proj and self.vdim != embed_dim:
            raise ValueError(f"value_proj=False needs vdim == embed_dim, got vdim={self.vdim}, embed_dim={embed_dim}")
        self.batch_first, self.backend, self.dropout = batch_first, backend, dropout
        fk = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * self.latent_dim, bias=bias, **fk)
        self.k_proj = nn.Linear(self.kdim, num_heads * self.latent_dim, bias=bias, **fk)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **fk) if value_proj else nn.Identity()
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **fk)
        self.softmax_scale = self.latent_dim**-0.5

    def _merge_masks(self, attn_mask, key_padding_mask, B, T, S, dtype, device):
        """nn.MultiheadAttention masks -> one keep-mask (bool) or additive bias [B|1, H|1, T, S], or None."""
        H = self.num_heads
        parts = []
        for name, t in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            # nn.MultiheadAttention semantics: bool True = masked out, float = additive bias. An integer
            # 0/1 mask (as HF's attention_mask, where 1 = attend) would be read as a +1 bias: refuse it.
            if t is not None and (not isinstance(t, torch.Tensor) or (t.dtype != torch.bool
                                                                     and not t.is_floating_point())):
                raise TypeError(
                    f"{name}: expected a bool (True = ignore) or float (additive bias) tensor, got "
                    f"{getattr(t, 'dtype', type(t).__name__)}"
                )
        if attn_mask is not None:
            m = attn_mask.to(device)
            if m.dim() == 2:
                m = m[None, None]
            elif m.dim() == 3:
                if m.shape[0] != B * H:
                    raise ValueError(f"attn_mask: a 3-D mask must be [B*H={B * H}, T, S], got {tuple(m.shape)}")
                m = m.view(B, H, T, S)
            elif m.dim() != 4:
                raise ValueError(f"attn_mask: expected [T, S], [B*H, T, S] or [B, H, T, S], got {tuple(m.shape)}")
            if m.shape[-2:] != (T, S):
                raise ValueError(f"attn_mask: last dims must be (T, S) = {(T, S)}, got {tuple(m.shape[-2:])}")
            parts.append(m)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, S):
                raise ValueError(f"key_padding_mask: expected [B, S] = {[B, S]}, got {list(key_padding_mask.shape)}")
            parts.append(key_padding_mask.to(device)[:, None, None, :])
        if not parts:
            return None
        if all(p.dtype == torch.bool for p in parts):
            drop = parts[0]
            for p in parts[1:]:
                drop = drop | p
            return ~drop
        bias = torch.zeros((), dtype=torch.float32, device=device)
        for p in parts:
            if p.dtype == torch.bool:
                p = torch.zeros(p.shape, dtype=torch.float32, device=device).masked_fill(p, float("-inf"))
            bias = bias + p.float()
        return bias

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = False,
        is_causal: bool = False,
        average_attn_weights: bool = False,
    ):
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 3 or t.shape[-1] != width:
                raise ValueError(f"{name}: expected [B, L, {width}], got shape {tuple(t.shape)}")
            _check_input_dtype(name, t, self.q_proj.weight.dtype)
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        B, T, _ = query.shape
        S = key.shape[1]
        if key.shape[0] != B or value.shape[:2] != key.shape[:2]:
            raise ValueError(
                f"key/value: batch and length must match (query batch {B}); got key {tuple(key.shape)}, "
                f"value {tuple(value.shape)}"
            )
        H, dl = self.num_heads, self.latent_dim
        q = self.q_proj(query).view(B, T, H, dl)
        k = self.k_proj(key).view(B, S, H, dl)
        v = self.v_proj(value).view(B, S, H, self.head_dim)
        mask = self._merge_masks(attn_mask, key_padding_mask, B, T, S, q.dtype, q.device)
        res = attention_with_stats(
            q, k, v, causal=is_causal, softmax_scale=self.softmax_scale, attn_mask=mask, backend=self.backend
        )
        o = F.dropout(res.out, p=self.dropout, training=self.training)
        out = self.out_proj(o.reshape(B, T, self.embed_dim))
        weights = None
        if need_weights:
            weights = attention_probs(
                q.detach(), k.detach(), res.lse.detach(), softmax_scale=self.softmax_scale, causal=is_causal,
                attn_mask=mask,
            ).float()
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not self.batch_first:
            out = out.transpose(0, 1)
        density = causal_density(T, S) if is_causal else 1.0
        if mask is not None and mask.dtype == torch.bool:
            keep = mask.expand(B, H, T, S)
            if is_causal:
                rows = torch.arange(T, device=q.device)[:, None]
                keep = keep & (torch.arange(S, device=q.device)[None, :] <= rows + S - T)
            density = float(keep.float().mean())
        stats = AttentionStats(res.backend, dl, density, _head_max(res.max_logit))
        return out, weights, stats


# ---------------------------------------------------------------------------------------------------
# DeepSeek MLA
# ---------------------------------------------------------------------------------------------------
class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 Multi-Head Latent Attention with transformers' ``DeepseekV3Attention`` weights.

    Parameters (names as in transformers): ``q_proj`` ``[H·(dn+dr), E]`` when ``q_lora_rank`` is None,
    else ``q_a_proj`` ``[q_lora_rank, E]``, ``q_a_layernorm``, ``q_b_proj`` ``[H·(dn+dr), q_lora_rank]``;
    ``kv_a_proj_with_mqa`` ``[dc+dr, E]``; ``kv_a_layernorm`` (dc); ``kv_b_proj`` ``[H·(dn+dv), dc]``;
    ``o_proj`` ``[E, H·dv]``. Softmax scale ``(dn+dr)^-0.5`` times YaRN ``mscale²``.

    Args:
        config: ``MLAConfig``.
        layer_idx: index of this layer in a ``LatentCache`` (default 0).
        form: ``"naive"``, ``"absorbed"`` or ``"auto"`` (absorbed when a cache is used and the new
            chunk has at most ``absorb_max_q`` tokens — decode — naive otherwise).
        backend: as in ``mla.functional.latent_attention``.

    ``forward(hidden_states [B,T,E], *, position_ids=None, cache=None, attention_mask=None,
    causal=True, form=None, need_weights=False)`` returns ``(out [B,T,E], stats)`` (and the
    ``[B,H,T,S]`` probabilities as a third element when ``need_weights``). Packed documents:
    ``cu_seqlens`` int32 ``[D+1]`` (and ``max_seqlen``, default: the longest) splits the tokens of a
    ``[1, total, E]`` batch into ``D`` documents (``mla.functional.latent_attention_varlen``: no attention
    across documents; positions restart at 0 in each document unless ``position_ids`` are given; no cache,
    ``attention_mask`` or ``need_weights``). With a ``LatentCache``, the
    new ``[c_kv | k_rope]`` rows are appended and attention runs over all cached tokens (causal is
    bottom-right, so a chunk continuing a cache attends correctly). ``position_ids`` default to
    ``cached_length + arange(T)``. ``attention_mask`` ``[B, S]`` (1/True = real token) masks padded
    keys (reference path).

    Raises:
        ValueError: ``hidden_states`` of the wrong shape, unknown form.
    """

    absorb_max_q = 64
    # Head (tensor) parallelism, set by ``mla.parallel.parallelize_mla``: identity in the forward pass, sums
    # the gradient over the tensor-parallel ranks in backward. Applied to the latent rows that this rank's
    # heads consume directly (shared by all heads, so each rank's gradient is a partial sum).
    _shared_latent_grad_hook = None

    def __init__(self, config: MLAConfig, layer_idx: int | None = None, *, form: str = "auto", backend: str = "auto"):
        super().__init__()
        require_config(config)
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        self.config = config
        self.layer_idx = 0 if layer_idx is None else layer_idx
        self.form, self.backend = form, backend
        E, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(E, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(E, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(E, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, E, bias=bias)
        self.rotary_emb = RotaryEmbedding(
            self.qk_rope_head_dim, config.rope_parameters, config.max_position_embeddings
        )
        self.softmax_scale = yarn_softmax_scale(self.qk_head_dim, config.rope_parameters)
        # Sliding window (HF semantics: the token and the sliding_window - 1 before it) and per-head sinks.
        w = config.sliding_window
        self.window_size = (-1, -1) if w is None else (w - 1, 0)
        self.sinks = nn.Parameter(torch.zeros(H, dtype=torch.float32)) if config.attention_sinks else None

    # -- pieces shared with LatentSparseAttention and the transformers integration -------------
    def project_q(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``[B, T, H, dn + dr]`` (before RoPE) and the normed query latent (None without q_lora).

        ``H`` is this rank's head count (``num_heads / tp`` when sharded by ``mla.parallel``)."""
        B, T, _ = hidden_states.shape
        if self.q_lora_rank is None:
            return self.q_proj(hidden_states).view(B, T, -1, self.qk_head_dim), None
        q_lat = self.q_a_layernorm(self.q_a_proj(hidden_states))
        return self.q_b_proj(q_lat).view(B, T, -1, self.qk_head_dim), q_lat

    def project_kv_latent(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_kv [B, T, dc] normed, k_rope [B, T, dr] before RoPE)``."""
        ckv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_rope = torch.split(ckv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope

    def _weights_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``kv_b_proj.weight``: ``W_UK [H, dn, dc]`` and ``W_UV [H, dv, dc]`` (this rank's heads
        when the weight is a tensor-parallel ``DTensor`` shard)."""
        w = self.kv_b_proj.weight
        if hasattr(w, "to_local"):  # DTensor (head-parallel): the local rows are this rank's heads
            w = w.to_local()
        w = w.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _shared_latent(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (latent rows used by every head); under head parallelism its gradient is summed over ranks."""
        hook = self._shared_latent_grad_hook
        return t if hook is None else hook(t)

    def rope(self, q_rope: torch.Tensor, k_rope: torch.Tensor, position_ids: torch.Tensor):
        """Rotate ``q_rope [B,T,H,dr]`` and ``k_rope [B,T,dr]`` at ``position_ids [B|1, T]``."""
        cos, sin = self.rotary_emb(position_ids, dtype=q_rope.dtype)
        il = self.config.rope_interleave
        q_rope = apply_rotary(q_rope, cos, sin, il)
        k_rope = apply_rotary(k_rope[:, :, None], cos, sin, il)[:, :, 0]
        return q_rope, k_rope

    def resolve_form(self, form: str | None, T: int, cached: bool) -> str:
        form = form or self.form
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if form == "auto":
            return "absorbed" if cached and T <= self.absorb_max_q else "naive"
        return form

    def build_qkv(self, q_nope, q_rope, latent, form: str):
        """Attention inputs for ``form``: ``(q, k, v)`` with ``latent [B, S, dc+dr]`` rows ``[c_kv | k_rope]``."""
        B, S, _ = latent.shape
        dn, dr, dc = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if form == "absorbed":
            q = self.absorb_q(q_nope, q_rope)
            k = self._shared_latent(latent)[:, :, None, :]
            v = k[..., :dc]  # a prefix view of k: the kernels load the latent tile once
            return q, k, v
        kv = self.kv_b_proj(latent[..., :dc]).view(B, S, -1, dn + self.v_head_dim)
        H = kv.shape[2]
        k_nope, v = torch.split(kv, [dn, self.v_head_dim], dim=-1)
        k_rope = self._shared_latent(latent[..., dc:])
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return q, k, v

    def finish(self, out: torch.Tensor, form: str) -> torch.Tensor:
        """``o_proj`` of the attention output (after ``W_UV`` in the absorbed form). out ``[B,T,H,·]``."""
        B, T = out.shape[:2]
        if form == "absorbed":
            _, w_uv = self._weights_uk_uv()
            out = torch.einsum("bthc,hvc->bthv", out, w_uv.to(out.dtype))
        return self.o_proj(out.reshape(B, T, -1))

    def absorb_q(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Absorbed query ``[B, T, H, dc + dr]``: ``cat(q_nope · W_UK, q_rope)``."""
        w_uk, _ = self._weights_uk_uv()
        return torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk.to(q_nope.dtype)), q_rope], dim=-1)

    def _prepare(self, hidden_states, position_ids, cache):
        """Project and rotate; store the new latent rows in ``cache``.

        Returns ``(q_nope, q_rope, q_latent, latent, position_ids)`` where ``latent [B, S, dc+dr]`` are
        all rows to attend over (for a ``PagedLatentCache``: only the new rows; the pages hold the rest).
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states: expected [B, T, {self.config.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        _check_input_dtype("hidden_states", hidden_states, self.kv_a_proj_with_mqa.weight.dtype)
        B, T, _ = hidden_states.shape
        device = hidden_states.device
        paged = isinstance(cache, PagedLatentCache)
        if paged and len(cache.seq_ids) != B:
            raise ValueError(f"cache: the current step has {len(cache.seq_ids)} sequences, hidden_states has {B}")
        if position_ids is None:
            if paged:
                position_ids = cache.step_start.to(device).long()[:, None] + torch.arange(T, device=device)
            else:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + T, device=device)[None]
        q, q_latent = self.project_q(hidden_states)
        q_nope, q_rope = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.project_kv_latent(hidden_states)
        q_rope, k_rope = self.rope(q_rope, k_rope, position_ids)
        # Under autocast RMSNorm's fp32 weight promotes c_kv to fp32: attend in the queries' dtype.
        latent = torch.cat([c_kv, k_rope], dim=-1).to(q.dtype)
        if paged:
            cache.write(self.layer_idx, latent.to(cache.dtype))  # e.g. bf16 autocast rows into an fp32 cache
        elif cache is not None:
            latent = cache.update(self.layer_idx, latent)
        return q_nope, q_rope, q_latent, latent, position_ids

    @staticmethod
    def _key_mask(attention_mask, B, S, device):
        if attention_mask is None:
            return None
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask: expected [B, S] = {[B, S]}, got {list(attention_mask.shape)}")
        return attention_mask.to(device=device).bool()[:, None, None, :]

    @staticmethod
    def _paged_decode_step(cache, T: int, need_weights: bool, attention_mask) -> bool:
        """Whether this call attends over the pages (not a fresh prefill); checks what that path needs."""
        if not isinstance(cache, PagedLatentCache) or cache.step_is_prefill:
            return False
        if cache.step_uniform_len != T:
            raise ValueError(
                f"cache: a step continuing cached sequences must append the same number of tokens to each "
                f"(T={T}), got {cache._step_lens}"
            )
        if need_weights or attention_mask is not None:
            raise ValueError("need_weights / attention_mask are not supported when decoding over a PagedLatentCache")
        return True

    def _sinks(self):
        """The fp32 ``[H]`` sink logits (the parameter stays fp32 even in a half-precision module) or None."""
        sinks = getattr(self, "sinks", None)
        return None if sinks is None else sinks.float()

    def _window(self):
        return getattr(self, "window_size", (-1, -1))

    def _decode(self, q_abs, cache, topk_indices=None):
        """``mla_decode`` of absorbed queries over the pages of ``cache`` (causal per sequence)."""
        out, lse = mla_decode(
            q_abs, cache.kv_cache(self.layer_idx), cache.block_table, cache.cache_seqlens,
            softmax_scale=self.softmax_scale, head_dim_v=self.kv_lora_rank, causal=True,
            topk_indices=topk_indices, backend=self.backend, check_inputs=False, kv_format=cache.kv_format,
            window_size=self._window(), sinks=self._sinks(),
        )
        return out, resolve_backend(self.backend, q_abs.device, q_abs.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | PagedLatentCache | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = True,
        form: str | None = None,
        need_weights: bool = False,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ):
        if cu_seqlens is not None:
            return self._forward_packed(hidden_states, cu_seqlens, max_seqlen, position_ids, cache, attention_mask,
                                        causal, form, need_weights)
        q_nope, q_rope, _, latent, _ = self._prepare(hidden_states, position_ids, cache)
        B, T = q_nope.shape[:2]
        if self._paged_decode_step(cache, T, need_weights, attention_mask):
            if not causal:
                raise ValueError("causal=False is not supported when decoding over a PagedLatentCache")
            out, backend = self._decode(self.absorb_q(q_nope, q_rope), cache)
            density = _causal_density_t(T, cache.cache_seqlens.max())  # over the longest sequence, lazily
            return self.finish(out, "absorbed"), AttentionStats(
                backend, self.kv_lora_rank + self.qk_rope_head_dim, density, None, "absorbed"
            )
        S = latent.shape[1]
        form = self.resolve_form(form, T, cache is not None)
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        keep = self._key_mask(attention_mask, B, S, q.device)
        res = attention_with_stats(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, attn_mask=keep, backend=self.backend,
            window_size=self._window(), sinks=self._sinks(),
        )
        out = self.finish(res.out, form)
        density = causal_density(T, S) if causal else 1.0
        stats = AttentionStats(res.backend, q.shape[-1], density, _head_max(res.max_logit), form)
        if need_weights:
            probs = attention_probs(
                q.detach(), k.detach(), res.lse.detach(), softmax_scale=self.softmax_scale, causal=causal,
                attn_mask=keep, window_size=self._window(),
            )
            return out, stats, probs
        return out, stats


    def _forward_packed(self, hidden_states, cu_seqlens, max_seqlen, position_ids, cache, attention_mask, causal,
                        form, need_weights):
        """``forward`` over packed documents (see the class docstring)."""
        if cache is not None or attention_mask is not None or need_weights:
            raise ValueError("cu_seqlens: packed documents take no cache, attention_mask or need_weights")
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise ValueError(f"cu_seqlens: hidden_states must be one packed row [1, total, E], got "
                             f"{tuple(hidden_states.shape)}")
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens, hidden_states.shape[1])[None]
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        q_nope, q_rope, _, latent, _ = self._prepare(hidden_states, position_ids, None)
        form = self.resolve_form(form, q_nope.shape[1], False)
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        out = latent_attention_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=self.softmax_scale, causal=causal, backend=self.backend)
        backend = resolve_backend(self.backend, q.device, q.dtype)
        # Pairs attended over the packed total x total grid (per document: causal triangle or square).
        lens = cu_seqlens.diff().double()
        pairs = (lens * (lens + 1) / 2).sum() if causal else (lens * lens).sum()
        density = pairs / max(q.shape[1], 1) ** 2
        return self.finish(out[None], form), AttentionStats(backend, q.shape[-1], density, None, form)


def packed_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]`` positions that restart at 0 at each ``cu_seqlens`` boundary (packed documents)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=total)
    return torch.arange(total, device=cu.device) - starts


# ---------------------------------------------------------------------------------------------------
# Sparse MLA
# ---------------------------------------------------------------------------------------------------
class LightningIndexer(nn.Module):
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 report): cheap scores that pick keys.

    ``I[t, s] = Σ_j w[t, j] · ReLU(q_idx[t, j] · k_idx[s])`` with ``n_heads`` small indexer heads of
    ``head_dim`` channels; the first ``rope_dim`` channels of ``q_idx``/``k_idx`` carry non-interleaved
    (half-split) RoPE. ``w = weights_proj(x) · n_heads^-0.5 · head_dim^-0.5``.

    Args:
        hidden_size: E; q_in_dim: width of the query input (the q latent, or E); n_heads, head_dim,
        rope_dim: indexer sizes.

    ``forward(hidden_states [B,T,E], q_input [B,T,q_in_dim], cos, sin, keys=None)`` returns
    ``scores [B, T, S]`` float32 over ``keys [B, S, head_dim]`` (all cached + new keys) when given, else
    over the new tokens' own keys (``S = T``).
    """

    def __init__(self, hidden_size: int, q_in_dim: int, n_heads: int, head_dim: int, rope_dim: int):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.wq = nn.Linear(q_in_dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim)
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    def _rope(self, x, cos, sin):
        r = apply_rotary(x[..., : self.rope_dim], cos, sin, interleaved=False)
        return torch.cat([r, x[..., self.rope_dim :]], dim=-1)

    def keys(self, hidden_states, cos, sin):
        """Indexer keys ``[B, T, head_dim]`` for new tokens (RoPE applied)."""
        k = self.k_norm(self.wk(hidden_states))
        return self._rope(k[:, :, None], cos, sin)[:, :, 0]

    def forward(self, hidden_states, q_input, cos, sin, keys=None):
        B, T, _ = hidden_states.shape
        q = self.wq(q_input).view(B, T, self.n_heads, self.head_dim)
        q = self._rope(q, cos, sin)
        k = self.keys(hidden_states, cos, sin) if keys is None else keys
        w = self.weights_proj(hidden_states).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        logits = F.relu(torch.einsum("btjd,bsd->btjs", q.float(), k.float()))
        return torch.einsum("btj,btjs->bts", w, logits)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_attn ‖ softmax(I)) averaged over query rows: the DeepSeek-V3.2 indexer warm-up loss.

    Args:
        index_scores: ``[B, T, S]`` indexer scores, ``-inf`` where a key may not be chosen.
        attn_probs: ``[B, H, T, S]`` dense attention probabilities; the target sums them over heads and
            L1-normalises each row.

    Returns:
        Scalar float32; 0 when ``softmax(index_scores)`` equals the target. Rows with no key are skipped.
    """
    target = attn_probs.detach().float().sum(dim=1)
    norm = target.sum(dim=-1, keepdim=True)
    valid = norm.squeeze(-1) > 0
    target = target / norm.clamp_min(1e-30)
    logp = torch.log_softmax(index_scores.float().masked_fill(~torch.isfinite(index_scores), -1e30), dim=-1)
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), torch.zeros_like(target))
    kl = kl.sum(dim=-1)
    return kl[valid].mean() if bool(valid.any()) else kl.sum() * 0


class LatentSparseAttention(MultiHeadLatentAttention):
    """MLA with a sparse key set per query token: the hybrid of DESIGN §5.

    Always runs the absorbed form (one latent kv head shared by all heads, heads packed in the kernel
    tile), as DeepSeek-V3.2 does for its sparse attention. Per query token (bottom-right causal):

    * ``mode="block"``: key blocks of ``sparse_block_size`` tokens; the token keeps the first
      ``num_sink_blocks`` blocks, the ``num_local_blocks`` blocks ending at its own block (>= 1), and the
      ``topk_blocks`` best other visible blocks, scored in latent space as its absorbed query latent
      (``q_nope · W_UK`` averaged over heads) against the mean-pooled compressed keys ``c_kv`` of each
      block (MoBA, arXiv 2502.13189 / NSA, arXiv 2502.11089 style). The choice is a ``BlockMask`` with
      query blocks of one token, run by the block-sparse kernel; inside kept blocks causality is per token.
    * ``mode="topk"``: a ``LightningIndexer`` scores the keys and the token keeps its ``index_topk`` best
      (DeepSeek Sparse Attention); run by the top-k kernel. With ``indexer_loss=True`` the forward also
      returns ``indexer_kl_loss`` against the dense attention distribution in ``stats.indexer_loss``.

    Selection only looks at complete past blocks / past keys, so incremental decoding (``LatentCache`` or
    ``PagedLatentCache``; decode steps use ``mla_decode`` with top-k token indices) equals the full forward.
    Over a ``PagedLatentCache`` the layer keeps its pooled block keys (running ``c_kv`` sums per block,
    ``add_block_sums``) and its indexer keys (``write_tokens``) in the cache as tokens are written, so a
    decode step selects without re-reading the cached rows, with fixed shapes and no host sync.
    Weights as ``MultiHeadLatentAttention`` (+ ``indexer.*`` in topk mode). Selection is not
    differentiable; gradients flow through the attention over the kept keys (and the indexer's KL loss).
    Returns ``(out, stats)`` like its parent, with ``density`` and ``visited_blocks``/``visited_tokens``.

    Raises:
        ValueError: unknown mode, ``num_local_blocks < 1`` in block mode, ``causal=False``.
    """

    MODES = ("block", "topk")

    def __init__(
        self,
        config: MLAConfig,
        layer_idx: int | None = None,
        *,
        mode: str = "block",
        form: str = "absorbed",
        backend: str = "auto",
        indexer_loss: bool = False,
    ):
        super().__init__(config, layer_idx, form="absorbed", backend=backend)
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if mode == "block" and config.num_local_blocks < 1:
            raise ValueError("num_local_blocks: block mode needs >= 1 (a token must keep its own block)")
        self.mode = mode
        self.indexer_loss = indexer_loss
        if mode == "topk":
            self.indexer = LightningIndexer(
                config.hidden_size, config.q_lora_rank or config.hidden_size, config.index_n_heads,
                config.index_head_dim, config.qk_rope_head_dim,
            )

    def _block_grid(self, q_abs, block_sums, key_len, pos):
        """bool ``[B, T, nK]`` key blocks kept per query token.

        q_abs ``[B, T, H, dc+dr]``; block_sums ``[B, nK, dc]`` sums of the compressed keys ``c_kv`` per
        block (0 past ``key_len``); key_len ``[B]``; pos ``[B|1, T]`` key-aligned position of each query.
        """
        cfg, dc = self.config, self.kv_lora_rank
        bs = cfg.sparse_block_size
        nk = block_sums.shape[1]
        dev = block_sums.device
        with torch.no_grad():
            qm = q_abs[..., :dc].float().mean(dim=2)
            start = torch.arange(nk, device=dev) * bs
            cnt = (key_len.to(dev).long()[:, None] - start[None, :]).clamp(1, bs)
            scores = torch.einsum("btc,bkc->btk", qm, (block_sums / cnt[..., None].to(block_sums.dtype)).float())
            allowed = start[None, None, :] <= pos[..., None]
            return select_topk_blocks(
                scores, cfg.topk_blocks, allowed, num_sink_blocks=cfg.num_sink_blocks,
                num_local_blocks=cfg.num_local_blocks,
            )

    def _block_sums(self, rows):
        """``[B, ceil(S / block), dc]`` fp32 sums of ``c_kv`` per key block of ``rows [B, S, dc+dr]``."""
        bs, dc = self.config.sparse_block_size, self.kv_lora_rank
        B, S = rows.shape[:2]
        nk = math.ceil(S / bs)
        return F.pad(rows[..., :dc].detach().float(), (0, 0, 0, nk * bs - S)).view(B, nk, bs, dc).sum(2)

    def _block_tokens(self, grid, pos):
        """int32 ``[B, T, n·bs]`` token positions of the kept blocks (``n = min(nK, sinks + local + topk)``,
        a bound on the kept blocks: fixed shapes), ``-1`` for positions past ``pos`` and unused lanes."""
        cfg, bs = self.config, self.config.sparse_block_size
        nk = grid.shape[-1]
        n = min(nk, cfg.num_sink_blocks + cfg.num_local_blocks + cfg.topk_blocks)
        kcol = torch.arange(nk, device=grid.device)
        # Kept blocks in ascending order: the largest keys nk - k of the kept columns.
        key = torch.where(grid, nk - kcol, torch.zeros((), dtype=kcol.dtype, device=grid.device))
        blk = nk - torch.topk(key, n, dim=-1).values
        tok = blk[..., None] * bs + torch.arange(bs, device=grid.device)
        ok = (blk[..., None] < nk) & (tok <= pos[..., None, None])
        return torch.where(ok, tok, -1).flatten(-2).to(torch.int32)

    @staticmethod
    def _kept_tokens(grid, pos, bs: int, S: int) -> torch.Tensor:
        """bool ``[B, T, S]``: tokens of the kept blocks that the query may see (``s <= pos``)."""
        s = torch.arange(S, device=grid.device)
        # Index by block rather than repeat-and-slice: no guard on S being a multiple of bs under compile.
        return grid[..., s // bs] & (s <= pos[..., None])

    def _indexer_scores(self, hidden_states, q_latent, position_ids, cache):
        """Indexer scores ``[B, T, S]`` over the keys: the new tokens' own (no cache, paged prefill), all
        cached ones (``LatentCache``), or a paged decode step's ``[B, capacity]`` pages."""
        cos, sin = self.rotary_emb(position_ids, dtype=hidden_states.dtype)
        # The indexer trains on its own loss: its inputs are detached from the main model (DeepSeek-V3.2).
        x_idx = hidden_states.detach()
        q_in = x_idx if q_latent is None else q_latent.detach()
        keys = None
        if isinstance(cache, PagedLatentCache):
            keys = self.indexer.keys(x_idx, cos, sin)
            cache.write_tokens(self.layer_idx, "index_keys", keys)
            if not cache.step_is_prefill:
                keys = cache.gather_tokens(self.layer_idx, "index_keys")
        elif cache is not None:
            keys = cache.update_extra(self.layer_idx, "index_keys", self.indexer.keys(x_idx, cos, sin))
        return self.indexer(x_idx, q_in, cos, sin, keys)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | PagedLatentCache | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = True,
        form: str | None = None,
        need_weights: bool = False,
    ):
        if not causal:
            raise ValueError("LatentSparseAttention is causal: sinks, local blocks and the indexer assume causal order")
        q_nope, q_rope, q_latent, latent, position_ids = self._prepare(hidden_states, position_ids, cache)
        B, T = q_nope.shape[:2]
        device = q_nope.device
        bs = self.config.sparse_block_size
        q_abs = self.absorb_q(q_nope, q_rope)
        paged = isinstance(cache, PagedLatentCache)
        if paged and self.mode == "block":  # pooled block keys, kept up to date as tokens are written
            cache.add_block_sums(self.layer_idx, "block_keys", latent[..., : self.kv_lora_rank], bs)
        decoding = self._paged_decode_step(cache, T, need_weights, attention_mask)
        if decoding:
            # Only device tensors and the table's fixed capacity: no read of the cached rows, no host sync.
            key_len = cache.cache_seqlens.to(device)
            pos = cache.step_start.to(device).long()[:, None] + torch.arange(T, device=device)
            S = cache.capacity
            s_max = key_len.max()
        else:
            key_len = torch.full((B,), latent.shape[1], dtype=torch.long, device=device)
            pos = (latent.shape[1] - T + torch.arange(T, device=device))[None]
            S = s_max = latent.shape[1]
        keep = None if decoding else self._key_mask(attention_mask, B, S, device)
        block_mask = topk = kl = None
        if self.mode == "block":
            sums = cache.block_sums(self.layer_idx, "block_keys") if decoding else self._block_sums(latent)
            grid = self._block_grid(q_abs, sums, key_len, pos)
            visited_blocks = grid.sum()
            if decoding:
                topk = self._block_tokens(grid, pos)[:, :, None]
                visited_tokens = (topk >= 0).sum()
            else:
                visited_tokens = self._kept_tokens(grid, pos, bs, S).sum()
                block_mask = BlockMask.from_dense(grid[:, None], (1, bs), (T, S))
        else:
            visited_blocks = None
            scores = self._indexer_scores(hidden_states, q_latent, position_ids, cache)[:, :, :S]
            allowed = (torch.arange(S, device=device) <= pos[..., None]) & (
                torch.arange(S, device=device) < key_len.to(device)[:, None, None]
            )
            if keep is not None:
                allowed = allowed & keep[:, 0]
            scores = scores.masked_fill(~allowed, float("-inf"))
            topk = topk_indices_from_scores(scores.detach()[:, :, None], self.config.index_topk)
            visited_tokens = (topk >= 0).sum()  # the lanes are distinct keys
            if self.indexer_loss and not decoding:
                q, k, v = q_abs, latent[:, :, None], latent[:, :, None, : self.kv_lora_rank]
                with torch.no_grad():
                    ref = attention_with_stats(
                        q, k, v, causal=True, softmax_scale=self.softmax_scale, attn_mask=keep,
                        return_max_logit=False, backend=self.backend,
                    )
                    dense = attention_probs(
                        q, k, ref.lse, softmax_scale=self.softmax_scale, causal=True, attn_mask=keep
                    )
                kl = indexer_kl_loss(scores, dense)
        # Kept on the device (read lazily through AttentionStats): over the longest sequence's keys.
        density = visited_tokens / (B * T * s_max if decoding else max(1, B * T * S))
        if decoding:
            out, backend = self._decode(q_abs, cache, topk[:, :, 0])
            stats = AttentionStats(
                backend, q_abs.shape[-1], density, None, "absorbed", visited_blocks, visited_tokens
            )
            return self.finish(out, "absorbed"), stats
        k = latent[:, :, None, :]
        v = k[..., : self.kv_lora_rank]
        res = attention_with_stats(
            q_abs, k, v, causal=True, softmax_scale=self.softmax_scale, block_mask=block_mask, topk_indices=topk,
            attn_mask=keep, backend=self.backend, check_indices=False,
        )
        out = self.finish(res.out, "absorbed")
        stats = AttentionStats(
            res.backend, q_abs.shape[-1], density, _head_max(res.max_logit), "absorbed", visited_blocks,
            visited_tokens, kl,
        )
        if need_weights:
            probs = attention_probs(
                q_abs.detach(), k.detach(), res.lse.detach(), softmax_scale=self.softmax_scale, causal=True,
                block_mask=block_mask, topk_indices=topk, attn_mask=keep,
            )
            return out, stats, probs
        return out, stats
