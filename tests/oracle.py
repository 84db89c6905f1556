"""The tests' one float64 oracle: attention over the full ``[B, Hq, T, S]`` score matrix.

Written independently of ``mla.reference`` (which it checks, docs/design.md §6.1) and of the kernels:
every op's expected values come from :func:`attention` under an element keep-mask, and the masks of
the ops are built here from their own inputs:

* dense: :func:`causal_keep`, :func:`window_keep` (element by element);
* block-sparse: ``BlockMask.to_element_mask(causal)`` (partial blocks included);
* top-k: :func:`topk_keep` from ``topk_indices`` (``-1`` and out-of-range lanes ignored);
* paged decode: :func:`paged_decode` over each sequence's cache rows, gathered by the test.

Everything is computed in float64 on the inputs' device; gradients come from autograd (:func:`attention_grads`).
"""

from __future__ import annotations

import math

import torch


def causal_keep(T: int, S: int, device=None) -> torch.Tensor:
    """``[T, S]`` bool: bottom-right causal (query i sees key j iff j <= i + S - T)."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    return j <= i + (S - T)


def window_keep(T: int, S: int, left: int, right: int) -> torch.Tensor:
    """``[T, S]`` bool: FlashAttention window, query i sees key j iff
    ``i + S - T - left <= j <= i + S - T + right`` (-1 = unbounded), written element by element."""
    keep = torch.zeros(T, S, dtype=torch.bool)
    for i in range(T):
        for j in range(S):
            lo_ok = left < 0 or j >= i + S - T - left
            hi_ok = right < 0 or j <= i + S - T + right
            keep[i, j] = lo_ok and hi_ok
    return keep


def topk_keep(idx: torch.Tensor, T: int, S: int, Hq: int, causal: bool = False) -> torch.Tensor:
    """bool ``[B, Hq, T, S]`` from ``topk_indices`` int ``[B, T, Hkv, K]``: query (b, h, t) sees key s iff s is
    listed in row (b, t, h // (Hq / Hkv)); lanes outside ``[0, S)`` (``-1``) are ignored; ``causal`` also
    requires ``s <= t + S - T``."""
    B, _, Hkv, _ = idx.shape
    j = idx.long().cpu()
    t = torch.arange(T).view(1, T, 1, 1)
    valid = (j >= 0) & (j < S)
    if causal:
        valid &= j <= t + (S - T)
    keep = torch.zeros(B, Hkv, T, S + 1, dtype=torch.bool)
    keep.scatter_(3, torch.where(valid, j, S).permute(0, 2, 1, 3), True)
    return keep[..., :S].repeat_interleave(Hq // Hkv, dim=1)


def attention(q, k, v, scale: float, keep=None, sinks=None):
    """float64 ``(out [B,T,Hq,Dv], lse [B,Hq,T], max_logit [B,Hq])`` on q's device, differentiable in q, k, v
    and sinks.

    ``q [B,T,Hq,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]`` (GQA: query head h reads kv head
    h // (Hq / Hkv)); ``keep`` bool broadcastable to ``[B,Hq,T,S]`` (None: every key). Rows with no kept key
    give out 0 and lse +inf; heads with no kept key give max_logit -inf. ``sinks [Hq]``: an extra score
    column per head with a zero value (its mass leaves the output), included in ``lse`` but not in
    ``max_logit``; then rows without keys give out 0 and lse = sink.
    """
    q, k, v = (x.double() for x in (q, k, v))
    G = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    if keep is not None:
        s = s.masked_fill(~keep.to(s.device), -math.inf)
    B, H, T, S = s.shape
    max_logit = s.detach().amax(dim=(-2, -1)) if T * S > 0 else s.new_full((B, H), -math.inf)
    if sinks is not None:
        col = sinks.to(s.device, torch.float64)[None, :, None, None].expand(B, H, T, 1)
        s = torch.cat([s, col], dim=-1)
        vv = torch.cat([vv, vv.new_zeros(B, 1, *vv.shape[2:])], dim=1)
    # Max-shifted softmax (m detached: lse = m + log Σ exp(s - m) has the same value and gradient).
    m = s.detach().amax(dim=-1, keepdim=True) if s.shape[-1] > 0 else s.new_full((B, H, T, 1), -math.inf)
    empty = torch.isneginf(m)
    m0 = torch.where(empty, 0.0, m)
    e = torch.exp(s - m0)
    denom = e.sum(dim=-1, keepdim=True)
    d1 = torch.where(denom == 0, 1.0, denom)
    out = torch.einsum("bhts,bshe->bthe", e / d1, vv)
    lse = torch.where(empty, math.inf, m0 + torch.log(d1)).squeeze(-1)
    return out, lse, max_logit


def attention_grads(q, k, v, scale: float, do, keep=None, sinks=None, dlse=None):
    """float64 gradients of ``Σ out·do + Σ lse·dlse`` (lse terms of rows without keys left out) from
    :func:`attention`: ``(dq, dk, dv)``, plus ``dsinks`` when ``sinks`` is given. ``v`` is its own leaf, so
    with ``v`` a view of ``k`` dk is the score path only and dv the value path, as the kernels return."""
    leaves = [x.detach().double().clone().requires_grad_(True) for x in (q, k, v)]
    if sinks is not None:
        leaves.append(sinks.detach().double().clone().requires_grad_(True))
    out, lse, _ = attention(*leaves[:3], scale, keep, leaves[3] if sinks is not None else None)
    loss = (out * do.detach().to(out.device, torch.float64)).sum()
    if dlse is not None:
        loss = loss + torch.where(torch.isinf(lse), 0.0, lse * dlse.detach().to(lse.device, torch.float64)).sum()
    loss.backward()
    return tuple(x.grad for x in leaves)


def paged_decode(q, rows, scale: float, dv: int, causal: bool = False, topk=None, sinks=None):
    """float64 ``(out [B,Tq,H,dv], lse [B,H,Tq])`` of decode over a paged latent cache.

    ``q [B,Tq,H,Dk]``; ``rows[b]`` the ``[L_b, Dk]`` cache rows of sequence b in position order (what the
    block table and ``cache_seqlens`` address); keys are the rows, values their first ``dv`` columns (one
    latent head). ``causal``: bottom-right per sequence. ``topk`` int ``[B, Tq, K]`` positions shared by the
    heads of a token (``-1`` and positions ``>= L_b`` ignored). Empty rows: out 0, lse +inf (= sink with
    ``sinks``).
    """
    B, Tq, H, _ = q.shape
    outs, lses = [], []
    for b in range(B):
        kb = rows[b].to(q.device, torch.float64)[None, :, None, :]
        L = kb.shape[1]
        keep = causal_keep(Tq, L) if causal else torch.ones(Tq, L, dtype=torch.bool)
        if topk is not None:
            keep = keep & topk_keep(topk[b].reshape(1, Tq, 1, -1), Tq, L, 1)[0, 0]
        o, lse, _ = attention(q[b:b + 1], kb, kb[..., :dv], scale, keep, sinks)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)
