"""Decode throughput of transformers MLA-family models (DeepSeek-V3, -V3.2, GLM-5, -V4) before and after
``patch_model`` (mla.integrations).

    python -m bench.bench_hf                 # every model, CPU (and CUDA when present): contexts 512, 2k, 8k
    python -m bench.bench_hf --model deepseek_v32 glm_moe_dsa   # the DeepSeek Sparse Attention models only
    python -m bench.bench_hf --model deepseek_v4 --quick
    python -m bench.bench_hf --quick         # contexts 128 and 512, short timing budget
    python -m bench.bench_hf --device cuda --contexts 512 2048 8192 32768 --csv hf.csv

Each model (``--model`` / ``--models``: ``deepseek_v3``, ``deepseek_v32``, ``glm_moe_dsa``, ``deepseek_v4``;
default all) is a random-weight ``<Model>ForCausalLM`` built from a config (no download). The MLA ones have
DeepSeek's attention head sizes (``kv_lora_rank`` 512, ``qk_nope_head_dim`` 128, ``qk_rope_head_dim`` 64,
``v_head_dim`` 128) but few heads and layers and dense MLPs, so the CPU run stays short; change them with
``--heads/--hidden/--layers``. The DSA models (V3.2, GLM-5) add their lightning indexer at its real size (V3.2:
64 heads, GLM-5: 32 heads, of 128; ``index_topk`` 2048, so the 8k context is cut to 2048 keys per token;
``q_lora_rank`` 256 unless given), and GLM-5's odd layers reuse the previous layer's choice. For each context
length a transformers ``DynamicCache`` holding the compressed latents of the context is filled once (see below),
then greedy decoding runs

* *before*: transformers' module (default ``attn_implementation="sdpa"``), which expands the cached latents to
  per-head K/V with ``kv_b_proj`` at every step: ``~2·S·dc·H·(dn+dv)`` FLOPs per layer and token;
* *after*: the patched model, absorbed form over the same compressed cache: ``~4·S·H·(dc+dr)`` FLOPs
  (DSA: over at most ``index_topk`` of them, chosen by the same indexer; ``mla_decode`` with index lists),

from the same cache (``cache.crop`` rewinds it between runs), and the generated tokens are compared.
The cache of the ``ctx``-token context is filled, by default, with random latents through the cache's own
``update`` (for DSA also random indexer keys through ``update_indexer``; a CPU prefill at 8k takes minutes and
does not change what a decode step computes); ``--prefill model`` runs the real (chunked) prefill instead.
``deepseek_v4``: a random ``DeepseekV4ForCausalLM`` with V4-Flash's attention sizes (one shared key = value
head of 512 with 64 RoPE channels, window 128, sinks, CSA rate 4 with an indexer of 16 heads x 128 keeping 512
entries, HCA rate 128, ``o_groups`` 2 x 256) and one layer of each type per three layers (``--layers``, default 3);
*before* is transformers' eager module (V4 ships eager only: it builds the dense ``[window | compressed]`` mask),
*after* the patched module (top-k index lists). The V4 cache holds compressor state that ``crop`` cannot rewind,
so the context is always prefilled through the model (in chunks) and each run decodes from a copy of that cache.
Tokens/s counts decode steps × batch over wall time (``torch.cuda.synchronize`` on CUDA), after one
warm-up step; each side runs until ``--budget`` seconds have passed (at least ``--min-steps`` steps).
"""

from __future__ import annotations

import argparse
import copy
import csv
import time

import torch

from mla.integrations.transformers import patch_model, unpatch_model

MLA_SHAPE = "kv_lora_rank 512, qk 128+64, v 128"
#: --model -> (transformers config class, model class, extra config fields, attention shape). DSA: the real
#: indexer sizes. deepseek_v4: built by ``build_v4_model``.
MODELS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {}, MLA_SHAPE),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128},
                     MLA_SHAPE + ", indexer 64 x 128 top-2048"),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    {"index_topk": 2048, "index_n_heads": 32, "index_head_dim": 128},
                    MLA_SHAPE + ", indexer 32 x 128 top-2048"),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", {},
                    "head_dim 512 (64 RoPE), window 128, CSA 4 / top-512, HCA 128"),
}
DSA_MODELS = ("deepseek_v32", "glm_moe_dsa")


