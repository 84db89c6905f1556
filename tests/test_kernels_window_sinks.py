"""Dense kernels with a sliding window (``window_size``) and attention sinks (``sinks``), issue 14.

Against the float64 oracle of tests/oracle.py, under the Triton interpreter on CPU (fp32, fp16),
outputs and gradients written into NaN-filled buffers. The window's loop bounds are checked directly:
a row tile visits exactly the key blocks that hold a key one of its rows sees (and a key block's dK/dV
program exactly the row blocks that see one of its keys), so blocks wholly outside are never loaded.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import CUDA, DEVICE, Case, assert_close, kernel_tol, needs_kernels, rel_err  # noqa: E402
from oracle import attention, causal_keep, window_keep  # noqa: E402

from kernels import attention_bwd as bwd_mod  # noqa: E402
from kernels import attention_fwd as fwd_mod  # noqa: E402
from kernels._config import INTERPRET  # noqa: E402

pytestmark = [needs_kernels, pytest.mark.interpreter]

# Every left in {0, 1, 7, 128, >= S}, every right in {0, 3, -1}, T < S, T > S (rows without keys), GQA,
# Dk != Dv, v a prefix view of k.
CASES = [
    Case(9, 40, 4, 2, 16, 8, window=(0, 0), sinks=True, name="T9S40w(0, 0)c0s1a0"),
    Case(40, 9, 2, 1, 16, 16, causal=True, window=(1, 3), name="T40S9w(1, 3)c1s0a0"),
    Case(33, 70, 2, 2, 24, 16, window=(7, -1), sinks=True, name="T33S70w(7, -1)c0s1a0"),
    Case(20, 20, 4, 1, 32, 16, window=(128, 3), alias=True, name="T20S20w(128, 3)c0s0a1"),
    Case(12, 37, 2, 2, 16, 16, window=(-1, 3), sinks=True, name="T12S37w(-1, 3)c0s1a0"),
    Case(35, 35, 2, 1, 16, 16, window=(7, 0), name="T35S35w(7, 0)c0s0a0"),
    Case(17, 50, 2, 2, 16, 16, causal=True, window=(60, -1), sinks=True, alias=True,
         name="T17S50w(60, -1)c1s1a1"),
    Case(45, 12, 2, 2, 16, 16, window=(1, -1), sinks=True, name="T45S12w(1, -1)c0s1a0"),
]


def _keep(T, S, window, causal):
    keep = window_keep(T, S, *window)
    return keep & causal_keep(T, S) if causal else keep


def _inputs(case: Case, dtype, seed=0):
    c = case
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, c.T, c.Hq, c.Dk, generator=g).to(DEVICE, dtype)
    k = torch.randn(1, c.S, c.Hkv, c.Dk, generator=g).to(DEVICE, dtype)
    v = k[..., :c.Dv] if c.alias else torch.randn(1, c.S, c.Hkv, c.Dv, generator=g).to(DEVICE, dtype)
    sinks = (torch.randn(c.Hq, generator=g) * 2).to(DEVICE) if c.sinks else None
    return q, k, v, sinks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_window_sinks_forward_backward(case, dtype):
    T, S, Hq, Dk, Dv, alias = case.T, case.S, case.Hq, case.Dk, case.Dv, case.alias
    window, causal = case.window, case.causal
    q, k, v, sinks = _inputs(case, dtype)
    scale = Dk**-0.5
    nan = float("nan")
    out = torch.full((1, T, Hq, Dv), nan, dtype=dtype, device=DEVICE)
    lse = torch.full((1, Hq, T), nan, device=DEVICE)
    o, l_, _ = fwd_mod.attention_fwd(q, k, v, scale, causal, out=out, lse=lse, window_size=window, sinks=sinks)
    keep = _keep(T, S, window, causal).to(DEVICE)
    ts = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    s64 = sinks.double().requires_grad_(True) if sinks is not None else None
    ref, ref_lse, _ = attention(*ts, scale, keep, sinks=s64)
    tol = kernel_tol(dtype, INTERPRET)
    assert_close(o, ref, name="out", tol=tol)
    assert_close(l_, ref_lse, name="lse", tol=max(tol, 1e-5))
    if sinks is not None:  # every row finite; rows without keys give exactly 0
        empty = ~keep.any(-1)
        assert torch.isfinite(l_).all() and (o[:, empty] == 0).all()

    do = torch.randn_like(ref)
    dq = torch.full_like(q, nan)
    dk = torch.full_like(k, nan)
    dv = torch.full_like(v, nan) if not alias else torch.full(v.shape, nan, dtype=dtype, device=DEVICE)
    res = bwd_mod.attention_bwd(do.to(dtype), q, k, v, o, l_, scale, causal, dq=dq, dk=dk, dv=dv,
                                window_size=window, sinks=sinks)
    torch.autograd.backward(ref, do)
    # With v aliasing k the kernel returns the score-path dk and the value-path dv separately, as the
    # oracle's separate leaves do.
    got = (res[0], res[1], res[2])
    want = (ts[0].grad, ts[1].grad, ts[2].grad)
    gtol = 2 * tol if dtype == torch.float16 else tol
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert_close(a, b, name=name, tol=gtol)
    if sinks is not None:
        assert len(res) == 4
        assert_close(res[3], s64.grad, name="dsinks", tol=max(gtol, 1e-5))


def test_sinks_backward_is_deterministic():
    case = CASES[2]
    q, k, v, sinks = _inputs(case, torch.float32, seed=1)
    o, l_, _ = fwd_mod.attention_fwd(q, k, v, 0.25, False, window_size=case.window, sinks=sinks)
    do = torch.randn_like(o)
    a = bwd_mod.attention_bwd(do, q, k, v, o, l_, 0.25, False, window_size=case.window, sinks=sinks)
    b = bwd_mod.attention_bwd(do, q, k, v, o, l_, 0.25, False, window_size=case.window, sinks=sinks)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


if INTERPRET or CUDA:
    import triton.language as tl

    from kernels._jit import window_block_range, window_q_range

    @triton.jit
    def _ranges_kernel(OUT_F, OUT_B, T, S, WIN_L, WIN_R, G: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """Program i writes the forward/dQ block range of row tile i and the dK/dV row-block range of key
        block i (the helpers the kernels use)."""
        i = tl.program_id(0)
        n0, n1 = window_block_range(i * BLOCK_M, T, S, G, BLOCK_M, BLOCK_N, (WIN_L, WIN_R))
        tl.store(OUT_F + 2 * i, n0)
        tl.store(OUT_F + 2 * i + 1, n1)
        m0, m1 = window_q_range(i * BLOCK_N, T, S, G, BLOCK_M, BLOCK_N, (WIN_L, WIN_R))
        tl.store(OUT_B + 2 * i, m0)
        tl.store(OUT_B + 2 * i + 1, m1)


@pytest.mark.parametrize("T,S,G,window", [(64, 64, 1, (7, 0)), (50, 130, 2, (1, 3)), (130, 40, 1, (0, -1)),
                                          (64, 64, 4, (-1, 3)), (33, 200, 1, (128, 0)), (20, 20, 1, (300, 300))])
def test_window_loop_bounds_visit_exactly_the_blocks_with_visible_keys(T, S, G, window):
    BM, BN = 16, 32
    n_m, n_n = triton.cdiv(T * G, BM), triton.cdiv(S, BN)
    n = max(n_m, n_n)
    of = torch.full((2 * n,), -7, dtype=torch.int32, device=DEVICE)
    ob = torch.full((2 * n,), -7, dtype=torch.int32, device=DEVICE)
    _ranges_kernel[(n,)](of, ob, T, S, window[0], window[1], G=G, BLOCK_M=BM, BLOCK_N=BN)
    keep = window_keep(T, S, *window).repeat_interleave(G, dim=0)  # packed rows x keys
    visited = 0
    for i in range(n_m):
        rows = keep[i * BM:(i + 1) * BM]
        need = {j for j in range(n_n) if rows[:, j * BN:(j + 1) * BN].any()}
        lo, hi = int(of[2 * i]), int(of[2 * i + 1])
        assert set(range(lo, hi)) == need or (not need and hi <= lo), (i, lo, hi, need)
        visited += max(hi - lo, 0)
    for j in range(n_n):
        cols = keep[:, j * BN:(j + 1) * BN]
        need = {m for m in range(n_m) if cols[m * BM:(m + 1) * BM].any()}
        lo, hi = int(ob[2 * j]), int(ob[2 * j + 1])
        assert set(range(lo, hi)) == need or (not need and hi <= lo), (j, lo, hi, need)
    # a narrow window visits fewer blocks than the full grid
    if 0 <= window[0] < 8 and 0 <= window[1] < 8 and S > 2 * BN:
        assert visited < n_m * n_n


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.float16, marks=pytest.mark.slow)])
def test_block_sparse_sinks_values_and_grads(dtype):
    """Block-sparse kernels with sinks (issue 14): query block 1 of head 0 lists no block (rows without
    keys: output 0, lse = sink); per-head lists."""
    from mla import latent_attention
    from mla.sparsity import block_mask_from_dense

    T, S, Hq, Hkv, D = 12, 14, 4, 2, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, h, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
               for n, h in ((T, Hq), (S, Hkv), (S, Hkv)))
    sinks = torch.randn(Hq, generator=g).to(DEVICE).requires_grad_(True)
    grid = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
    per_head = torch.stack([grid, ~grid, grid.roll(1, 0), torch.ones_like(grid)])[None].to(DEVICE)
    bmask = block_mask_from_dense(per_head, (4, 4), (T, S))
    out, lse = latent_attention(q, k, v, block_mask=bmask, sinks=sinks, backend="triton", return_lse=True)
    keep = bmask.to_element_mask().to(DEVICE)
    ts = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref, ref_lse, _ = attention(*ts[:3], D**-0.5, keep, sinks=ts[3])
    tol = kernel_tol(dtype, INTERPRET)
    assert rel_err(out, ref) <= tol and rel_err(lse, ref_lse) <= max(tol, 1e-5)
    assert (out[0, 4:8, 0] == 0).all() and torch.isfinite(lse).all()
    do = torch.randn_like(ref)
    torch.autograd.backward(out, do.to(dtype))
    torch.autograd.backward(ref, do)
    for a, b in zip((q, k, v, sinks), ts):
        assert rel_err(a.grad, b.grad) <= max(2 * tol, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.slow
def test_topk_sinks_values_and_grads(dtype):
    """Top-k kernels with sinks (issue 14), with -1 lanes and a row whose lanes are all -1 (output 0,
    lse = sink), deterministic and atomic dK/dV."""
    from mla import latent_attention
    from mla.sparsity import topk_to_dense_mask

    T, S, Hq, Hkv, D = 6, 9, 4, 2, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, h, D, generator=g).to(DEVICE, dtype).requires_grad_(True)
               for n, h in ((T, Hq), (S, Hkv), (S, Hkv)))
    sinks = torch.randn(Hq, generator=g).to(DEVICE).requires_grad_(True)
    idx = torch.stack([torch.randperm(S, generator=g)[:4] for _ in range(T * Hkv)]).view(1, T, Hkv, 4).int()
    idx[0, :, :, 3] = -1
    idx[0, 2, 0] = -1  # token 2, kv head 0: no key
    idx = idx.to(DEVICE)
    keep = topk_to_dense_mask(idx, S).repeat_interleave(Hq // Hkv, dim=1)
    ts = [t.detach().double().requires_grad_(True) for t in (q, k, v, sinks)]
    ref, ref_lse, _ = attention(*ts[:3], D**-0.5, keep, sinks=ts[3])
    do = torch.randn_like(ref)
    torch.autograd.backward(ref, do)
    tol = kernel_tol(dtype, INTERPRET)
    for det in (True, False):
        for t in (q, k, v, sinks):
            t.grad = None
        out, lse = latent_attention(q, k, v, topk_indices=idx, sinks=sinks, backend="triton", return_lse=True,
                                    deterministic=det)
        assert rel_err(out, ref) <= tol and rel_err(lse, ref_lse) <= max(tol, 1e-5)
        assert (out[0, 2, :2] == 0).all() and torch.isfinite(lse).all()
        torch.autograd.backward(out, do.to(dtype))
        for a, b in zip((q, k, v, sinks), ts):
            assert rel_err(a.grad, b.grad) <= max(2 * tol, 1e-5)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("topk,window", [(False, None), (True, None), (False, (5, 0)), (False, (20, -1))])
def test_decode_sinks_split_and_direct(num_splits, topk, window):
    """Paged decode with sinks (issue 14): the sink is added once (in the combine with splits, in the split
    kernel when it writes directly); an empty sequence gives 0 and lse = sink; top-k -1 lanes."""
    from mla.functional import mla_decode

    B, Tq, H, D, Dv, page = 3, 2, 4, 48, 32, 8
    g = torch.Generator().manual_seed(7)
    lens = torch.tensor([37, 0, 20], dtype=torch.int32)
    cache = torch.randn(15, page, 1, D, generator=g)
    table = torch.arange(15, dtype=torch.int32).view(3, 5)
    q = torch.randn(B, Tq, H, D, generator=g)
    sinks = torch.randn(H, generator=g)
    idx = None
    if topk:
        idx = torch.full((B, Tq, 6), -1, dtype=torch.int32)  # distinct keys, -1 lanes
        for b in range(B):
            for t in range(Tq):
                sel = torch.randperm(int(lens[b]), generator=g)[:4]
                idx[b, t, : len(sel)] = sel.int()
    kw = dict(head_dim_v=Dv, causal=True, topk_indices=idx, sinks=sinks)
    if window is not None:
        kw.update(window_size=window, causal=window[1] == 0 and num_splits == 1)
    out, lse = mla_decode(q, cache, table, lens, backend="triton", num_splits=num_splits, **kw)
    ref, ref_lse = mla_decode(q.double(), cache.double(), table, lens, backend="reference", **kw)
    assert rel_err(out, ref) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-5
    assert (out[1] == 0).all() and torch.allclose(lse[1], sinks[:, None].expand(H, Tq))
