"""latent_attention / modules through the Triton kernels (autograd wrappers) against the reference path.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), on
CUDA natively (bf16 included there). Shapes are small: the interpreter is slow.
"""

import pytest
import torch
from helpers import rel_err

from mla import LatentAttention, MultiHeadLatentAttention, latent_attention
from mla.functional import attention_with_stats
from mla.sparsity import BlockMask, causal_block_mask

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5 if DEVICE == "cpu" else 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def _inputs(B, T, S, Hq, Hkv, Dk, Dv, dtype, seed=0, alias=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hq, Dk, generator=g).to(DEVICE, dtype).requires_grad_()
    if alias:  # absorbed MLA: one latent kv head, v a prefix view of k
        lat = torch.randn(B, S, 1, Dk, generator=g).to(DEVICE, dtype).requires_grad_()
        return q, lat, None
    k = torch.randn(B, S, Hkv, Dk, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(B, S, Hkv, Dv, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def _run(backend, q, k, v, Dv, causal, with_lse_loss, **kw):
    if v is None:  # aliasing: the graph goes through the view
        kk, vv = k, k[..., :Dv]
    else:
        kk, vv = k, v
    res = attention_with_stats(q, kk, vv, causal=causal, backend=backend, **kw)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(res.out.shape, generator=g).to(q.device)
    loss = (res.out.float() * w).sum()
    if with_lse_loss:
        wl = torch.randn(res.lse.shape, generator=g).to(q.device)
        loss = loss + (torch.where(torch.isinf(res.lse), 0, res.lse) * wl).sum()
    leaves = [t for t in (q, k, v) if t is not None]
    grads = torch.autograd.grad(loss, leaves)
    return res, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "B,T,S,Hq,Hkv,Dk,Dv,causal,alias",
    [
        (2, 17, 33, 4, 2, 32, 16, True, False),
        (1, 7, 3, 6, 2, 24, 16, True, False),  # rows with no key
        (1, 9, 9, 8, 1, 64, 64, False, False),
        (1, 5, 12, 4, 1, 80, 64, True, True),  # v = k[..., :64]
    ],
    ids=["gqa-causal", "empty-rows", "mqa", "alias"],
)
@pytest.mark.interpreter
def test_triton_matches_reference_with_grads(dtype, B, T, S, Hq, Hkv, Dk, Dv, causal, alias):
    q, k, v = _inputs(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=alias)
    ref, ref_g = _run("reference", q, k, v, Dv, causal, True, return_max_logit=True)
    out, out_g = _run("triton", q, k, v, Dv, causal, True, return_max_logit=True)
    assert out.backend == "triton" and ref.backend == "reference"
    assert rel_err(out.out, ref.out) < TOL[dtype]
    fin = torch.isfinite(ref.lse)
    assert torch.equal(fin, torch.isfinite(out.lse))
    assert rel_err(out.lse[fin], ref.lse[fin]) < TOL[dtype]
    assert torch.allclose(out.max_logit, ref.max_logit, atol=1e-2, rtol=1e-2)
    for a, b in zip(out_g, ref_g):
        assert rel_err(a, b) < 5 * TOL[dtype]


def test_auto_backend_picks_reference_on_cpu_and_triton_on_cuda():
    q, k, v = _inputs(1, 4, 4, 2, 2, 16, 16, torch.float32)
    res = attention_with_stats(q, k, v)
    assert res.backend == ("triton" if DEVICE == "cuda" else "reference")


@pytest.mark.interpreter
def test_modules_through_kernels():
    torch.manual_seed(0)
    attn = LatentAttention(64, 4, 0.5, backend="triton").to(DEVICE)
    x = torch.randn(2, 9, 64, device=DEVICE)
    out, w, st = attn(x, x, x, need_weights=True, is_causal=True)
    attn.backend = "reference"
    ref, w_ref, _ = attn(x, x, x, need_weights=True, is_causal=True)
    assert st.backend == "triton"
    assert rel_err(out, ref) < 1e-4 and rel_err(w, w_ref) < 1e-4
    from mla import registry

    cfg = registry.get("tiny", hidden_size=64, num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=16, v_head_dim=16)
    mla = MultiHeadLatentAttention(cfg, backend="triton").to(DEVICE)
    x = torch.randn(1, 11, 64, device=DEVICE)
    for form in ("naive", "absorbed"):
        a, sa = mla(x, form=form)
        mla.backend = "reference"
        b, _ = mla(x, form=form)
        mla.backend = "triton"
        assert sa.backend == "triton" and rel_err(a, b) < 1e-4


@pytest.mark.parametrize(
    "Hq,Hkv,Dk,Dv,alias,block,per_head,causal",
    [
        (4, 2, 32, 16, False, (8, 8), True, True),  # per-head lists, unpacked GQA
        (4, 1, 40, 32, True, (1, 4), False, True),  # absorbed, per-token mask (the sparse module's)
        (2, 2, 16, 16, False, (6, 5), True, False),  # uneven blocks, non-causal
    ],
    ids=["gqa-per-head", "absorbed-per-token", "uneven"],
)
@pytest.mark.slow
@pytest.mark.interpreter
def test_block_mask_through_kernels(Hq, Hkv, Dk, Dv, alias, block, per_head, causal):
    B, T, S = 2, 19, 23
    q, k, v = _inputs(B, T, S, Hq, Hkv, Dk, Dv, torch.float32, seed=3, alias=alias)
    g = torch.Generator().manual_seed(6)
    nq, nk = -(-T // block[0]), -(-S // block[1])
    grid = torch.rand(B, Hq if per_head else 1, nq, nk, generator=g) < 0.5
    grid[0, 0, 1] = False  # a query block that lists no key block
    bm = BlockMask.from_dense(grid.to(DEVICE), block, (T, S))
    kw = dict(block_mask=bm, return_max_logit=True)
    ref, ref_g = _run("reference", q, k, v, Dv, causal, True, **kw)
    out, out_g = _run("triton", q, k, v, Dv, causal, True, **kw)
    assert out.backend == "triton"
    assert rel_err(out.out, ref.out) < 1e-5
    assert torch.equal(torch.isinf(out.lse), torch.isinf(ref.lse))
    assert (out.out[0, block[0]:2 * block[0], 0] == 0).all()
    assert torch.allclose(out.max_logit, ref.max_logit, atol=1e-5, rtol=1e-5)
    for a, b in zip(out_g, ref_g):
        assert rel_err(a, b) < 1e-4


@pytest.mark.interpreter
def test_causal_block_mask_through_kernels_equals_dense():
    q, k, v = _inputs(1, 20, 20, 2, 1, 16, 16, torch.float32, seed=3)
    bm = causal_block_mask(20, 20, 8, device=DEVICE)
    dense = latent_attention(q, k, v, causal=True, backend="triton")
    out = latent_attention(q, k, v, causal=True, block_mask=bm, backend="triton")
    assert rel_err(out, dense) < 1e-6


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("alias", [pytest.param(False, marks=pytest.mark.slow), True])
@pytest.mark.interpreter
def test_topk_through_kernels(deterministic, alias):
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 6, 13, 4, 1 if alias else 2, 32, 16, 5
    q, k, v = _inputs(B, T, S, Hq, Hkv, Dk, Dv, torch.float32, seed=4, alias=alias)
    g = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(B * T * Hkv)]).view(B, T, Hkv, K)
    idx[0, 0, :, :2] = -1
    idx[0, 1] = -1  # a row with no key
    idx = idx.to(torch.int32).to(DEVICE)
    kw = dict(topk_indices=idx, return_max_logit=True, deterministic=deterministic)
    ref, ref_g = _run("reference", q, k, v, Dv, True, True, **kw)
    out, out_g = _run("triton", q, k, v, Dv, True, True, **kw)
    assert out.backend == "triton"
    assert rel_err(out.out, ref.out) < 1e-5 and (out.out[0, 1] == 0).all()
    for a, b in zip(out_g, ref_g):
        assert rel_err(a, b) < 1e-4


