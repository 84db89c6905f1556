"""transformers drop-in (DESIGN §6.5): patched MLA models (DeepseekV3, V2, MiniCPM3, GLM-4-MoE-Lite, Youtu, AXK1)
against transformers' eager attention.

Tiny random configs (hidden 64, 2 layers, dense MLPs via a large ``first_k_dense_replace``), batch 2 with
left padding. Logits are compared at real (non-pad) positions: rows of pad queries see no key, which the
latent attention answers with 0 (DESIGN §3) and eager with a uniform average — neither reaches a real token.
"""

import copy
import inspect
import pickle

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from helpers import rel_err  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf_v3  # noqa: E402

import mla.integrations.transformers as mt  # noqa: E402
from mla.integrations.transformers import (  # noqa: E402
    ATTN_IMPLEMENTATION,
    LatentAttentionForHF,
    is_patched,
    patch_model,
    unpatch_model,
)

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
             max_position_embeddings=256, pad_token_id=0, bos_token_id=None, eos_token_id=None)
MOE_OFF = dict(first_k_dense_replace=100, moe_intermediate_size=16, n_routed_experts=2, num_experts_per_tok=1,
               n_group=1, topk_group=1, n_shared_experts=1)
NEW_TOKENS = 20
SCALE = 1.5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threading only adds overhead (and is very slow on a loaded machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def v3_config(q_lora_rank=None, rope=DEFAULT, interleave=True, bias=False):
    cfg = transformers.DeepseekV3Config(
        **SIZES, **MOE_OFF, q_lora_rank=q_lora_rank, rope_parameters=dict(rope), rope_interleave=interleave,
        attention_bias=bias,
    )
    cfg._attn_implementation = "eager"
    return cfg


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights: matrices ~ N(0, 1.5/fan_in), norms 1 + N(0, 0.2), biases N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(r * SCALE / p.shape[-1] ** 0.5)
            elif "norm" in name:
                p.copy_(1 + 0.2 * r)
            else:
                p.copy_(0.1 * r)
    return model.eval()


def build(cfg, seed=0, cls=transformers.DeepseekV3ForCausalLM):
    torch.manual_seed(seed)
    return randomize(cls(cfg), seed)


def batch(T=9, pad=3, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, T), generator=g)
    am = torch.ones(2, T, dtype=torch.long)
    am[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, am


def logits(model, ids, am):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=am).logits


def greedy(model, ids, am, n=NEW_TOKENS, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, **kw)


def greedy_with_logits(model, ids, am, n=NEW_TOKENS):
    """Greedy tokens and the ``[n, B, vocab]`` logits of every generation step (prefill's last row, then decode)."""
    with torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=am, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
            output_logits=True,
        )
    return out.sequences, torch.stack(out.logits)


def lm_grads(model, ids):
    """``(loss, {parameter name: gradient})`` of the language-model loss of ``ids`` (grads zeroed first)."""
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compiled_layer_error(model, layer_idx, ids, am):
    """Relative error, over the non-pad rows, of ``torch.compile(fullgraph=True)`` (``aot_eager``) of the attention
    module of layer ``layer_idx`` against its eager call, on the arguments the model passes it (no cache)."""
    attn, call = model.model.layers[layer_idx].self_attn, {}
    hook = attn.register_forward_pre_hook(lambda m, a, kw: call.update(a=a, kw=kw), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=am, use_cache=False)
    hook.remove()
    assert call["kw"]["attention_mask"].dim() == 4
    torch._dynamo.reset()
    with torch.no_grad():
        ref = attn(*call["a"], **call["kw"])[0]
        got = torch.compile(attn, fullgraph=True, backend="aot_eager")(*call["a"], **call["kw"])[0]
    valid = am.bool()
    return rel_err(got[valid], ref[valid])


