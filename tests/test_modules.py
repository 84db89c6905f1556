"""Modules on the reference path: LatentAttention, MLA forms and caching, sparse MLA, the LM, registry."""

import math

import pytest
import torch
from helpers import rel_err
from oracle import attention, causal_keep

from mla import (
    LatentAttention,
    LatentCache,
    LatentSparseAttention,
    MLACausalLM,
    MLAConfig,
    MultiHeadLatentAttention,
    TransformerBlock,
    registry,
)
from mla.attention import LightningIndexer, causal_density, indexer_kl_loss

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def small_config(**kw):
    base = dict(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=3,
                kv_lora_rank=20, qk_nope_head_dim=12, qk_rope_head_dim=6, v_head_dim=10, sparse_block_size=4,
                num_sink_blocks=1, num_local_blocks=1, topk_blocks=1, index_n_heads=2, index_head_dim=8,
                index_topk=5)
    base.update(kw)
    return MLAConfig(**base).validate()


# -- LatentAttention -----------------------------------------------------------------------------
def test_seed_example():
    torch.manual_seed(0)
    attn = LatentAttention(embed_dim=512, num_heads=8, latent_dim_ratio=0.25)
    inputs = torch.randn(2, 128, 512)
    out, weights, stats = attn(inputs, inputs, inputs, need_weights=True)
    assert out.shape == torch.Size([2, 128, 512])
    assert weights.shape == (2, 8, 128, 128)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 8, 128))
    assert stats.backend == "reference" and stats.latent_dim == 16 and stats.density == 1.0
    assert stats.max_logit.shape == (8,)


def test_latent_attention_math_and_masks():
    torch.manual_seed(1)
    attn = LatentAttention(32, 4, 0.5, batch_first=True).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    kv = torch.randn(2, 7, 32, dtype=torch.float64)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    out, w, stats = attn(x, kv, kv, key_padding_mask=pad, need_weights=True, is_causal=True)
    q = attn.q_proj(x).view(2, 5, 4, 4)
    k = attn.k_proj(kv).view(2, 7, 4, 4)
    v = attn.v_proj(kv).view(2, 7, 4, 8)
    keep = causal_keep(5, 7)[None, None] & ~pad[:, None, None, :]
    ref, _, _ = attention(q, k, v, 4**-0.5, keep)
    expect = attn.out_proj(ref.reshape(2, 5, 32))
    assert rel_err(out, expect) < 1e-12
    assert (w[1, :, :, 5:] == 0).all() and torch.allclose(w.sum(-1), torch.ones(2, 4, 5, dtype=w.dtype))
    assert stats.density < 1.0
    # nn.MultiheadAttention conventions: bool True = masked, [T, S]; float masks add
    bool_mask = ~causal_keep(5, 7)
    out2, _, _ = attn(x, kv, kv, attn_mask=bool_mask, key_padding_mask=pad)
    assert rel_err(out2, out) < 1e-12
    float_mask = torch.zeros(5, 7, dtype=torch.float64).masked_fill(bool_mask, float("-inf"))
    out3, _, _ = attn(x, kv, kv, attn_mask=float_mask, key_padding_mask=pad)
    assert rel_err(out3, out) < 1e-12
    # sequence-first layout
    attn.batch_first = False
    out4, _, _ = attn(x.transpose(0, 1), kv.transpose(0, 1), kv.transpose(0, 1), is_causal=True, key_padding_mask=pad)
    assert rel_err(out4.transpose(0, 1), out) < 1e-12


