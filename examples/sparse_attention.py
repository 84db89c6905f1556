"""Block-sparse and top-k sparse latent attention, functional and as the hybrid LatentSparseAttention.

    python examples/sparse_attention.py            # CPU: reference path, a few seconds
    python examples/sparse_attention.py --device cuda

1. A sliding-window BlockMask (FlexAttention field names) and a causal top-k key list, each checked
   against dense attention with the equivalent element mask.
2. ``LatentSparseAttention`` in both modes (local + sink + top-k blocks scored in latent space;
   lightning-indexer top-k tokens), its density and visited blocks/tokens, and a backward pass.
"""

from __future__ import annotations

import argparse

from _deps import requirements

with requirements():
    import torch

    from mla import LatentSparseAttention, latent_attention, registry
    from mla.sparsity import sliding_window_block_mask, topk_indices_from_scores, topk_to_dense_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)

    # -- 1. functional: block mask and top-k indices ------------------------------------------------
    B, T, S, Hq, Hkv, Dk, Dv = 1, 256, 256, 8, 1, 576, 512  # absorbed MLA: one latent kv head
    q = torch.randn(B, T, Hq, Dk, device=dev, dtype=dtype)
    latent = torch.randn(B, S, Hkv, Dk, device=dev, dtype=dtype)
    k, v = latent, latent[..., :Dv]  # v is a prefix view of k: the kernels load the tile once
    scale = 192**-0.5
    via = "Triton kernel" if dev.type == "cuda" else "reference path"  # backend="auto"

    bm = sliding_window_block_mask(T, S, window=64, BLOCK_SIZE=32, device=dev)
    out = latent_attention(q, k, v, causal=True, block_mask=bm, softmax_scale=scale)
    ref = latent_attention(q, k, v, softmax_scale=scale, backend="reference",
                           attn_mask=bm.to_element_mask(causal=True))
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"block-sparse: {bm}, density {bm.density(causal=True):.3f}, "
          f"rel. error ({via}) vs dense+element mask {err:.1e}")

    scores = torch.randn(B, T, Hkv, S, device=dev)  # e.g. a lightning indexer's scores
    idx = topk_indices_from_scores(scores, 32, causal=True)  # int32 [B, T, Hkv, 32], -1 where fewer keys
    out = latent_attention(q, k, v, causal=True, topk_indices=idx, softmax_scale=scale)
    keep = topk_to_dense_mask(idx, S).repeat_interleave(Hq // Hkv, dim=1)
    ref = latent_attention(q, k, v, softmax_scale=scale, backend="reference", attn_mask=keep)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"top-k: K=32 of S={S}, {int((idx >= 0).sum())} (query, key) pairs, "
          f"rel. error ({via}) vs dense+element mask {err:.1e}")

    # -- 2. the hybrid module ----------------------------------------------------------------------
    cfg = registry.get("tiny", sparse_block_size=16, num_sink_blocks=1, num_local_blocks=1, topk_blocks=2,
                       index_topk=48)
    x = torch.randn(2, 128, cfg.hidden_size, device=dev, requires_grad=True)
    for mode in ("block", "topk"):
        attn = LatentSparseAttention(cfg, mode=mode).to(dev)
        y, stats = attn(x)
        y.square().mean().backward()
        seen = (f"{stats.visited_blocks} key blocks" if mode == "block" else f"{stats.visited_tokens} keys")
        print(f"LatentSparseAttention(mode={mode!r}): out {tuple(y.shape)}, backend {stats.backend}, "
              f"density {stats.density:.3f} ({seen} over all queries), grad ok: {bool(torch.isfinite(x.grad).all())}")


if __name__ == "__main__":
    main()