CONFIGS = {
    "plain": dict(q_lora_rank=None, rope=DEFAULT, interleave=True, bias=False),
    "qlora-halfsplit": dict(q_lora_rank=24, rope=DEFAULT, interleave=False, bias=False),
    "qlora-yarn-bias": dict(q_lora_rank=24, rope=YARN, interleave=True, bias=True),
    "yarn-halfsplit-bias": dict(q_lora_rank=None, rope=YARN, interleave=False, bias=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_v3_logits_and_greedy_match_eager(name):
    model = build(v3_config(**CONFIGS[name]))
    ids, am = batch()
    ref = logits(model, ids, am)
    ref_tokens, ref_steps = greedy_with_logits(model, ids, am)
    assert ref_tokens.shape[1] == ids.shape[1] + NEW_TOKENS
    assert len(set(ref_tokens[:, -NEW_TOKENS:].flatten().tolist())) > 2  # not a constant output
    attn0 = model.model.layers[0].self_attn
    patch_model(model)
    new0 = model.model.layers[0].self_attn
    assert isinstance(new0, LatentAttentionForHF) and isinstance(new0, hf_v3.DeepseekV3Attention)
    assert new0 is not attn0 and new0.kv_b_proj is attn0.kv_b_proj  # same weights, no copy
    assert new0.softmax_scale == attn0.scaling
    valid = am.bool()
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    tokens, steps = greedy_with_logits(model, ids, am)
    assert torch.equal(tokens, ref_tokens)
    assert rel_err(steps, ref_steps) <= 1e-5  # every decode step's logits, both rows (one left-padded)


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_forced_forms_match(form):
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=1)
    ids, am = batch(seed=1)
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am)
    patch_model(model, form=form, backend="reference")
    valid = am.bool()
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am), ref_tokens)


def test_decode_runs_absorbed_over_compressed_cache(monkeypatch):
    """form="auto": naive without a cache / for long chunks, absorbed (one latent kv head) for decode steps."""
    model = patch_model(build(v3_config(**CONFIGS["plain"])))
    calls = []
    orig = mt.attention_with_stats

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], k.shape[2], k.shape[3], kw["causal"], kw["attn_mask"] is not None))
        return orig(q, k, v, **kw)

    monkeypatch.setattr(mt, "attention_with_stats", spy)
    ids, am = batch(T=70, pad=0)
    logits(model, ids, am)  # no cache: naive, purely causal -> no element mask
    assert set(calls) == {(70, 4, 24, True, False)}
    calls.clear()
    greedy(model, ids, am, n=3)  # prefill of 70 > absorb_max_q tokens: naive; decode: absorbed
    assert calls[:2] == [(70, 4, 24, True, False)] * 2
    assert set(calls[2:]) == {(1, 1, 32 + 8, True, False)}
    calls.clear()
    ids, am = batch(T=10, pad=4)
    greedy(model, ids, am, n=3)  # left padding: the keep-mask reaches the decode steps too
    assert all(c[1:3] == (1, 40) and c[4] for c in calls)


@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_bf16_attention_layer_within_tolerance(form):
    """One attention layer in bf16 (prefill of 9 left-padded tokens, then a decode step over the cache) against
    transformers' eager layer computing in float32 with the same bf16-rounded weights: the bf16 tolerance 1e-2."""
    cfg = v3_config(**CONFIGS["qlora-yarn-bias"])
    model = build(cfg).to(torch.bfloat16)
    rotary = model.model.rotary_emb
    reference = copy.deepcopy(model.model.layers[0].self_attn).float()
    ours = patch_model(model, form=form).model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 64, generator=g).bfloat16().float()  # inputs representable in bf16
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 1, 1, 0, 1, 2, 3, 4, 5, 6]])
    keep = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril()
    keep[1, :, :, :3] = False
    outs = {}
    for name, module, dt in (("ref", reference, torch.float32), ("ours", ours, torch.bfloat16)):
        cache = DynamicCache(config=cfg)
        cos, sin = rotary(x.to(dt), pos)
        mask = torch.zeros(keep.shape, dtype=dt).masked_fill(~keep, torch.finfo(dt).min)
        with torch.no_grad():
            prefill, _ = module(x[:, :9].to(dt), (cos[:, :9], sin[:, :9]), mask[:, :, :9, :9], cache)
            decode, _ = module(x[:, 9:].to(dt), (cos[:, 9:], sin[:, 9:]), mask[:, :, 9:], cache)
        outs[name] = (prefill, decode)
    assert outs["ours"][0].dtype == torch.bfloat16
    assert rel_err(outs["ours"][0][keep[:, 0, :9].any(-1)], outs["ref"][0][keep[:, 0, :9].any(-1)]) <= 1e-2
    assert rel_err(outs["ours"][1], outs["ref"][1]) <= 1e-2


