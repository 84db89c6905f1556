"""FP8 latent-cache rows in DeepSeek-V3.2's ``fp8_ds_mla`` byte layout (quantize / dequantize).

DeepSeek-V3.2 serves MLA from an FP8 cache (FlashMLA's sparse decode; vLLM calls the format
``"fp8_ds_mla"``): per token and layer, the ``kv_lora_rank = dc`` latent values are stored as
``float8_e4m3fn`` with one fp32 scale per 128 values, rounded up to a power of two, and the
``qk_rope_head_dim = dr`` rotary values stay bf16 (they carry the position and are few). One row is

============================  =====================  ==============================
bytes                         content                DeepSeek-V3 (dc 512, dr 64)
============================  =====================  ==============================
``[0, dc)``                   e4m3 latent codes      512
``[dc, dc + dc/32)``          fp32 scales, 1 / 128   16 (4 scales)
``[.., .. + 2 dr)``           bf16 RoPE values       128
up to a multiple of 16        zero padding           0 (656 in all, vs 1,152 bf16)
============================  =====================  ==============================

A latent value is ``code · scale`` with ``scale = 2^ceil(log2(amax / 448))`` for the ``amax`` of its
128-value block (448 = largest e4m3 value), so every block uses e4m3's full range and dividing by the
scale is exact. ``dc`` must be a multiple of 128; ``dr`` is free (the padding keeps every row, and so
the fp32 scales, 16-byte aligned for vectorised loads). Values are recovered within e4m3's rounding:
``|x - x̂| <= 2^-4 |x| + 2^-10 · scale`` (3 mantissa bits; the second term covers codes in e4m3's
subnormal range, below ``2^-6 · scale``). An all-zero block gets scale 1 and decodes to exact zeros;
``±inf`` (and anything beyond ``448 · 2^118``) saturates to ``±448 · scale``; a NaN input makes its
block NaN (never silently finite).

Our own code; the layout follows DeepSeek-V3.2 / FlashMLA's documented FP8 KV cache.
"""

from __future__ import annotations

import torch

__all__ = ["FP8_DS_MLA", "KV_FORMATS", "FP8_BLOCK", "E4M3_MAX", "fp8_ds_mla_row_bytes",
           "quantize_fp8_ds_mla", "dequantize_fp8_ds_mla"]

#: Name of the FP8 cache format (vLLM's ``kv_cache_dtype="fp8_ds_mla"``).
FP8_DS_MLA = "fp8_ds_mla"
#: Accepted ``kv_format`` values: ``None`` (rows stored in the cache's dtype) or ``"fp8_ds_mla"``.
KV_FORMATS = (None, FP8_DS_MLA)
#: Latent values sharing one scale.
FP8_BLOCK = 128
#: Largest finite ``float8_e4m3fn`` value.
E4M3_MAX = 448.0
_MAX_SCALE_EXP = 118


def _check_dims(kv_lora_rank: int, rope_dim: int) -> None:
    if not isinstance(kv_lora_rank, int) or kv_lora_rank < FP8_BLOCK or kv_lora_rank % FP8_BLOCK:
        raise ValueError(f"kv_lora_rank: the {FP8_DS_MLA} format needs a positive multiple of {FP8_BLOCK}, "
                         f"got {kv_lora_rank!r}")
    if not isinstance(rope_dim, int) or rope_dim < 0:
        raise ValueError(f"rope_dim: expected an int >= 0, got {rope_dim!r}")


