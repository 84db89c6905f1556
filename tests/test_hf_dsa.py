"""DSA drop-in (DeepSeek-V3.2 ``deepseek_v32``, GLM-5 ``glm_moe_dsa``): patched models against transformers' eager.

Tiny random configs (hidden 64, 2 layers, dense MLPs, ``index_topk`` 8) on sequences of 24+ tokens, so the
indexer really cuts keys (asserted). The indexer is the model's own module in both runs; its inputs differ by
rounding from layer 2 on, so every test first asserts that its seed leaves a clear margin between the
``index_topk``-th and the next visible score (near-ties would let the two runs pick different keys).
"""

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import rel_err  # noqa: E402
from test_hf_integration import (  # noqa: E402
    MOE_OFF,
    SIZES,
    YARN,
    _one_thread,  # noqa: F401  (the module-scoped autouse fixture: tiny models run on one thread)
    batch,
    compiled_layer_error,
    greedy,
    lm_grads,
    logits,
    randomize,
)
from transformers import DynamicCache  # noqa: E402

import mla.integrations.dsa as dsa  # noqa: E402
from mla.integrations.transformers import ATTN_IMPLEMENTATION, is_patched, patch_model, unpatch_model  # noqa: E402

TOPK = 8
DSA_SIZES = dict(q_lora_rank=24, index_topk=TOPK, index_head_dim=16, index_n_heads=8)
T_PROMPT = 24  # > TOPK: the indexer drops keys for most rows
MODELS = ["deepseek_v32", "glm_moe_dsa"]
# The backend="triton" tests run the kernels on CPU tensors: under the interpreter only.
INTERPRETER = [pytest.mark.interpreter, pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                                           reason="runs the kernels on CPU under TRITON_INTERPRET=1")]


def dsa_config(model_type, **extra):
    kw = {**SIZES, **MOE_OFF, **DSA_SIZES, **extra}
    if model_type == "deepseek_v32":
        cfg = transformers.DeepseekV32Config(**kw)
    else:
        kw.setdefault("indexer_types", ["full", "shared"])  # layer 1 reuses layer 0's choice
        cfg = transformers.GlmMoeDsaConfig(**kw)
    cfg._attn_implementation = "eager"
    return cfg


def build(model_type, seed=0, **extra):
    cls = transformers.DeepseekV32ForCausalLM if model_type == "deepseek_v32" else transformers.GlmMoeDsaForCausalLM
    torch.manual_seed(seed)
    return randomize(cls(dsa_config(model_type, **extra)), seed)


def indexer_margins(model, ids, am):
    """Run ``model`` and return, over every indexer call, ``(min relative gap between the index_topk-th and the
    next visible score over rows that see more than index_topk keys, number of such rows)``."""
    calls = []
    hooks = [
        layer.self_attn.indexer.register_forward_pre_hook(lambda m, a, kw: calls.append((m, a)), with_kwargs=True)
        for layer in model.model.layers if layer.self_attn.indexer is not None
    ]
    try:
        logits(model, ids, am)
    finally:
        for h in hooks:
            h.remove()
    gap, cut_rows = float("inf"), 0
    for mod, (hs, q_resid, (cos, sin), mask) in [(m, a[:4]) for m, a in calls]:
        hf = sys.modules[type(mod).__module__]
        rope = hf.apply_rotary_pos_emb if "V32" in type(mod).__name__ else hf.apply_rotary_pos_emb_interleave
        B, T, _ = hs.shape
        with torch.no_grad():
            q = mod.wq_b(q_resid).view(B, T, mod.n_heads, mod.head_dim)
            k = mod.k_norm(mod.wk(hs))[:, :, None]
            dr = mod.qk_rope_head_dim
            q_rot, k_rot = rope(q[..., :dr], k[..., :dr], cos, sin, unsqueeze_dim=2)
            q, k = torch.cat([q_rot, q[..., dr:]], -1), torch.cat([k_rot, k[..., dr:]], -1)[:, :, 0]
            s = torch.relu(torch.einsum("bthd,bsd->bths", q.float(), k.float()))
            w = mod.weights_proj(hs).float()
            scores = torch.einsum("bth,bths->bts", w, s)
        keep = mask if mask.dtype == torch.bool else mask == 0
        for b in range(B):
            for t in range(T):
                vis = scores[b, t][keep[b, t]].sort(descending=True).values
                if vis.numel() > mod.index_topk:
                    cut_rows += 1
                    scale = vis.abs().max().clamp_min(1e-30)
                    gap = min(gap, float((vis[mod.index_topk - 1] - vis[mod.index_topk]) / scale))
    return gap, cut_rows


