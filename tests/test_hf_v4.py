"""DeepSeek-V4 drop-in (``mla.integrations.deepseek_v4``) against transformers' eager ``DeepseekV4Attention``.

Tiny random config with one layer of each type (sliding, CSA, HCA): window 8, CSA rate 4 with an indexer keeping
3 entries, HCA rate 8, 40-token prompts, so the window, the indexer and both compression rates all cut keys
(asserted on the index lists the attention receives). Logits are compared at real (non-pad) positions: pad
queries see no key, which with sinks both sides answer with 0 but through different masks.
"""

import copy
import pickle

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import rel_err  # noqa: E402
from test_hf_integration import _one_thread, compiled_layer_error, lm_grads, randomize  # noqa: E402, F401 (autouse)
from transformers import DynamicCache  # noqa: E402
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as hf_v4  # noqa: E402

import mla.integrations.deepseek_v4 as mv4  # noqa: E402
from mla.integrations.transformers import is_patched, patch_model, unpatch_model  # noqa: E402

LAYERS = ["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"]
WINDOW, CSA, HCA, TOPK = 8, 4, 8, 3
SEED = 4  # inputs with a clear indexer top-k margin (test_seeds_have_clear_indexer_margin)


def v4_config(**over):
    kw = dict(
        vocab_size=128, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        head_dim=32, q_lora_rank=16, partial_rotary_factor=0.25, num_experts_per_tok=2, n_routed_experts=3,
        layer_types=list(LAYERS), mlp_layer_types=["moe"] * 3, hc_mult=2, hc_sinkhorn_iters=3,
        compress_rates={"compressed_sparse_attention": CSA, "heavily_compressed_attention": HCA},
        sliding_window=WINDOW, o_groups=2, o_lora_rank=8, index_n_heads=8, index_head_dim=16, index_topk=TOPK,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    kw.update(over)
    cfg = transformers.DeepseekV4Config(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build(seed=0, **over):
    torch.manual_seed(seed)
    model = randomize(transformers.DeepseekV4ForCausalLM(v4_config(**over)), seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for layer in model.model.layers:  # sinks of order 1, so they matter
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape, generator=g))
    return model


def batch(T=40, pad=5, seed=0, B=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[-1, :pad] = 0
    ids[-1, :pad] = 0
    return ids, am


def logits(model, ids, am=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


def greedy(model, ids, am, n=16):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False)


def indexer_margin(model, ids, am):
    """Smallest relative gap between the ``index_topk``-th and the next visible indexer score over the queries
    with more than ``index_topk`` visible entries (eager run; 0 when the boundary score is an exact ReLU zero,
    a tie ``topk`` breaks by position). Above ~1e-5 the choice cannot change under the ~1e-7 relative
    differences between eager's and our hidden states, nor with the number of entries (prefill vs decode)."""
    gaps = []

    def hook(mod, args, out):
        s = out.detach()  # [B, T, N], before the indexer masks future entries
        vis = torch.arange(s.shape[-1])[None, :] < ((torch.arange(s.shape[1]) + 1) // CSA)[:, None]
        top = s.masked_fill(~vis, float("-inf")).topk(min(TOPK + 1, s.shape[-1]), dim=-1).values
        rows = vis.sum(-1) > TOPK
        if rows.any():
            kth, nxt = top[..., TOPK - 1][:, rows], top[..., TOPK][:, rows]
            gap = torch.where(kth == 0, 0.0, (kth - nxt) / top[..., 0][:, rows].abs())
            gaps.append(float(gap.min()))

    hooks = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, hf_v4.DeepseekV4IndexerScorer)]
    try:
        logits(model, ids, am)
    finally:
        for h in hooks:
            h.remove()
    return min(gaps)


@pytest.mark.parametrize("kw", [{}, dict(T=40, pad=0, B=1), dict(T=37, pad=9), dict(T=24, pad=3)])
def test_seeds_have_clear_indexer_margin(kw):
    """Two implementations agree on top-k only when scores are not near-tied: the test inputs keep a margin."""
    assert indexer_margin(build(SEED), *batch(seed=SEED, **kw)) > 1e-3


def test_logits_greedy_and_index_lists_match_eager(monkeypatch):
    model = build(SEED)
    ids, am = batch(seed=SEED)
    valid = am.bool()
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am)
    originals = [layer.self_attn for layer in model.model.layers]
    keys = list(model.state_dict())
    patch_model(model, backend="reference")
    assert is_patched(model) and list(model.state_dict()) == keys
    again = pickle.loads(pickle.dumps(model.model.layers[1].self_attn))
    assert type(again) is mv4.LatentDeepseekV4Attention and torch.equal(again.sinks, originals[1].sinks)
    for layer, orig in zip(model.model.layers, originals):
        attn = layer.self_attn
        assert isinstance(attn, mv4.LatentDeepseekV4Attention) and isinstance(attn, hf_v4.DeepseekV4Attention)
        assert attn is not orig and attn.kv_proj is orig.kv_proj and attn.sinks is orig.sinks  # shared, no copy
        assert attn.compressor is orig.compressor
    seen = []
    real = mv4.latent_attention

    def spy(q, k, v, **kw):
        seen.append((k.shape[1], kw["topk_indices"].clone()))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mv4, "latent_attention", spy)
    got = logits(model, ids, am)
    assert rel_err(got[valid], ref[valid]) <= 1e-5
    # the masks actually cut keys: window 8 of 40, CSA top-3 of up to 10 entries, HCA prefix of 5 entries
    (s0, i0), (s1, i1), (s2, i2) = seen
    T = ids.shape[1]
    assert s0 == T and i0.shape[-1] == WINDOW and int((i0 >= 0).sum(-1).max()) == WINDOW
    assert s1 == T + T // CSA and i1.shape[-1] == WINDOW + TOPK
    comp1 = (i1[0, :, 0, WINDOW:] >= 0).sum(-1)
    assert int(comp1.max()) == TOPK and T // CSA > TOPK
    assert torch.equal(comp1, ((torch.arange(T) + 1) // CSA).clamp(max=TOPK))  # causal threshold (p + 1) // m
    assert s2 == T + T // HCA and i2.shape[-1] == WINDOW + T // HCA
    comp2 = (i2[0, :, 0, WINDOW:] >= 0).sum(-1)
    assert torch.equal(comp2, (torch.arange(T) + 1) // HCA)
    monkeypatch.undo()
    tokens = greedy(model, ids, am)
    assert torch.equal(tokens, ref_tokens)
    unpatch_model(model)
    assert not is_patched(model) and all(a.self_attn is o for a, o in zip(model.model.layers, originals))


def test_prefill_chunk_and_decode_equal_full_forward(monkeypatch):
    """Cache across prefill (24), a chunk (6) and single-token steps: same logits as one full forward. Without
    padding the sliding layer runs the dense window kernels (causal + window_size + sinks)."""
    model = patch_model(build(SEED), backend="reference")
    ids, _ = batch(T=40, pad=0, seed=SEED, B=1)
    calls = []
    real = mv4.latent_attention

    def spy(q, k, v, **kw):
        calls.append((kw.get("window_size"), kw.get("topk_indices") is not None))
        return real(q, k, v, **kw)

    monkeypatch.setattr(mv4, "latent_attention", spy)
    full = logits(model, ids)
    assert calls == [((WINDOW - 1, 0), False), (None, True), (None, True)]
    cache = DynamicCache(config=model.config)
    steps = [ids[:, :24], ids[:, 24:30]] + [ids[:, t:t + 1] for t in range(30, 40)]
    parts = []
    with torch.no_grad():
        for chunk in steps:
            parts.append(model(input_ids=chunk, cache=cache, use_cache=True).logits)
    assert rel_err(torch.cat(parts, dim=1), full) <= 1e-5
    # and a patched model continues a cache the unpatched one filled (same state layout)
    unpatch_model(model)
    cache2 = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids[:, :30], cache=cache2, use_cache=True)
        patch_model(model)
        nxt = model(input_ids=ids[:, 30:31], cache=cache2, use_cache=True).logits
    assert rel_err(nxt, full[:, 30:31]) <= 1e-5


def test_ragged_batch_generate_matches_eager():
    model = build(SEED)
    ids, am = batch(T=37, pad=9, seed=SEED)
    ref = greedy(model, ids, am)
    patch_model(model)
    assert torch.equal(greedy(model, ids, am), ref)


def test_gradients_match_eager():
    """Every parameter eager trains gets the same gradient (sinks, compressors and their position biases too);
    the indexer gets none in both (its output is integer indices)."""
    model = build(SEED).train()
    ids, _ = batch(pad=0, B=1, seed=SEED)

    ref_loss, ref = lm_grads(model, ids)
    patch_model(model, backend="reference")
    loss, got = lm_grads(model, ids)
    assert rel_err(loss, ref_loss) <= 1e-6
    assert got.keys() == ref.keys()
    for name in ("sinks", "compressor.kv_proj", "compressor.position_bias", "q_b_proj", "kv_norm"):
        assert sum(name in n for n in got) >= 2, name
    assert not any("indexer" in n for n in got)
    attn = [n for n in ref if ".self_attn." in n]
    assert len(attn) > 30
    assert max(rel_err(got[n], ref[n]) for n in attn) <= 1e-4
    # the rest sees our ~1e-7 forward differences through mHC's Sinkhorn iterations; the final hyper-connection
    # head's gradients (norm ~1e-4) cancel heavily and move by ~1e-4 relative
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-3


@pytest.mark.interpreter
@pytest.mark.slow
def test_triton_interpreter_logits_and_gradients():
    """The top-k kernels with sinks (Triton interpreter on CPU) on the smallest config: logits and gradients."""
    model = build(SEED).train()
    ids, am = batch(T=24, pad=3, seed=SEED)
    valid = am.bool()
    out = model(input_ids=ids, attention_mask=am).logits
    (out[valid].sum() * 1e-2).backward()
    ref = out.detach()
    ref_g = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    patch_model(model, backend="triton")
    out = model(input_ids=ids, attention_mask=am).logits
    (out[valid].sum() * 1e-2).backward()
    assert rel_err(out.detach()[valid], ref[valid]) <= 1e-5
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == ref_g.keys()
    assert max(rel_err(got[n], ref_g[n]) for n in ref_g) <= 1e-4
    with torch.no_grad():  # no padding: the sliding layer on the dense window kernel with sinks
        one = ids[:1, :20]
        got = model(input_ids=one).logits
        unpatch_model(model)
        assert rel_err(got, model(input_ids=one).logits) <= 1e-5


@pytest.mark.parametrize("layer", range(3), ids=LAYERS)
def test_patched_layer_compiles_fullgraph(layer):
    # as transformers' V4 layer: one graph (no host reads of the mask: every layer type on the index lists)
    model = patch_model(build(SEED), backend="reference")
    assert compiled_layer_error(model, layer, *batch(T=12, pad=3)) <= 1e-6


def test_unsupported_config_fields_are_refused():
    model = build(0, attention_dropout=0.1).train()
    ids, _ = batch(T=12, pad=0, B=1)
    patch_model(model)
    with pytest.raises(ValueError, match=r"config\.attention_dropout=0\.1"):
        model(input_ids=ids)
    model.eval()
    logits(model, ids)  # inference ignores dropout, as eager does
    model = build(0)
    for layer in model.model.layers:
        layer.self_attn.sliding_window = None
    with pytest.raises(ValueError, match=r"config\.sliding_window"):
        patch_model(model)


def test_v4_topk_indices_values_and_bad_input():
    window = torch.tensor([[[0, 1, -1], [1, 2, 3]]])  # int64 in, int32 out
    comp = torch.tensor([[[-1, 0], [1, -1]]], dtype=torch.int32)
    got = mv4.v4_topk_indices(window, 4, comp)
    assert got.dtype == torch.int32 and got.tolist() == [[[[0, 1, -1, -1, 4]], [[1, 2, 3, 5, -1]]]]
    assert mv4.v4_topk_indices(window, 4, None).dtype == torch.int32
    with pytest.raises(TypeError, match="window_idx: expected an integer torch.Tensor, got torch.float32"):
        mv4.v4_topk_indices(window.float(), 4, comp)
    with pytest.raises(ValueError, match=r"compressed_idx: expected \[B, T\] = \[1, 2\]"):
        mv4.v4_topk_indices(window, 4, comp[:, :1])
    with pytest.raises(ValueError, match="window_idx: expected \\[B, T, K\\] \\(3-D\\)"):
        mv4.v4_topk_indices(window[0], 4, None)
    with pytest.raises(TypeError, match="S: expected an int >= 0"):
        mv4.v4_topk_indices(window, 4.0, comp)


def test_attn_implementation_mla_latent_points_to_patch_model():
    """V4 passes its sinks as ``s_aux``: the registered attention function refuses them and names the way that
    supports them."""
    model = build()
    model.config._attn_implementation = "mla_latent"
    with pytest.raises(ValueError, match=r"s_aux.*patch_model\(model\)"), torch.no_grad():
        model(torch.ones(1, 4, dtype=torch.long))


def test_foreign_mask_is_refused():
    model = patch_model(build(0))
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 12, 32)
    pos = torch.arange(12)[None]
    pe = {k: model.model.rotary_emb(x, position_ids=pos, layer_type=k) for k in ("main", "compress")}
    full = torch.zeros(1, 1, 12, 12)  # no causal / window cut at all
    with pytest.raises(ValueError, match="outside the sliding window"):
        attn(x, position_embeddings=pe, position_ids=pos, attention_mask=full)
    with pytest.raises(ValueError, match="attention_mask"):
        attn(x, position_embeddings=pe, position_ids=pos, attention_mask=None)


def test_registry_preset_matches_transformers_v4_flash_sizes():
    """``deepseek-v4-flash`` carries the sizes of transformers' ``DeepseekV4Config`` defaults (V4-Flash)."""
    from mla import registry

    hf, ours = transformers.DeepseekV4Config(), registry.get("deepseek-v4-flash")
    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank",
                 "qk_rope_head_dim", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                 "max_position_embeddings", "rms_norm_eps"):
        assert getattr(ours, name) == getattr(hf, name), name
    assert ours.intermediate_size == hf.moe_intermediate_size and ours.attention_sinks
    assert ours.qk_head_dim == ours.v_head_dim == ours.cache_values_per_token == hf.head_dim == 512
    assert ours.rope_theta == hf.rope_theta


@pytest.mark.slow
def test_hf_dropin_example_deepseek_v4():
    """``examples/hf_dropin.py --model deepseek_v4`` runs on CPU and reports identical greedy tokens."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "hf_dropin.py"), "--model", "deepseek_v4", "--context", "256",
         "--new-tokens", "3", "--threads", "1"], cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical greedy output: True" in proc.stdout and "LatentDeepseekV4Attention" in proc.stdout


def test_bf16_model_logits():
    """A model cast to bf16 (sinks too: ``.to`` ignores transformers' fp32 keep-list): logits as close to float32
    (same bf16 weights) as transformers' own bf16 eager model."""
    model = build(SEED).to(torch.bfloat16)
    ids, am = batch(seed=SEED)
    valid = am.bool()
    ref32 = logits(copy.deepcopy(model).float(), ids, am)
    eager_err = rel_err(logits(model, ids, am)[valid].float(), ref32[valid])
    out = logits(patch_model(model), ids, am)
    assert out.dtype == torch.bfloat16
    assert rel_err(out[valid].float(), ref32[valid]) <= max(1e-2, 1.25 * eager_err)