def fp8_ds_mla_row_bytes(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one cached row: ``dc + 4 · dc/128 + 2 · dr`` rounded up to 16 (656 for 512 / 64).

    Raises:
        ValueError: ``kv_lora_rank`` not a positive multiple of 128, or ``rope_dim < 0``.
    """
    _check_dims(kv_lora_rank, rope_dim)
    raw = kv_lora_rank + 4 * (kv_lora_rank // FP8_BLOCK) + 2 * rope_dim
    return -(-raw // 16) * 16


def quantize_fp8_ds_mla(rows: torch.Tensor, kv_lora_rank: int) -> torch.Tensor:
    """Quantize rows ``[..., dc + dr]`` (``[c_kv | k_rope]``, any float dtype) to uint8 ``[..., row_bytes]``.

    Per 128-value latent block: ``scale = 2^ceil(log2(amax / 448))`` (1 for an all-zero block),
    ``code = e4m3(clamp(x / scale, ±448))`` (round to nearest even); the RoPE part is rounded to bf16.

    Raises:
        TypeError: non-floating ``rows``, non-int ``kv_lora_rank``. ValueError: ``dc`` not a multiple of 128
        or wider than the rows.
    """
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
        raise TypeError(f"rows: expected a floating-point tensor, got {getattr(rows, 'dtype', type(rows).__name__)}")
    width = rows.shape[-1] if rows.dim() else 0
    if isinstance(kv_lora_rank, bool) or not isinstance(kv_lora_rank, int):
        raise TypeError(f"kv_lora_rank: expected an int, got {type(kv_lora_rank).__name__}")
    if kv_lora_rank > width:
        raise ValueError(f"rows: last dim {width} is narrower than kv_lora_rank={kv_lora_rank!r}")
    dc, dr = kv_lora_rank, width - kv_lora_rank
    nbytes = fp8_ds_mla_row_bytes(dc, dr)
    lead = rows.shape[:-1]
    x = rows.reshape(-1, width)
    lat = x[:, :dc].float().reshape(-1, dc // FP8_BLOCK, FP8_BLOCK)
    # Finite stand-in for ±inf so that it saturates instead of making the scale inf (NaN stays NaN).
    lat = torch.nan_to_num(lat, nan=float("nan"), posinf=torch.finfo(torch.float32).max,
                           neginf=-torch.finfo(torch.float32).max)
    amax = lat.abs().amax(-1)
    # ceil(log2(amax / 448)) from the exponent of amax / 448 (frexp: m in [0.5, 1)); exact, unlike log2.
    mant, expo = torch.frexp(amax / E4M3_MAX)
    # Scales are fp32-normal, and 448 · scale stays finite (2^118): larger values saturate.
    expo = torch.where(mant == 0.5, expo - 1, expo).clamp(-126, _MAX_SCALE_EXP)
    scale = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), expo), torch.ones_like(amax))
    scale = torch.where(torch.isnan(amax), amax, scale)
    codes = (lat / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch.zeros(x.shape[0], nbytes, dtype=torch.uint8, device=rows.device)
    out[:, :dc] = codes.reshape(-1, dc).view(torch.uint8)
    s_end = dc + 4 * (dc // FP8_BLOCK)
    out[:, dc:s_end] = scale.contiguous().view(torch.uint8)
    out[:, s_end:s_end + 2 * dr] = x[:, dc:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out.reshape(*lead, nbytes)


def dequantize_fp8_ds_mla(data: torch.Tensor, kv_lora_rank: int, rope_dim: int,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``[..., dc + dr]`` in ``dtype`` from uint8 ``[..., row_bytes]`` (``code · scale | rope``).

    The values are exact in fp32 (and in bf16 for the usual scales); the decode kernel computes the same
    ``code · scale`` in fp32 registers and rounds it to the query dtype.

    Raises:
        TypeError: ``data`` not uint8. ValueError: last dim is not ``fp8_ds_mla_row_bytes(dc, dr)``.
    """
    if not isinstance(data, torch.Tensor) or data.dtype != torch.uint8:
        raise TypeError(f"data: expected a uint8 tensor in the {FP8_DS_MLA} layout, "
                        f"got {getattr(data, 'dtype', type(data).__name__)}")
    nbytes = fp8_ds_mla_row_bytes(kv_lora_rank, rope_dim)
    if data.dim() == 0 or data.shape[-1] != nbytes:
        raise ValueError(f"data: expected rows of {nbytes} bytes (kv_lora_rank={kv_lora_rank}, "
                         f"rope_dim={rope_dim}), got shape {tuple(data.shape)}")
    dc, dr = kv_lora_rank, rope_dim
    lead = data.shape[:-1]
    x = data.reshape(-1, nbytes)
    s_end = dc + 4 * (dc // FP8_BLOCK)
    codes = x[:, :dc].contiguous().view(torch.float8_e4m3fn).float().reshape(-1, dc // FP8_BLOCK, FP8_BLOCK)
    scale = x[:, dc:s_end].contiguous().view(torch.float32)
    lat = (codes * scale[..., None]).reshape(-1, dc)
    rope = x[:, s_end:s_end + 2 * dr].contiguous().view(torch.bfloat16).float()
    return torch.cat([lat, rope], dim=-1).to(dtype).reshape(*lead, dc + dr)
