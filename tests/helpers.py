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


def window_keep_oracle(T: int, S: int, left: int, right: int) -> torch.Tensor:
    """``[T, S]`` bool: FlashAttention window, query i sees key j iff
    ``i + S - T - left <= j <= i + S - T + right`` (-1 = unbounded), written element by element."""
    keep = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            lo_ok = left < 0 or j >= i + S - T - left
            hi_ok = right < 0 or j <= i + S - T + right
            keep[i, j] = lo_ok and hi_ok
    return keep


def full_attention(q, k, v, scale, keep=None, sinks=None):
    """float64 ``(out [B,T,Hq,Dv], lse [B,Hq,T])`` with ``keep`` broadcastable to ``[B,Hq,T,S]``.

    Rows with no kept key give out 0 and lse +inf. ``sinks [Hq]``: an extra score column per head with a
    zero value (its probability mass leaves the output), included in ``lse``; then empty rows give
    out 0 and lse = sink. Differentiable in q, k, v and sinks.
    """
    q, k, v = q.double(), k.double(), v.double()
    G = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    if keep is not None:
        s = s.masked_fill(~keep, -math.inf)
    if sinks is not None:
        B, H, T, _ = s.shape
        col = sinks.double()[None, :, None, None].expand(B, H, T, 1)
        s = torch.cat([s, col], dim=-1)
        vv = torch.cat([vv, vv.new_zeros(vv.shape[0], 1, *vv.shape[2:])], dim=1)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)
    p = torch.exp(s - torch.where(empty, 0.0, lse)[..., None])
    p = torch.where(empty[..., None], 0.0, p)
    out = torch.einsum("bhts,bshe->bthe", p, vv)
    lse = torch.where(empty, math.inf, lse)
    return out, lse


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (0 when both are 0). Non-finite x gives inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def kernel_tol(dtype, interpret: bool = True) -> float:
    """DESIGN §6 tolerance of a kernel output against the reference; fp32 on a GPU runs its dots in tf32."""
    if dtype == torch.float32:
        return 1e-5 if interpret else 1e-3
    return {torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]


def assert_stat(x, ref, what: str, tol: float, bad_sign: float | None = None):
    """A statistic (lse, max logit): finite entries within ``tol``; the ±inf entries (empty rows/heads)
    exactly where and with the sign expected (``bad_sign``: the sign every infinity must have)."""
    x, ref = x.detach().cpu(), ref.detach().cpu()
    assert not torch.isnan(x).any(), f"{what}: NaN (unwritten or invalid)"
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), inf_ref), f"{what}: ±inf pattern differs"
    assert torch.equal(x[inf_ref].double(), ref[inf_ref].double()), f"{what}: wrong infinity sign"
    if bad_sign is not None and inf_ref.any():
        assert (ref[inf_ref] * bad_sign > 0).all()
    fin = ~inf_ref
    if fin.any():
        err = rel_err(x[fin], ref[fin])
        assert err <= tol, f"{what}: rel err {err:.3g} > {tol}"


def random_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype=torch.float64, device="cpu", seed=0, requires_grad=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, Hq, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    v = torch.randn(B, S, Hkv, Dv, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v
