"""Top-k sparse attention kernels (kernels.topk_sparse), forward and backward, against a float64 formula.

The oracle (tests/oracle.py) is dense attention with the equivalent element mask (a key is kept for a
query iff it is listed in the query's top-k row, is in ``[0, S)`` and, with causal, at most
``i + S - T``); its gradients come from autograd.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so
shapes stay small and the dtypes are fp32 and fp16 (the interpreter's bf16 ``tl.dot`` is broken,
docs/design.md §6); on CUDA the same cases run compiled with the GPU configurations, plus bf16. Every output
is written into a NaN-poisoned buffer (``out=`` / ``lse=`` / ``dq=`` / ``dk=`` / ``dv=``), so an
element a kernel forgets fails the comparison.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DEVICE, assert_close, needs_kernels, random_qkv
from helpers import rel_err as rel
from oracle import attention, attention_grads, topk_keep

from kernels._config import HAS_TRITON, INTERPRET

pytestmark = needs_kernels

if HAS_TRITON:
    from kernels.topk_sparse import (
        KINDS,
        SPEC_SHAPES,
        TopkConfig,
        build_key_major_index,
        column_plan,
        compile_specs,
        topk_attention_bwd,
        topk_attention_fwd,
        topk_config,
    )

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


# ------------------------------------------------------------------------------------------------
# inputs and the float64 oracle
# ------------------------------------------------------------------------------------------------
def make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, *, alias=False, seed=0):
    """helpers.random_qkv on this file's device."""
    return random_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, DEVICE, seed, alias=alias)


