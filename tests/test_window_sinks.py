"""Sliding windows (``window_size``) and attention sinks (``sinks``): reference and API (issue 14)."""

import math

import pytest
import torch
from helpers import random_qkv, rel_err
from oracle import attention, causal_keep, window_keep

from mla import latent_attention, reference
from mla.functional import attention_with_stats


def _ref(q, k, v, **kw):
    return latent_attention(q, k, v, return_lse=True, backend="reference", **kw)


@pytest.mark.parametrize("T,S", [(5, 9), (9, 5), (6, 6)])
@pytest.mark.parametrize("left", [-1, 0, 1, 7, 128])
@pytest.mark.parametrize("right", [-1, 0, 3])
def test_window_keep_matches_elementwise_definition(T, S, left, right):
    assert torch.equal(reference.window_keep(0, T, T, S, (left, right)), window_keep(T, S, left, right))


@pytest.mark.parametrize("left,right,causal", [(0, 0, False), (1, -1, False), (7, 3, False), (128, 3, True),
                                               (2, -1, True), (-1, 3, False)])
def test_window_reference_matches_oracle(left, right, causal):
    T, S = 7, 12
    q, k, v = random_qkv(2, T, S, 4, 2, 8, 6, dtype=torch.float64, seed=left + 7 * right)
    out, lse = _ref(q, k, v, window_size=(left, right), causal=causal)
    keep = window_keep(T, S, left, right)
    if causal:
        keep = keep & causal_keep(T, S)
    ref, ref_lse, _ = attention(q, k, v, 8**-0.5, keep)
    assert rel_err(out, ref) < 1e-12
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    fin = torch.isfinite(ref_lse)
    assert rel_err(lse[fin], ref_lse[fin]) < 1e-12


def test_causal_is_window_right_zero():
    q, k, v = random_qkv(1, 6, 10, 2, 1, 8, 8, dtype=torch.float64)
    a = _ref(q, k, v, causal=True)
    b = _ref(q, k, v, window_size=(-1, 0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("window,causal", [((-1, -1), False), ((2, 0), False), ((1, 1), True)])
def test_sinks_values_and_grads_match_oracle(window, causal):
    # T > S with causal leaves rows without keys: the sink takes them (out 0, lse = sink, finite).
    T, S, Hq = 8, 5, 4
    q, k, v = random_qkv(2, T, S, Hq, 2, 8, 6, dtype=torch.float64, seed=3, requires_grad=True)
    sinks = torch.randn(Hq, dtype=torch.float32).requires_grad_(True)
    out, lse = _ref(q, k, v, causal=causal, window_size=window, sinks=sinks)
    keep = window_keep(T, S, *window)
    if causal:
        keep = keep & causal_keep(T, S)
    s64 = sinks.detach().double().requires_grad_(True)
    q2, k2, v2 = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse, _ = attention(q2, k2, v2, 8**-0.5, keep, sinks=s64)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref) < 1e-12
    assert rel_err(lse, ref_lse) < 1e-6  # sinks are float32
    empty = ~keep.any(-1)
    if empty.any():
        assert (out[:, empty] == 0).all()
        assert torch.allclose(lse[:, :, empty], sinks.detach().double()[None, :, None].expand_as(lse[:, :, empty]))
    g, gl = torch.randn_like(ref), torch.randn_like(ref_lse)
    torch.autograd.backward((out, lse), (g, gl))
    torch.autograd.backward((ref, ref_lse), (g, gl))
    for a, b in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad), (sinks.grad, s64.grad)):
        assert rel_err(a, b) < 1e-6


def test_sinks_grad_formula():
    # d sink_h = −Σ_rows P_sink · delta, delta = rowsum(dO · O), when only out carries a gradient.
    q, k, v = random_qkv(1, 5, 7, 2, 2, 8, 8, dtype=torch.float64, seed=5)
    sinks = torch.tensor([0.5, -1.0], requires_grad=True)
    out, lse = _ref(q, k, v, sinks=sinks)
    do = torch.randn_like(out)
    (out * do).sum().backward()
    p_sink = torch.exp(sinks.detach().double()[None, :, None] - lse.detach())  # [B,H,T]
    delta = (do * out.detach()).sum(-1).transpose(1, 2)  # [B,H,T]
    assert rel_err(sinks.grad, -(p_sink * delta).sum((0, 2))) < 1e-6


