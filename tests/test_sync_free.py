"""No host syncs on the hot paths: a paged decode step of ``MLACausalLM`` and the top-k backward's
key-major index compile into one graph with no data-dependent value or shape, and sparse decode uses
the cache's incrementally kept pooled block keys / indexer keys instead of re-reading every row.

A host sync (``.item()``, ``int(tensor)``, ``bool(tensor)``, ``nonzero``, ``unique``, a boolean-mask index)
shows up under ``torch.compile`` as a graph break (fullgraph fails) or as an *unbacked* symbol (a value or
size only known after running): ``_strict`` rejects both, so these tests fail on any such call.
"""

import pytest
import torch
import torch._dynamo
from helpers import backend_params, rel_err
from torch._dynamo.utils import counters

from mla import MLACausalLM, registry
from mla.cache import PagedLatentCache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _strict(gm, example_inputs):
    """Dynamo backend that refuses graphs holding data-dependent values or shapes, then runs aot_eager."""
    from torch._dynamo.backends.debugging import aot_eager
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    bad = []
    for node in gm.graph.nodes:
        val = node.meta.get("example_value")
        if val is not None and free_unbacked_symbols(val):
            bad.append(node.format_node())
    if bad:
        raise AssertionError("data-dependent values/shapes (host syncs) in the graph:\n" + "\n".join(bad))
    return aot_eager(gm, example_inputs)


def _compile(fn):
    torch._dynamo.reset()
    counters.clear()
    return torch.compile(fn, fullgraph=True, backend=_strict)


@pytest.mark.parametrize("sync", ["item", "int", "nonzero", "bool_index", "unique"])
def test_strict_backend_rejects_host_syncs(sync):
    """The check itself can fail: each kind of sync is refused."""
    ops = {
        "item": lambda x: x * (x.sum() > 0).item(),
        "int": lambda x: x[: int((x > 0).sum())],
        "nonzero": lambda x: x.nonzero(),
        "bool_index": lambda x: x[x > 0],
        "unique": lambda x: torch.unique(x),
    }
    fn = _compile(ops[sync])
    # a graph break under fullgraph (older torch) or an unbacked symbol refused by _strict
    with pytest.raises(torch._dynamo.exc.TorchDynamoException):
        fn(torch.randn(8, device=DEVICE))


def _cfg(layers=2):
    return registry.get(
        "tiny", num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, sparse_block_size=4, num_sink_blocks=1,
        num_local_blocks=1, topk_blocks=1, index_topk=5, index_n_heads=2, index_head_dim=8, vocab_size=64,
    )


def _model(attention, mode, dtype=torch.float32, backend="reference"):
    torch.manual_seed(0)
    model = MLACausalLM(_cfg(), attention=attention, sparse_mode=mode, backend=backend)
    return model.to(DEVICE, dtype).eval()


def _prefill(model, prompts, page_size, max_tokens):
    """A paged cache holding the ragged ``prompts`` (list of 1-D id tensors)."""
    B = len(prompts)
    lens = [p.numel() for p in prompts]
    ids = torch.zeros(B, max(lens), dtype=torch.long, device=DEVICE)
    for b, p in enumerate(prompts):
        ids[b, : p.numel()] = p
    cache = model.new_paged_cache(B, max_tokens, page_size=page_size)
    seqs = cache.add_sequences(B)
    cache.begin_step(seqs, lens)
    with torch.no_grad():
        model(ids, cache=cache)
    return cache, seqs


