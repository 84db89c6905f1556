"""Rotary position embeddings (RoPE) and YaRN context extension, as DeepSeek-V2/V3 use them.

* RoPE: Su et al. 2021, "RoFormer" (arXiv 2104.09864).
* YaRN: Peng et al. 2023, "YaRN: Efficient Context Window Extension" (arXiv 2309.00071): a ramp that
  interpolates low frequencies by ``factor`` and keeps high ones, plus the attention ``mscale``.
* DeepSeek-V2 (arXiv 2405.04434) applies RoPE only to the decoupled ``qk_rope_head_dim`` part and
  multiplies the softmax scale by ``mscale(factor, mscale_all_dim)²``.

Numerics and layouts match Hugging Face ``transformers``' DeepseekV3 implementation: ``cos``/``sin`` are
``cat(freqs, freqs)`` times the YaRN attention factor; the *half-split* layout rotates ``(x[i], x[i + d/2])``
pairs; the *interleaved* layout (DeepSeek's checkpoints) rotates ``(x[2i], x[2i+1])`` pairs and returns the
result de-interleaved (evens' rotation, then odds'), exactly like transformers. Because queries and keys
get the same permutation, their dot products equal those of an in-place pair rotation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

__all__ = [
    "rope_inv_freq",
    "yarn_get_mscale",
    "yarn_inv_freq",
    "rope_parameters_inv_freq",
    "yarn_softmax_scale",
    "rotate_half",
    "apply_rotary",
    "RotaryEmbedding",
]


def rope_inv_freq(dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """``1 / base^(2i/dim)`` for ``i < dim/2``: float32 ``[dim // 2]``."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature ``0.1·mscale·ln(scale) + 1`` (1 when ``scale <= 1``)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(
    dim: int,
    base: float,
    factor: float,
    original_max_position_embeddings: int,
    *,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
    device=None,
) -> tuple[torch.Tensor, float]:
    """YaRN inverse frequencies and the cos/sin attention factor.

    Frequencies whose wavelength fits ``original_max_position_embeddings`` more than ``beta_fast`` times
    are kept (extrapolation); those fitting fewer than ``beta_slow`` times are divided by ``factor``
    (interpolation); a linear ramp blends the band between (YaRN §3.2).

    Returns:
        ``(inv_freq float32 [dim // 2], attention_factor)`` where ``attention_factor`` multiplies cos/sin:
        ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are given, else
        ``mscale(factor)``.
    """
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = beta_fast or 32.0
    beta_slow = beta_slow or 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, float(attention_factor)


def _rope_type(params: Mapping | None) -> str:
    if not params:
        return "default"
    return params.get("rope_type", params.get("type", "default")) or "default"


def rope_parameters_inv_freq(
    dim: int, rope_parameters: Mapping | None, max_position_embeddings: int, device=None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention factor from a transformers-style ``rope_parameters`` dict.

    Supports ``rope_type`` ``"default"`` and ``"yarn"`` (keys ``rope_theta``, ``factor``,
    ``original_max_position_embeddings``, ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``,
    ``attention_factor``, ``truncate``).

    Raises:
        ValueError: for another ``rope_type``.
    """
    params = dict(rope_parameters or {})
    base = float(params.get("rope_theta", 10000.0))
    kind = _rope_type(params)
    if kind == "default":
        return rope_inv_freq(dim, base, device), 1.0
    if kind == "yarn":
        factor = params.get("factor")
        orig = params.get("original_max_position_embeddings") or max_position_embeddings
        if factor is None:
            factor = max_position_embeddings / orig
        return yarn_inv_freq(
            dim, base, float(factor), int(orig),
            beta_fast=params.get("beta_fast") or 32.0, beta_slow=params.get("beta_slow") or 1.0,
            mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
            attention_factor=params.get("attention_factor"), truncate=params.get("truncate", True),
            device=device,
        )
    raise ValueError(f"rope_parameters: rope_type {kind!r} is not supported (use 'default' or 'yarn')")


def yarn_softmax_scale(qk_head_dim: int, rope_parameters: Mapping | None) -> float:
    """Softmax scale of DeepSeek MLA: ``qk_head_dim^-0.5``, times ``mscale(factor, mscale_all_dim)²``
    under YaRN when ``mscale_all_dim`` is set (DeepSeek-V2 reference code; transformers DeepseekV3)."""
    scale = qk_head_dim**-0.5
    params = dict(rope_parameters or {})
    if _rope_type(params) != "default":
        mscale_all_dim = params.get("mscale_all_dim", 0)
        if mscale_all_dim:
            m = yarn_get_mscale(float(params["factor"]), float(mscale_all_dim))
            scale = scale * m * m
    return scale


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` for ``x = cat(x1, x2)`` along the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate ``x [B, T, H, D]`` by position.

    Args:
        x: ``[B, T, H, D]`` (D even).
        cos, sin: ``[B, T, D]`` or ``[T, D]`` as produced by ``RotaryEmbedding`` (``cat(freqs, freqs)``).
        interleaved: pairs are ``(x[2i], x[2i+1])`` (DeepSeek checkpoints); the output is de-interleaved
            like transformers' ``apply_rotary_pos_emb_interleave``. Otherwise half-split pairs.

    Returns:
        Tensor like ``x``.
    """
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos = cos.unsqueeze(2).to(x.dtype)
    sin = sin.unsqueeze(2).to(x.dtype)
    if interleaved:
        half = cos.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE or YaRN on ``dim`` rotary channels.

    Args:
        dim: rotary channels (``qk_rope_head_dim``), even.
        rope_parameters: transformers-style dict (``rope_type`` ``"default"`` or ``"yarn"``, ``rope_theta``,
            YaRN keys); None means default RoPE with base 10000.
        max_position_embeddings: used by YaRN when ``factor`` or ``original_max_position_embeddings`` is
            missing.

    ``forward(position_ids [B, T] or [T], dtype)`` returns ``(cos, sin)``, each ``[B, T, dim]`` (or
    ``[T, dim]``), already multiplied by the YaRN attention factor.
    """

    def __init__(self, dim: int, rope_parameters: Mapping | None = None, max_position_embeddings: int = 4096):
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim: rotary dimension must be even, got {dim}")
        inv_freq, self.attention_scaling = rope_parameters_inv_freq(dim, rope_parameters, max_position_embeddings)
        # A plain attribute, not a buffer: ``model.to(torch.bfloat16)`` must not round the frequencies
        # (angles at long positions would drift); it follows the positions' device instead.
        self.inv_freq = inv_freq
        self.dim = dim

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype = torch.float32):
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
