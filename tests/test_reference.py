"""mla.reference / latent_attention(backend="reference") against an independent float64 formula."""

import math

import pytest
import torch
from helpers import random_qkv, rel_err
from oracle import attention, causal_keep

from mla import latent_attention
from mla.reference import attention_reference
from mla.sparsity import BlockMask, topk_to_dense_mask


def _run(q, k, v, **kw):
    return latent_attention(q, k, v, return_lse=True, backend="reference", **kw)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_dense_matches_formula(dtype, tol):
    q, k, v = random_qkv(2, 5, 9, 3, 3, 16, 16, dtype=dtype)
    out, lse = _run(q, k, v)
    ref, ref_lse, _ = attention(q, k, v, 16**-0.5)
    assert out.dtype == dtype and out.shape == (2, 5, 3, 16)
    assert lse.shape == (2, 3, 5)
    assert rel_err(out, ref) < tol
    assert rel_err(lse, ref_lse) < tol


def test_causal_bottom_right_t_lt_s():
    # T=3, S=7: row i sees keys 0 .. i + 4.
    q, k, v = random_qkv(1, 3, 7, 2, 2, 8, 8)
    out, lse = _run(q, k, v, causal=True)
    keep = causal_keep(3, 7)
    assert keep[0].tolist() == [True] * 5 + [False] * 2
    ref, ref_lse, _ = attention(q, k, v, 8**-0.5, keep)
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    # top-left alignment (SDPA's is_causal) would give a different answer
    tl = torch.ones(3, 7, dtype=torch.bool).tril()
    ref_tl, _, _ = attention(q, k, v, 8**-0.5, tl)
    assert rel_err(out, ref_tl) > 1e-3


def test_empty_rows_zero_output_inf_lse_zero_grads():
    # T=7 > S=3 with causal: rows 0..3 see no key.
    q, k, v = random_qkv(2, 7, 3, 2, 1, 8, 4, requires_grad=True)
    out, lse = _run(q, k, v, causal=True)
    assert torch.isfinite(out).all()
    assert (out[:, :4] == 0).all()
    assert torch.isinf(lse[:, :, :4]).all() and (lse[:, :, :4] > 0).all()
    assert torch.isfinite(lse[:, :, 4:]).all()
    ref, ref_lse, _ = attention(q.detach(), k.detach(), v.detach(), 8**-0.5, causal_keep(7, 3))
    assert rel_err(out, ref) < 1e-12
    (out * torch.randn_like(out)).sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
    assert (q.grad[:, :4] == 0).all()


def test_gqa_dk_ne_dv_long_s_chunked():
    q, k, v = random_qkv(1, 9, 1025, 6, 2, 24, 16, dtype=torch.float64, seed=3)
    ref, ref_lse, _ = attention(q, k, v, 24**-0.5, causal_keep(9, 1025))
    for chunk in (None, 1, 4):
        out, lse, _ = attention_reference(q, k, v, causal=True, chunk_size=chunk)
        assert out.shape == (1, 9, 6, 16)
        assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


def test_chunked_gradients_match_unchunked():
    q, k, v = random_qkv(1, 12, 20, 4, 2, 8, 8, requires_grad=True, seed=5)
    go = torch.randn(1, 12, 4, 8, dtype=torch.float64)
    grads = []
    for chunk in (None, 3):
        for t in (q, k, v):
            t.grad = None
        out, _, _ = attention_reference(q, k, v, causal=True, chunk_size=chunk)
        (out * go).sum().backward()
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-12


def test_softmax_scale_applied():
    # With at least two keys a scale error changes the output (one key would hide it).
    q, k, v = random_qkv(1, 4, 6, 2, 2, 8, 8, seed=7)
    out, _ = _run(q, k, v, softmax_scale=0.3)
    ref, _, _ = attention(q, k, v, 0.3)
    default, _, _ = attention(q, k, v, 8**-0.5)
    assert rel_err(out, ref) < 1e-12
    assert rel_err(out, default) > 1e-3


@pytest.mark.parametrize("bshape", [(2, 4), (1, 4), (2, 1), (1, 1)])
def test_block_mask_matches_element_mask(bshape):
    B, H, T, S = 2, 4, 50, 70
    g = torch.Generator().manual_seed(11)
    grid = torch.rand(*bshape, 4, 3, generator=g) > 0.4  # BLOCK_SIZE (16, 32): ceil(50/16)=4, ceil(70/32)=3
    grid[..., 1, :] = False  # a query block with no key block
    bm = BlockMask.from_dense(grid, (16, 32), (T, S))
    q, k, v = random_qkv(B, T, S, H, 2, 8, 8, seed=2)
    for causal in (False, True):
        out, lse = _run(q, k, v, block_mask=bm, causal=causal)
        keep = bm.to_element_mask(causal=causal)
        ref, ref_lse, _ = attention(q, k, v, 8**-0.5, keep)
        assert rel_err(out, ref) < 1e-12
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
        assert (out[:, 16:32] == 0).all()


