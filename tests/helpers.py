"""Independent float64 oracles and small utilities shared by the tests.

The formulas here materialise the full ``[B, Hq, T, S]`` score matrix, written separately from
``mla.reference`` so that the two can disagree.
"""

from __future__ import annotations

import math

import torch


def causal_keep(T: int, S: int, device=None) -> torch.Tensor:
    """``[T, S]`` bool: bottom-right causal (query i sees key j iff j <= i + S - T)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def full_attention(q, k, v, scale, keep=None):
    """float64 ``(out [B,T,Hq,Dv], lse [B,Hq,T])`` with ``keep`` broadcastable to ``[B,Hq,T,S]``.

    Rows with no kept key give out 0 and lse +inf.
    """
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    p = torch.where(empty[..., None], 0.0, p)
    out = torch.einsum("bhts,bshe->bthe", p, vv)
    lse = torch.where(empty, math.inf, lse)
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (0 when both are 0). Non-finite x gives inf."""
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def random_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, Hq, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, Dv, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v