def test_bf16_model_logits():
    """Whole-model bf16 logits: as close to float32 (same bf16 weights) as transformers' own bf16 eager model.

    The error is dominated by bf16 rounding outside attention (embeddings, MLPs, norms, lm_head), which both
    models share; ~1e-2 either way on these tiny random models."""
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"])).to(torch.bfloat16)
    ids, am = batch()
    valid = am.bool()
    ref32 = logits(copy.deepcopy(model).float(), ids, am)
    eager_err = rel_err(logits(model, ids, am)[valid], ref32[valid])
    out = logits(patch_model(model), ids, am)
    assert out.dtype == torch.bfloat16
    assert rel_err(out[valid], ref32[valid]) <= max(1e-2, 1.25 * eager_err)
    tokens = greedy(model, ids, am, n=4)
    assert tokens.shape == (2, ids.shape[1] + 4)


def test_sampling_matches_with_same_seed():
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=2)
    ids, am = batch(seed=2)
    kw = dict(do_sample=True, top_k=20, temperature=0.9, max_new_tokens=NEW_TOKENS)
    with torch.no_grad():
        torch.manual_seed(7)
        ref = model.generate(input_ids=ids, attention_mask=am, **kw)
        patch_model(model)
        torch.manual_seed(7)
        out = model.generate(input_ids=ids, attention_mask=am, **kw)
    assert torch.equal(out, ref)


def test_patch_twice_unpatch_and_state_dict_roundtrip(tmp_path):
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=3)
    ids, am = batch(seed=3)
    valid = am.bool()
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am)
    originals = [layer.self_attn for layer in model.model.layers]
    keys = list(model.state_dict())

    patch_model(model)
    once = [layer.self_attn for layer in model.model.layers]
    patch_model(model, form="absorbed")  # second patch: same modules, new settings
    assert [layer.self_attn for layer in model.model.layers] == once
    assert all(m.form == "absorbed" for m in once) and is_patched(model)
    assert list(model.state_dict()) == keys
    out = logits(model, ids, am)
    assert rel_err(out[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am), ref_tokens)

    path = tmp_path / "patched.pt"
    torch.save(model.state_dict(), path)
    fresh = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=99)  # different weights
    fresh.load_state_dict(torch.load(path))
    assert rel_err(logits(fresh, ids, am)[valid], ref[valid]) == 0  # unpatched model, patched model's weights
    patch_model(fresh)
    fresh.load_state_dict(torch.load(path))  # loading into a patched model
    assert rel_err(logits(fresh, ids, am)[valid], ref[valid]) <= 1e-5

    pickled = pickle.loads(pickle.dumps(model))  # Latent<Class> is importable by name
    assert rel_err(logits(pickled, ids, am)[valid], ref[valid]) <= 1e-5

    unpatch_model(model)
    assert [layer.self_attn for layer in model.model.layers] == originals and not is_patched(model)
    assert type(originals[0]) is hf_v3.DeepseekV3Attention
    assert torch.equal(logits(model, ids, am), ref)
    assert torch.equal(greedy(model, ids, am), ref_tokens)


def test_save_pretrained_roundtrip(tmp_path):
    cfg = v3_config(**CONFIGS["plain"])
    model = patch_model(build(cfg, seed=4))
    ids, am = batch(seed=4)
    ref = logits(model, ids, am)
    model.save_pretrained(tmp_path)
    loaded = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    valid = am.bool()
    assert rel_err(logits(loaded, ids, am)[valid], ref[valid]) <= 1e-5
    assert rel_err(logits(patch_model(loaded), ids, am)[valid], ref[valid]) <= 1e-6


