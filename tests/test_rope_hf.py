"""RoPE / YaRN and MultiHeadLatentAttention against transformers' DeepseekV3 (tiny random configs)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import rel_err  # noqa: E402
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf  # noqa: E402

from mla import MLAConfig, MultiHeadLatentAttention  # noqa: E402
from mla.rope import RotaryEmbedding, apply_rotary, yarn_softmax_scale  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}
DEFAULT = {"rope_type": "default", "rope_theta": 10000.0}


def hf_config(q_lora_rank=None, rope=DEFAULT, interleave=True, bias=False):
    cfg = transformers.DeepseekV3Config(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rope_parameters=dict(rope), rope_interleave=interleave, attention_bias=bias,
        max_position_embeddings=256,
    )
    cfg._attn_implementation = "eager"
    return cfg


@pytest.mark.parametrize("rope", [DEFAULT, YARN], ids=["default", "yarn"])
def test_rotary_tables_match(rope):
    cfg = hf_config(rope=rope)
    ours = RotaryEmbedding(8, rope, 256)
    theirs = hf.DeepseekV3RotaryEmbedding(cfg)
    pos = torch.arange(0, 200)[None]
    c1, s1 = ours(pos)
    c2, s2 = theirs(torch.zeros(1, dtype=torch.float32), pos)
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-6)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-6)
    assert ours.attention_scaling == pytest.approx(theirs.attention_scaling)


@pytest.mark.parametrize("interleaved", [True, False])
def test_apply_rotary_matches(interleaved):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g)  # HF layout [B, H, T, D]
    k = torch.randn(2, 1, 7, 8, generator=g)
    cfg = hf_config(rope=YARN)
    cos, sin = hf.DeepseekV3RotaryEmbedding(cfg)(q, torch.arange(3, 10)[None].expand(2, 7))
    fn = hf.apply_rotary_pos_emb_interleave if interleaved else hf.apply_rotary_pos_emb
    q2, k2 = fn(q, k, cos, sin)
    q1 = apply_rotary(q.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)
    k1 = apply_rotary(k.transpose(1, 2), cos, sin, interleaved).transpose(1, 2)
    torch.testing.assert_close(q1, q2, rtol=0, atol=1e-6)
    torch.testing.assert_close(k1, k2, rtol=0, atol=1e-6)


def test_yarn_softmax_scale_matches():
    assert yarn_softmax_scale(24, YARN) == pytest.approx(hf.yarn_apply_mscale(YARN, 24**-0.5))
    assert yarn_softmax_scale(24, DEFAULT) == pytest.approx(24**-0.5)


def _hf_forward(attn, cfg, x, positions):
    rot = hf.DeepseekV3RotaryEmbedding(cfg)
    cos, sin = rot(x, positions)
    T = x.shape[1]
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None].expand(x.shape[0], 1, T, T)
    out, _ = attn(x, position_embeddings=(cos, sin), attention_mask=mask)
    return out


@pytest.mark.parametrize(
    "q_lora_rank,rope,interleave,bias",
    [(None, DEFAULT, True, False), (24, DEFAULT, False, False), (24, YARN, True, True), (None, YARN, False, True)],
    ids=["plain", "qlora-halfsplit", "qlora-yarn-bias", "yarn-halfsplit-bias"],
)
@pytest.mark.parametrize("form", ["naive", "absorbed"])
def test_state_dict_loads_and_matches_eager(q_lora_rank, rope, interleave, bias, form):
    torch.manual_seed(0)
    cfg = hf_config(q_lora_rank, rope, interleave, bias)
    theirs = hf.DeepseekV3Attention(cfg, layer_idx=0).double()
    with torch.no_grad():  # random, non-trivial norms and biases
        for name, p in theirs.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0) + (1.0 if "layernorm" in name else 0.0))
    ours = MultiHeadLatentAttention(MLAConfig.from_transformers(cfg), form=form, backend="reference").double()
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    assert ours.softmax_scale == pytest.approx(theirs.scaling)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    pos = torch.arange(9)[None].expand(2, 9)
    ref = _hf_forward(theirs, cfg, x, pos)
    out, stats = ours(x, position_ids=pos)
    assert stats.form == form
    # transformers' eager path runs RMSNorm and softmax in float32 even for float64 inputs
    assert rel_err(out, ref) < 1e-5