def assert_clear_margin(model, ids, am):
    gap, cut_rows = indexer_margins(model, ids, am)
    assert cut_rows > 0, "index_topk must cut keys in this test"
    assert gap > 1e-4, f"seed leaves near-tied indexer scores (relative gap {gap:.2e}): pick another seed"


@pytest.mark.parametrize("model_type", MODELS)
def test_logits_greedy_and_mla_latent_match_eager(model_type):
    model = build(model_type)
    ids, am = batch(T=T_PROMPT, pad=3)
    assert_clear_margin(model, ids, am)
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am, n=16)
    # The selection matters: the same model attending densely gives other logits.
    dense = build(model_type, index_topk=4 * T_PROMPT)
    assert rel_err(logits(dense, ids, am), ref) > 1e-3
    valid = am.bool()
    patch_model(model, backend="reference")
    assert is_patched(model) and isinstance(model.model.layers[0].self_attn, dsa.LatentDSAAttentionForHF)
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am, n=16), ref_tokens)
    patch_model(model, form="naive", backend="reference")  # per-head K/V, the index list repeated over heads
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am, n=16), ref_tokens)
    # attn_implementation="mla_latent" without patching: transformers passes the choice as ``indices``.
    unpatch_model(model)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am, n=16), ref_tokens)


@pytest.mark.parametrize("model_type", MODELS)
def test_prefill_then_decode_equals_full_forward(model_type, monkeypatch):
    model = patch_model(build(model_type, seed=1), backend="reference")
    ids, am = batch(T=T_PROMPT + 4, pad=0, seed=1)
    assert_clear_margin(model, ids, am)
    full = logits(model, ids, am)
    calls = []
    orig = dsa.mla_decode

    def spy(q, kv, table, lens, **kw):
        calls.append((q.shape[1], kw["topk_indices"].shape[-1], int((kw["topk_indices"] >= 0).sum(-1).max())))
        return orig(q, kv, table, lens, **kw)

    monkeypatch.setattr(dsa, "mla_decode", spy)
    cache = DynamicCache(config=model.config)
    steps = []
    with torch.no_grad():
        steps.append(model(input_ids=ids[:, :T_PROMPT], cache=cache, use_cache=True).logits)
        for t in range(T_PROMPT, ids.shape[1]):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    assert rel_err(torch.cat(steps, dim=1), full) <= 1e-5
    # Decode ran mla_decode with index lists of index_topk live keys out of more cached ones.
    assert len(calls) == 4 * model.config.num_hidden_layers
    assert all(c[0] == 1 and c[1] == TOPK and c[2] == TOPK for c in calls)


@pytest.mark.parametrize(
    "model_type,backend",
    [(m, "reference") for m in MODELS]
    + [pytest.param("deepseek_v32", "triton", marks=[pytest.mark.slow, *INTERPRETER])],
)
def test_training_gradients_match_eager(model_type, backend):
    """Eager runs the indexer under no_grad: its parameters get no gradient; every other attention parameter
    gets eager's (also through the top-k kernel's backward under the Triton interpreter)."""
    model = build(model_type, seed=4).train()
    ids, _ = batch(T=T_PROMPT, pad=0, seed=4)
    assert_clear_margin(model, ids, torch.ones_like(ids))
    ref_loss, ref = lm_grads(model, ids)
    patch_model(model, backend=backend)
    loss, got = lm_grads(model, ids)
    assert rel_err(loss, ref_loss) <= 1e-6
    attn = {n for n, _ in model.named_parameters() if ".self_attn." in n and ".indexer." not in n}
    assert got.keys() == ref.keys() and attn <= got.keys()
    assert not any(".indexer." in n for n in got)
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4


