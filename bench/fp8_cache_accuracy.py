"""Accuracy of the FP8 latent cache (``kv_format="fp8_ds_mla"``) against unquantized caches.

    python -m bench.fp8_cache_accuracy                  # ~2 minutes on 2 CPU cores (80 s of training)
    python -m bench.fp8_cache_accuracy --max-time 30    # shorter

1. Random rows: decode output over the FP8 cache and over a bf16-rounded cache against the fp32 cache
   (N(0, 1) latent and rope rows and queries, DeepSeek-V3's absorbed shape 576/512, 16 heads, 512 keys):
   mean and worst relative error per query row.
2. A trained model: the quickstart's ``tiny`` byte-level LM with ``kv_lora_rank=128`` (the FP8 format
   needs a multiple of 128; the preset has 64) trained on CPython's pydoc topics for ``--max-time``
   seconds. On its activations (the latent rows each layer caches and the absorbed queries of the last
   position, captured during a cached forward of validation windows): decode error per layer as in 1.
3. The same model end to end: validation bits per byte with every byte predicted through the cache
   (teacher-forced decode, one byte per step, over fp32 / bf16-rounded / FP8 caches), and how many of
   64 greedy bytes match the fp32-cache generation, per prompt.

"bf16" is emulated on CPU: rows are rounded to bf16 and stored in fp32 (what a bf16 cache holds); the
model runs in fp32. Prints a table; nothing is written.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from mla import registry  # noqa: E402
from mla.cache import PagedLatentCache  # noqa: E402
from mla.functional import mla_decode  # noqa: E402
from mla.quant import FP8_DS_MLA, quantize_fp8_ds_mla  # noqa: E402
from mla.train import (  # noqa: E402
    ByteDataset,
    TrainConfig,
    Trainer,
    bits_per_byte,  # noqa: E402
)

FORMATS = ("fp32", "bf16", "fp8")


class _Bf16RoundedCache(PagedLatentCache):
    """fp32 pages holding bf16-rounded rows: a bf16 cache's values for an fp32 model."""

    def write(self, layer_idx, rows):
        super().write(layer_idx, rows.to(torch.bfloat16).to(rows.dtype))


