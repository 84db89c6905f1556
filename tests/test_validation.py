"""Bad input is rejected on the host with TypeError/ValueError naming the argument (DESIGN §8)."""

import pytest
import torch

from mla import latent_attention
from mla.sparsity import BlockMask, causal_block_mask


def _qkv(B=2, T=4, S=6, Hq=4, Hkv=2, Dk=8, Dv=8, dtype=torch.float32):
    return (torch.randn(B, T, Hq, Dk, dtype=dtype), torch.randn(B, S, Hkv, Dk, dtype=dtype),
            torch.randn(B, S, Hkv, Dv, dtype=dtype))


def _check(exc, match, *args, **kw):
    with pytest.raises(exc, match=match):
        latent_attention(*args, **kw)


def test_wrong_rank():
    q, k, v = _qkv()
    _check(ValueError, r"^q: expected a 4-D", q[0], k, v)
    _check(ValueError, r"^k: expected a 4-D", q, k[..., None], v)
    _check(ValueError, r"^v: expected a 4-D", q, k, v[0])


def test_not_a_tensor():
    q, k, v = _qkv()
    _check(TypeError, r"^q: expected a torch.Tensor", q.numpy(), k, v)


def test_mismatched_batch():
    q, k, v = _qkv()
    _check(ValueError, r"^k: batch size 1", q, k[:1], v)
    _check(ValueError, r"^v: batch size 1", q, k, v[:1])


def test_mismatched_seq_heads_dims():
    q, k, v = _qkv()
    _check(ValueError, r"^v: sequence length 5", q, k, v[:, :5])
    _check(ValueError, r"^v: 1 heads", q, k, v[:, :, :1])
    _check(ValueError, r"^k: head dim 7", q, k[..., :7], v)


def test_heads_not_divisible():
    q, k, v = _qkv(Hq=6, Hkv=4)
    _check(ValueError, r"Hq=6 must be a multiple of .* Hkv=4", q, k, v)


def test_int_dtype_and_mixed_dtypes():
    q, k, v = _qkv()
    _check(TypeError, r"^q: expected dtype float16", q.long(), k, v)
    _check(TypeError, r"^k: dtype torch.float16 does not match", q, k.half(), v)


def test_mixed_devices():
    q, k, v = _qkv()
    meta = torch.empty(k.shape, device="meta")
    _check(ValueError, r"^k: on device meta", q, meta, v)


def test_topk_index_out_of_range_and_dtype_and_shape():
    q, k, v = _qkv()
    idx = torch.zeros(2, 4, 2, 3, dtype=torch.int32)
    idx[..., 0] = 6  # == S
    _check(ValueError, r"^topk_indices: entries must be in \[-1, S=6\)", q, k, v, topk_indices=idx)
    idx2 = torch.full((2, 4, 2, 3), -2, dtype=torch.int32)
    _check(ValueError, r"^topk_indices: entries must be in", q, k, v, topk_indices=idx2)
    _check(TypeError, r"^topk_indices: expected dtype int32", q, k, v, topk_indices=idx.float())
    bad_shape = torch.zeros(2, 4, 4, 3, dtype=torch.int32)
    _check(ValueError, r"^topk_indices: expected shape", q, k, v, topk_indices=bad_shape)
    # int64 beyond the int32 range: a plain cast would wrap 2**32 + 3 to the valid key 3
    wide = torch.zeros(2, 4, 2, 3, dtype=torch.int64)
    wide[..., 0], wide[..., 1] = 2**32 + 3, 1
    _check(ValueError, r"^topk_indices: entries must be in \[-1, S=6\), got min 0, max 2147483647", q, k, v,
           topk_indices=wide)


def test_topk_duplicates_rejected_in_checked_mode():
    q, k, v = _qkv()
    idx = torch.tensor([0, 1, 1], dtype=torch.int32).expand(2, 4, 2, 3).contiguous()
    _check(ValueError, r"^topk_indices: duplicate key index", q, k, v, topk_indices=idx)
    # -1 lanes may repeat
    ok = torch.tensor([0, -1, -1], dtype=torch.int32).expand(2, 4, 2, 3).contiguous()
    latent_attention(q, k, v, topk_indices=ok, backend="reference")


def test_block_mask_wrong_size_and_type():
    q, k, v = _qkv()
    _check(ValueError, r"^block_mask: built for \(T, S\) = \(4, 7\)", q, k, v, block_mask=causal_block_mask(4, 7, 2))
    bm = BlockMask.from_dense(torch.ones(3, 2, 2, 3, dtype=torch.bool), 2, (4, 6))
    _check(ValueError, r"^block_mask: batch/head dims", q, k, v, block_mask=bm)
    _check(TypeError, r"^block_mask: expected mla.sparsity.BlockMask", q, k, v, block_mask=torch.ones(2, 3))


def test_block_mask_and_topk_exclusive():
    q, k, v = _qkv()
    idx = torch.zeros(2, 4, 2, 1, dtype=torch.int32)
    _check(ValueError, r"block_mask and topk_indices are exclusive", q, k, v,
           block_mask=causal_block_mask(4, 6, 2), topk_indices=idx)


def test_window_with_sparse_masks_is_reference_only():
    """The sparse kernels take no window: backend='triton' says so before any launch."""
    pytest.importorskip("triton")
    q, k, v = _qkv()
    idx = torch.zeros(2, 4, 2, 1, dtype=torch.int32)
    for kw in (dict(block_mask=causal_block_mask(4, 6, 2)), dict(topk_indices=idx)):
        _check(ValueError, r"^backend='triton': window_size with block_mask / topk_indices runs on "
               r"backend='reference' only", q, k, v, window_size=(2, 0), backend="triton", **kw)


def test_bad_softmax_scale_causal_backend():
    q, k, v = _qkv()
    _check(ValueError, r"^softmax_scale: expected a finite positive", q, k, v, softmax_scale=float("nan"))
    _check(TypeError, r"^softmax_scale:", q, k, v, softmax_scale="0.1")
    _check(TypeError, r"^causal: expected a bool", q, k, v, causal=1)
    _check(ValueError, r"^backend: expected one of", q, k, v, backend="cuda")


def test_attn_mask_bad_shape():
    q, k, v = _qkv()
    bad = torch.ones(3, 4, 6, dtype=torch.bool)
    _check(ValueError, r"^attn_mask: expected a shape broadcastable", q, k, v, attn_mask=bad)


def test_block_mask_bad_values():
    q, k, v = _qkv()
    bm = causal_block_mask(4, 6, 2)
    bm.kv_indices[0, 0, 0, 0] = 7
    bm._dense = None
    _check(ValueError, r"^block_mask: kv_indices has entries outside", q, k, v, block_mask=bm)


def test_flags_and_config_types_are_checked():
    from mla import MultiHeadLatentAttention
    from mla.functional import attention_with_stats

    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="return_lse"):
        latent_attention(q, q, q, return_lse="no")
    with pytest.raises(TypeError, match="deterministic"):
        attention_with_stats(q, q, q, deterministic=1)
    with pytest.raises(TypeError, match="config"):
        MultiHeadLatentAttention("tiny")
