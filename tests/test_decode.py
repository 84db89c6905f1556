"""mla_decode over a PagedLatentCache: reference and kernel against latent_attention on the gathered cache."""


import pytest
import torch
from helpers import assert_close, backend_params, paged_cache
from oracle import paged_decode

from mla.cache import PagedLatentCache
from mla.functional import mla_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _backends():
    out = ["reference"]
    try:
        import kernels.decode  # noqa: F401
        from kernels._config import HAS_TRITON, INTERPRET

        if HAS_TRITON and (DEVICE == "cuda" or INTERPRET):
            out.append("triton")
    except ImportError:
        pass
    return out


BACKENDS = _backends()


def make_paged(seqlens, Dk, page_size, dtype, scatter=True, seed=0, extra_pages=3, poison=True):
    """helpers.paged_cache on this file's device: ``(kv_cache, block_table, cache_seqlens, rows)``."""
    return paged_cache(seqlens, Dk, page_size, dtype, scatter=scatter, seed=seed, extra_pages=extra_pages,
                       poison=poison, device=DEVICE)


def _check(out, lse, ref, ref_lse, dtype):
    assert_close(out, ref, dtype=dtype, name="out")
    assert_close(lse, ref_lse, name="lse")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_empty_row_scattered_pages_nan_slots(backend, dtype):
    L = 37
    seqlens = [L, L, L, 0]
    Dk, Dv, H, ps = 48, 32, 4, 16
    pool, table, sl, rows = make_paged(seqlens, Dk, ps, dtype)
    q = torch.randn(4, 1, H, Dk, dtype=torch.float64).to(DEVICE, dtype)
    out, lse = mla_decode(q, pool, table, sl, softmax_scale=0.2, head_dim_v=Dv, backend=backend)
    ref, ref_lse = paged_decode(q, rows, 0.2, Dv, False)
    _check(out, lse, ref, ref_lse, dtype)
    assert (out[3] == 0).all() and torch.isinf(lse[3]).all()
    # the same data laid out contiguously gives the same result
    pool2, table2, sl2, _ = make_paged(seqlens, Dk, ps, dtype, scatter=False)
    out2, _ = mla_decode(q, pool2, table2, sl2, softmax_scale=0.2, head_dim_v=Dv, backend=backend)
    assert_close(out2, out, dtype=dtype, name="out (contiguous pages)")


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
@pytest.mark.parametrize("seqlens,ps,Tq,causal", [
    ([1, 5], 4, 1, False),
    ([19, 7, 33], 8, 3, True),
    ([26, 3], 5, 2, False),
], ids=["S1", "tq3-causal", "odd-page-tq2"])
def test_lengths_pages_causal(backend, seqlens, ps, Tq, causal):
    dtype = torch.float32
    Dk, Dv, H = 40, 32, 3
    pool, table, sl, rows = make_paged(seqlens, Dk, ps, dtype, seed=1)
    q = torch.randn(len(seqlens), Tq, H, Dk, dtype=torch.float64).to(DEVICE, dtype)
    out, lse = mla_decode(q, pool, table, sl, softmax_scale=Dk**-0.5, head_dim_v=Dv, causal=causal, backend=backend)
    ref, ref_lse = paged_decode(q, rows, Dk**-0.5, Dv, causal)
    _check(out, lse, ref, ref_lse, dtype)