def test_latent_attention_bad_input():
    attn = LatentAttention(32, 4)
    x = torch.randn(2, 5, 32)
    with pytest.raises(ValueError, match="query: expected"):
        attn(x[0], x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        attn(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        LatentAttention(30, 4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_modules_name_an_input_dtype_mismatch(dtype):
    # fp32 parameters, input of another dtype: a TypeError naming the argument, not a matmul RuntimeError
    x = torch.randn(2, 5, 32, dtype=dtype)
    with pytest.raises(TypeError, match=r"query: dtype torch\.(float64|float16) does not match .*torch\.float32"):
        LatentAttention(32, 4)(x, x, x)
    m = MultiHeadLatentAttention(small_config())
    with pytest.raises(TypeError, match=r"hidden_states: dtype .* does not match the module's parameters"):
        m(torch.randn(2, 6, 48, dtype=dtype))
    with pytest.raises(TypeError, match=r"hidden_states: expected a floating-point tensor .* got torch\.int64"):
        m(torch.ones(2, 6, 48, dtype=torch.long))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts both: no error
        out, _ = m(torch.randn(2, 6, 48))
    assert out.shape == (2, 6, 48) and torch.isfinite(out).all()


def test_latent_attention_gradients_flow():
    attn = LatentAttention(32, 4)
    x = torch.randn(2, 6, 32, requires_grad=True)
    out, _, _ = attn(x, x, x, is_causal=True)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in attn.parameters())


# -- MultiHeadLatentAttention ----------------------------------------------------------------------
@pytest.mark.parametrize("q_lora_rank,rope", [(None, None), (16, YARN)], ids=["plain", "qlora-yarn"])
def test_naive_equals_absorbed_float64(q_lora_rank, rope):
    torch.manual_seed(2)
    cfg = small_config(q_lora_rank=q_lora_rank, **({"rope_parameters": rope} if rope else {}))
    m = MultiHeadLatentAttention(cfg, backend="reference").double()
    x = torch.randn(2, 11, 48, dtype=torch.float64)
    a, sa = m(x, form="naive")
    b, sb = m(x, form="absorbed")
    assert sa.form == "naive" and sb.form == "absorbed"
    assert sb.latent_dim == cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert rel_err(b, a) < 1e-10
    # the per-head max logits agree too (same scores, different factorisation)
    assert torch.allclose(sa.max_logit, sb.max_logit)


@pytest.mark.parametrize("form", ["naive", "absorbed", "auto"])
def test_incremental_decoding_equals_full_forward(form):
    torch.manual_seed(3)
    cfg = small_config(q_lora_rank=16, rope_parameters=YARN)
    m = MultiHeadLatentAttention(cfg, form=form, backend="reference").double()
    x = torch.randn(2, 12, 48, dtype=torch.float64)
    full, _ = m(x)
    cache = LatentCache(1)
    parts = [m(x[:, :5], cache=cache)[0], m(x[:, 5:8], cache=cache)[0]]  # second chunk starts at 5
    for t in range(8, 12):
        parts.append(m(x[:, t:t + 1], cache=cache)[0])
    assert cache.get_seq_length() == 12
    assert rel_err(torch.cat(parts, 1), full) < 1e-10


def test_cache_holds_only_latents():
    cfg = small_config()
    cache = LatentCache(2)
    model = MLACausalLM(cfg)
    model(torch.randint(0, 64, (1, 9)), cache=cache)
    assert cache.bytes_per_token() == 2 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4
    assert cfg.expanded_cache_values_per_token == 3 * (18 + 10)


def test_mla_need_weights_and_padding_mask():
    cfg = small_config()
    m = MultiHeadLatentAttention(cfg, backend="reference")
    x = torch.randn(2, 6, 48)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, :2] = False  # left padding
    out, stats, probs = m(x, attention_mask=keep, need_weights=True)
    assert probs.shape == (2, 3, 6, 6)
    assert (probs[0, :, :, :2] == 0).all()
    rows = probs.sum(-1)
    assert torch.allclose(rows[1], torch.ones_like(rows[1]))
    with pytest.raises(ValueError, match="hidden_states"):
        m(x[..., :10])


# -- sparse ------------------------------------------------------------------------------------------
def test_sparse_block_mode_all_blocks_equals_dense():
    torch.manual_seed(4)
    cfg = small_config(topk_blocks=100)
    dense = MultiHeadLatentAttention(cfg, backend="reference").double()
    sparse = LatentSparseAttention(cfg, mode="block", backend="reference").double()
    sparse.load_state_dict(dense.state_dict())
    x = torch.randn(2, 15, 48, dtype=torch.float64)
    a, _ = dense(x)
    b, st = sparse(x)
    assert rel_err(b, a) < 1e-10
    assert st.density == pytest.approx(causal_density(15, 15))
    # per query token: all blocks up to its own (tokens 0-3: 1, 4-7: 2, 8-11: 3, 12-14: 4)
    assert st.visited_blocks == 2 * (4 * 1 + 4 * 2 + 4 * 3 + 3 * 4)
    assert st.visited_tokens == 2 * 120


def test_sparse_block_mode_selects_subset():
    torch.manual_seed(5)
    cfg = small_config(topk_blocks=1, num_local_blocks=1, num_sink_blocks=1)
    sparse = LatentSparseAttention(cfg, mode="block", backend="reference").double()
    x = torch.randn(1, 32, 48, dtype=torch.float64)
    out, st, probs = sparse(x, need_weights=True)
    # each query token keeps <= 3 of its visible key blocks: sink, own block, one chosen
    assert st.visited_blocks <= 3 * 32 and st.density < causal_density(32, 32)
    assert torch.isfinite(out).all()
    nz = (probs[0, 0] > 0).float().view(32, 8, 4).amax(-1)  # key blocks with weight per query
    assert (nz.sum(-1) <= 3).all() and (nz.sum(-1)[8:] == 3).all()
    assert (nz[:, 0] == 1).all()  # the sink block
    assert all(nz[t, t // 4] == 1 for t in range(32))  # the own block


@pytest.mark.parametrize("mode", ["block", "topk"])
def test_sparse_incremental_equals_full_when_selection_matters(mode):
    torch.manual_seed(15)
    cfg = small_config(topk_blocks=1, index_topk=6, q_lora_rank=16)
    m = LatentSparseAttention(cfg, mode=mode, backend="reference").double()
    x = torch.randn(2, 30, 48, dtype=torch.float64)
    full, st = m(x)
    assert st.density < 0.6 * causal_density(30, 30)
    cache = LatentCache(1)
    parts = [m(x[:, :13], cache=cache)[0], m(x[:, 13:17], cache=cache)[0]]
    parts += [m(x[:, t:t + 1], cache=cache)[0] for t in range(17, 30)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-10


def test_sparse_topk_mode_large_k_equals_dense_and_cache():
    torch.manual_seed(6)
    cfg = small_config(index_topk=64, q_lora_rank=16)
    dense = MultiHeadLatentAttention(cfg, backend="reference").double()
    sparse = LatentSparseAttention(cfg, mode="topk", backend="reference").double()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    x = torch.randn(2, 10, 48, dtype=torch.float64)
    a, _ = dense(x)
    b, st = sparse(x)
    assert rel_err(b, a) < 1e-10
    assert st.visited_tokens == 2 * 55 and st.density == pytest.approx(55 / 100)


def test_indexer_formula_and_kl():
    torch.manual_seed(7)
    idx = LightningIndexer(hidden_size=16, q_in_dim=12, n_heads=3, head_dim=8, rope_dim=4).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    qin = torch.randn(2, 5, 12, dtype=torch.float64)
    cos = torch.ones(1, 5, 4, dtype=torch.float64)  # zero angle: rotation is the identity
    sin = torch.zeros(1, 5, 4, dtype=torch.float64)
    scores = idx(x, qin, cos, sin)
    q = idx.wq(qin).view(2, 5, 3, 8)
    k = idx.k_norm(idx.wk(x))
    w = idx.weights_proj(x) * (3**-0.5 * 8**-0.5)
    expect = torch.zeros(2, 5, 5, dtype=torch.float64)
    for b in range(2):
        for t in range(5):
            for s in range(5):
                expect[b, t, s] = sum(w[b, t, j] * torch.relu(q[b, t, j] @ k[b, s]) for j in range(3))
    assert rel_err(scores, expect) < 1e-6  # the indexer runs in float32
    # KL is zero when the indexer distribution equals the attention distribution
    s = torch.randn(2, 4, 6).masked_fill(~causal_keep(4, 6), float("-inf"))
    p = torch.softmax(s, -1)[:, None].expand(2, 3, 4, 6) / 3
    assert indexer_kl_loss(s, p).abs() < 1e-6
    assert indexer_kl_loss(torch.zeros(2, 4, 6), p) > 1e-3


def test_sparse_indexer_loss_trains_indexer_only():
    cfg = small_config(index_topk=4)
    sparse = LatentSparseAttention(cfg, mode="topk", backend="reference", indexer_loss=True)
    x = torch.randn(2, 10, 48, requires_grad=True)
    out, st = sparse(x)
    assert st.indexer_loss is not None and st.indexer_loss > 0
    st.indexer_loss.backward()
    assert sparse.indexer.wq.weight.grad is not None
    assert x.grad is None or (x.grad == 0).all()  # indexer inputs are detached
    with pytest.raises(ValueError, match="mode"):
        LatentSparseAttention(cfg, mode="dense")
    with pytest.raises(ValueError, match="form: LatentSparseAttention always runs the absorbed form"):
        LatentSparseAttention(cfg, mode="topk", form="naive")
    with pytest.raises(ValueError, match="form"):
        sparse(torch.randn(1, 3, cfg.hidden_size), form="naive")


# -- blocks, LM, registry ----------------------------------------------------------------------------
@pytest.mark.parametrize("attention,mode", [("mla", "block"), ("sparse", "block"), ("sparse", "topk")])
def test_lm_generate_greedy_matches_full_forward(attention, mode):
    torch.manual_seed(8)
    cfg = small_config(index_topk=6, topk_blocks=1)
    model = MLACausalLM(cfg, attention=attention, sparse_mode=mode).double().eval()
    prompt = torch.randint(0, 64, (2, 9))
    out = model.generate(prompt, 16, temperature=0)
    assert out.shape == (2, 25) and torch.equal(out[:, :9], prompt)
    seq = prompt
    for _ in range(16):
        nxt = model(seq).logits[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


def test_lm_loss_and_block():
    cfg = small_config()
    model = MLACausalLM(cfg)
    ids = torch.randint(0, 64, (2, 8))
    res = model(ids, targets=ids)
    assert res.logits.shape == (2, 8, 64) and math.isfinite(res.loss.item())
    assert len(res.stats) == cfg.num_hidden_layers
    res.loss.backward()
    blk = TransformerBlock(cfg)
    y, st = blk(torch.randn(1, 4, 48))
    assert y.shape == (1, 4, 48) and st.backend == "reference"
    with pytest.raises(TypeError, match="input_ids"):
        model(ids.float())


@pytest.mark.parametrize(
    "ids, error, message",
    [
        (torch.tensor([[1, 64]]), ValueError, r"input_ids: ids must be in \[0, vocab_size=64\), got \[1, 64\]"),
        (torch.tensor([[-1, 3]]), ValueError, r"input_ids: ids must be in \[0, vocab_size=64\), got \[-1, 3\]"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "input_ids: expected an integer dtype"),
        (torch.tensor([1, 2]), ValueError, r"input_ids: expected a \[B, T\] integer tensor"),
    ],
)
def test_causal_lm_rejects_bad_input_ids(ids, error, message):
    model = MLACausalLM(small_config(num_hidden_layers=1))
    with pytest.raises(error, match=message):
        model(ids)


def test_registry_presets():
    v3 = registry.get("deepseek-v3")
    assert (v3.hidden_size, v3.num_attention_heads, v3.q_lora_rank, v3.kv_lora_rank) == (7168, 128, 1536, 512)
    assert (v3.qk_nope_head_dim, v3.qk_rope_head_dim, v3.v_head_dim) == (128, 64, 128)
    assert v3.cache_values_per_token == 576 and v3.expanded_cache_values_per_token == 128 * (192 + 128)
    lite = registry.get("deepseek-v2-lite")
    assert (lite.hidden_size, lite.num_attention_heads, lite.q_lora_rank, lite.kv_lora_rank) == (2048, 16, None, 512)
    tiny = registry.get("tiny", num_hidden_layers=1)
    assert tiny.num_hidden_layers == 1
    model = registry.build("tiny", num_hidden_layers=1)
    assert isinstance(model, MLACausalLM)
    registry.register("my-test", lambda: small_config(), overwrite=True)
    assert registry.get("my-test").hidden_size == 48
    with pytest.raises(KeyError, match="unknown config"):
        registry.get("nope")
    with pytest.raises(TypeError, match="name: expected a registered config name"):
        registry.get(3)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("tiny", lambda: small_config())
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        small_config(qk_rope_head_dim=5)


def test_generate_batched_different_prompt_lengths():
    torch.manual_seed(9)
    cfg = small_config()
    model = MLACausalLM(cfg).double().eval()
    a = torch.randint(0, 64, (7,))
    b = torch.randint(0, 64, (4,))
    ga = model.generate(a[None], 8, temperature=0)[0, 7:]
    gb = model.generate(b[None], 8, temperature=0)[0, 4:]
    # left padding (HF style) and right padding both work
    left = torch.stack([a, torch.cat([torch.zeros(3, dtype=a.dtype), b])])
    lmask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    out = model.generate(left, 8, attention_mask=lmask, temperature=0, page_size=4)
    assert torch.equal(out[0, 7:], ga) and torch.equal(out[1, 7:], gb)
    right = torch.stack([a, torch.cat([b, torch.zeros(3, dtype=b.dtype)])])
    out = model.generate(right, 8, attention_mask=lmask.flip(1), temperature=0, page_size=3)
    assert torch.equal(out[0, 7:], ga) and torch.equal(out[1, 7:], gb)
    # sampling is reproducible with a generator; eos stops a sequence
    g1 = model.generate(left, 5, attention_mask=lmask, generator=torch.Generator().manual_seed(0), top_k=5)
    g2 = model.generate(left, 5, attention_mask=lmask, generator=torch.Generator().manual_seed(0), top_k=5)
    assert torch.equal(g1, g2)
    eos = int(ga[0])
    out = model.generate(a[None], 8, temperature=0, eos_token_id=eos)
    assert out.shape[1] == 8 and out[0, -1] == eos


@pytest.mark.parametrize("which", ["attn_mask", "key_padding_mask"])
def test_latent_attention_rejects_integer_masks(which):
    """nn.MultiheadAttention semantics (bool True = ignore, float = bias): a 0/1 integer mask (HF style,
    1 = attend) would silently act as a +1 bias, so it is refused."""
    attn = LatentAttention(32, 2)
    x = torch.randn(2, 6, 32)
    mask = torch.zeros(6, 6, dtype=torch.long) if which == "attn_mask" else torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(TypeError, match=which):
        attn(x, x, x, **{which: mask})
