"""``LatentAttention``: multi-head attention with per-head latent scores (the README's layer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mla.attention.common import (
    AttentionStats,
    _check_input_dtype,
    _head_max,
    causal_density,
)
from mla.functional import (
    attention_probs,
    attention_with_stats,
)


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
