"""Split-KV MLA decode kernel (kernels.decode) against the float64 oracle (tests/oracle.py).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1
before triton is imported). fp32 and
fp16 only there: the interpreter's bf16 ``tl.dot`` is broken (docs/design.md §6), bf16 runs on CUDA.
Every launch writes into NaN-poisoned ``out`` / ``lse`` buffers, so an element the kernel
forgets to write fails the comparison.
"""

import math

import pytest
import torch
from helpers import DEVICE, assert_close, needs_kernels, paged_cache
from oracle import paged_decode

from kernels._config import HAS_TRITON

pytestmark = needs_kernels

if HAS_TRITON:
    from kernels.decode import (
        MAX_SPLITS,
        choose_num_splits,
        compile_specs,
        decode_config,
        mla_decode_fwd,
        wave_efficiency,
    )

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
# the Hopper configuration splits a 512-wide value dim over two programs; run that path here too
SPLIT_DV = {"BLOCK_DV": 32, "DV_SPLIT": 2}


# ------------------------------------------------------------------------------------------------
# inputs and the float64 oracle
# ------------------------------------------------------------------------------------------------
def make_cache(seqlens, dk, page_size, dtype, **kw):
    """helpers.paged_cache on this file's device: ``(kv_cache, block_table, cache_seqlens, rows)``."""
    return paged_cache(seqlens, dk, page_size, dtype, device=DEVICE, **kw)


def make_q(B, Tq, H, dk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Tq, H, dk, generator=g, dtype=torch.float64).to(DEVICE, dtype)