def test_cache_is_shared_with_unpatched_modules():
    """The cache holds what transformers stores: prefill unpatched, decode patched (and back)."""
    model = build(v3_config(**CONFIGS["qlora-halfsplit"]), seed=5)
    ids, am = batch(seed=5)
    ref_tokens = greedy(model, ids, am, n=6)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 1)  # as generate() does for left padding
        out = model(input_ids=ids, attention_mask=am, cache=cache, position_ids=pos, use_cache=True)
        patch_model(model)
        tokens = ids
        for step in range(6):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            am = torch.cat([am, torch.ones_like(nxt)], dim=1)
            if step == 3:
                unpatch_model(model)
            pos = am.sum(-1, keepdim=True) - 1
            out = model(input_ids=nxt, attention_mask=am, cache=cache, position_ids=pos, use_cache=True)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("attn", ["sdpa", "static-cache"])
def test_other_masks_and_static_cache(attn):
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=6)
    ids, am = batch(seed=6)
    kw = {"cache_implementation": "static"} if attn == "static-cache" else {}
    if attn == "sdpa":
        model.set_attn_implementation("sdpa")
    ref_tokens = greedy(model, ids, am, **kw)
    patch_model(model)
    assert torch.equal(greedy(model, ids, am, **kw), ref_tokens)


def test_registered_attention_implementation():
    cfg = v3_config(**CONFIGS["qlora-yarn-bias"])
    eager = build(cfg, seed=8)
    ids, am = batch(seed=8)
    valid = am.bool()
    ours = transformers.DeepseekV3ForCausalLM._from_config(cfg, attn_implementation=ATTN_IMPLEMENTATION).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == ATTN_IMPLEMENTATION
    assert rel_err(logits(ours, ids, am)[valid], logits(eager, ids, am)[valid]) <= 1e-5
    assert torch.equal(greedy(ours, ids, am), greedy(eager, ids, am))


