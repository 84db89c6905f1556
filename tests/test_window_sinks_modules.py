"""MLAConfig.sliding_window / attention_sinks in MultiHeadLatentAttention (issue 14): naive and absorbed
forms agree, the sinks parameter learns, paged decode equals the full forward, the kernels match."""

import pytest
import torch
from helpers import rel_err

from mla import MLAConfig, MultiHeadLatentAttention
from mla.cache import PagedLatentCache
from mla.functional import _triton_usable

CFG = MLAConfig(hidden_size=32, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, sliding_window=3, attention_sinks=True)


def _module(backend="reference", seed=0):
    torch.manual_seed(seed)
    m = MultiHeadLatentAttention(CFG, backend=backend)
    with torch.no_grad():
        m.sinks.copy_(torch.tensor([0.5, -1.0]))
    return m


def test_config_fields_validated():
    assert MLAConfig(sliding_window=128).validate().sliding_window == 128
    with pytest.raises(ValueError, match="sliding_window"):
        MLAConfig(sliding_window=0).validate()
    with pytest.raises(ValueError, match="attention_sinks"):
        MLAConfig(attention_sinks=1).validate()


def test_forms_agree_and_sinks_learn():
    m = _module()
    assert m.sinks.dtype == torch.float32 and m.sinks.shape == (2,) and m.window_size == (2, 0)
    x = torch.randn(2, 9, 32)
    naive, _ = m(x, form="naive")
    absorbed, _ = m(x, form="absorbed")
    assert rel_err(naive, absorbed) < 1e-5
    naive.square().sum().backward()
    assert m.sinks.grad is not None and m.sinks.grad.abs().sum() > 0
    # the window matters: a module without it differs
    plain = MultiHeadLatentAttention(CFG.replace(sliding_window=None, attention_sinks=False))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if k != "sinks"})
    assert rel_err(plain(x)[0], naive) > 1e-3


def test_paged_decode_matches_full_forward():
    m = _module()
    x = torch.randn(1, 8, 32)
    full, _ = m(x)
    cache = PagedLatentCache(1, CFG.kv_lora_rank + CFG.qk_rope_head_dim, num_pages=4, page_size=4)
    (sid,) = cache.add_sequences(1)
    cache.begin_step([sid], 7)
    m(x[:, :7], cache=cache)
    cache.begin_step([sid], 1)
    step, _ = m(x[:, 7:], cache=cache)
    assert rel_err(step, full[:, 7:]) < 1e-5


@pytest.mark.skipif(not _triton_usable(torch.device("cpu"))[0], reason="needs TRITON_INTERPRET=1")
@pytest.mark.interpreter
def test_module_on_kernels_matches_reference():
    ref, tri = _module("reference"), _module("triton")
    x = torch.randn(1, 10, 32)
    a, _ = ref(x, form="absorbed")
    b, stats = tri(x, form="absorbed")
    assert stats.backend == "triton" and rel_err(b, a) < 1e-5
    a.sum().backward()
    b.sum().backward()
    assert rel_err(tri.sinks.grad, ref.sinks.grad) < 1e-4