@pytest.mark.interpreter
def test_sparse_module_topk_through_kernels():
    from mla import registry

    torch.manual_seed(1)
    cfg = registry.get("tiny", hidden_size=64, num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=16, v_head_dim=16, index_topk=4)
    from mla import LatentSparseAttention

    m = LatentSparseAttention(cfg, mode="topk", backend="triton").to(DEVICE)
    x = torch.randn(1, 12, 64, device=DEVICE)
    a, st = m(x)
    m.backend = "reference"
    b, _ = m(x)
    assert st.backend == "triton" and rel_err(a, b) < 1e-4


@pytest.mark.slow
@pytest.mark.interpreter
def test_sparse_module_block_mode_through_kernels():
    from mla import LatentSparseAttention, registry

    torch.manual_seed(2)
    cfg = registry.get("tiny", hidden_size=64, num_attention_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
                       qk_rope_head_dim=16, v_head_dim=16, sparse_block_size=4, num_sink_blocks=1,
                       num_local_blocks=1, topk_blocks=1)
    m = LatentSparseAttention(cfg, mode="block", backend="triton").to(DEVICE)
    x = torch.randn(1, 21, 64, device=DEVICE, requires_grad=True)
    a, st = m(x)
    (ga,) = torch.autograd.grad(a.square().sum(), x)
    m.backend = "reference"
    b, _ = m(x)
    (gb,) = torch.autograd.grad(b.square().sum(), x)
    assert st.backend == "triton" and rel_err(a, b) < 1e-4 and rel_err(ga, gb) < 1e-4


@pytest.mark.interpreter
def test_backward_beyond_the_kernels_raises_clearly():
    """A second-order backward through the kernels (create_graph) and a backward through the decode kernel raise
    a RuntimeError saying so (not torch's "register_autograd" hint); create_graph=True alone still works."""
    from mla.functional import mla_decode

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 2, 8, generator=g, requires_grad=True)
    k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 4, 1, 8, generator=g)
    idx = torch.tensor([0, 2, -1], dtype=torch.int32).expand(1, 4, 1, 3)
    for kw in (dict(causal=True), dict(topk_indices=idx), dict(block_mask=causal_block_mask(4, 4, BLOCK_SIZE=2))):
        (dq,) = torch.autograd.grad(latent_attention(q, k, v, backend="triton", **kw).sum(), q, create_graph=True)
        ref = torch.autograd.grad(latent_attention(q, k, v, backend="reference", **kw).sum(), q)[0]
        assert rel_err(dq.detach(), ref) <= 1e-5
        with pytest.raises(RuntimeError, match="double backward .* backend='reference'"):
            dq.sum().backward()
    cache, table, lens = torch.randn(1, 4, 1, 8, generator=g), torch.zeros(1, 1, dtype=torch.int32), torch.tensor(
        [4], dtype=torch.int32)
    out = mla_decode(q[:, :1], cache, table, lens, backend="triton", return_lse=False)
    with pytest.raises(RuntimeError, match="inference-only"):
        out.sum().backward()