def test_topk_with_minus_one_and_more_lanes_than_keys():
    B, T, S, Hq, Hkv = 2, 6, 5, 4, 2
    q, k, v = random_qkv(B, T, S, Hq, Hkv, 8, 8, seed=4)
    g = torch.Generator().manual_seed(1)
    K = 8  # more lanes than keys
    idx = torch.full((B, T, Hkv, K), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            for h in range(Hkv):
                n = int(torch.randint(0, S + 1, (1,), generator=g))
                perm = torch.randperm(S, generator=g)[:n]
                lanes = torch.randperm(K, generator=g)[:n]
                idx[b, t, h, lanes] = perm.to(torch.int32)
    idx[0, 0] = -1  # an all -1 row
    out, lse = _run(q, k, v, topk_indices=idx)
    keep = topk_to_dense_mask(idx, S).repeat_interleave(Hq // Hkv, dim=1)
    ref, ref_lse, _ = attention(q, k, v, 8**-0.5, keep)
    assert rel_err(out, ref) < 1e-12
    assert (out[0, 0] == 0).all() and torch.isinf(lse[0, :, 0]).all()
    # causal additionally masks
    out_c, _ = _run(q, k, v, topk_indices=idx, causal=True)
    ref_c, _, _ = attention(q, k, v, 8**-0.5, keep & causal_keep(T, S))
    assert rel_err(out_c, ref_c) < 1e-12


def test_max_logit():
    q, k, v = random_qkv(2, 5, 7, 4, 2, 8, 8, seed=9)
    _, _, ml = attention_reference(q, k, v, causal=True, softmax_scale=0.5, return_max_logit=True)
    assert torch.allclose(ml, attention(q, k, v, 0.5, causal_keep(5, 7))[2])


def test_low_precision_inputs_accumulate_in_fp32():
    q, k, v = random_qkv(1, 16, 40, 2, 1, 32, 32, seed=8)
    ref, _, _ = attention(q, k, v, 32**-0.5)
    for dtype, tol in ((torch.float16, 5e-3), (torch.bfloat16, 1e-2)):
        out, lse = _run(q.to(dtype), k.to(dtype), v.to(dtype))
        assert out.dtype == dtype and lse.dtype == torch.float32
        assert rel_err(out, ref) < tol


def test_zero_length_sequences():
    q, k, v = random_qkv(1, 3, 0, 2, 2, 8, 8)
    out, lse = _run(q, k, v)
    assert out.shape == (1, 3, 2, 8) and (out == 0).all() and torch.isinf(lse).all()


def test_gradcheck_dense_block_topk():
    torch.manual_seed(0)
    q, k, v = random_qkv(1, 5, 6, 2, 1, 4, 3, requires_grad=True, seed=12)

    def f_dense(q, k, v):
        return latent_attention(q, k, v, causal=True, backend="reference")

    assert torch.autograd.gradcheck(f_dense, (q, k, v))
    bm = BlockMask.from_dense(torch.tensor([[True, False, True], [False, True, True], [True, True, False]]), 2, (5, 6))

    def f_block(q, k, v):
        return latent_attention(q, k, v, block_mask=bm, backend="reference")

    assert torch.autograd.gradcheck(f_block, (q, k, v))
    idx = torch.tensor([[0, 3, -1], [5, -1, 1], [-1, -1, -1], [2, 4, 0], [1, -1, 5]], dtype=torch.int32)
    idx = idx[None, :, None, :]

    def f_topk(q, k, v):
        return latent_attention(q, k, v, topk_indices=idx, backend="reference")

    assert torch.autograd.gradcheck(f_topk, (q, k, v))


# ---- CPU dispatch to torch's fused flash-attention kernel (mla.reference._sdpa_cpu) -------------------

@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused CPU path that returned a result (not None)."""
    import mla.reference as ref_mod

    calls = []
    real = ref_mod._sdpa_cpu

    def spy(*args, **kw):
        res = real(*args, **kw)
        calls.append(res is not None)
        return res

    monkeypatch.setattr(ref_mod, "_sdpa_cpu", spy)
    return calls


@pytest.mark.parametrize(
    "B,T,S,Hq,Hkv,Dk,Dv,causal,dispatched",
    [
        (2, 33, 33, 4, 4, 24, 16, True, True),     # T == S: the kernel's own causal flag; Dk > Dv (naive MLA)
        (1, 17, 40, 4, 2, 16, 16, True, True),     # T < S: bottom-right via an explicit mask; GQA
        (2, 9, 50, 3, 3, 8, 12, False, True),      # not causal; Dk < Dv
        (1, 40, 17, 2, 2, 16, 16, True, False),    # T > S: rows with no key -> chunked path (0 / +inf)
        (1, 20, 20, 8, 1, 40, 32, True, True),     # MQA; v = k[..., :Dv] (absorbed MLA)
    ],
)
def test_fused_cpu_dispatch_matches_chunked_path(B, T, S, Hq, Hkv, Dk, Dv, causal, dispatched, fused_calls):
    q, k, v = random_qkv(B, T, S, Hq, Hkv, Dk, max(Dk, Dv), dtype=torch.float32, seed=3, requires_grad=True)
    v = k[..., :Dv] if Dv <= Dk and Hq == 8 else v[..., :Dv]
    kw = dict(causal=causal, softmax_scale=0.37)
    with torch.no_grad():
        out, lse, _ = attention_reference(q, k, v, **kw)
        want, want_lse, _ = attention_reference(q, k, v, fused_cpu=False, **kw)
        exact, exact_lse, _ = attention(q, k, v, 0.37, causal_keep(T, S) if causal else None)
    assert fused_calls == ([True] if dispatched else [False] if causal and T > S else [])
    assert rel_err(out, exact) < 1e-5 and rel_err(want, exact) < 1e-5
    seen = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), seen) and (lse[~seen] == math.inf).all()
    assert rel_err(lse[seen], exact_lse[seen]) < 1e-5
    assert torch.isfinite(out).all()
    # gradients of out (lse discarded: lse_grad=False) through the fused kernel's backward
    fused_calls.clear()
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out_f, _, _ = attention_reference(q, k, v, lse_grad=False, **kw)
    grads = torch.autograd.grad(out_f, (q, k, v) if v.data_ptr() != k.data_ptr() else (q, k), g)
    out_c, _, _ = attention_reference(q, k, v, fused_cpu=False, **kw)
    ref_grads = torch.autograd.grad(out_c, (q, k, v) if v.data_ptr() != k.data_ptr() else (q, k), g)
    assert fused_calls == ([True] if dispatched else [False] if causal and T > S else [])
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 1e-5


def test_fused_cpu_dispatch_only_where_exact(fused_calls):
    q, k, v = random_qkv(1, 8, 8, 2, 2, 8, 8, dtype=torch.float32, requires_grad=True)
    # a differentiable lse is needed (latent_attention(return_lse=True) with grads): chunked path
    out, lse = latent_attention(q, k, v, causal=True, return_lse=True, backend="reference")
    assert lse.requires_grad and fused_calls == []
    torch.autograd.grad(lse.sum(), q)  # gradients through lse exist
    # return_lse=False: the lse is discarded, the fused kernel runs
    latent_attention(q, k, v, causal=True, backend="reference")
    assert fused_calls == [True]
    fused_calls.clear()
    with torch.no_grad():
        latent_attention(q.double(), k.double(), v.double(), backend="reference")  # float64 stays our formula
        attention_reference(q, k, v, return_max_logit=True)
        attention_reference(q, k, v, chunk_size=4)
        attention_reference(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool))
        out, lse = latent_attention(q, k, v, causal=True, return_lse=True, backend="reference")  # no grad: fused
    assert fused_calls == [True]
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_fused_cpu_dispatch_strided_head_dim(which, fused_calls):
    # Views whose last dim is not unit-stride (x[..., ::2]): the fused CPU kernel assumes stride 1 there.
    q, k, v = random_qkv(2, 5, 8, 4, 2, 16, 16, dtype=torch.float32, seed=5, requires_grad=True)
    q, k, v = (t[..., ::2] if name == which else t[..., :8] for name, t in zip("qkv", (q, k, v)))
    kw = dict(causal=True, softmax_scale=0.3, lse_grad=False)
    out, lse, _ = attention_reference(q, k, v, **kw)
    want, want_lse, _ = attention_reference(q, k, v, fused_cpu=False, **kw)
    assert fused_calls == [True]
    assert rel_err(out, want) < 1e-5 and rel_err(lse, want_lse) < 1e-5
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("Dv", [8, 16, 24])
def test_fused_cpu_dispatch_output_contiguous(Dv, fused_calls):
    # Dk=16 > Dv=8 (naive MLA's 192 / 128) returned a slice of the padded output: out.view(B, T, -1) failed.
    q, k, v = random_qkv(2, 4, 5, 3, 3, 16, Dv, dtype=torch.float32, seed=7)
    out, _, _ = attention_reference(q, k, v, causal=True)
    assert fused_calls == [True] and out.is_contiguous()
    want, _, _ = attention_reference(q, k, v, causal=True, fused_cpu=False)
    assert rel_err(out.view(2, 4, -1), want.reshape(2, 4, -1)) < 1e-5
