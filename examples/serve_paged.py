"""Serving-style MLA decode over a paged latent cache.

    python examples/serve_paged.py                 # CPU: reference path, a few seconds
    python examples/serve_paged.py --device cuda   # the split-KV decode kernel
    python examples/serve_paged.py --fp8           # the FP8 latent cache (fp8_ds_mla, 656 bytes/token)

1. Low level: a ``PagedLatentCache`` page pool, three sequences of different lengths admitted,
   prefilled and decoded step by step with ``mla_decode`` (heads packed, split-KV), one sequence
   finishing and releasing its pages while another is admitted.
2. High level: ``MLACausalLM.generate()`` on a batch of prompts of different lengths (left padding +
   ``attention_mask``), which runs the same cache and kernel.

With ``--fp8`` both use DeepSeek-V3.2's FP8 cache (``kv_format="fp8_ds_mla"``: rows quantized on write,
dequantized inside the decode kernel; the tiny model then gets ``kv_lora_rank=128``, a multiple of 128).
"""

from __future__ import annotations

import argparse

from _deps import requirements

with requirements():
    import torch

    from mla import MLACausalLM, registry
    from mla.cache import PagedLatentCache
    from mla.functional import mla_decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fp8", action="store_true", help="FP8 latent cache (kv_format='fp8_ds_mla')")
    args = ap.parse_args()
    kv_format = "fp8_ds_mla" if args.fp8 else None
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)

    # -- 1. the cache and the decode kernel directly ----------------------------------------------
    H, dc, dr = 16, 512, 64  # DeepSeek-V3 latent sizes, 16 heads
    scale = (128 + 64) ** -0.5
    cache = PagedLatentCache(num_layers=1, head_dim=dc + dr, num_pages=64, page_size=64, dtype=dtype, device=dev,
                             kv_format=kv_format, kv_lora_rank=dc)
    seqs = cache.add_sequences(3)
    prompt_lens = [300, 45, 129]
    cache.begin_step(seqs, prompt_lens)  # reserve pages; rows then go to positions 0..len-1
    cache.write(0, torch.randn(3, max(prompt_lens), dc + dr, device=dev, dtype=dtype))
    print(f"pool: {cache.num_pages} pages x {cache.page_size} tokens of {cache.bytes_per_token()} bytes "
          f"({kv_format or dtype}), {cache.num_free_pages} free after prefill; "
          f"block_table {tuple(cache.block_table.shape)}, cache_seqlens {cache.cache_seqlens.tolist()}")
    for step in range(3):
        cache.begin_step(seqs, 1)  # one new token per sequence
        cache.write(0, torch.randn(len(seqs), 1, dc + dr, device=dev, dtype=dtype))
        q = torch.randn(len(seqs), 1, H, dc + dr, device=dev, dtype=dtype)  # absorbed queries [B, Tq, H, 576]
        out, lse = mla_decode(q, cache.kv_cache(0), cache.block_table, cache.cache_seqlens,
                              softmax_scale=scale, head_dim_v=dc, causal=True, kv_format=cache.kv_format)
        print(f"step {step}: lengths {cache.cache_seqlens.tolist()}, out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    cache.release(seqs[1:2])  # the short sequence finished: its pages return to the pool
    (new,) = cache.add_sequences(1)
    print(f"released sequence {seqs[1]} -> {cache.num_free_pages} free pages; admitted sequence {new}")

    # -- 2. generation through the same machinery -----------------------------------------------
    cfg = registry.get("tiny", **({"kv_lora_rank": 128} if args.fp8 else {}))
    model = MLACausalLM(cfg).to(dev).eval()
    prompts = [b"The while statement", b"Lists are"]
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(list(p))
        mask[i, width - len(p):] = 1
    out = model.generate(ids.to(dev), 24, attention_mask=mask.to(dev), temperature=0, kv_format=kv_format)
    for i in range(len(prompts)):
        print(f"generate[{i}]: {bytes(out[i, width:].tolist())!r} (untrained model: random bytes)")
    if kv_format is not None:  # the same greedy generation through an unquantized cache, for comparison
        ref = model.generate(ids.to(dev), 24, attention_mask=mask.to(dev), temperature=0)
        for i in range(len(prompts)):
            new_fp8, new_ref = out[i, width:].tolist(), ref[i, width:].tolist()
            same = next((j for j, (a, b) in enumerate(zip(new_fp8, new_ref)) if a != b), len(new_ref))
            print(f"generate[{i}]: the first {same} of {len(new_ref)} greedy bytes equal the unquantized cache's "
                  "(an untrained model's near-ties flip under FP8 rounding)")


if __name__ == "__main__":
    main()
