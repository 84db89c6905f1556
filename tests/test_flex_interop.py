"""FlexAttention ``BlockMask`` interop: full blocks unmasked, partial blocks masked per token (issue 14).

Forward values are compared with ``torch.nn.attention.flex_attention`` (eager on CPU); gradients with
the float64 formula of ``tests.helpers`` on the token mask from FlexAttention's own ``create_mask``
(FlexAttention has no CPU backward). Kernels run under the interpreter with NaN-poisoned outputs.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import backend_params, kernel_tol, rel_err
from oracle import attention, causal_keep

from kernels import block_sparse as bs
from mla import autograd
from mla.functional import latent_attention
from mla.sparsity import BlockMask, as_block_mask

flex = pytest.importorskip("torch.nn.attention.flex_attention")

DEVICE = "cpu"


def _window(w):
    def mask_mod(b, h, q, k):
        return (q >= k) & (q - k <= w)
    return mask_mod


def _documents(doc_ids):
    def mask_mod(b, h, q, k):
        return doc_ids[b, q] == doc_ids[b, k]
    return mask_mod


def _causal(b, h, q, k):
    return q >= k


def _prefix_lm(prefix):
    def mask_mod(b, h, q, k):
        return (k <= q) | (k < prefix)
    return mask_mod


def _head_window(b, h, q, k):
    return (q >= k) & (q - k <= 3 + 9 * h)


def _doc_ids(B, T):
    g = torch.Generator().manual_seed(3)
    ids = []
    for _ in range(B):
        cuts = torch.sort(torch.randperm(T - 1, generator=g)[:3] + 1).values
        ids.append(torch.bucketize(torch.arange(T), cuts, right=True))
    return torch.stack(ids)


#: (name, mask_mod factory, B, Hq, Hkv, T, BLOCK_SIZE, mask B, mask H)
CASES = {
    "window": (lambda B, T: _window(13), 1, 2, 1, 70, 16, None, None),
    "documents": (lambda B, T: _documents(_doc_ids(B, T)), 2, 2, 2, 53, 16, 2, None),
    "causal": (lambda B, T: _causal, 1, 2, 1, 45, 16, None, None),
    "prefix_lm": (lambda B, T: _prefix_lm(11), 1, 2, 2, 40, (16, 8), None, None),
    "per_head_window_gqa": (lambda B, T: _head_window, 1, 4, 2, 37, 16, None, 4),
    "default_block_128": (lambda B, T: _window(40), 1, 1, 1, 150, 128, None, None),
}


def _make(name):
    factory, B, Hq, Hkv, T, bs_, mb, mh = CASES[name]
    mask_mod = factory(B, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmask = flex.create_block_mask(mask_mod, mb, mh, T, T, device=DEVICE, BLOCK_SIZE=bs_)
        keep = flex.create_mask(mask_mod, mb, mh, T, T, device=DEVICE)
    return fmask, keep, B, Hq, Hkv, T


def _qkv(B, T, Hq, Hkv, Dk, Dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, T, Hq, Dk), mk(B, T, Hkv, Dk), mk(B, T, Hkv, Dv)


def _flex_out(q, k, v, fmask, scale):
    G = q.shape[2] // k.shape[2]
    t = lambda x: x.detach().float().transpose(1, 2)  # noqa: E731
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        o = flex.flex_attention(t(q), t(k).repeat_interleave(G, 1), t(v).repeat_interleave(G, 1),
                                block_mask=fmask, scale=scale)
    return o.transpose(1, 2)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("documents", "default_block_128")
                                  else n for n in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("backend", backend_params())
def test_matches_flex_attention(name, dtype, backend):
    fmask, keep, B, Hq, Hkv, T = _make(name)
    assert fmask.kv_num_blocks.sum() > 0 or fmask.full_kv_num_blocks.sum() > 0
    q, k, v = _qkv(B, T, Hq, Hkv, 24, 16, dtype)
    scale = 0.3
    out, lse = latent_attention(q, k, v, block_mask=fmask, softmax_scale=scale, backend=backend, return_lse=True)
    ref_out, ref_lse, _ = attention(q.detach(), k.detach(), v.detach(), scale, keep)
    tol = kernel_tol(dtype)
    assert rel_err(out, _flex_out(q, k, v, fmask, scale)) <= max(tol, 2e-6)
    assert rel_err(out, ref_out) <= tol
    assert rel_err(lse, ref_lse) <= tol
    # Gradients against the float64 formula on FlexAttention's token mask.
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref64, _, _ = attention(q64, k64, v64, scale, keep)
    ref_grads = torch.autograd.grad(ref64, (q64, k64, v64), do.double())
    for what, g, r in zip("qkv", grads, ref_grads):
        assert rel_err(g, r) <= tol * 4, f"d{what}"


@pytest.mark.interpreter
def test_block_aligned_mask_is_not_empty():
    """A block-aligned mask keeps every block in ``full_kv_*`` (``kv_*`` empty): it must not run as empty."""
    T, bsz = 48, 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmask = flex.create_block_mask(lambda b, h, q, k: q // bsz >= k // bsz, None, None, T, T, device=DEVICE,
                                       BLOCK_SIZE=bsz)
    assert int(fmask.kv_num_blocks.sum()) == 0 and int(fmask.full_kv_num_blocks.sum()) > 0
    ours = BlockMask.from_flex(fmask)
    assert not ours.has_partial and int(ours.kv_num_blocks.sum()) == 6
    q, k, v = _qkv(1, T, 2, 1, 16, 16, torch.float32)
    out, lse = latent_attention(q, k, v, block_mask=fmask, backend="triton", return_lse=True)
    assert torch.isfinite(lse).all()
    assert rel_err(out, _flex_out(q, k, v, fmask, 16**-0.5)) <= 2e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.slow
@pytest.mark.interpreter
def test_kernels_poisoned_outputs_with_causal_flag(dtype):
    """Launchers with partial blocks write every element (outputs pre-filled with NaN); ``causal=True``
    combines with the mask (prefix-LM & causal = causal); a query block listing no key block gives 0 /
    +inf / zero gradients."""
    T, Hq, Hkv, Dk, Dv, scale = 40, 4, 2, 24, 16, 0.25
    fmask, keep, *_ = _make("prefix_lm")
    m = as_block_mask(fmask)
    assert m.has_partial
    # Drop query block 1's list (a hand-built hole): its rows see nothing.
    kvn = m.kv_num_blocks.clone()
    kvn[..., 1] = 0
    hole = BlockMask(kvn, m.kv_indices, m.BLOCK_SIZE, m.seq_lengths)
    hole._set_partial(m._partial_grid, m.partial_bits)
    keep = keep & causal_keep(T, T)
    bm = m.BLOCK_SIZE[0]
    keep = keep.clone()
    keep[..., bm:2 * bm, :] = False
    q, k, v = (t.detach() for t in _qkv(1, T, Hq, Hkv, Dk, Dv, dtype, seed=1))
    out = torch.full((1, T, Hq, Dv), math.nan, dtype=dtype)
    lse = torch.full((1, Hq, T), math.nan)
    bs.block_sparse_attention_fwd(q, k, v, hole.kv_num_blocks, hole.kv_indices, hole.BLOCK_SIZE, scale, True,
                                  out=out, lse=lse, kv_partial=hole.kv_partial, partial_bits=hole.partial_bits)
    ref_out, ref_lse, _ = attention(q, k, v, scale, keep)
    tol = kernel_tol(dtype)
    assert rel_err(out, ref_out) <= tol
    assert torch.isinf(lse[..., bm:2 * bm]).all() and (out[:, bm:2 * bm] == 0).all()
    fin = torch.isfinite(ref_lse)
    assert rel_err(lse[fin], ref_lse[fin]) <= tol
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dq, dk, dv = (torch.full(t.shape, math.nan, dtype=dtype) for t in (q, k, v))
    res = [bs.block_sparse_attention_bwd(do, q, k, v, out, lse, hole.kv_num_blocks, hole.kv_indices,
                                         hole.q_num_blocks, hole.q_indices, hole.BLOCK_SIZE, scale, True,
                                         dq=x, dk=y, dv=z, kv_partial=hole.kv_partial, q_partial=hole.q_partial,
                                         partial_bits=hole.partial_bits)
           for x, y, z in ((dq, dk, dv), tuple(torch.full(t.shape, math.nan, dtype=dtype) for t in (q, k, v)))]
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref64, _, _ = attention(q64, k64, v64, scale, keep)
    ref_grads = torch.autograd.grad(ref64, (q64, k64, v64), do.double())
    for what, g, r in zip("qkv", res[0], ref_grads):
        assert rel_err(g, r) <= tol * 4, f"d{what}"
    for a, b in zip(*res):  # deterministic: bitwise equal on a second run
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_hand_built_mask_without_blocks_allowed():
    T = 32
    kvn = torch.tensor([[[1, 0]]], dtype=torch.int32)
    kvi = torch.tensor([[[[0, 1], [0, 0]]]], dtype=torch.int32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmask = flex.BlockMask.from_kv_blocks(kvn, kvi, BLOCK_SIZE=16, seq_lengths=(T, T))
    q, k, v = _qkv(1, T, 1, 1, 16, 16, torch.float32)
    out, lse = latent_attention(q, k, v, block_mask=fmask, backend="triton", return_lse=True)
    assert (out[:, 16:] == 0).all() and torch.isinf(lse[..., 16:]).all()
    # The block lists rule, as in FlexAttention's kernels (its eager CPU path reads only mask_mod).
    keep = torch.zeros(T, T, dtype=torch.bool)
    keep[:16, :16] = True
    ref, _, _ = attention(q.detach(), k.detach(), v.detach(), 16**-0.5, keep)
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("breakage", ["index_out_of_range", "count_too_large", "rows", "seq_lengths"])
def test_inconsistent_flex_mask_refused(breakage):
    T = 32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmask = flex.create_block_mask(_window(5), None, None, T, T, device=DEVICE, BLOCK_SIZE=16)
    if breakage == "index_out_of_range":
        fmask.kv_indices = fmask.kv_indices.clone().fill_(7)
    elif breakage == "count_too_large":
        fmask.kv_num_blocks = fmask.kv_num_blocks.clone().fill_(9)
    elif breakage == "rows":
        fmask.kv_num_blocks = fmask.kv_num_blocks[..., :1]
    else:
        fmask.seq_lengths = (T, 3 * T)
    q, k, v = _qkv(1, T, 1, 1, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="block_mask"):
        latent_attention(q, k, v, block_mask=fmask, backend="reference")


def test_wrong_type_message_names_both_classes():
    q, k, v = _qkv(1, 8, 1, 1, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="flex_attention.BlockMask"):
        latent_attention(q, k, v, block_mask=object())


@pytest.mark.slow
@pytest.mark.interpreter
def test_opcheck_with_partial_blocks():
    fmask, _, B, Hq, Hkv, T = _make("window")
    m = as_block_mask(fmask)
    q, k, v = _qkv(B, T, Hq, Hkv, 16, 8, torch.float32)
    mt = (m.kv_num_blocks, m.kv_indices, m.q_num_blocks, m.q_indices, *m.BLOCK_SIZE)
    part = (m.kv_partial, m.q_partial, m.partial_bits)
    out, lse, _ = autograd.OPS["block_sparse_attention_fwd"](q, k, v, *mt, 0.25, False, False, *part)
    for name, args in (
        ("block_sparse_attention_fwd", (q, k, v, *mt, 0.25, False, True, *part)),
        ("block_sparse_attention_bwd", (torch.randn(out.shape), q.detach(), k.detach(), v.detach(), out.detach(),
                                        lse.detach(), *mt[:4], None, *mt[4:], 0.25, False, *part)),
    ):
        result = torch.library.opcheck(autograd.OPS[name], args)
        assert all(r == "SUCCESS" for r in result.values()), result


@pytest.mark.interpreter
def test_compile_fullgraph_with_converted_mask():
    fmask, keep, B, Hq, Hkv, T = _make("window")
    m = BlockMask.from_flex(fmask)
    q, k, v = (t.detach() for t in _qkv(B, T, Hq, Hkv, 16, 16, torch.float32))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: latent_attention(q, k, v, block_mask=m, backend="triton"),
                       fullgraph=True, backend="aot_eager")
    ref, _, _ = attention(q, k, v, 16**-0.5, keep)
    assert rel_err(fn(q, k, v), ref) <= 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_queries_differ_from_keys_with_causal_flag(backend):
    """T != S (a chunk of 30 queries after 20 cached keys): a shifted window mask_mod combined with our
    bottom-right ``causal`` flag equals the oracle on (mask & causal); gradients included."""
    T, S, off = 30, 50, 20

    def shifted_window(b, h, q, k):
        return (q + off - k <= 9) & (k <= q + off + 3)  # window of 10 keys, 3 keys of look-ahead

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fmask = flex.create_block_mask(shifted_window, None, None, T, S, device=DEVICE, BLOCK_SIZE=16)
        keep = flex.create_mask(shifted_window, None, None, T, S, device=DEVICE) & causal_keep(T, S)
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(*s, generator=g).requires_grad_() for s in ((1, T, 2, 16), (1, S, 1, 16), (1, S, 1, 8)))
    out = latent_attention(q, k, v, block_mask=fmask, causal=True, softmax_scale=0.3, backend=backend)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, _, _ = attention(q64, k64, v64, 0.3, keep)
    assert rel_err(out, ref) <= 1e-5
    do = torch.randn(out.shape, generator=g)
    for what, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), do),
                          torch.autograd.grad(ref, (q64, k64, v64), do.double())):
        assert rel_err(a, b) <= 1e-5, f"d{what}"