@pytest.mark.parametrize("model_type", [pytest.param(m, marks=INTERPRETER) for m in MODELS])
def test_triton_interpreter_matches_eager(model_type):
    """The top-k prefill kernel and the top-k decode kernel (interpreter, fp32) inside the patched model."""
    model = build(model_type, seed=3)
    ids, am = batch(T=T_PROMPT, pad=0, seed=3)
    assert_clear_margin(model, ids, am)
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am, n=3)
    patch_model(model, backend="triton")
    assert rel_err(logits(model, ids, am), ref) <= 1e-5
    assert torch.equal(greedy(model, ids, am, n=3), ref_tokens)


@pytest.mark.parametrize("model_type", MODELS)
def test_patched_layer_compiles_fullgraph(model_type):
    # as transformers' own DSA layer: one graph (layer 1 of GLM-5 is "shared": the index value check is skipped)
    model = patch_model(build(model_type), backend="reference")
    assert compiled_layer_error(model, 1, *batch(T=12, pad=3)) <= 1e-6


def test_unsupported_config_fields_are_refused():
    model = build("glm_moe_dsa", indexer_types=["shared", "full"])
    with pytest.raises(ValueError, match=r"indexer_types\[0\]"):
        patch_model(model)
    model = build("glm_moe_dsa", indexer_types=["full", "sliding"])
    with pytest.raises(ValueError, match=r"indexer_types\[1\]"):
        patch_model(model)
    model = build("deepseek_v32")
    model.config.index_topk = 0
    with pytest.raises(ValueError, match="index_topk"):
        patch_model(model)
    assert not is_patched(model)
    glm = patch_model(build("glm_moe_dsa"))
    x = torch.randn(1, 4, glm.config.hidden_size)
    pe = glm.model.rotary_emb(x, torch.arange(4)[None])
    with pytest.raises(ValueError, match="prev_topk_indices"):  # a "shared" layer alone
        glm.model.layers[1].self_attn(x, pe, None)
    model = patch_model(build("deepseek_v32", attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match="attention_dropout"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_topk_from_hf_pads_invisible_lanes():
    keep = torch.tensor([[[True, False, True, False], [False, False, False, False]]])
    got = dsa.topk_from_hf(torch.tensor([[[3, 2, 0], [0, 1, 2]]], dtype=torch.int32), keep)
    assert got.dtype == torch.int32 and got.tolist() == [[[0, 2, -1], [-1, -1, -1]]]
    with pytest.raises(ValueError, match="indices"):
        dsa.topk_from_hf(torch.tensor([[[4, 0, 1], [0, 1, 2]]]), keep)
    with pytest.raises(TypeError, match="indices: expected an integer torch.Tensor, got torch.float32"):
        dsa.topk_from_hf(torch.tensor([[[3.0, 2.0, 0.0], [0.0, 1.0, 2.0]]]), keep)
    with pytest.raises(TypeError, match="keep: expected a bool torch.Tensor, got torch.float32"):
        dsa.topk_from_hf(torch.tensor([[[3, 2, 0], [0, 1, 2]]]), keep.float())
    with pytest.raises(ValueError, match=r"keep: expected \[B, T, S\]"):
        dsa.topk_from_hf(torch.tensor([[[3, 2, 0], [0, 1, 2]]]), keep[0])


@pytest.mark.parametrize("yarn", [False, True], ids=["default-rope", "yarn"])
@pytest.mark.parametrize("model_type", MODELS)
def test_latent_sparse_attention_loads_hf_state_dict(model_type, yarn):
    """Our ``LatentSparseAttention(mode="topk")`` takes a V3.2 / GLM-5 attention state dict unchanged (strict) and
    gives the original's output (the indexer's RoPE too, YaRN-scaled cos/sin included); a state dict with our
    old indexer name ``wq`` still loads."""
    from mla import LatentSparseAttention, MLAConfig

    model = build(model_type, seed=5, **({"rope_parameters": dict(YARN)} if yarn else {}))
    hf_attn = model.model.layers[0].self_attn
    cfg = MLAConfig.from_transformers(model.config)
    assert cfg.index_rope_interleave == (model_type == "glm_moe_dsa")
    ours = LatentSparseAttention(cfg, 0, mode="topk", backend="reference")
    ours.load_state_dict(hf_attn.state_dict(), strict=True)
    assert ours.indexer.k_norm.eps == hf_attn.indexer.k_norm.eps == 1e-6
    x = torch.randn(2, T_PROMPT, model.config.hidden_size, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(T_PROMPT)[None].expand(2, -1)
    mask = torch.full((T_PROMPT, T_PROMPT), torch.finfo(torch.float32).min).triu(1)[None, None].expand(2, 1, -1, -1)
    with torch.no_grad():
        ref = hf_attn(x, model.model.rotary_emb(x, pos), mask, position_ids=pos)[0]
        got, stats = ours(x)
    assert rel_err(got, ref) <= 1e-5
    assert stats.visited_tokens < 2 * T_PROMPT * (T_PROMPT + 1) // 2  # index_topk cut keys
    old = {k.replace("indexer.wq_b.", "indexer.wq."): v for k, v in hf_attn.state_dict().items()}
    fresh = LatentSparseAttention(cfg, 0, mode="topk", backend="reference")
    fresh.load_state_dict(old, strict=True)
    assert torch.equal(fresh.indexer.wq_b.weight, hf_attn.indexer.wq_b.weight)


@pytest.mark.parametrize("name,config_cls", [("deepseek-v3.2", "DeepseekV32Config"), ("glm-5", "GlmMoeDsaConfig")])
def test_registry_presets_match_transformers_sizes(name, config_cls):
    """The presets carry the public sizes (transformers' config defaults are the released models')."""
    from mla import MLAConfig, registry

    ours, hf = registry.get(name), MLAConfig.from_transformers(getattr(transformers, config_cls)())
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
              "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "vocab_size", "intermediate_size",
              "max_position_embeddings", "rms_norm_eps", "index_n_heads", "index_head_dim", "index_topk",
              "index_rope_interleave"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(hf, f) for f in fields}


@pytest.mark.parametrize("model_type", MODELS)
def test_static_cache_pickle_unpatch_and_fp8_refusal(model_type):
    import pickle

    from mla.integrations.transformers import FP8LatentCache

    model = build(model_type)
    ids, am = batch(T=T_PROMPT, pad=3)
    assert_clear_margin(model, ids, am)
    ref = greedy(model, ids, am, n=6, cache_implementation="static")
    keys = list(model.state_dict())
    patch_model(model, backend="reference")
    # A static cache returns its whole buffer: unfilled slots must be neither chosen nor attended.
    assert torch.equal(greedy(model, ids, am, n=6, cache_implementation="static"), ref)
    clone = pickle.loads(pickle.dumps(model))
    assert isinstance(clone.model.layers[1].self_attn, dsa.LatentDSAAttentionForHF)
    assert torch.equal(logits(clone, ids, am), logits(model, ids, am))
    with pytest.raises(ValueError, match="FP8LatentCache"):
        greedy(model, ids, am, n=2, cache=FP8LatentCache())
    assert list(model.state_dict()) == keys  # weights shared under the original names
    unpatch_model(model)
    assert not is_patched(model) and type(model.model.layers[0].self_attn).__name__ in dsa.DSA_ATTENTION_CLASSES


@pytest.mark.slow
@pytest.mark.parametrize("model_type", MODELS)
def test_hf_dropin_example_runs(model_type):
    """``examples/hf_dropin.py --model deepseek_v32|glm_moe_dsa``, shortened: identical tokens both ways."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: reference path on CPU
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "hf_dropin.py"), "--model", model_type, "--context", "320",
         "--new-tokens", "3", "--threads", "1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "identical greedy output: True" in proc.stdout
    assert 'attn_implementation="mla_latent" gives the same greedy output: True' in proc.stdout