@pytest.mark.parametrize("num_splits", [1, 2, 7, 64])
@pytest.mark.interpreter
def test_num_splits(num_splits):
    backend = BACKENDS[-1]
    seqlens = [45, 12]
    pool, table, sl, rows = make_paged(seqlens, 48, 16, torch.float32, seed=2)
    q = torch.randn(2, 1, 4, 48, dtype=torch.float64).to(DEVICE, torch.float32)
    out, lse = mla_decode(q, pool, table, sl, softmax_scale=0.15, head_dim_v=32, num_splits=num_splits,
                          backend=backend)
    ref, ref_lse = paged_decode(q, rows, 0.15, 32, False)
    _check(out, lse, ref, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_topk_decode(backend):
    seqlens = [30, 9, 20]
    Dk, Dv, H, Tq, K = 48, 32, 4, 2, 8
    pool, table, sl, rows = make_paged(seqlens, Dk, 8, torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    topk = torch.stack([torch.stack([torch.randperm(40, generator=g)[:K] for _ in range(Tq)]) for _ in seqlens])
    topk = topk.to(torch.int32)
    topk[0, 0, :3] = -1  # leading -1 lanes
    topk[1, 1, -2:] = -1  # trailing
    topk[2, 0] = -1  # all
    topk = topk.to(DEVICE)
    q = torch.randn(3, Tq, H, Dk, dtype=torch.float64).to(DEVICE, torch.float32)
    for causal in (False, True):
        out, lse = mla_decode(q, pool, table, sl, softmax_scale=0.2, head_dim_v=Dv, topk_indices=topk,
                              causal=causal, backend=backend)
        ref, ref_lse = paged_decode(q, rows, 0.2, Dv, causal, topk.cpu())
        _check(out, lse, ref, ref_lse, torch.float32)
        assert (out[2, 0] == 0).all()


@pytest.mark.parametrize("backend", backend_params(BACKENDS))
def test_absorbed_shape(backend):
    seqlens = [70, 3]
    pool, table, sl, rows = make_paged(seqlens, 576, 64, torch.float16, seed=5)
    q = (torch.randn(2, 1, 16, 576, dtype=torch.float64) * 0.3).to(DEVICE, torch.float16)
    out, lse = mla_decode(q, pool, table, sl, softmax_scale=192**-0.5, head_dim_v=512, backend=backend)
    ref, ref_lse = paged_decode(q, rows, 192**-0.5, 512, False)
    _check(out, lse, ref, ref_lse, torch.float16)


def test_bad_inputs():
    pool, table, sl, _ = make_paged([10, 4], 48, 4, torch.float32)
    q = torch.randn(2, 1, 4, 48, device=DEVICE)
    with pytest.raises(ValueError, match="block_table: .* hold"):
        mla_decode(q, pool, table[:, :2], sl, head_dim_v=32)
    with pytest.raises(ValueError, match="kv_cache: row width 48 does not match q's head dim Dk=40"):
        mla_decode(q[..., :40], pool, table, sl)
    with pytest.raises(TypeError, match="kv_cache: dtype"):
        mla_decode(q.half(), pool, table, sl)
    with pytest.raises(TypeError, match="block_table: expected dtype int32"):
        mla_decode(q, pool, table.long(), sl)
    with pytest.raises(TypeError, match="cache_seqlens: expected dtype int32"):
        mla_decode(q, pool, table, sl.float())
    with pytest.raises(ValueError, match="head_dim_v"):
        mla_decode(q, pool, table, sl, head_dim_v=49)
    bad = table.clone()
    bad[0, 0] = 999
    with pytest.raises(ValueError, match="block_table: page ids"):
        mla_decode(q, pool, bad, sl)
    with pytest.raises(ValueError, match="num_splits"):
        mla_decode(q, pool, table, sl, num_splits=0)
    # the kernel's limit, checked on every backend (the reference used to accept what the kernel refuses)
    with pytest.raises(ValueError, match=r"num_splits: expected None or an int in \[1, 256\], got 257"):
        mla_decode(q, pool, table, sl, num_splits=257, backend="reference")
    with pytest.raises(ValueError, match=r"q: batch 1 .* the cache holds 2 sequences"):
        mla_decode(q[:1], pool, table, sl)
    with pytest.raises(ValueError, match="cache_seqlens: 1 sequences, but block_table has 2 rows"):
        mla_decode(q, pool, table, sl[:1])
    # an int64 position past the int32 range is skipped like any position >= L (a cast would wrap it to 3)
    wide = torch.tensor([[[2**32 + 3]], [[1]]], device=DEVICE)
    out_w = mla_decode(q, pool, table, sl, topk_indices=wide, return_lse=False)
    want = mla_decode(q, pool, table, sl, topk_indices=torch.tensor([[[-1]], [[1]]], device=DEVICE), return_lse=False)
    assert torch.equal(out_w, want) and (out_w[0] == 0).all()
    with pytest.raises(ValueError, match=r"q: heads and head dim must be >= 1, got shape \(2, 1, 0, 48\)"):
        mla_decode(q[:, :, :0], pool, table, sl)  # the reference raised ZeroDivisionError
    # a cached position listed twice: the kernel would weigh it twice, the reference once
    dup = torch.tensor([[[3, 3, -1]], [[0, 5, 5]]], dtype=torch.int32, device=DEVICE)  # 5 >= L=4: skipped
    with pytest.raises(ValueError, match=r"topk_indices: duplicate key position in row \(b, t\) = \(0, 0\)"):
        mla_decode(q, pool, table, sl, topk_indices=dup)
    dup[0, 0, 1] = -1
    out = mla_decode(q, pool, table, sl, topk_indices=dup, return_lse=False)  # -1 and >= L repeats are fine
    assert torch.isfinite(out).all()
    # the kernel launcher's layout checks, made before the launch with the argument named
    with pytest.raises(ValueError, match=r"kv_cache: page_size \(dim 1\) must be >= 1"):
        mla_decode(q, pool[:, :0], table, sl, backend="reference")
    strided = torch.empty(*pool.shape[:3], 96, device=DEVICE)[..., ::2]
    strided.copy_(pool)
    with pytest.raises(ValueError, match="kv_cache: backend='triton' needs last stride 1"):
        mla_decode(q, strided, table, sl, backend="triton")
    assert torch.equal(mla_decode(q, strided, table, sl, backend="reference", return_lse=False),
                       mla_decode(q, pool, table, sl, backend="reference", return_lse=False))


# -- PagedLatentCache --------------------------------------------------------------------------------
def test_paged_cache_allocation_write_gather_release():
    cache = PagedLatentCache(2, 6, num_pages=6, page_size=4)
    a, b = cache.add_sequences(2)
    cache.begin_step([a, b], [5, 2])
    assert cache.cache_seqlens.tolist() == [5, 2] and cache.step_start.tolist() == [0, 0]
    assert cache.num_free_pages == 3 and cache.step_is_prefill
    rows = torch.randn(2, 5, 6)
    for layer in range(2):
        cache.write(layer, rows + layer)
    g = cache.gather(1)
    assert torch.equal(g[0], rows[0] + 1) and torch.equal(g[1, :2], rows[1, :2] + 1) and (g[1, 2:] == 0).all()
    cache.begin_step([a, b], 1)
    assert cache.step_start.tolist() == [5, 2] and not cache.step_is_prefill and cache.step_uniform_len == 1
    new = torch.randn(2, 1, 6)
    cache.write(0, new)
    g = cache.gather(0)
    assert torch.equal(g[0, 5], new[0, 0]) and torch.equal(g[1, 2], new[1, 0])
    cache.release([a])
    assert cache.num_free_pages == 5  # a held 2 pages (6 tokens), b keeps 1
    with pytest.raises(RuntimeError, match="more pages needed"):
        (c,) = cache.add_sequences(1)
        cache.begin_step([c], 100)
    assert cache.bytes_per_token() == 2 * 6 * 4
    contig = PagedLatentCache.contiguous(1, 6, batch_size=2, max_seqlen=32)
    assert contig.page_size == 32 and contig.num_pages == 2


def test_cache_rejects_short_writes_and_unknown_ids():
    cache = PagedLatentCache(1, 3, num_pages=4, page_size=4)
    (a,) = cache.add_sequences(1)
    with pytest.raises(ValueError, match="begin_step"):
        cache.write(0, torch.ones(1, 8, 3))
    cache.begin_step([a], 8)
    cache.write(0, torch.full((1, 8, 3), 7.0))
    cache.release([a])
    (b,) = cache.add_sequences(1)
    cache.begin_step([b], [8])
    # Fewer rows than reserved would leave the released sequence's rows visible to decode.
    with pytest.raises(ValueError, match="reserved 8"):
        cache.write(0, torch.ones(1, 3, 3))
    with pytest.raises(TypeError, match="rows: expected the cache's dtype torch.float32, got torch.bfloat16"):
        cache.write(0, torch.ones(1, 8, 3, dtype=torch.bfloat16))  # no silent rounding into the cache
    with pytest.raises(ValueError, match="layer_idx"):
        cache.write(1, torch.ones(1, 8, 3))
    with pytest.raises(ValueError, match="layer_idx"):
        cache.kv_cache(-1)
    with pytest.raises(KeyError, match="unknown"):
        cache.release([a])
    with pytest.raises(KeyError, match="repeated"):
        cache.release([b, b])
    assert cache.seq_len(b) == 8  # nothing released
    cache.write(0, torch.ones(1, 8, 3))
    assert torch.equal(cache.gather(0), torch.ones(1, 8, 3))


@pytest.mark.parametrize("kv_format", [None, "fp8_ds_mla"])
def test_paged_cache_gather_empty_step(kv_format):
    # A step where every sequence is (still) empty: gather returns [B, 0, head_dim], not a reshape error.
    cache = PagedLatentCache(1, 136, num_pages=4, page_size=2, kv_format=kv_format,
                             kv_lora_rank=128 if kv_format else None)
    seqs = cache.add_sequences(2)
    cache.begin_step(seqs, 0)
    cache.write(0, torch.randn(2, 0, 136))
    assert cache.gather(0).shape == (2, 0, 136)


def test_cache_begin_step_rejects_repeated_ids_and_bad_counts():
    cache = PagedLatentCache(1, 3, num_pages=1, page_size=2)
    (c,) = cache.add_sequences(1)
    cache.begin_step([c], 1)
    # A repeated id would be counted once for pages but grow twice (IndexError on an empty free list).
    with pytest.raises(ValueError, match=r"seq_ids: each sequence at most once per step, got \[0, 0\]"):
        cache.begin_step([c, c], 1)
    with pytest.raises(TypeError, match="num_new: expected an int or one int per sequence, got 1.5"):
        cache.begin_step([c], 1.5)
    cache.begin_step([c], torch.tensor([1]))
    assert cache.cache_seqlens.tolist() == [2]


def test_max_decode_splits_is_the_kernel_limit():
    pytest.importorskip("triton")
    from kernels.decode import MAX_SPLITS
    from mla.functional import MAX_DECODE_SPLITS

    assert MAX_DECODE_SPLITS == MAX_SPLITS


def test_cache_release_closes_the_open_step():
    cache = PagedLatentCache(1, 3, num_pages=3, page_size=2)
    a, b = cache.add_sequences(2)
    cache.begin_step([a, b], 2)
    cache.write(0, torch.ones(2, 2, 3))
    cache.release([b])
    # b's page is free again: the step's write would have gone into it (and gather raised KeyError)
    with pytest.raises(ValueError, match="no step is open"):
        cache.write(0, torch.ones(2, 2, 3))
    (c,) = cache.add_sequences(1)
    cache.begin_step([a, c], 1)
    cache.write(0, torch.full((2, 1, 3), 5.0))
    g = cache.gather(0)
    assert g.shape == (2, 3, 3) and (g[0, :2] == 1).all() and (g[0, 2] == 5).all() and (g[1, 0] == 5).all()