def _row_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error ``|out - ref| / |ref|`` per query row (``[..., Dv]`` -> ``[...]``)."""
    return (out - ref).float().norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-30)


def _decode_errors(q, rows, dv, scale=None) -> dict[str, torch.Tensor]:
    """Per-row relative errors of decode over bf16-rounded and FP8 rows vs fp32 rows. q [B,1,H,Dk], rows [B,S,Dk]."""
    B, S, Dk = rows.shape
    table = torch.arange(B, dtype=torch.int32)[:, None]
    lens = torch.full((B,), S, dtype=torch.int32)
    pool = rows[:, :, None].float().contiguous()
    kw = dict(head_dim_v=dv, causal=True, backend="reference", return_lse=False, softmax_scale=scale)
    ref = mla_decode(q.float(), pool, table, lens, **kw)
    bf = mla_decode(q.float(), pool.bfloat16().float(), table, lens, **kw)
    f8 = mla_decode(q.float(), quantize_fp8_ds_mla(pool, dv), table, lens, kv_format=FP8_DS_MLA, **kw)
    return {"bf16": _row_errors(bf, ref), "fp8": _row_errors(f8, ref)}


def _fmt(errs: dict[str, torch.Tensor]) -> str:
    return "  ".join(f"{k}: mean {float(v.mean()):.2e} worst {float(v.max()):.2e}" for k, v in errs.items())


def random_rows(seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(4, 1, 16, 576, generator=g)
    rows = torch.randn(4, 512, 576, generator=g)
    print(f"random N(0,1), 576/512, 16 heads, 512 keys   {_fmt(_decode_errors(q, rows, 512))}")


def train(max_time: float, seed: int) -> tuple[torch.nn.Module, ByteDataset]:
    dataset = ByteDataset(None)
    torch.manual_seed(seed)
    cfg = TrainConfig(preset="tiny", overrides={"kv_lora_rank": 128}, steps=100_000, batch_size=8, seq_len=64,
                      lr=3e-3, min_lr=3e-4, warmup=30, eval_interval=10**9, eval_batches=4, eval_at_start=False,
                      seed=seed, max_time=max_time, progress=False, verbose=False)
    trainer = Trainer(cfg, model=registry.build("tiny", kv_lora_rank=128), dataset=dataset)
    trainer.fit()
    return trainer.model.eval(), dataset


def _new_cache(model, fmt: str, batch: int, tokens: int) -> PagedLatentCache:
    if fmt == "fp8":
        return model.new_paged_cache(batch, tokens, kv_format=FP8_DS_MLA)
    cache = model.new_paged_cache(batch, tokens)
    if fmt == "bf16":
        cache.__class__ = _Bf16RoundedCache
    return cache


@torch.no_grad()
def trained_activations(model, x: torch.Tensor) -> None:
    """Decode errors per layer on the rows a cached forward of ``x`` stores and its last absorbed queries."""
    B, T = x.shape
    cache = model.new_paged_cache(B, T)
    ids = cache.add_sequences(B)
    cache.begin_step(ids, T - 1)
    model(x[:, :-1], cache=cache)
    captured = {}

    def grab(mod, args, kwargs):
        captured[mod.layer_idx] = (args[0], kwargs.get("position_ids"))

    hooks = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.layers]
    try:
        cache.begin_step(ids, 1)
        model(x[:, -1:], cache=cache)
    finally:
        for h in hooks:
            h.remove()
    for i, layer in enumerate(model.layers):
        attn = layer.self_attn
        hidden, _ = captured[i]
        pos = cache.step_start.long()[:, None]
        q, _ = attn.project_q(hidden)
        q_nope, q_rope = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
        _, k_rope = attn.project_kv_latent(hidden)
        q_rope, _ = attn.rope(q_rope, k_rope, pos)
        q_abs = attn.absorb_q(q_nope, q_rope)
        errs = _decode_errors(q_abs, cache.gather(i), attn.kv_lora_rank, attn.softmax_scale)
        print(f"trained tiny, layer {i}, {B} windows x {T} bytes   {_fmt(errs)}")


@torch.no_grad()
def cached_bits_per_byte(model, x: torch.Tensor, y: torch.Tensor, fmt: str) -> float:
    """Mean bits per byte of the targets ``y [B, T]`` of ``x``, one byte per step through the cache."""
    B, T = x.shape
    cache = _new_cache(model, fmt, B, T)
    ids = cache.add_sequences(B)
    nll = 0.0
    for t in range(T):
        cache.begin_step(ids, 1)
        logits = model(x[:, t:t + 1], cache=cache).logits[:, -1]
        nll += float(torch.nn.functional.cross_entropy(logits.float(), y[:, t], reduction="sum"))
    return bits_per_byte(nll / (B * T))


@torch.no_grad()
def greedy(model, prompt: bytes, fmt: str, n: int = 64) -> list[int]:
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    if fmt == "fp8":
        return model.generate(ids, n, temperature=0, kv_format=FP8_DS_MLA)[0, len(prompt):].tolist()
    if fmt == "fp32":
        return model.generate(ids, n, temperature=0)[0, len(prompt):].tolist()
    cache = _new_cache(model, fmt, 1, len(prompt) + n)
    seq = cache.add_sequences(1)
    cache.begin_step(seq, len(prompt))
    logits = model(ids, cache=cache).logits[:, -1]
    out = []
    for _ in range(n):
        nxt = logits.argmax(-1)
        out.append(int(nxt))
        cache.begin_step(seq, 1)
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-time", type=float, default=80.0, help="training budget, seconds (default 80)")
    ap.add_argument("--windows", type=int, default=16, help="validation windows of 128 bytes (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    random_rows(args.seed)
    model, dataset = train(args.max_time, args.seed)
    g = torch.Generator().manual_seed(1234)
    x, y = dataset.get_batch("val", args.windows, 128, g, torch.device("cpu"))
    with torch.no_grad():
        full = bits_per_byte(float(model(x, targets=y).loss))
    print(f"trained {time.perf_counter() - t0:.0f} s; val bits/byte of a full forward (no cache) {full:.4f}")
    trained_activations(model, x)
    bpb = {fmt: cached_bits_per_byte(model, x, y, fmt) for fmt in FORMATS}
    print(f"val bits/byte through the cache ({args.windows} x 128 predictions): "
          + ", ".join(f"{k} {v:.4f}" for k, v in bpb.items())
          + f"; fp8 - fp32 {bpb['fp8'] - bpb['fp32']:+.4f}, bf16 - fp32 {bpb['bf16'] - bpb['fp32']:+.4f}")
    prompts = [b'The "while" statement', b"Function definitions", b"The import system", b"Exceptions are"]
    for p in prompts:
        ref = greedy(model, p, "fp32")
        cells = []
        for fmt in ("bf16", "fp8"):
            got = greedy(model, p, fmt)
            same = sum(a == b for a, b in zip(ref, got))
            first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
            cells.append(f"{fmt} {same}/64 equal, identical prefix {first}")
        print(f"greedy 64 bytes after {p.decode()!r} vs the fp32 cache: " + "; ".join(cells))
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