ATTENTIONS = [("mla", "block"), ("sparse", "block"), ("sparse", "topk")]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("attention,mode", ATTENTIONS, ids=["dense", "sparse-block", "sparse-topk"])
@pytest.mark.slow
def test_paged_decode_step_is_one_sync_free_graph(attention, mode, backend):
    """One whole decode step (all layers, cache writes, sparse selection, attention over the pages:
    the reference, or the decode kernel's op) compiles with fullgraph and no data-dependent value; later
    steps reuse the graph (fixed shapes, as CUDA-graph replay needs) and match eager decoding."""
    if backend == "triton":
        pytest.importorskip("triton")
    model = _model(attention, mode, backend=backend)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g).to(DEVICE) for n in (6, 11, 2)]
    eager_cache, seqs = _prefill(model, prompts, page_size=4, max_tokens=20)
    comp_cache, seqs_c = _prefill(model, prompts, page_size=4, max_tokens=20)

    @torch.no_grad()
    def step(ids):
        out = model(ids, cache=comp_cache)
        return out.logits, [s.density_raw for s in out.stats]

    compiled = _compile(step)
    for i in range(4):
        ids = torch.randint(0, 64, (3, 1), generator=g).to(DEVICE)
        eager_cache.begin_step(seqs, 1)
        comp_cache.begin_step(seqs_c, 1)
        with torch.no_grad():
            ref = model(ids, cache=eager_cache)
        logits, density = compiled(ids)
        assert rel_err(logits, ref.logits) < 1e-5, i
        assert all(abs(float(d) - s.density) < 1e-6 for d, s in zip(density, ref.stats))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_decode_stats_are_lazy():
    """Stats of a decode step stay on the device until read."""
    model = _model("sparse", "block")
    cache, seqs = _prefill(model, [torch.arange(9, device=DEVICE), torch.arange(3, device=DEVICE)], 4, 16)
    cache.begin_step(seqs, 1)
    with torch.no_grad():
        st = model(torch.ones(2, 1, dtype=torch.long, device=DEVICE), cache=cache).stats[0]
    assert isinstance(st.density_raw, torch.Tensor) and isinstance(st.visited_tokens_raw, torch.Tensor)
    assert isinstance(st.density, float) and isinstance(st.visited_tokens, int) and isinstance(st.visited_blocks, int)
    # 10 tokens: sink block 0, own block 2, the best other (1): 4 + 4 + 2 keys; 4 tokens: block 0 only
    assert st.visited_blocks == 3 + 1 and st.visited_tokens == (4 + 4 + 2) + 4
    assert st.density == pytest.approx(st.visited_tokens / (2 * 10))


@pytest.mark.parametrize("mode", ["block", "topk"])
@pytest.mark.parametrize("page_size", [3, 8])
def test_sparse_decode_uses_kept_keys_and_matches_full_recompute(mode, page_size, monkeypatch):
    """Ragged batch, several decode steps: each step's logits equal a full forward of every sequence
    alone (block sums / indexer keys recomputed from all rows), and decode never gathers the cached rows.
    Page size 3 does not divide the block size 4 (blocks straddle pages), 8 holds two blocks per page."""
    model = _model("sparse", mode, torch.float64)
    g = torch.Generator().manual_seed(2)
    seqs_tokens = [torch.randint(0, 64, (n,), generator=g).to(DEVICE) for n in (7, 13, 2)]
    cache, seqs = _prefill(model, seqs_tokens, page_size=page_size, max_tokens=26)

    def no_gather(*a, **k):
        raise AssertionError("decode read every cached row (cache.gather)")

    monkeypatch.setattr(PagedLatentCache, "gather", no_gather)
    for _ in range(6):
        nxt = torch.randint(0, 64, (3,), generator=g).to(DEVICE)
        seqs_tokens = [torch.cat([t, nxt[b: b + 1]]) for b, t in enumerate(seqs_tokens)]
        cache.begin_step(seqs, 1)
        with torch.no_grad():
            logits = model(nxt[:, None], cache=cache).logits[:, 0]
            for b, toks in enumerate(seqs_tokens):
                full = model(toks[None]).logits[0, -1]
                assert rel_err(logits[b], full) < 1e-9, (b, toks.numel())