def run(q, cache, table, seq, scale, dv, **kw):
    """Launch with NaN-poisoned outputs (catches unwritten elements)."""
    B, Tq, H, _ = q.shape
    out = torch.full((B, Tq, H, dv), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((B, H, Tq), float("nan"), dtype=torch.float32, device=q.device)
    o, l_ = mla_decode_fwd(q, cache, table, seq, scale, dv, out=out, lse=lse, **kw)
    assert o.data_ptr() == out.data_ptr() and l_.data_ptr() == lse.data_ptr()
    return o, l_


def check(o, lse, ref_o, ref_lse, dtype):
    """Output and lse against the oracle (lse +inf exactly where the oracle's is)."""
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert_close(o, ref_o, name="out")
    assert_close(lse, ref_lse, name="lse")


# ------------------------------------------------------------------------------------------------
# dense decode
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.interpreter
def test_empty_sequence_row(dtype, num_splits):
    """cache_seqlens = [L, L, L, 0]: the empty sequence gives 0 and lse = +inf, the others are
    unaffected (equal to a launch without it)."""
    dk, dv, H, L = 48, 32, 4, 37
    cache, table, seq, rows = make_cache([L, L, L, 0], dk, 16, dtype)
    q = make_q(4, 1, H, dk, dtype)
    o, lse = run(q, cache, table, seq, dk**-0.5, dv, num_splits=num_splits)
    ro, rl = paged_decode(q, rows, dk**-0.5, dv)
    check(o, lse, ro, rl, dtype)
    assert (o[3] == 0).all() and torch.isposinf(lse[3]).all()
    o3, lse3 = run(q[:3], cache, table[:3], seq[:3], dk**-0.5, dv, num_splits=num_splits)
    assert torch.equal(o3, o[:3]) and torch.equal(lse3, lse[:3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_scattered_pages_equal_contiguous(dtype):
    """The same rows in randomly ordered pages and in consecutive pages give the same result."""
    dk, dv, H = 48, 32, 4
    lens = [29, 50, 3]
    c1, t1, s1, rows = make_cache(lens, dk, 16, dtype, scatter=True)
    c2, t2, s2, rows2 = make_cache(lens, dk, 16, dtype, scatter=False)
    assert all(torch.equal(a, b) for a, b in zip(rows, rows2))
    q = make_q(3, 2, H, dk, dtype)
    o1, l1 = run(q, c1, t1, s1, 0.2, dv, num_splits=2)
    o2, l2 = run(q, c2, t2, s2, 0.2, dv, num_splits=2)
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    check(o1, l1, *paged_decode(q, rows, 0.2, dv), dtype)


@pytest.mark.parametrize("num_splits", [1, pytest.param(4, marks=pytest.mark.slow)])
@pytest.mark.interpreter
def test_nan_pages_and_garbage_block_table(num_splits):
    """NaN in every unused slot and page, -1 / huge ids in unused block-table entries (and a table
    much wider than needed): finite output, equal to the launch over a clean cache."""
    dtype, dk, dv, H = torch.float32, 48, 32, 4
    lens = [5, 33, 1, 20]
    c1, t1, s1, rows = make_cache(lens, dk, 8, dtype, poison=True, extra_pages=4, table_width=12)
    c2, t2, s2, _ = make_cache(lens, dk, 8, dtype, poison=False, extra_pages=4, table_width=12)
    assert torch.isnan(c1).any() and (t1 == -1).any() and (t1 > 2**29).any()
    q = make_q(4, 2, H, dk, dtype)
    o1, l1 = run(q, c1, t1, s1, 0.3, dv, num_splits=num_splits)
    o2, l2 = run(q, c2, t2, s2, 0.3, dv, num_splits=num_splits)
    assert torch.isfinite(o1).all() and torch.equal(o1, o2) and torch.equal(l1, l2)
    check(o1, l1, *paged_decode(q, rows, 0.3, dv), dtype)


@pytest.mark.parametrize("page_size", [16, 64, 7])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_lengths_and_page_sizes(page_size, dtype):
    """S = 1, S not a multiple of the page or of the key tile; key tiles that span pages (7)."""
    dk, dv, H = 48, 32, 4
    lens = [1, page_size + 3, 2 * page_size, 45]
    cache, table, seq, rows = make_cache(lens, dk, page_size, dtype)
    q = make_q(4, 1, H, dk, dtype)
    o, lse = run(q, cache, table, seq, dk**-0.5, dv, num_splits=2)
    check(o, lse, *paged_decode(q, rows, dk**-0.5, dv), dtype)


@pytest.mark.parametrize("tq,causal", [(1, False), (2, False), pytest.param(3, True, marks=pytest.mark.slow),
                                       (1, True)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_query_tokens_and_causal(tq, causal, dtype):
    """Tq query tokens packed with the heads (Tq * H > BLOCK_H: several head groups); causal is
    bottom-right aligned per sequence; a causal row before the cache (L < Tq) is empty."""
    dk, dv, H = 48, 32, 8
    lens = [40, 2, 17]
    cache, table, seq, rows = make_cache(lens, dk, 16, dtype)
    q = make_q(3, tq, H, dk, dtype)
    for ns in (1, 3):
        o, lse = run(q, cache, table, seq, 0.25, dv, causal=causal, num_splits=ns)
        ro, rl = paged_decode(q, rows, 0.25, dv, causal=causal)
        check(o, lse, ro, rl, dtype)
    if causal and tq == 3:
        assert torch.isposinf(lse[1, :, 0]).all() and (o[1, 0] == 0).all()  # L=2: row 0 sees nothing


@pytest.mark.parametrize("num_splits", [1, 2, 7, pytest.param(64, marks=pytest.mark.slow)])
@pytest.mark.interpreter
def test_num_splits(num_splits):
    """Any split count gives the same answer, also more splits than pages / key tiles (empty
    splits contribute exactly 0)."""
    dtype, dk, dv, H = torch.float32, 48, 32, 4
    lens = [70, 1]
    cache, table, seq, rows = make_cache(lens, dk, 16, dtype)
    q = make_q(2, 2, H, dk, dtype)
    o, lse = run(q, cache, table, seq, 0.2, dv, causal=True, num_splits=num_splits)
    check(o, lse, *paged_decode(q, rows, 0.2, dv, causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_value_split_across_programs(dtype):
    """DV_SPLIT = 2 (the GPU configuration for Dv = 512): two programs own half the value columns
    each; same result, with and without the split merge."""
    dk, dv, H = 80, 64, 4
    cache, table, seq, rows = make_cache([33, 0, 12], dk, 16, dtype)
    q = make_q(3, 2, H, dk, dtype)
    for ns, causal in ((1, False), (3, True)):
        o, lse = run(q, cache, table, seq, 0.2, dv, causal=causal, num_splits=ns, config=SPLIT_DV)
        check(o, lse, *paged_decode(q, rows, 0.2, dv, causal=causal), dtype)


@pytest.mark.parametrize("dk,dv", [(48, 32), (80, 64), (64, 64), (40, 24)])
@pytest.mark.interpreter
def test_generic_head_dims(dk, dv):
    """Padded / masked tiles for head dims that are not powers of two, and Dk == Dv (no rope part)."""
    dtype, H = torch.float32, 3
    cache, table, seq, rows = make_cache([21, 6], dk, 16, dtype)
    q = make_q(2, 2, H, dk, dtype)
    o, lse = run(q, cache, table, seq, dk**-0.5, dv, causal=True, num_splits=2)
    check(o, lse, *paged_decode(q, rows, dk**-0.5, dv, causal=True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.interpreter
def test_absorbed_deepseek_shape(dtype):
    """Dk = 576 (512 latent + 64 rope), Dv = 512, H = 16, with the scale of the absorbed form;
    the direct path, the split merge, and the Hopper value split (2 x 256 columns)."""
    dk, dv, H = 576, 512, 16
    cache, table, seq, rows = make_cache([40, 7], dk, 16, dtype, seed=3)
    q = make_q(2, 1, H, dk, dtype, seed=4)
    scale = 192**-0.5
    ro, rl = paged_decode(q, rows, scale, dv)
    for ns, cfg in ((1, None), (2, None), (2, {"BLOCK_DV": 256, "DV_SPLIT": 2})):
        o, lse = run(q, cache, table, seq, scale, dv, num_splits=ns, config=cfg)
        check(o, lse, ro, rl, dtype)


@pytest.mark.interpreter
def test_query_strides_and_layouts():
    """q with non-packed strides (a transposed view) and an lse view with odd strides."""
    dtype, dk, dv, H, Tq = torch.float32, 48, 32, 4, 2
    cache, table, seq, rows = make_cache([19, 30], dk, 16, dtype)
    q = make_q(2, H, Tq, dk, dtype).transpose(1, 2)  # [B, Tq, H, Dk], stride(1) != H * stride(2)
    assert q.stride(1) != H * q.stride(2)
    lse_store = torch.full((2, Tq, H), float("nan"), device=DEVICE)
    o, lse = mla_decode_fwd(q, cache, table, seq, 0.2, dv, num_splits=2, lse=lse_store.transpose(1, 2))
    check(o, lse, *paged_decode(q, rows, 0.2, dv), dtype)
    assert torch.isfinite(lse_store).all()


@pytest.mark.interpreter
def test_default_num_splits_and_empty_batch():
    dtype, dk, dv, H = torch.float32, 48, 32, 4
    cache, table, seq, rows = make_cache([25, 3], dk, 16, dtype)
    q = make_q(2, 1, H, dk, dtype)
    o, lse = mla_decode_fwd(q, cache, table, seq, 0.2, dv)  # num_splits chosen
    check(o, lse, *paged_decode(q, rows, 0.2, dv), dtype)
    o0, l0 = mla_decode_fwd(q[:0], cache, table[:0], seq[:0], 0.2, dv)
    assert o0.shape == (0, 1, H, dv) and l0.shape == (0, H, 1)


# ------------------------------------------------------------------------------------------------
# top-k sparse decode
# ------------------------------------------------------------------------------------------------
def _topk(B, Tq, K, lens, seed=5):
    """Distinct positions per (b, t) drawn from [0, L + 4) (so some are >= L), plus -1 lanes:
    b = 0 has -1 in the first lane, b = 1 in the last lane, b = 2 all lanes -1 for t = 0."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.empty(B, Tq, K, dtype=torch.int32)
    for b in range(B):
        for t in range(Tq):
            pool = torch.randperm(lens[b] + 4, generator=g)[:K]
            row = torch.full((K,), -1, dtype=torch.int32)
            row[:pool.numel()] = pool.int()
            idx[b, t] = row
    idx[0, :, 0] = -1
    idx[1, :, -1] = -1
    idx[2, 0, :] = -1
    return idx


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.slow
@pytest.mark.interpreter
def test_topk_decode(causal, dtype):
    """Top-k indices shared by the heads of a token: -1 lanes (first, last, all), indices >= L
    ignored, causal limits per query token; split and direct, value split."""
    dk, dv, H, Tq, K = 48, 32, 4, 2, 24
    lens = [30, 45, 20, 0]
    cache, table, seq, rows = make_cache(lens, dk, 16, dtype)
    idx = _topk(4, Tq, K, lens)
    q = make_q(4, Tq, H, dk, dtype)
    ro, rl = paged_decode(q, rows, 0.2, dv, causal=causal, topk=idx)
    for ns, cfg in ((1, None), (3, None), (2, SPLIT_DV)):
        o, lse = run(q, cache, table, seq, 0.2, dv, causal=causal, topk_indices=idx.to(DEVICE),
                     num_splits=ns, config=cfg)
        check(o, lse, ro, rl, dtype)
    assert torch.isposinf(lse[2, :, 0]).all() and (o[2, 0] == 0).all()  # all lanes -1
    assert torch.isposinf(lse[3]).all()  # empty sequence


@pytest.mark.interpreter
def test_topk_four_dim_indices_and_causal_empty_row():
    """[B, Tq, 1, K] indices are accepted; a causal token whose limit is below 0 sees nothing."""
    dtype, dk, dv, H, Tq = torch.float32, 48, 32, 2, 3
    cache, table, seq, rows = make_cache([2, 9], dk, 4, dtype)
    idx = torch.tensor([[[0, 1, -1]] * Tq, [[8, 0, 4]] * Tq], dtype=torch.int32)
    q = make_q(2, Tq, H, dk, dtype)
    o, lse = run(q, cache, table, seq, 0.2, dv, causal=True, topk_indices=idx[:, :, None].to(DEVICE),
                 num_splits=2)
    check(o, lse, *paged_decode(q, rows, 0.2, dv, causal=True, topk=idx), dtype)
    assert torch.isposinf(lse[0, :, 0]).all()  # L = 2, Tq = 3: token 0 sees no key


# ------------------------------------------------------------------------------------------------
# the GPU tiles under the interpreter (it runs one small configuration unless a test forces one)
# ------------------------------------------------------------------------------------------------
#: sm90's tiles (kernels.decode._GPU_ARCH_TILES / _GPU_WIDE_TILES) at small head dims: 64 or 128 rows,
#: 32 keys per step (one block-table lookup per step when the page size is a multiple of 32), value split.
GPU_TILES = [{"BLOCK_H": 128, "BLOCK_N": 32, "BLOCK_DV": 16, "DV_SPLIT": 2},
             {"BLOCK_H": 64, "BLOCK_N": 32, "BLOCK_DV": 16, "DV_SPLIT": 2}]


@pytest.mark.parametrize("cfg,page_size,dtype", [
    (GPU_TILES[0], 64, torch.float32), pytest.param(GPU_TILES[0], 16, torch.float16, marks=pytest.mark.slow),
    (GPU_TILES[1], 16, torch.float32), pytest.param(GPU_TILES[1], 64, torch.float16, marks=pytest.mark.slow)],
                         ids=["rows128-page64-fp32", "rows128-page16-fp16", "rows64-page16-fp32", "rows64-page64-fp16"])
@pytest.mark.interpreter
def test_gpu_tiles_dense(cfg, page_size, dtype):
    """The sm90 tiles: Tq * H = 144 rows (the last row block mostly padding rows, stored unmasked over
    the last row), causal, key steps that cross the end of the range and (page size 16) span pages, an
    empty sequence; direct and split, against the oracle."""
    dk, dv, H, Tq = 48, 32, 36, 4
    lens = [45, 0]
    cache, table, seq, rows = make_cache(lens, dk, page_size, dtype)
    q = make_q(2, Tq, H, dk, dtype)
    ro, rl = paged_decode(q, rows, 0.2, dv, causal=True)
    for ns in (1, 2):
        o, lse = run(q, cache, table, seq, 0.2, dv, causal=True, num_splits=ns, config=cfg)
        check(o, lse, ro, rl, dtype)


@pytest.mark.parametrize("cfg", GPU_TILES, ids=["rows128", "rows64"])
@pytest.mark.interpreter
def test_gpu_tiles_topk(cfg):
    """The sm90 tiles in top-k mode: 20 heads per token (padding rows), -1 lanes, causal."""
    dtype, dk, dv, H, Tq, K = torch.float32, 48, 32, 20, 1, 40
    lens = [30, 45, 20]
    cache, table, seq, rows = make_cache(lens, dk, 16, dtype)
    idx = _topk(3, Tq, K, lens)
    q = make_q(3, Tq, H, dk, dtype)
    ro, rl = paged_decode(q, rows, 0.2, dv, causal=True, topk=idx)
    for ns in (1, 2):
        o, lse = run(q, cache, table, seq, 0.2, dv, causal=True, topk_indices=idx.to(DEVICE), num_splits=ns,
                     config=cfg)
        check(o, lse, ro, rl, dtype)


@pytest.mark.parametrize("cfg", GPU_TILES, ids=["rows128", "rows64"])
@pytest.mark.interpreter
def test_gpu_tiles_window_and_sinks(cfg):
    """The sm90 tiles with a sliding window (its first step starts at a multiple of 32 keys below the window)
    and attention sinks, direct and split, against the reference backend."""
    from mla.functional import mla_decode

    B, Tq, H, dk, dv, page = 2, 2, 40, 48, 32, 64
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([150, 41], dtype=torch.int32)  # windows: positions 104.. (steps from 96 on), 0..
    cache = torch.randn(6, page, 1, dk, generator=g).to(DEVICE)
    table = torch.arange(6, dtype=torch.int32).view(2, 3).to(DEVICE)
    q = torch.randn(B, Tq, H, dk, generator=g).to(DEVICE)
    sinks = torch.randn(H, generator=g).to(DEVICE)
    lens = lens.to(DEVICE)
    ref, ref_lse = mla_decode(q.double(), cache.double(), table, lens, backend="reference", head_dim_v=dv,
                              softmax_scale=dk**-0.5, causal=True, window_size=(45, 0), sinks=sinks)
    for ns in (1, 3):
        out, lse = run(q, cache, table, lens, dk**-0.5, dv, causal=True, num_splits=ns, config=cfg,
                       sinks=sinks, window_left=45)
        assert_close(out, ref.float(), name="out")
        assert_close(lse, ref_lse.float(), name="lse")


# ------------------------------------------------------------------------------------------------
# host-side pieces
# ------------------------------------------------------------------------------------------------
def test_choose_num_splits():
    # enough programs already: no split
    assert choose_num_splits(256, 128, 1, 8192, 132) == 1
    # one sequence, long cache: split up to filling the machine, bounded by the key tiles
    n = choose_num_splits(1, 16, 1, 65536, 132)
    assert 2 <= n <= MAX_SPLITS
    assert choose_num_splits(1, 16, 1, 64, 132) == 1  # two tiles: not worth splitting
    assert choose_num_splits(1, 128, 2, 4096, 132, block_n=32, dv_split=2) <= 4096 // 64
    assert choose_num_splits(0, 16, 1, 100, 132) == 1 and choose_num_splits(4, 16, 1, 0, 132) == 1
    for b in (1, 2, 3, 8, 33):
        for L in (1, 100, 5000, 200000):
            n = choose_num_splits(b, 16, 1, L, 108)
            assert 1 <= n <= MAX_SPLITS and n <= max(1, math.ceil(L / 64))
    with pytest.raises(ValueError):
        choose_num_splits(1, 16, 1, 100, 0)
    for tile in (dict(block_h=0), dict(block_n=0)):  # was ZeroDivisionError
        with pytest.raises(ValueError, match="block_h and block_n"):
            choose_num_splits(1, 16, 1, 100, 132, **tile)


@pytest.mark.parametrize("batch,splits", [(1, 64), (8, 8), (40, 3), (64, 1), (128, 1)])
def test_choose_num_splits_by_waves(batch, splits):
    """The issue's cases on an H100 / H200 (132 SMs), H = 128, S = 4096, the sm90 tile (128 rows, 32 keys,
    two value halves: 2 programs per sequence and split): B = 40 fills one wave to 61 % unsplit, so it is
    split (3: 240 programs, 91 %); B = 128 fills 1.94 waves (97 %): no split; small batches split until the
    machine is full. Every answer keeps >= 90 % of the SMs busy."""
    cfg = decode_config(576, 512, torch.float16, 90, rows=128, interpret=False)
    assert (cfg["BLOCK_H"], cfg["BLOCK_N"], cfg["DV_SPLIT"]) == (128, 32, 2)
    kw = dict(block_h=cfg["BLOCK_H"], block_n=cfg["BLOCK_N"], dv_split=cfg["DV_SPLIT"])
    n = choose_num_splits(batch, 128, 1, 4096, 132, **kw)
    assert n == splits
    assert wave_efficiency(batch * 2 * n, 132) >= 0.9
    assert wave_efficiency(40 * 2, 132) < 0.65 and wave_efficiency(128 * 2, 132) > 0.95  # unsplit
    # top-k decode counts the query tokens as sequences: B = 20, Tq = 2 behaves as B = 40
    assert choose_num_splits(20 * 2, 128, 1, 2048, 132, **kw) > 1


def test_wave_efficiency():
    assert wave_efficiency(132, 132) == 1.0 and wave_efficiency(0, 132) == 1.0
    assert wave_efficiency(133, 132) == pytest.approx(133 / 264)
    assert wave_efficiency(80, 132) == pytest.approx(80 / 132)


def test_decode_config_and_compile_specs():
    cfg = decode_config(576, 512)
    assert cfg["DV_SPLIT"] * cfg["BLOCK_DV"] >= 512 and cfg["BLOCK_DR"] >= 64
    with pytest.raises(ValueError):
        decode_config(32, 48)
    for arch in (80, 86, 89, 90):
        specs = compile_specs(arch)
        kinds = {s.kernel for s in specs}
        assert kinds == {"mla_decode_split", "mla_decode_combine"}
        assert {s.dtype for s in specs} == {"fp16", "bf16", "fp32"}
        assert {s.extra["num_heads"] for s in specs if s.head_dims == (576, 512)} >= {1, 16, 128}
        assert {s.head_dims for s in specs if s.kernel == "mla_decode_split"} == {(576, 512), (80, 64)}
        for s in specs:
            assert list(s.signature) == list(s.fn.arg_names) and s.arch == arch
            assert all((k if isinstance(k, str) else k[0]) in s.signature for k in s.constexprs)
            assert set(s.extra["divisible"]) <= set(s.signature)


def test_validation_errors():
    dtype, dk, dv, H = torch.float32, 48, 32, 2
    cache, table, seq, _ = make_cache([5], dk, 4, dtype)
    q = make_q(1, 1, H, dk, dtype)
    with pytest.raises(TypeError):
        mla_decode_fwd(q.half(), cache, table, seq, 0.2, dv)
    with pytest.raises(TypeError):
        mla_decode_fwd(q, cache, table.long(), seq, 0.2, dv)
    with pytest.raises(ValueError):
        mla_decode_fwd(q[..., :40], cache, table, seq, 0.2, dv)
    with pytest.raises(ValueError):
        mla_decode_fwd(q, cache, table, seq, 0.2, dk + 1)
    with pytest.raises(ValueError):
        mla_decode_fwd(q, cache, table, seq, 0.2, dv, num_splits=0)
    with pytest.raises(ValueError):
        mla_decode_fwd(q, cache, table, seq, 0.2, dv, num_splits=MAX_SPLITS + 1)
    with pytest.raises(ValueError):
        mla_decode_fwd(q, cache, table, seq, 0.2, dv, out=torch.empty(1, 1, H, dv + 1, device=DEVICE))
    with pytest.raises(ValueError):  # rows t * H + h of out not equally spaced
        bad = torch.empty(1, H, 2, dv, device=DEVICE).transpose(1, 2)
        mla_decode_fwd(make_q(1, 2, H, dk, dtype), cache, table, seq, 0.2, dv, out=bad)
    with pytest.raises(ValueError):
        mla_decode_fwd(q, cache, table, seq, 0.2, dv, topk_indices=torch.zeros(1, 2, 3, dtype=torch.int32))


@pytest.mark.cuda  # bf16 tl.dot is broken under the interpreter
@pytest.mark.interpreter
def test_bf16_absorbed_cuda():
    dtype, dk, dv, H = torch.bfloat16, 576, 512, 128
    lens = [1, 700, 4096, 0]
    cache, table, seq, rows = make_cache(lens, dk, 64, dtype)
    q = make_q(4, 2, H, dk, dtype)
    for ns in (None, 1, 5):
        o, lse = run(q, cache, table, seq, 192**-0.5, dv, causal=True, num_splits=ns)
        check(o, lse, *paged_decode(q, rows, 192**-0.5, dv, causal=True), dtype)
