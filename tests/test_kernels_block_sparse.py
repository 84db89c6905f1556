"""Block-sparse fused attention kernels (kernels.block_sparse) against the float64 oracle (tests/oracle.py).

The oracle is dense attention under the equivalent element mask (``BlockMask.to_element_mask``,
bottom-right causal). On CPU the kernels run under
the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes stay small; on CUDA
the same cases run compiled (autotuned), plus bf16. Outputs and gradients are written into
NaN-filled buffers so that any element a kernel fails to write fails the test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import CUDA, DEVICE, Case, assert_close, case_params, make_inputs, nan_buffer, needs_kernels  # noqa: E402
from helpers import rel_err as rel  # noqa: E402
from oracle import attention, attention_grads  # noqa: E402

from kernels import attention_bwd as bwd_mod  # noqa: E402
from kernels import attention_fwd as fwd_mod  # noqa: E402
from kernels import block_sparse as bs  # noqa: E402
from kernels._config import INTERPRET  # noqa: E402
from mla.sparsity import (  # noqa: E402
    BlockMask,
    causal_block_mask,
    sliding_window_block_mask,
)

pytestmark = needs_kernels
F32, F16 = torch.float32, torch.float16


def make_mask(c: Case) -> BlockMask:
    bm, bn = c.block
    nq, nk = math.ceil(c.T / bm), math.ceil(c.S / bn)
    Bm = c.B if c.bh[0] != 1 else 1
    Hm = c.Hq if c.bh[1] != 1 else 1
    g = torch.Generator().manual_seed(100 + c.seed)
    if c.pattern == "causal":
        return causal_block_mask(c.T, c.S, c.block)
    if c.pattern == "window":
        return sliding_window_block_mask(c.T, c.S, window=3 * bn, BLOCK_SIZE=c.block)
    if c.pattern == "empty":
        return BlockMask.from_dense(torch.zeros(Bm, Hm, nq, nk, dtype=torch.bool), c.block, (c.T, c.S))
    grid = torch.rand(Bm, Hm, nq, nk, generator=g) < 0.35
    if nq > 1:
        grid[..., 0, :] = False  # the first query block visits nothing: zero rows, lse +inf
    if nq > 2:
        grid[..., 2, -1] = True  # the key tail block (partial when S % BLOCK_N != 0)
    return BlockMask.from_dense(grid, c.block, (c.T, c.S))


def mask_tensors(mask: BlockMask, strided: bool):
    """The four index tensors; ``strided``: non-contiguous views with the same values."""
    ts = [mask.kv_num_blocks, mask.kv_indices, mask.q_num_blocks, mask.q_indices]
    ts = [t.to(DEVICE) for t in ts]
    if strided:
        ts = [torch.stack([t, torch.full_like(t, -7)], dim=-1)[..., 0] for t in ts]
        assert not ts[1].is_contiguous()
    return ts


def run_fwd(c: Case, q, k, v, mask, scale):
    kvn, kvi, _, _ = mask_tensors(mask, c.strided)
    out = nan_buffer((c.B, c.T, c.Hq, c.Dv), c.dtype, c.strided, DEVICE)
    lse = torch.full((c.B, c.Hq, c.T), math.nan, dtype=torch.float32, device=DEVICE)
    res = bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, mask.BLOCK_SIZE, scale, c.causal,
                                        return_max_logit=True, out=out, lse=lse, config=c.fwd_cfg)
    assert res[0] is out and res[1] is lse
    return res


def run_bwd(c: Case, do, q, k, v, out, lse, mask, scale, dlse=None):
    kvn, kvi, qn, qi = mask_tensors(mask, c.strided)
    dq = nan_buffer(tuple(q.shape), c.dtype, c.strided, DEVICE)
    dk, dv = (nan_buffer(tuple(x.shape), c.dtype, device=DEVICE) for x in (k, v))
    res = bs.block_sparse_attention_bwd(do, q, k, v, out, lse, kvn, kvi, qn, qi, mask.BLOCK_SIZE, scale, c.causal,
                                        dlse=dlse, dq=dq, dk=dk, dv=dv, dkdv_config=c.bwd_cfg, dq_config=c.bwd_cfg)
    assert res[0] is dq and res[1] is dk and res[2] is dv
    return res


def element_keep(c: Case, mask: BlockMask):
    return mask.to_element_mask(c.causal)  # [Bm, Hm, T, S], broadcasts against [B, Hq, T, S]


def check_case(c: Case, *, with_dlse: bool = False):
    q, k, v = make_inputs(c, DEVICE)
    assert fwd_mod.is_prefix_alias(k, v) == c.alias
    mask = make_mask(c)
    scale = 0.7 * c.Dk**-0.5
    out, lse, max_logit = run_fwd(c, q, k, v, mask, scale)
    keep = element_keep(c, mask)
    ref_out, ref_lse, ref_max = attention(q, k, v, scale, keep)
    assert out.dtype == c.dtype
    assert_close(out, ref_out, name="out")
    empty = torch.isinf(ref_lse).permute(0, 2, 1).cpu()
    assert (out.cpu()[empty] == 0).all(), "rows without keys must be exactly 0"
    assert_close(lse, ref_lse, name="lse")
    assert_close(max_logit, ref_max, name="max_logit")

    g = torch.Generator().manual_seed(7)
    do = torch.randn(c.B, c.T, c.Hq, c.Dv, generator=g).to(c.dtype).to(DEVICE)
    dlse = None
    if with_dlse:
        dlse = torch.randn(c.B, c.Hq, c.T, generator=g).to(DEVICE)
        dlse = torch.where(torch.isinf(lse), 0.0, dlse)  # no gradient flows through +inf lse
    dq, dk, dv = run_bwd(c, do, q, k, v, out, lse, mask, scale, dlse)

    # with the alias v is its own leaf (value path only), as the kernel returns dk and dv
    for name, x, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), attention_grads(q, k, v, scale, do, keep, dlse=dlse)):
        assert x.dtype == c.dtype, name
        assert_close(x, ref, name=name)
    if c.check_determinism:  # no atomics: bitwise identical reruns
        dq2, dk2, dv2 = run_bwd(c, do, q, k, v, out, lse, mask, scale, dlse)
        assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)


GQA = dict(Hq=6, Hkv=2, Dk=24, Dv=16)
FC, BC = fwd_mod.FwdConfig, bwd_mod.BwdConfig
CASES = [
    # Long key range, few queries (not a multiple of the blocks).
    Case(40, 1025, **GQA, block=(32, 64), pattern="random", causal=False, check_determinism=True,
         name="random-S1025"),
    Case(40, 1025, **GQA, block=(32, 64), pattern="random", causal=True, dtype=F16, name="random-S1025-causal-f16"),
    Case(40, 1025, **GQA, block=(32, 32), pattern="window", causal=True, name="window-S1025"),
    Case(70, 33, 4, 4, 32, 32, block=(16, 16), pattern="random", causal=True, name="random-T>S-causal"),
    # Uneven mask blocks: sub-tiles masked to their block, row tiles padded inside a query block.
    Case(50, 90, **GQA, block=(24, 40), pattern="random", causal=True, strided=True, name="uneven-blocks"),
    # Mask blocks of 64, kernel tiles 32/16: several sub-tiles per block on both axes.
    Case(100, 200, 4, 2, 32, 32, block=(64, 64), pattern="random", causal=True, name="subtiles-64",
         fwd_cfg=FC(32, 16, num_stages=1), bwd_cfg=BC(16, 32, num_stages=1), check_determinism=True),
    Case(100, 130, 4, 2, 32, 32, block=(64, 64), pattern="window", causal=True, name="subtiles-64-nonresident",
         fwd_cfg=FC(16, 32, num_stages=1, q_resident=False), bwd_cfg=BC(32, 16, num_stages=1, resident=False)),
    # Broadcast mask dims with GQA; per-head lists (Hm = Hq) take the one-head-per-tile mode.
    *[Case(33, 70, B=2, **GQA, block=(16, 16), pattern="random", causal=causal,
           bh=bh, check_determinism=bh == (2, 6), seed=i, name=f"broadcast-{bh[0]}x{bh[1]}")
      for i, (bh, causal) in enumerate((((1, 1), True), ((2, 1), False), ((1, 6), True), ((2, 6), True)))],
    Case(33, 70, 3, 3, 24, 16, block=(16, 32), pattern="random", causal=True, bh=(1, 3), name="per-head-mha"),
    # Per-token masks (LatentSparseAttention mode="block"): absorbed MLA shape, v = k[..., :512].
    Case(5, 40, 4, 1, 576, 512, B=2, block=(1, 16), pattern="random", causal=True,
         bh=(2, 1), alias=True, check_determinism=True, name="per-token-absorbed"),
    Case(3, 33, 3, 1, 576, 512, block=(1, 16), pattern="random", causal=False,
         alias=True, dtype=F16, name="per-token-absorbed-f16"),
    Case(9, 50, 8, 2, 24, 16, block=(1, 16), pattern="random", causal=True, alias=True, name="per-token-gqa-alias"),
    # sm90's 4-warp absorbed fits (fwd_configs): q streamed in 64-column pieces, 64-row tiles (64 packed rows
    # per query block), 32 keys with the v alias, 16 without.
    Case(40, 70, 4, 1, 576, 512, block=(16, 32), pattern="random", causal=True, alias=True, dtype=F16,
         fwd_cfg=FC(64, 32, nsplit=2, stream=True), name="absorbed-streamed-q-f16"),
    Case(40, 70, 4, 1, 576, 512, block=(16, 32), pattern="random", causal=True,
         fwd_cfg=FC(64, 16, nsplit=2, stream=True), name="absorbed-streamed-q-noalias"),
    Case(20, 30, **GQA, block=(16, 16), pattern="empty", causal=False, name="empty-mask"),
]
if CUDA:  # bf16 only compiled: the interpreter's bf16 dot is wrong
    CASES += [replace(c, dtype=torch.bfloat16, name=c.name + "-bf16") for c in CASES if c.dtype == F16]


#: The everyday run's block-sparse parity cases (the others take 4-30 s each on a 2-core CPU).
QUICK = {"per-head-mha", "empty-mask", "absorbed-streamed-q-f16"}


@pytest.mark.interpreter
@pytest.mark.parametrize("c", case_params(CASES, slow=lambda c: c.id not in QUICK))
def test_block_sparse_matches_element_mask(c: Case):
    check_case(c)


@pytest.mark.interpreter
@pytest.mark.slow
def test_lse_gradient():
    """``dlse`` enters the backward as ``delta - dlse`` (``d lse / dS = P``)."""
    check_case(Case(20, 50, **GQA, block=(16, 16), pattern="random", causal=True, name="dlse"), with_dlse=True)


@pytest.mark.interpreter
@pytest.mark.parametrize("T,S,Hkv,block", [(40, 1025, 2, 32), (70, 200, 6, 64)], ids=["gqa-S1025", "mha-block64"])
@pytest.mark.slow
def test_causal_block_list_equals_dense_kernel(T, S, Hkv, block):
    """causal_block_mask + causal=True walks the same tiles as the dense causal kernel (mask blocks of
    64 in 32-wide sub-tiles too): same results (bitwise on the interpreter), forward and gradients."""
    B, Hq = 1, 6
    q, k, v = make_inputs(Case(T, S, Hq, Hkv, 24, 16, True, B=B), DEVICE)
    mask = causal_block_mask(T, S, block)
    kvn, kvi, qn, qi = mask_tensors(mask, False)
    scale = 0.3
    fcfg, bcfg = FC(32, 32, num_stages=1), BC(32, 32, num_stages=1)
    d_out, d_lse, d_max = fwd_mod.attention_fwd(q, k, v, scale, True, return_max_logit=True, config=fcfg)
    s_out, s_lse, s_max = bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, mask.BLOCK_SIZE, scale, True,
                                                        return_max_logit=True, config=fcfg)
    do = torch.randn_like(d_out)
    d_grads = bwd_mod.attention_bwd(do, q, k, v, d_out, d_lse, scale, True, dkdv_config=bcfg, dq_config=bcfg)
    s_grads = bs.block_sparse_attention_bwd(do, q, k, v, s_out, s_lse, kvn, kvi, qn, qi, mask.BLOCK_SIZE, scale,
                                            True, dkdv_config=bcfg, dq_config=bcfg)
    pairs = [("out", s_out, d_out), ("lse", s_lse, d_lse), ("max_logit", s_max, d_max)]
    pairs += list(zip(("dq", "dk", "dv"), s_grads, d_grads))
    for name, x, ref in pairs:
        if INTERPRET:
            assert torch.equal(x, ref), name
        else:
            assert rel(x, ref) <= 1e-6, name


@pytest.mark.interpreter
def test_no_keys_at_all():
    """S = 0 (no key blocks): out 0, lse +inf, max_logit -inf, dq 0, nothing else touched."""
    T, Hq, Hkv = 5, 4, 2
    q = torch.randn(1, T, Hq, 32, device=DEVICE)
    k = torch.randn(1, 0, Hkv, 32, device=DEVICE)
    v = torch.randn(1, 0, Hkv, 32, device=DEVICE)
    kvn = torch.zeros(1, 1, 1, dtype=torch.int32, device=DEVICE)
    kvi = torch.zeros(1, 1, 1, 0, dtype=torch.int32, device=DEVICE)
    qn = torch.zeros(1, 1, 0, dtype=torch.int32, device=DEVICE)
    qi = torch.zeros(1, 1, 0, 1, dtype=torch.int32, device=DEVICE)
    out = torch.full((1, T, Hq, 32), math.nan, device=DEVICE)
    out, lse, max_logit = bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, (16, 16), 0.2, True,
                                                        return_max_logit=True, out=out)
    assert (out == 0).all() and torch.isposinf(lse).all() and torch.isneginf(max_logit).all()
    dq, dk, dv = bs.block_sparse_attention_bwd(torch.ones_like(out), q, k, v, out, lse, kvn, kvi, qn, qi,
                                               (16, 16), 0.2, True)
    assert (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


@pytest.mark.interpreter
def test_mask_mismatch_is_rejected():
    q = torch.randn(1, 20, 4, 16)
    k = v = torch.randn(1, 30, 2, 16)
    kvn = torch.zeros(1, 1, 3, dtype=torch.int32)
    kvi = torch.zeros(1, 1, 3, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="kv_num_blocks"):  # 20 tokens in blocks of 16 -> 2 query blocks
        bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, (16, 16), 0.2, False)
    with pytest.raises(ValueError, match="kv_num_blocks"):  # head dim 3 is neither 1 nor Hq = 4
        bs.block_sparse_attention_fwd(q, k, v, kvn[:, :, :2].expand(1, 3, 2), kvi[:, :, :2].expand(1, 3, 2, 2),
                                      (16, 16), 0.2, False)
    with pytest.raises(TypeError, match="int32"):
        bs.block_sparse_attention_fwd(q, k, v, kvn[..., :2].float(), kvi[:, :, :2], (16, 16), 0.2, False)
    for bad in ((8.5, 8), (8, 8, 8), (0, 8), (True, 8)):
        with pytest.raises(ValueError, match="block_size"):
            bs.block_sparse_attention_fwd(q, k, v, kvn[:, :, :2], kvi[:, :, :2], bad, 0.2, False)
    out, lse, _ = bs.block_sparse_attention_fwd(q, k, v, kvn[:, :, :2], kvi[:, :, :2], (16, 16), 0.2, False)
    qn, qi = torch.zeros(1, 1, 2, dtype=torch.int32), torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    for name, kw in (("lse", dict(lse=lse[:, :1])), ("dlse", dict(dlse=lse[:, :, :3]))):
        args = dict(lse=lse, dlse=None) | kw
        with pytest.raises(ValueError, match=name):
            bs.block_sparse_attention_bwd(out, q, k, v, out, args["lse"], kvn[:, :, :2], kvi[:, :, :2], qn, qi,
                                          (16, 16), 0.2, False, dlse=args["dlse"])


@pytest.mark.interpreter
def test_blocks_longer_than_the_sequence():
    """One block holding the whole sequence (BLOCK_SIZE > T, S) equals dense attention; the launch is cut
    to the sequence, not to the block (no tiles past the end)."""
    T, S, Hq, Hkv, D = 5, 32, 2, 1, 16
    q, k, v = (torch.randn(1, n, h, D, device=DEVICE) for n, h in ((T, Hq), (S, Hkv), (S, Hkv)))
    one = torch.ones(1, 1, 1, dtype=torch.int32, device=DEVICE)
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=DEVICE)
    dense, dlse, _ = fwd_mod.attention_fwd(q, k, v, 0.25, True)
    out, lse, _ = bs.block_sparse_attention_fwd(q, k, v, one, zero, (2048, 4096), 0.25, True)
    assert rel(out, dense) < 1e-6 and rel(lse, dlse) < 1e-6
    do = torch.randn_like(out)
    ref = bwd_mod.attention_bwd(do, q, k, v, dense, dlse, 0.25, True)
    got = bs.block_sparse_attention_bwd(do, q, k, v, out, lse, one, zero, one, zero, (2048, 4096), 0.25, True)
    for a, b in zip(got, ref):
        assert rel(a, b) < 1e-5


# ---------------------------------------------------------------------------------------------
# Host-side planning (pure Python)
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpreter
def test_forward_off64_path(monkeypatch):
    """The int64 key-offset variant (``OFF64``: keys/values past 2**31 elements per batch entry) forced on a
    small block-sparse case with uneven blocks (tiles masked to their block)."""
    monkeypatch.setattr(bs._common, "needs_off64", lambda k, v: True)
    check_case(Case(33, 70, 3, 3, 24, 16, block=(16, 24), pattern="random", causal=True, bh=(1, 3),
                    name="off64"))


def test_packing_modes():
    assert bs.packing(128, 1, 1) == (128, 1)  # per-token absorbed MLA: the heads of one token per tile
    assert bs.packing(6, 2, 1) == (3, 1)  # shared lists: GQA group packed
    assert bs.packing(6, 2, 6) == (1, 3)  # per-head lists in a group: one head per tile
    assert bs.packing(6, 6, 6) == (1, 1)


@pytest.mark.parametrize("arch", [80, 90])
def test_fitted_configs_respect_mask_blocks(arch):
    """Fitted tiles: no key tile spans two mask key blocks when a table tile can divide them, row tiles
    stay inside one query block, wgmma-sized M sides on sm90 (16-bit) with at most one warp per 16 of
    their rows (no replicated score product), sm90 dK/dV row tiles capped (d128: 32, 192/128: 16), and
    every fitted config is one the compile check compiles."""
    for dk, dv, _g, _alias in bs.SPEC_SHAPES:
        for dtype in ("fp16", "fp32"):
            spec = {kind: set(bs.spec_configs(kind, arch, dk, dv, dtype, 1)) for kind in ("fwd", "dkdv", "dq")}
            for rows in (1, 3, 16, 40, 64, 128, 384, 1024):
                for bn in (16, 24, 64, 128):
                    for kind in ("fwd", "dkdv", "dq"):
                        cfgs = (bs.fwd_configs(arch, dk, dv, dtype, rows, bn) if kind == "fwd"
                                else bs.bwd_configs(kind, arch, dk, dv, dtype, rows, bn))
                        assert cfgs and set(cfgs) <= spec[kind], (kind, rows, bn, cfgs)
                        for cfg in cfgs:
                            m_side = cfg.block_n if kind == "dkdv" else cfg.block_m
                            if arch == 90 and dtype == "fp16":
                                assert m_side >= 64, (kind, cfg)  # wgmma M sides
                                # no warp repeats the chained score product
                                assert m_side >= 16 * cfg.num_warps, (kind, cfg)
                                if kind == "dkdv" and dk in (128, 192):  # row caps: the dense rows spill here
                                    assert cfg.block_m <= {128: 32, 192: 16}[dk], cfg
                            if bn % 16 == 0:
                                odd = kind == "dkdv" and cfg.block_n in (32, 64) and bn < cfg.block_n
                                assert bn % cfg.block_n == 0 or odd  # the smallest key tile, masked
                            if rows >= 64 and kind != "dkdv":
                                assert cfg.block_m <= rows


def test_fit_helpers():
    assert bs.fit_rows(128, 1024, 16) == 128
    assert bs.fit_rows(128, 64, 16) == 64
    assert bs.fit_rows(128, 192, 64) == 64
    assert bs.fit_rows(64, 16, 16) == 16 and bs.fit_rows(64, 16, 64) == 64
    assert bs.fit_rows(64, 6, 16) == 16
    assert bs.fit_keys(64, 128, 16) == 64 and bs.fit_keys(128, 64, 64) == 64
    assert bs.fit_keys(64, 32, 16) is None


@pytest.mark.interpreter
@pytest.mark.skipif(CUDA, reason="on CUDA every test above takes the autotuned path")
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (fitted candidates, triton.autotune, grids from META, max-logit partial
    buffer) run under the interpreter: on sm80 with 192/128 heads and this mask every kernel has a
    single candidate, so the autotuner launches it without benchmarking."""
    monkeypatch.setattr(bs, "compiled_launch", lambda q: True)
    monkeypatch.setattr(bs, "device_arch", lambda device: 80)
    rows, bn = 64 * 2, 32
    assert len(bs.fwd_configs(80, 192, 128, "fp32", rows, bn)) == 1
    assert all(len(bs.bwd_configs(kind, 80, 192, 128, "fp32", rows, bn)) == 1 for kind in ("dkdv", "dq"))
    c = Case(100, 70, 2, 1, 192, 128, block=(64, bn), pattern="random", causal=True, name="autotuned")
    check_case(c)


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [-0.3, 0.0])
def test_fwd_rejects_nonpositive_scale(scale):
    """The forward scales the row max (softmax_scale > 0 only): a scale <= 0 raises, never NaN output."""
    q, k, v = (torch.randn(1, n, 2, 16, device=DEVICE) for n in (5, 7, 7))
    kvn = torch.ones(1, 1, 1, dtype=torch.int32, device=DEVICE)
    kvi = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="softmax_scale"):
        bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, (16, 16), scale, False)