def test_paged_cache_block_sums_any_page_size():
    """Running block sums equal the sums of the written rows for page sizes that divide, straddle or
    exceed the block size, written in ragged chunks."""
    g = torch.Generator().manual_seed(3)
    for page_size, bs in ((3, 4), (4, 4), (8, 4), (5, 12), (2, 3)):
        cache = PagedLatentCache(1, 6, num_pages=40, page_size=page_size, dtype=torch.float64, max_pages_per_seq=12)
        seqs = cache.add_sequences(3)
        rows = [torch.zeros(0, 6, dtype=torch.float64) for _ in seqs]
        for chunk in ([5, 9, 1], [1, 1, 1], [7, 0, 3], [1, 1, 1]):
            cache.begin_step(seqs, chunk)
            new = torch.randn(3, max(chunk), 6, generator=g, dtype=torch.float64)
            cache.write(0, new)
            cache.add_block_sums(0, "k", new, bs)
            rows = [torch.cat([r, new[b, :n]]) for b, (r, n) in enumerate(zip(rows, chunk))]
            sums = cache.block_sums(0, "k")
            assert sums.shape == (3, -(-cache.capacity // bs), 6)
            for b, r in enumerate(rows):
                nk = -(-r.shape[0] // bs)
                ref = torch.nn.functional.pad(r, (0, 0, 0, nk * bs - r.shape[0])).view(nk, bs, 6).sum(1)
                assert torch.allclose(sums[b, :nk], ref, atol=1e-12) and (sums[b, nk:] == 0).all()
        cache.release(seqs[:1])  # the freed pages are zeroed when a new sequence takes them
        (s,) = cache.add_sequences(1)
        cache.begin_step([s], 2)
        with pytest.raises(RuntimeError, match="prefill"):  # a store can't start mid-sequence
            cache.add_block_sums(0, "late", torch.ones(1, 2, 6, dtype=torch.float64), bs)
        cache.add_block_sums(0, "k", torch.ones(1, 2, 6, dtype=torch.float64), bs)
        assert torch.equal(cache.block_sums(0, "k")[0, 0, 0], torch.tensor(2.0, dtype=torch.float64))
        with pytest.raises(ValueError, match="block_size"):
            cache.add_block_sums(0, "k", torch.ones(1, 2, 6, dtype=torch.float64), bs + 1)
        with pytest.raises(ValueError, match="values: expected"):
            cache.add_block_sums(0, "k", torch.ones(1, 2, 5, dtype=torch.float64), bs)
        with pytest.raises(ValueError, match="reserved 2"):
            cache.write_tokens(0, "t", torch.ones(1, 1, 3))
    with pytest.raises(ValueError, match="no step is open"):
        PagedLatentCache(1, 6, num_pages=2, page_size=4).write_tokens(0, "t", torch.ones(1, 1, 3))


def test_paged_cache_fixed_width_updates_in_place():
    """With max_pages_per_seq the step tensors keep their shape and storage from step to step."""
    cache = PagedLatentCache(1, 4, num_pages=8, page_size=2, max_pages_per_seq=3)
    a, b = cache.add_sequences(2)
    cache.begin_step([a, b], [3, 1])
    ptrs = [t.data_ptr() for t in (cache.block_table, cache.cache_seqlens, cache.step_start, cache.step_len)]
    assert cache.block_table.shape == (2, 3) and cache.capacity == 6
    cache.write(0, torch.randn(2, 3, 4))
    cache.begin_step([a, b], 1)
    assert [t.data_ptr() for t in (cache.block_table, cache.cache_seqlens, cache.step_start, cache.step_len)] == ptrs
    assert cache.cache_seqlens.tolist() == [4, 2] and cache.step_start.tolist() == [3, 1]
    with pytest.raises(RuntimeError, match="max_pages_per_seq"):
        cache.begin_step([a], 3)


# -- top-k backward ------------------------------------------------------------------------------------
def test_key_major_index_compiles_without_syncs():
    """build_key_major_index: one graph, no data-dependent sizes, same result as eager."""
    from kernels.topk_sparse import build_key_major_index

    g = torch.Generator().manual_seed(4)
    B, T, Hkv, K, S = 2, 9, 2, 6, 37
    idx = torch.randint(-1, S, (B, T, Hkv, K), generator=g, dtype=torch.int32).to(DEVICE)
    for causal in (False, True):
        fn = _compile(lambda i, c=causal: build_key_major_index(i, S, c, 8, group=3, rows_per_item=6))
        got, ref = fn(idx), build_key_major_index(idx, S, causal, 8, group=3, rows_per_item=6)
        for name in ("ent_t", "ent_lo", "ent_hi", "offsets", "items", "multi"):
            assert torch.equal(getattr(got, name), getattr(ref, name)), name
        assert (got.n_slots, got.chunk) == (ref.n_slots, ref.chunk)


def test_key_major_index_slot_budget():
    """max_slots bounds the fp32 partial slots by lengthening work items; the lists stay the same."""
    from kernels.topk_sparse import build_key_major_index

    g = torch.Generator().manual_seed(5)
    idx = torch.randint(-1, 64, (1, 64, 1, 16), generator=g, dtype=torch.int32).to(DEVICE)
    free = build_key_major_index(idx, 64, True, 16, rows_per_item=4)
    capped = build_key_major_index(idx, 64, True, 16, rows_per_item=4, max_slots=6)
    assert free.n_slots > 6 >= capped.n_slots and capped.chunk > free.chunk
    for name in ("ent_t", "ent_lo", "ent_hi", "offsets"):
        assert torch.equal(getattr(free, name), getattr(capped, name))
    used = capped.items[:, 3]
    assert int(used.max()) < max(1, capped.n_slots)


@pytest.mark.slow
@pytest.mark.interpreter
def test_topk_forward_backward_triton_compiles_without_syncs():
    """Top-k sparse attention forward + deterministic backward on the Triton path (the interpreter on
    CPU) through torch.compile: one graph, no data-dependent values, gradients as eager."""
    pytest.importorskip("triton")
    from mla import latent_attention
    from mla.sparsity import topk_indices_from_scores

    g = torch.Generator().manual_seed(6)
    q = torch.randn(1, 12, 4, 24, generator=g).to(DEVICE).requires_grad_()
    lat = torch.randn(1, 12, 1, 24, generator=g).to(DEVICE).requires_grad_()
    idx = topk_indices_from_scores(torch.randn(1, 12, 1, 12, generator=g).to(DEVICE), 5, causal=True)

    def f(q, lat):
        out = latent_attention(q, lat, lat[..., :16], causal=True, topk_indices=idx, backend="triton")
        out.square().sum().backward()
        return out.detach()

    ref = f(q, lat)
    ref_grads = (q.grad.clone(), lat.grad.clone())
    q.grad = lat.grad = None
    out = _compile(lambda q, lat: latent_attention(q, lat, lat[..., :16], causal=True, topk_indices=idx,
                                                   backend="triton"))(q, lat)
    out.square().sum().backward()
    assert rel_err(out, ref) < 1e-6
    assert rel_err(q.grad, ref_grads[0]) < 1e-5 and rel_err(lat.grad, ref_grads[1]) < 1e-5
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("mode", ["block", "topk"])
@pytest.mark.slow
@pytest.mark.interpreter
def test_sparse_module_training_step_is_sync_free(mode):
    """LatentSparseAttention forward + backward (selection, block mask / top-k indices, the Triton ops,
    tensor stats) is one graph with no data-dependent value."""
    pytest.importorskip("triton")
    from mla import LatentSparseAttention

    torch.manual_seed(0)
    mod = LatentSparseAttention(_cfg(1), mode=mode, backend="triton").to(DEVICE)
    x = torch.randn(2, 13, 32, device=DEVICE)
    out, st = _compile(mod)(x)
    out.square().mean().backward()
    ref, ref_st = mod(x)
    assert rel_err(out, ref) < 1e-6 and st.visited_tokens == ref_st.visited_tokens
    assert all(p.grad is not None for n, p in mod.named_parameters() if not n.startswith("indexer."))


@pytest.mark.interpreter
def test_topk_backward_launcher_makes_no_host_sync(monkeypatch):
    """The deterministic top-k backward launcher (index build included) never turns a tensor into a
    Python value: every such conversion raises while it runs."""
    pytest.importorskip("triton")
    from kernels.topk_sparse import topk_attention_bwd, topk_attention_fwd
    from mla.sparsity import topk_indices_from_scores

    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 10, 2, 16, generator=g).to(DEVICE), torch.randn(1, 10, 1, 16, generator=g).to(DEVICE),
               torch.randn(1, 10, 1, 16, generator=g).to(DEVICE))
    idx = topk_indices_from_scores(torch.randn(1, 10, 1, 10, generator=g).to(DEVICE), 4, causal=True)
    out, lse, _ = topk_attention_fwd(q, k, v, idx, 0.25, True)
    do = torch.randn_like(out)
    ref = topk_attention_bwd(do, q, k, v, out, lse, idx, 0.25, True)

    def sync(*a, **kw):
        raise AssertionError("host sync in the top-k backward")

    from kernels import topk_sparse

    for name in ("item", "tolist", "__int__", "__bool__", "__float__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for name in ("unique", "unique_consecutive", "nonzero", "repeat_interleave", "masked_select"):
        monkeypatch.setattr(topk_sparse.torch, name, sync)
    got = topk_attention_bwd(do, q, k, v, out, lse, idx, 0.25, True)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