def test_sinks_zero_length_keys():
    q, k, v = random_qkv(1, 3, 0, 2, 1, 8, 8, dtype=torch.float32)
    sinks = torch.tensor([0.25, -2.0])
    out, lse = _ref(q, k, v, sinks=sinks)
    assert (out == 0).all() and torch.equal(lse, sinks[None, :, None].expand(1, 2, 3))


@pytest.mark.parametrize("bad", [5, (1,), (1, 2, 3), (-2, 0), (1.0, 2), "ab", (True, 0)])
def test_bad_window_size(bad):
    q, k, v = random_qkv(1, 2, 3, 2, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="window_size"):
        latent_attention(q, k, v, window_size=bad)


@pytest.mark.parametrize(
    "bad, error",
    [(torch.zeros(3), ValueError), (torch.zeros(2, dtype=torch.float16), TypeError), (torch.zeros(1, 2), ValueError),
     ([0.0, 0.0], TypeError)],
)
def test_bad_sinks(bad, error):
    """Wrong type or dtype: TypeError, like q's dtype check; wrong shape: ValueError."""
    q, k, v = random_qkv(1, 2, 3, 2, 2, 4, 4, dtype=torch.float32)
    with pytest.raises(error, match="sinks"):
        latent_attention(q, k, v, sinks=bad)


def test_attention_with_stats_carries_window_and_sinks():
    q, k, v = random_qkv(1, 4, 4, 2, 2, 8, 8, dtype=torch.float32)
    sinks = torch.zeros(2)
    res = attention_with_stats(q, k, v, window_size=(1, 0), sinks=sinks, backend="reference")
    ref, ref_lse, _ = attention(q, k, v, 8**-0.5, window_keep(4, 4, 1, 0), sinks=sinks)
    assert rel_err(res.out, ref) < 1e-5 and rel_err(res.lse, ref_lse) < 1e-5
    assert math.isfinite(float(res.max_logit.max()))


def test_decode_reference_window_and_sinks():
    from mla.functional import mla_decode

    B, Tq, H, D, Dv, page = 2, 2, 4, 16, 8, 4
    lens = torch.tensor([9, 3], dtype=torch.int32)
    cache = torch.randn(6, page, 1, D, dtype=torch.float64)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    q = torch.randn(B, Tq, H, D, dtype=torch.float64)
    sinks = torch.randn(H)
    out, lse = mla_decode(q, cache, table, lens, head_dim_v=Dv, window_size=(2, 0), sinks=sinks, backend="reference")
    for b in range(B):
        L = int(lens[b])
        rows = cache[table[b].long()].reshape(-1, D)[:L]
        k = rows[None, :, None]
        keep = window_keep(Tq, L, 2, 0)
        ref, ref_lse, _ = attention(q[b : b + 1], k, k[..., :Dv], D**-0.5, keep, sinks=sinks)
        assert rel_err(out[b : b + 1], ref) < 1e-12 and rel_err(lse[b : b + 1], ref_lse) < 1e-6


def test_window_with_block_mask_on_kernels_is_refused_and_auto_falls_back():
    from mla.functional import _triton_usable
    from mla.sparsity import causal_block_mask

    if not _triton_usable(torch.device("cpu"))[0]:
        pytest.skip("needs TRITON_INTERPRET=1")
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8, 8, dtype=torch.float32)
    bm = causal_block_mask(8, 8, 4)
    with pytest.raises(ValueError, match="window_size"):
        latent_attention(q, k, v, block_mask=bm, window_size=(2, 0), backend="triton")
    res = attention_with_stats(q, k, v, block_mask=bm, window_size=(2, 0), causal=True)
    keep = window_keep(8, 8, 2, 0) & causal_keep(8, 8)
    assert res.backend == "reference" and rel_err(res.out, attention(q, k, v, 8**-0.5, keep)[0]) < 1e-5