def test_registered_attention_implementation_generic_gqa_model():
    """The registered function is model-agnostic (naive form): a GQA Llama gives eager's logits."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    cfg._attn_implementation = "eager"
    model = build(cfg, cls=transformers.LlamaForCausalLM)
    ids, am = batch(vocab=64)
    valid = am.bool()
    ref = logits(model, ids, am)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5


def test_patched_layer_compiles_fullgraph():
    # transformers' eager layer compiles as one graph; the replacement must too (no host reads of the mask there).
    model = patch_model(build(v3_config(q_lora_rank=16)), backend="reference")
    assert compiled_layer_error(model, 0, *batch(T=12, pad=3)) <= 1e-6


def test_training_gradients_match_eager():
    """Backward through the patched model (reference path) gives eager's gradients (no padding: rows of pad
    queries see no key and answer 0 here, a uniform average in eager, which a shifted LM loss would read)."""
    model = build(v3_config(**CONFIGS["qlora-yarn-bias"]), seed=10).train()
    ids, _ = batch(pad=0, seed=10)
    ref_loss, ref = lm_grads(model, ids)
    patch_model(model)
    loss, got = lm_grads(model, ids)
    assert rel_err(loss, ref_loss) <= 1e-6
    assert got.keys() == ref.keys() and len(got) > 10
    assert max(rel_err(got[n], ref[n]) for n in ref) <= 1e-4


def _config(config_name, **extra):
    """A tiny config of another MLA model family: the shared sizes, keeping only keys its __init__ takes."""
    cls = getattr(transformers, config_name)
    params = inspect.signature(cls.__init__).parameters
    kw = {k: v for k, v in {**SIZES, **MOE_OFF, "q_lora_rank": 24, **extra}.items() if k in params}
    cfg = cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize(
    "config_name,model_name,extra",
    [
        ("DeepseekV2Config", "DeepseekV2ForCausalLM", {"rope_parameters": dict(YARN)}),  # complex RoPE
        ("MiniCPM3Config", "MiniCPM3ForCausalLM", {}),  # half-split RoPE always
        ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", {"rope_interleave": False}),
        ("YoutuConfig", "YoutuForCausalLM", {"rope_interleave": True}),
        ("AXK1Config", "AXK1ForCausalLM", {"rope_interleave": True}),
    ],
    ids=["deepseek-v2", "minicpm3", "glm4-moe-lite", "youtu", "axk1"],
)
def test_other_supported_models(config_name, model_name, extra):
    model = build(_config(config_name, **extra), seed=9, cls=getattr(transformers, model_name))
    ids, am = batch(seed=9)
    valid = am.bool()
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am)
    patch_model(model)
    assert type(model.model.layers[0].self_attn).__name__ == "Latent" + model_name.replace("ForCausalLM", "Attention")
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am), ref_tokens)


def test_model_without_mla_is_refused():
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.LlamaForCausalLM(cfg)
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no MLA attention.*LlamaAttention \(x2\)"):
        patch_model(model)
    with pytest.raises(ValueError, match="no MLA attention module.*no module whose class name mentions attention"):
        patch_model(nn.Sequential(nn.Linear(4, 4)))


def test_unsupported_mla_variants_are_refused():
    class MyAttention(hf_v3.DeepseekV3Attention):
        pass

    model = build(v3_config(**CONFIGS["plain"]))
    model.model.layers[1].self_attn = MyAttention(model.config, layer_idx=1)
    with pytest.raises(ValueError, match="MyAttention \\(is a subclass of DeepseekV3Attention"):
        patch_model(model)

    class OtherMLA(nn.Module):
        def __init__(self):
            super().__init__()
            self.kv_a_proj_with_mqa = nn.Linear(8, 8)
            self.kv_b_proj = nn.Linear(8, 8)

    with pytest.raises(ValueError, match="OtherMLA \\(has MLA weights but a forward"):
        patch_model(nn.Sequential(OtherMLA()))
    with pytest.raises(ValueError, match="form"):
        patch_model(build(v3_config()), form="flash")


def test_plan_mask_fast_path_and_padding():
    T, S = 3, 7
    causal = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + (S - T)
    additive = torch.zeros(2, 1, T, S).masked_fill(~causal, torch.finfo(torch.float32).min)
    assert mt._plan_mask_uncached(additive, 2, T, S, torch.device("cpu"), True) == (S, True, None)
    padded = additive.clone()
    padded[1, :, :, :2] = torch.finfo(torch.float32).min
    S_eff, is_causal, keep = mt._plan_mask_uncached(padded, 2, T, S, torch.device("cpu"), True)
    assert (S_eff, is_causal) == (S, False) and torch.equal(keep, padded == 0)
    static = torch.cat([causal, torch.zeros(T, 5, dtype=torch.bool)], dim=1)[None, None]  # unfilled slots
    assert mt._plan_mask_uncached(static, 1, T, S + 5, torch.device("cpu"), True) == (S, True, None)
    assert mt._plan_mask_uncached(torch.ones(2, S), 2, T, S, torch.device("cpu"), True) == (S, True, None)
    with pytest.raises(ValueError, match="attention_mask"):
        mt._plan_mask_uncached(additive, 2, T + 1, S, torch.device("cpu"), True)
    with pytest.raises(TypeError, match="BlockMask"):
        mt._plan_mask(object(), 2, T, S, torch.device("cpu"))


def test_kimi_k25_wrapper_model():
    """Kimi-K2.5 (``kimi_k25``): a multimodal wrapper whose text model is a ``DeepseekV3Model`` (its own text config);
    the MLA layers inside are patched, the vision tower's attention is left alone."""
    vision = dict(num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_attention_heads=2, patch_size=4,
                  pos_emb_height=4, pos_emb_width=4)
    cfg = transformers.Kimi_K25Config(text_config=v3_config(**CONFIGS["qlora-yarn-bias"]).to_dict(),
                                      vision_config=vision, projection_hidden_size=32)
    cfg._attn_implementation = cfg.text_config._attn_implementation = "eager"
    model = build(cfg, seed=2, cls=transformers.Kimi_K25ForConditionalGeneration)
    ids, am = batch(seed=2)
    valid = am.bool()
    ref, ref_tokens = logits(model, ids, am), greedy(model, ids, am)
    vision_attn = [m for m in model.modules() if type(m).__name__ == "Kimi_K25VisionAttention"]
    patch_model(model)
    text = model.model.language_model
    assert all(isinstance(layer.self_attn, LatentAttentionForHF) for layer in text.layers)
    assert text.layers[0].self_attn.config is cfg.text_config
    still = {id(m) for m in model.modules()}
    assert vision_attn and all(id(m) in still for m in vision_attn)  # same vision modules, not replaced
    assert rel_err(logits(model, ids, am)[valid], ref[valid]) <= 1e-5
    assert torch.equal(greedy(model, ids, am), ref_tokens)