def make_idx(B, T, Hkv, K, S, *, seed=1, holes=True):
    """int32 ``[B, T, Hkv, K]``: per row ``min(K, S)`` distinct keys in random lanes, -1 in the others
    (K > S). With ``holes``: -1 in the first lane of (b=0, h=0), the last lane of (b=last, h=last), and
    every lane of row (b=0, t=1, h=0)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, T, Hkv, K), -1, dtype=torch.int32)
    n = min(K, S)
    for b in range(B):
        for t in range(T):
            for h in range(Hkv):
                keys = torch.randperm(S, generator=g)[:n].int()
                lanes = torch.randperm(K, generator=g)[:n]
                idx[b, t, h, lanes] = keys
    if holes:
        idx[0, :, 0, 0] = -1
        idx[-1, :, -1, -1] = -1
        if T > 1:
            idx[0, 1, 0, :] = -1
    return idx.to(DEVICE)


def oracle(q, k, v, idx, scale, causal, do=None, dlse=None):
    """The float64 oracle under the top-k element mask: ``(out, lse, max_logit, grads)``, grads = (dq, dk,
    dv) of ``Σ out·do + Σ lse·dlse`` (None without ``do``)."""
    keep = topk_keep(idx, q.shape[1], k.shape[1], q.shape[2], causal)
    out, lse, max_logit = attention(q, k, v, scale, keep)
    grads = None if do is None else attention_grads(q, k, v, scale, do, keep, dlse=dlse)
    return out, lse, max_logit, grads


def nan_like(x, dtype=None):
    return torch.full(x.shape, float("nan"), dtype=dtype or x.dtype, device=x.device)


def run_fwd(q, k, v, idx, scale, causal, **kw):
    B, T, Hq, _ = q.shape
    out = torch.full((B, T, Hq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, Hq, T), float("nan"), dtype=torch.float32, device=q.device)
    o, l_, ml = topk_attention_fwd(q, k, v, idx, scale, causal, return_max_logit=True, out=out, lse=lse, **kw)
    assert o is out and l_ is lse and ml.shape == (B, Hq) and ml.dtype == torch.float32
    return o, l_, ml


def run_bwd(do, q, k, v, o, lse, idx, scale, causal, **kw):
    bufs = dict(dq=nan_like(q), dk=nan_like(k), dv=nan_like(v))
    dq, dk, dv = topk_attention_bwd(do, q, k, v, o, lse, idx, scale, causal, **bufs, **kw)
    assert dq is bufs["dq"] and dk is bufs["dk"] and dv is bufs["dv"]
    return dq, dk, dv


def full_check(q, k, v, idx, scale, causal, dtype, *, dlse=False, modes=(True, False), configs=None,
               fwd_config=None, seed=7):
    """Forward (out, lse, max_logit) and backward in each mode against the oracle; returns the results."""
    o, lse, ml = run_fwd(q, k, v, idx, scale, causal, config=fwd_config)
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    dl = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(DEVICE, torch.float32) if dlse else None
    ro, rl, rml, rg = oracle(q, k, v, idx, scale, causal, do, dl)
    assert o.dtype == dtype
    assert_close(o, ro, name="out")
    assert_close(lse, rl, name="lse")
    assert_close(ml, rml, name="max_logit")
    res = {}
    for det in modes:
        grads = run_bwd(do, q, k, v, o, lse, idx, scale, causal, dlse=dl, deterministic=det, configs=configs)
        for name, x, r in zip(("dq", "dk", "dv"), grads, rg):
            assert x.dtype == dtype
            assert_close(x, r, name=f"{name} (deterministic={det})")
        res[det] = grads
    return (o, lse, ml), res, do, dl


# ------------------------------------------------------------------------------------------------
# forward + backward against the oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
@pytest.mark.interpreter
def test_gqa_random_indices(dtype, causal):
    """GQA (Hq = 6, Hkv = 2), Dk = 24, Dv = 16 (padded tiles), random indices with -1 lanes first / last
    / a whole row; forward out / lse / max_logit, backward in both modes."""
    B, T, S, Hq, Hkv, Dk, Dv, K = 2, 4, 23, 6, 2, 24, 16, 9
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype)
    idx = make_idx(B, T, Hkv, K, S)
    (o, lse, _), _, _, _ = full_check(q, k, v, idx, Dk**-0.5, causal, dtype)
    assert torch.isposinf(lse[0, :3, 1]).all() and (o[0, 1, :3] == 0).all()  # row (b0, t1, kv head 0) is all -1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
@pytest.mark.interpreter
def test_k_larger_than_s_and_bottom_right_causal(dtype):
    """K = 7 lanes over S = 4 keys (3 lanes -1 per row), T = 6 > S causal: bottom-right aligned, the
    first two tokens see no key (out 0, lse +inf, zero dq, no NaN); the dlse path."""
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 6, 4, 4, 2, 32, 16, 7
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, seed=2)
    idx = make_idx(B, T, Hkv, K, S, holes=False, seed=3)
    (o, lse, _), res, _, _ = full_check(q, k, v, idx, 0.3, True, dtype, dlse=True)
    assert torch.isposinf(lse[:, :, :2]).all() and (o[:, :2] == 0).all()
    for grads in res.values():
        assert (grads[0][:, :2] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.slow
@pytest.mark.interpreter
def test_heavy_sharing_and_determinism(causal):
    """Every query selects the same few keys (sinks, the last keys) plus a few random ones; the key
    blocks' lists are long enough to be split over several work items (fp32 partials, ordered
    reduce). Deterministic mode twice: bitwise equal; atomic mode within tolerance."""
    dtype = torch.float16
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 12, 40, 3, 1, 24, 16, 7
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, seed=4)
    g = torch.Generator().manual_seed(5)
    idx = torch.empty(B, T, Hkv, K, dtype=torch.int32)
    for t in range(T):
        for h in range(Hkv):
            extra = torch.randperm(S - 5, generator=g)[:2] + 2
            idx[0, t, h] = torch.tensor([0, 1, S - 1, S - 2, S - 3, *extra.tolist()], dtype=torch.int32)
    idx = idx.to(DEVICE)
    cfg = {"dkdv_det": TopkConfig(16, 16, rows_per_item=16)} if INTERPRET else None
    if INTERPRET:  # the transposed index really splits the shared key blocks
        kmi = build_key_major_index(idx, S, causal, 16, Hq // Hkv, 16)
        assert kmi.n_slots > 0 and kmi.multi.shape[0] > 0
    (o, lse, _), res, do, _ = full_check(q, k, v, idx, 0.25, causal, dtype, configs=cfg)
    if INTERPRET:
        assert kmi.items.shape[0] > kmi.num_key_blocks
    again = run_bwd(do, q, k, v, o, lse, idx, 0.25, causal, deterministic=True, configs=cfg)
    for a, b in zip(res[True], again):
        assert torch.equal(a, b), "deterministic mode is not bitwise reproducible"
    if INTERPRET:  # a prebuilt (cached) transposed index gives the same bits; a mismatched one is refused
        reuse = run_bwd(do, q, k, v, o, lse, idx, 0.25, causal, deterministic=True, configs=cfg, key_index=kmi)
        assert all(torch.equal(a, b) for a, b in zip(res[True], reuse))
        with pytest.raises(ValueError):
            topk_attention_bwd(do, q, k, v, o, lse, idx, 0.25, causal, key_index=kmi,
                               configs={"dkdv_det": TopkConfig(16, 32)})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
@pytest.mark.interpreter
def test_absorbed_mla_shape(dtype):
    """Absorbed MLA: Dk = 576 (512 latent + 64 rope), Dv = 512, one latent kv head, v = k[..., :512]
    (the shared tile is loaded once), value dim split over two programs, causal; small T and H."""
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 3, 40, 4, 1, 576, 512, 16
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=True, seed=6)
    idx = make_idx(B, T, Hkv, K, S, holes=False, seed=7)
    idx[0, 0, 0, 3] = -1
    full_check(q, k, v, idx, 192**-0.5, True, dtype)


@pytest.mark.interpreter
def test_alias_equals_copy():
    """v a prefix view of k (with a rope tail): same results as an independent copy of those columns;
    dk holds only the score path, dv the value path."""
    dtype = torch.float32
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 4, 19, 4, 2, 40, 24, 6
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=True, seed=8)
    assert v.data_ptr() == k.data_ptr()
    idx = make_idx(B, T, Hkv, K, S, seed=9)
    (o1, l1, _), r1, do, _ = full_check(q, k, v, idx, 0.2, True, dtype, modes=(True,))
    vc = v.clone()
    o2, l2, _ = run_fwd(q, k, vc, idx, 0.2, True)
    assert rel(o1, o2) <= 1e-6 and torch.equal(torch.isinf(l1), torch.isinf(l2))
    r2 = run_bwd(do, q, k, vc, o2, l2, idx, 0.2, True, deterministic=True)
    for a, b in zip(r1[True], r2):
        assert rel(a, b) <= 1e-6


@pytest.mark.parametrize("stream", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2))])
@pytest.mark.interpreter
def test_gpu_code_paths(stream):
    """The structure of the GPU configurations at small size: two column splits (own / other chunk, a
    two-piece tail), every stream level (fixed-side tiles resident or re-read), dV and dK in one launch
    or in two."""
    dtype = torch.float32 if INTERPRET else torch.float16
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 3, 21, 4, 1, 80, 64, 10
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=stream == 1, seed=10)
    idx = make_idx(B, T, Hkv, K, S, seed=11)
    assert column_plan(Dk, Dv, stream == 1, 2).bt == 16  # a two-piece tail
    cfg = TopkConfig(16, 16, nsplit=2, stream=stream, split_dkdv=stream > 0)
    det = TopkConfig(16, 32, nsplit=2, stream=stream, rows_per_item=8, split_dkdv=stream > 0)
    full_check(q, k, v, idx, 0.15, stream != 0, dtype, fwd_config=cfg,
               configs={"dq": cfg, "dkdv_atomic": cfg, "dkdv_det": det})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_det_value_tiles_loaded_apart(dtype):
    """The sm90 absorbed deterministic dK/dV path (``load_v``): v a prefix view of k, but the value tiles
    are loaded on their own; dV and dK in two launches over two column splits with a two-piece tail."""
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 3, 21, 4, 1, 80, 64, 10
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=True, seed=12)
    idx = make_idx(B, T, Hkv, K, S, seed=13)
    det = TopkConfig(16, 32, nsplit=2, rows_per_item=8, split_dkdv=True, load_v=True)
    full_check(q, k, v, idx, 0.15, True, dtype, modes=(True,), configs={"dkdv_det": det})


@pytest.mark.interpreter
def test_rows_without_keys():
    """Every lane -1, or every listed key causally hidden: out 0, lse +inf, max_logit -inf, all
    gradients 0 (dk / dv written as zeros), nothing NaN."""
    dtype = torch.float32
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 3, 8, 2, 1, 16, 16, 4
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, seed=12)
    hidden = torch.tensor([[6, 7, -1, -1], [7, -1, -1, -1], [-1, -1, -1, -1]], dtype=torch.int32)  # t + S - T = t + 5
    for idx, causal in ((torch.full((B, T, Hkv, K), -1, dtype=torch.int32), False), (hidden.view(B, T, Hkv, K), True)):
        idx = idx.to(DEVICE)
        o, lse, ml = run_fwd(q, k, v, idx, 0.3, causal)
        assert (o == 0).all() and torch.isposinf(lse).all() and torch.isneginf(ml).all()
        do = torch.randn(o.shape, dtype=dtype, device=DEVICE)
        for det in (True, False):
            for g in run_bwd(do, q, k, v, o, lse, idx, 0.3, causal, dlse=torch.randn_like(lse), deterministic=det):
                assert (g == 0).all()


@pytest.mark.slow
@pytest.mark.interpreter
def test_strided_inputs_and_outputs():
    """Non-contiguous q (a transposed view), k / v / indices sliced from larger tensors, a column-strided
    q (copied), outputs and lse written through strided views; dlse path in both modes."""
    dtype = torch.float32
    B, T, S, Hq, Hkv, Dk, Dv, K = 2, 4, 13, 4, 2, 24, 16, 5
    q0, k0, v0 = make_qkv(B, T, S + 3, Hq, Hkv, Dk + 8, Dv, dtype, seed=13)
    q = q0.transpose(1, 2).contiguous().transpose(1, 2)[..., :Dk]  # [B, T, Hq, Dk], T-stride != Hq * Dk
    k = k0[:, 2:2 + S, :, 4:4 + Dk]
    v = v0[:, 1:1 + S]
    idx = make_idx(B, T, Hkv, K + 2, S, seed=14)[..., 1:K + 1]
    big = torch.full((B, Hq, T, 2 * Dv), float("nan"), dtype=dtype, device=DEVICE)
    out = big.transpose(1, 2)[..., ::2]  # strided last dim: written through a copy
    lse = torch.full((B, T, Hq), float("nan"), device=DEVICE).transpose(1, 2)
    o, l_, _ = topk_attention_fwd(q, k, v, idx, 0.2, True, out=out, lse=lse)
    g = torch.Generator().manual_seed(15)
    do = torch.randn(o.shape, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    dl = torch.randn(l_.shape, generator=g, dtype=torch.float64).to(DEVICE, torch.float32)
    ro, rl, _, rg = oracle(q, k, v, idx, 0.2, True, do, dl)
    assert_close(o, ro, name="out")
    assert_close(l_, rl, name="lse")
    qcol = torch.randn(B, T, Hq, 2 * Dk, dtype=torch.float64).to(DEVICE, dtype)[..., ::2]  # last stride 2
    for det in (True, False):
        dqb = torch.full((B, Hq, T, Dk), float("nan"), dtype=dtype, device=DEVICE).transpose(1, 2)
        dq, dk, dv = topk_attention_bwd(do.transpose(1, 2).contiguous().transpose(1, 2), q, k, v, o, l_, idx, 0.2,
                                        True, dlse=dl, deterministic=det, dq=dqb)
        assert dq is dqb
        for name, x, r in zip(("dq", "dk", "dv"), (dq, dk, dv), rg):
            assert_close(x, r, name=name)
    o2, l2, _ = topk_attention_fwd(qcol, k, v, idx, 0.2, False)
    assert_close(o2, oracle(qcol, k, v, idx, 0.2, False)[0], name="out (column-strided q)")


@pytest.mark.interpreter
def test_empty_sizes():
    """B = 0 and T = 0 return empty results; S = 0 (no keys) gives out 0, lse +inf, zero gradients."""
    dtype = torch.float32
    q, k, v = make_qkv(2, 3, 5, 2, 1, 16, 16, dtype)
    idx = make_idx(2, 3, 1, 4, 5, holes=False)
    o, lse, ml = topk_attention_fwd(q[:0], k[:0], v[:0], idx[:0], 0.2, False, return_max_logit=True)
    assert o.shape == (0, 3, 2, 16) and lse.shape == (0, 2, 3) and ml.shape == (0, 2)
    o, lse, ml = topk_attention_fwd(q[:, :0], k, v, idx[:, :0], 0.2, True, return_max_logit=True)
    assert o.shape == (2, 0, 2, 16) and torch.isneginf(ml).all()
    dq, dk, dv = topk_attention_bwd(o, q[:, :0], k, v, o, lse, idx[:, :0], 0.2, True)
    assert dq.shape == (2, 0, 2, 16) and (dk == 0).all() and (dv == 0).all()
    o, lse, ml = run_fwd(q, k[:, :0], v[:, :0], torch.full_like(idx, -1), 0.2, False)
    assert (o == 0).all() and torch.isposinf(lse).all() and torch.isneginf(ml).all()
    dq, dk, dv = topk_attention_bwd(torch.ones_like(o), q, k[:, :0], v[:, :0], o, lse, idx, 0.2, False,
                                    dq=nan_like(q))
    assert (dq == 0).all() and dk.shape == (2, 0, 1, 16)


@pytest.mark.cuda  # bf16 tl.dot is broken under the interpreter; large shape
@pytest.mark.interpreter
def test_bf16_absorbed_cuda_large():
    """The GPU configurations at the DeepSeek shape: 128 heads, K = 2048 of S = 4096, causal, bf16."""
    dtype = torch.bfloat16
    B, T, S, Hq, Hkv, Dk, Dv, K = 1, 64, 4096, 128, 1, 576, 512, 2048
    q, k, v = make_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype, alias=True, seed=16)
    g = torch.Generator().manual_seed(17)
    idx = torch.stack([torch.randperm(S, generator=g)[:K] for _ in range(T)]).view(B, T, Hkv, K).int().to(DEVICE)
    idx[..., :8] = torch.arange(8, dtype=torch.int32, device=DEVICE)  # sinks selected by everyone
    full_check(q, k, v, idx, 192**-0.5, True, dtype)


# ------------------------------------------------------------------------------------------------
# host-side pieces
# ------------------------------------------------------------------------------------------------
def test_key_major_index_matches_brute_force():
    """The transposed index lists, per (batch, kv head, key block), exactly the tokens that selected one
    of its keys (ascending) with the right key bits; duplicates collapse; work items tile the lists
    (every block at least one item, at most ``chunk`` entries each, slots for the split blocks)."""
    B, T, Hkv, K, S, bn = 2, 9, 2, 6, 70, 64
    idx = make_idx(B, T, Hkv, K, S, seed=18)
    idx[1, 2, 1, 1] = idx[1, 2, 1, 0]  # a duplicate (a caller error the deterministic mode tolerates)
    idx[0, 3, 0, 2] = S + 5  # out of range: skipped
    for causal in (False, True):
        kmi = build_key_major_index(idx, S, causal, bn, group=3, rows_per_item=6)
        nkb = -(-S // bn)
        keep = topk_keep(idx, T, S, Hkv, causal)  # [B, Hkv, T, S] (group 1)
        off = kmi.offsets.cpu()
        ent_t, lo, hi = kmi.ent_t.cpu(), kmi.ent_lo.cpu(), kmi.ent_hi.cpu()
        for b in range(B):
            for h in range(Hkv):
                for kb in range(nkb):
                    seg = (b * Hkv + h) * nkb + kb
                    blk = keep[b, h, :, kb * bn:(kb + 1) * bn]
                    toks = torch.nonzero(blk.any(dim=1)).flatten()
                    got = ent_t[off[seg]:off[seg + 1]].long()
                    assert torch.equal(got, toks)
                    for e, t in zip(range(int(off[seg]), int(off[seg + 1])), toks.tolist()):
                        bits = [j for j in range(blk.shape[1]) if blk[t, j]]
                        w = [(int(lo[e]) >> j) & 1 if j < 32 else (int(hi[e]) >> (j - 32)) & 1 for j in range(bn)]
                        assert [j for j in range(bn) if w[j]] == bits
        items = kmi.items.cpu()
        assert items.shape[0] >= B * Hkv * nkb and (items[:, 2] - items[:, 1] <= kmi.chunk).all()
        for seg in range(B * Hkv * nkb):
            its = items[items[:, 0] == seg]
            assert its.shape[0] >= 1 and its[0, 1] == off[seg] and its[-1, 2] == off[seg + 1]
            assert torch.equal(its[1:, 1], its[:-1, 2])
            assert (its[:, 3] < 0).all() if its.shape[0] == 1 else (its[:, 3] >= 0).all()
        # Sizes are bounds from the shapes (no host sync): real items first, then padding (segment -1);
        # the used slots are 0..n-1 within the bound, and the split list names each split block once.
        real = items[:, 0] >= 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any() and (items[n_real:, 1:3] == 0).all()
        used = items[:, 3][items[:, 3] >= 0]
        assert torch.equal(used, torch.arange(used.numel())) and used.numel() <= kmi.n_slots
        multi = kmi.multi.cpu()
        mreal = multi[multi[:, 0] >= 0]
        split = [s for s in range(B * Hkv * nkb) if int((items[:, 0] == s).sum()) > 1]
        assert mreal[:, 0].tolist() == split and (multi[len(split):] == -1).all()
        for s, first, count in mreal.tolist():
            assert items[items[:, 0] == s][:, 3].tolist() == list(range(first, first + count))
        assert kmi.num_entries == int(off[-1]) and kmi.nbytes() > 0
    with pytest.raises(ValueError):
        build_key_major_index(idx, S, False, 65)


def test_column_plan():
    assert column_plan(576, 512, True, 2) == column_plan(576, 512, True, 2)
    p = column_plan(576, 512, True, 2)
    assert (p.nsplit, p.bk, p.bv, p.bt) == (2, 256, 256, 32)
    p = column_plan(24, 16, False, 1)
    assert (p.bk, p.bt, p.bv) == (32, 0, 16)  # one padded 32-column tile
    p = column_plan(192, 128, False, 1)
    assert (p.bk, p.bt, p.bv) == (128, 64, 128)
    assert column_plan(64, 16, False, 2).nsplit == 1  # 16 value columns: one split
    for dk, dv, alias, ns in ((40, 24, True, 2), (80, 64, False, 2), (576, 512, False, 1), (100, 7, False, 1)):
        p = column_plan(dk, dv, alias, ns)
        assert p.nsplit * (p.bk + p.bt) >= dk and p.nsplit * p.bv >= dv and (not alias or p.bk == p.bv)
    with pytest.raises(ValueError):
        column_plan(64, 64, False, 3)
    with pytest.raises(ValueError):
        column_plan(16, 32, True, 1)


def test_configs_and_compile_specs():
    """compile_specs lists every kind for both archs, fp16 and bf16, on the representative shapes (the
    launcher's own choice for each), with signatures in argument order."""
    for arch in (80, 86, 89, 90):
        specs = compile_specs(arch)
        assert {"topk_bwd_pre", "topk_reduce"} <= {s.kernel for s in specs}
        assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"} and all(s.arch == arch for s in specs)
        assert {s.kernel for s in specs} >= {f"topk_{k}" for k in ("fwd", "dq")}
        main = [s for s in specs if "kind" in s.extra]
        for s in specs:
            assert list(s.signature) == list(s.fn.arg_names)
            assert all((k if isinstance(k, str) else k[0]) in s.signature for k in s.constexprs)
            assert set(s.extra["divisible"]) <= set(s.signature)
        for dtype in ("fp16", "bf16"):
            for dk, dv, hq, hkv, alias in SPEC_SHAPES:
                for kind in KINDS:
                    cfg = topk_config(kind, arch, dk, dv, hq // hkv, dtype, interpret=False, v_is_k=alias)
                    got = [s for s in main if s.extra["kind"] == kind and s.dtype == dtype
                           and s.head_dims == (dk, dv) and s.extra["heads"] == hq and s.extra["v_is_k"] == alias]
                    assert got and all(s.extra["config"] == cfg for s in got)
                    assert sorted(s.extra["part"] for s in got) == ([1, 2] if cfg.split_dkdv else [3])
                    if arch == 90 and kind != "dkdv_det":
                        assert cfg.block_m >= 64  # wgmma needs 64-row tiles
                    if arch == 90 and kind == "dkdv_det":
                        assert cfg.block_n >= 16 * cfg.num_warps  # no warp repeats the keys-on-M scores
    with pytest.raises(ValueError):
        topk_config("nope", 90, 64, 64, 1)