def build_model(args, device: torch.device, dtype: torch.dtype, name: str = "deepseek_v3"):
    """A random ``MODELS[name]`` causal LM (transformers) on ``device`` in ``dtype`` (V4: ``build_v4_model``)."""
    import transformers

    if name == "deepseek_v4":
        return build_v4_model(args, device, dtype)
    config_cls, model_cls, extra, _ = MODELS[name]
    extra = dict(extra)
    if name == "glm_moe_dsa":
        extra["indexer_types"] = ["full"] + ["shared" if i % 2 else "full" for i in range(1, args.layers)]
    q_lora = args.q_lora_rank or (256 if name in DSA_MODELS else None)  # the DSA indexer reads the q latent
    cfg = getattr(transformers, config_cls)(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=64, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.heads, q_lora_rank=q_lora, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, first_k_dense_replace=args.layers, n_routed_experts=2,
        num_experts_per_tok=1, n_group=1, topk_group=1, max_position_embeddings=max(args.contexts) + 4096,
        pad_token_id=0, bos_token_id=None, eos_token_id=None, **extra,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)._from_config(cfg, attn_implementation=args.attn, dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")


def build_v4_model(args, device: torch.device, dtype: torch.dtype):
    """A random DeepseekV4ForCausalLM (transformers, eager attention) with V4-Flash's attention sizes."""
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    cfg = DeepseekV4Config(
        vocab_size=args.vocab, hidden_size=args.hidden, moe_intermediate_size=64, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, head_dim=512, q_lora_rank=args.q_lora_rank or 1024,
        partial_rotary_factor=64 / 512, n_routed_experts=2, num_experts_per_tok=1,
        layer_types=[V4_LAYER_TYPES[i % 3] for i in range(args.layers)], mlp_layer_types=["moe"] * args.layers,
        sliding_window=128, o_groups=2, o_lora_rank=256, index_n_heads=16, index_head_dim=128, index_topk=512,
        max_position_embeddings=max(args.contexts) + 4096, pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )
    torch.manual_seed(0)
    model = DeepseekV4ForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    return model.to(device=device, dtype=dtype).eval()


def fill_random_cache(model, cache, B: int, ctx: int, g: torch.Generator, device, dtype) -> None:
    """Fill a transformers cache with ``ctx`` random latent rows per layer through its own ``update`` API:
    ``c_kv ~ N(0, 1)`` (an RMS-normalised latent) and ``k_rope ~ N(0, 1)``, shaped as ``DeepseekV3Attention``
    stores them (``[B, 1, ctx, kv_lora_rank]``, ``[B, 1, ctx, qk_rope_head_dim]``)."""
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        kv = torch.randn(B, 1, ctx, cfg.kv_lora_rank, generator=g).to(device=device, dtype=dtype)
        kr = torch.randn(B, 1, ctx, cfg.qk_rope_head_dim, generator=g).to(device=device, dtype=dtype)
        cache.update(kv, kr, layer)
        if hasattr(cache.layers[layer], "update_indexer"):  # DSA: the lightning indexer's keys (LayerNorm'd)
            idx = torch.randn(B, ctx, cfg.index_head_dim, generator=g).to(device=device, dtype=dtype)
            cache.update_indexer(idx, layer)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode(model, cache, first, steps: int, device) -> tuple[torch.Tensor, float]:
    """Greedy decode ``steps`` tokens after ``first [B, 1]``; returns (tokens [B, steps], seconds of steps 2..)."""
    tok, out, t0 = first, [], None
    for i in range(steps):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        logits = model(input_ids=tok, cache=cache, use_cache=True).logits
        tok = logits[:, -1:].argmax(-1)
        out.append(tok)
    _sync(device)
    return torch.cat(out, dim=1), time.perf_counter() - t0


def _rewind(cache, ctx: int) -> None:
    """Drop the tokens decoded after the ``ctx``-token prompt (transformers' ``crop`` takes a negative count)."""
    extra = cache.get_seq_length() - ctx
    if extra > 0:
        cache.crop(-extra)



def timed_decode(model, reset, first, args, device, steps: int | None = None):
    """Decode from ``reset()`` (the cache of the ``ctx``-token context), repeatedly, until ``args.budget`` seconds
    are spent.

    ``steps`` None: calibrate it first (``args.min_steps`` .. ``args.max_steps``, one run ≈ the budget).
    Returns (tokens of the first run [B, steps + 1], tokens/s, steps).
    """
    B = first.shape[0]
    if steps is None:
        tokens, t = decode(model, reset(), first, args.min_steps + 1, device)
        steps = int(min(args.max_steps, max(args.min_steps, args.budget * args.min_steps / max(t, 1e-9))))
        if steps == args.min_steps or t >= args.budget:
            return tokens, args.min_steps * B / t, args.min_steps
    tokens, total_t, total_steps = None, 0.0, 0
    start = time.perf_counter()
    while True:
        toks, t = decode(model, reset(), first, steps + 1, device)
        tokens = toks if tokens is None else tokens
        total_t, total_steps = total_t + t, total_steps + steps
        if time.perf_counter() - start >= args.budget:
            break
    return tokens, total_steps * B / total_t, steps


def bench_device(args, device: torch.device, name: str = "deepseek_v3") -> list[dict]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if args.dtype:
        dtype = getattr(torch, args.dtype)
    from transformers import DynamicCache

    v4 = name == "deepseek_v4"
    model = build_model(args, device, dtype, name)
    rows = []
    for ctx in args.contexts:
        g = torch.Generator().manual_seed(ctx)
        ids = torch.randint(1, args.vocab, (args.batch, ctx), generator=g).to(device)
        cache = DynamicCache(config=model.config)
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            if args.prefill == "model" or v4:
                for i in range(0, ctx, args.prefill_chunk):
                    logits = model(input_ids=ids[:, i : i + args.prefill_chunk], cache=cache, use_cache=True).logits
                first = logits[:, -1:].argmax(-1)
            else:
                fill_random_cache(model, cache, args.batch, ctx, g, device, dtype)
                first = ids[:, -1:]
        _sync(device)
        prefill_s = time.perf_counter() - t0
        if v4:  # compressor state cannot be cropped: decode from copies of the prefilled cache
            def reset(snapshot=cache):
                return copy.deepcopy(snapshot)
        else:
            def reset(cache=cache, ctx=ctx):
                _rewind(cache, ctx)
                return cache
        with torch.no_grad():
            ref_tokens, before, steps = timed_decode(model, reset, first, args, device)
            patch_model(model, form=args.form, backend=args.backend)
            tokens, after, _ = timed_decode(model, reset, first, args, device, steps=steps)
            unpatch_model(model)
        same = bool(torch.equal(tokens[:, : ref_tokens.shape[1]], ref_tokens))
        row = {
            "model": name, "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "batch": args.batch, "context": ctx,
            "prefill": args.prefill, "prefill_s": round(prefill_s, 3), "steps": steps, "before_tok_s": round(before, 2),
            "after_tok_s": round(after, 2), "ratio": round(after / before, 2), "same_tokens": same,
        }
        rows.append(row)
        print(
            f"  {name:12s} {device.type:4s} {row['dtype']:8s} context {ctx:6d}: before {before:9.2f} tok/s, "
            f"after {after:9.2f} tok/s, ratio {after / before:6.2f}x, same greedy tokens: {same} "
            f"(prefill {prefill_s:.1f}s)",
            flush=True,
        )
        del cache
    return rows



def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets only the contexts, budget and min steps not given explicitly."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", "--models", dest="models", nargs="+", choices=list(MODELS), default=list(MODELS),
                   help="transformers model types, default all (see the module docstring)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: CPU, plus CUDA when available")
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="default 512 2048 8192")
    p.add_argument("--quick", action="store_true",
                   help="contexts 128 512, budget 0.5 s, min steps 2 (options given explicitly win)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="default 2 (deepseek_v3), 3 (deepseek_v4: one per type)")
    p.add_argument("--q-lora-rank", type=int, default=None)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--attn", default="sdpa", help="attn_implementation of the unpatched model (sdpa, eager)")
    p.add_argument("--form", default="auto", choices=["auto", "naive", "absorbed"])
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: fp32 CPU, bf16 CUDA")
    p.add_argument("--budget", type=float, default=None, help="seconds of decoding per measurement (default 2)")
    p.add_argument("--min-steps", type=int, default=None, help="default 3")
    p.add_argument("--max-steps", type=int, default=64)
    p.add_argument("--prefill", choices=["random", "model"], default="random",
                   help="random: fill the transformers cache with random latents (fast; decode cost is the same);\n"
                   "model: prefill the prompt through the unpatched model in chunks (slow on CPU at 8k)")
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--csv", default=None, help="also write the rows to this CSV file")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0: torch's default); 1 is steadier on a shared machine")
    args = p.parse_args(argv)
    defaults = {"contexts": [128, 512], "budget": 0.5, "min_steps": 2} if args.quick else \
        {"contexts": [512, 2048, 8192], "budget": 2.0, "min_steps": 3}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for flag, values in (("--contexts", args.contexts), ("--batch", [args.batch]), ("--hidden", [args.hidden]),
                         ("--heads", [args.heads]), ("--layers", [args.layers or 1]), ("--vocab", [args.vocab]),
                         ("--min-steps", [args.min_steps]), ("--max-steps", [args.max_steps]),
                         ("--prefill-chunk", [args.prefill_chunk])):
        if min(values) < 1:
            p.error(f"{flag}: expected integers >= 1, got {min(values)}")
    if args.max_steps < args.min_steps:
        p.error(f"--max-steps: expected >= --min-steps ({args.min_steps}), got {args.max_steps}")
    if args.budget <= 0:
        p.error(f"--budget: expected seconds > 0, got {args.budget}")
    if args.threads < 0:
        p.error(f"--threads: expected >= 0, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to torch")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    rows = []
    for name in args.models:
        v4 = name == "deepseek_v4"
        margs = copy.copy(args)
        margs.layers = args.layers or (3 if v4 else 2)
        before = "eager (V4 ships eager only)" if v4 else f"attn_implementation={args.attn!r}"
        print(
            f"transformers {name} decode, hidden {args.hidden}, {args.heads} heads, {margs.layers} layers, "
            f"{MODELS[name][3]}, batch {args.batch}; before = {before}, after = "
            f"patch_model(form={args.form!r}, backend={args.backend!r}); CPU threads {torch.get_num_threads()}"
        )
        for dev in devices:
            rows += bench_device(margs, dev, name)
    print()
    print("| model | device | dtype | context | before tok/s | after tok/s | ratio | same tokens |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['device']} | {r['dtype']} | {r['context']} | {r['before_tok_s']} | "
            f"{r['after_tok_s']} | {r['ratio']}x | {r['same_tokens']} |"
        )
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
