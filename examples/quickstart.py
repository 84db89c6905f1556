"""Quickstart: latent attention in four steps, on a laptop CPU in about a minute and a half.

1. ``LatentAttention``, a drop-in for ``nn.MultiheadAttention`` (the README example).
2. Train the ``tiny`` byte-level MLA language model on real text: the English documentation that ships
   with CPython (``pydoc_data.topics``, nothing is downloaded), within a wall-clock budget; validation
   bits per byte are printed as it learns (8 bits/byte = a uniform guess over 256 byte values).
3. Generate text from a prompt through the compressed latent KV cache (``model.generate``).
4. KV-cache bytes per token of this model: the latent cache against a standard multi-head K/V cache.

Run from the repository root::

    python examples/quickstart.py                   # ~1.5 minutes on 2 CPU cores
    python examples/quickstart.py --max-time 30     # shorter (the model learns less)
    python examples/quickstart.py --steps 300 --device cuda
"""

from __future__ import annotations

import os

# On a busy machine, spinning OpenMP threads slow PyTorch's CPU kernels down several-fold; sleeping
# threads cost little when the machine is idle. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time

from _deps import requirements  # also puts the repository root on sys.path (runs from a checkout)

with requirements():
    import torch

    from mla import LatentAttention, registry
    from mla.threads import auto_threads, describe_threads
    from mla.train import ByteDataset, TrainConfig, Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (all optional)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-time", type=float, default=100.0,
                   help="wall-clock budget of the training part, seconds (default 100)")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps (default: as many as the budget allows, measured at start)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step (default 8)")
    p.add_argument("--seq-len", type=int, default=64, help="bytes per window (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, limited to the cores other processes leave idle)")
    p.add_argument("--data", default=None, help="train on this file instead of CPython's pydoc topics")
    p.add_argument("--prompt", default='The "while" statement', help="prompt for generation")
    p.add_argument("--new-tokens", type=int, default=200, help="bytes to generate (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.max_time <= 0:
        p.error(f"--max-time: expected seconds > 0, got {args.max_time}")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps: expected >= 1, got {args.steps}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected >= 1, got {args.threads}")
    if args.new_tokens < 0:
        p.error(f"--new-tokens: expected >= 0, got {args.new_tokens}")
    if not args.prompt:
        p.error("--prompt: must not be empty")
    return args


def section(title: str) -> None:
    """Print a section heading."""
    print(f"\n== {title}")


def demo_latent_attention() -> None:
    """Part 1: the README snippet, plus what ``weights`` and ``stats`` hold."""
    section("1. LatentAttention (nn.MultiheadAttention-style)")
    attn = LatentAttention(embed_dim=512, num_heads=8, latent_dim_ratio=0.25)
    inputs = torch.randn(2, 128, 512)
    out, weights, stats = attn(inputs, inputs, inputs, need_weights=True)
    print(out.shape)  # torch.Size([2, 128, 512])
    rows = weights.sum(-1)
    print(f"weights {tuple(weights.shape)} [B, H, T, S], row sums in [{rows.min():.6f}, {rows.max():.6f}]")
    print(
        f"stats: backend={stats.backend}, latent_dim={stats.latent_dim} per head (= 0.25 x head_dim 64), "
        f"density={stats.density:.2f}, max_logit per head up to "
        f"{'n/a' if stats.max_logit is None else f'{float(stats.max_logit.max()):.3f}'}"
    )


def seconds_per_step(model, dataset: ByteDataset, batch_size: int, seq_len: int, device) -> float:
    """Measured seconds of one forward + backward of ``model`` on a training batch (weights unchanged)."""
    g = torch.Generator().manual_seed(12345)
    x, y = dataset.get_batch("train", batch_size, seq_len, g, device)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        model(x, targets=y).loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    return min(times[1:]) * 1.15  # + optimizer step and bookkeeping


def train_tiny(args) -> Trainer:
    """Part 2: train the ``tiny`` preset within ``args.max_time`` seconds; returns the ``Trainer``."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.set_num_threads(args.threads if args.threads else auto_threads())
    t_start = time.perf_counter()
    dataset = ByteDataset(args.data)
    torch.manual_seed(args.seed)
    model = registry.build("tiny").to(device)
    cfg = model.config
    section(
        f"2. Train the 'tiny' MLA model ({model.num_parameters() / 1e6:.2f} M parameters, {cfg.num_hidden_layers} "
        f"layers, kv_lora_rank {cfg.kv_lora_rank}) on {dataset.name}"
    )
    print(f"data: {len(dataset):,} bytes ({dataset.train.numel():,} train / {dataset.val.numel():,} validation); "
          f"one token = one byte, so val loss / ln 2 = bits per byte (uniform guess: 8.0)")
    if device.type == "cpu":
        print(f"cpu: {describe_threads(args.threads)}")
    steps = args.steps
    if steps is None:
        per_step = seconds_per_step(model, dataset, args.batch_size, args.seq_len, device)
        budget = args.max_time - (time.perf_counter() - t_start)
        steps = max(10, int(0.8 * budget / per_step))  # ~20 % for evaluations and checks
        print(f"measured {per_step:.3f} s/step -> {steps} steps of {args.batch_size} x {args.seq_len} bytes "
              f"in a {args.max_time:g} s budget")
    train_cfg = TrainConfig(
        preset="tiny", steps=steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        min_lr=args.lr / 10, warmup=max(1, min(30, steps // 10)), weight_decay=0.1, grad_clip=1.0,
        eval_interval=max(1, steps // 4), eval_batches=max(2, 8192 // (args.batch_size * args.seq_len)),
        seed=args.seed, data=args.data,
        max_time=max(1.0, args.max_time - (time.perf_counter() - t_start)), device=str(device),
        progress=not args.no_progress,
    )
    trainer = Trainer(train_cfg, model=model, dataset=dataset)  # logs each evaluation via tqdm.write
    trainer.fit()
    first, last = trainer.metrics[0], trainer.metrics[-1]
    print(f"validation: {first['val_bpb']:.3f} -> {last['val_bpb']:.3f} bits/byte after {last['step']} steps "
          f"({last['tokens']:,} bytes seen, {time.perf_counter() - t_start:.0f} s)")
    return trainer


def demo_generate(model, prompt: str, new_tokens: int, seed: int) -> None:
    """Part 3: sample from the trained model through the compressed latent cache."""
    section("3. Generate through the compressed latent KV cache")
    device = next(model.parameters()).device
    ids = torch.tensor([list(prompt.encode("utf-8"))], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    t0 = time.perf_counter()
    out = model.generate(ids, new_tokens, temperature=0.7, top_k=40, generator=g)
    dt = time.perf_counter() - t0
    text = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(f"prompt {prompt!r}, {new_tokens} new bytes, temperature 0.7, top-k 40 ({new_tokens / dt:.0f} bytes/s):")
    print("-" * 72)
    print(text)
    print("-" * 72)


def demo_cache_size(model, prompt: str) -> None:
    """Part 4: KV-cache bytes per token, latent vs a standard multi-head cache (this model and DeepSeek-V3)."""
    section("4. KV-cache size per token")
    cfg = model.config
    elem = next(model.parameters()).element_size()
    # measure what the latent cache actually holds after a prefill
    cache = model.new_cache()
    device = next(model.parameters()).device
    with torch.no_grad():
        model(torch.tensor([list(prompt.encode("utf-8"))], device=device), cache=cache)
    measured = cache.bytes_per_token()
    latent = cfg.cache_values_per_token * cfg.num_hidden_layers * elem
    full = cfg.expanded_cache_values_per_token * cfg.num_hidden_layers * elem
    assert measured == latent, (measured, latent)
    print(f"tiny, {cfg.num_hidden_layers} layers, {elem}-byte elements: latent {cfg.cache_values_per_token} values "
          f"(kv_lora_rank {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}) = {latent:,} B/token "
          f"(measured {measured:,})")
    print(f"  vs standard multi-head K/V {cfg.expanded_cache_values_per_token} values "
          f"({cfg.num_attention_heads} heads x ({cfg.qk_head_dim} + {cfg.v_head_dim})) = {full:,} B/token "
          f"-> {full / latent:.1f}x smaller")
    v3 = registry.get("deepseek-v3")
    lat3 = v3.cache_values_per_token * v3.num_hidden_layers * 2
    full3 = v3.expanded_cache_values_per_token * v3.num_hidden_layers * 2
    print(f"deepseek-v3 preset, bf16: {lat3:,} vs {full3:,} B/token -> {full3 / lat3:.1f}x smaller")


def main(argv: list[str] | None = None) -> None:
    """Run the four parts; total about ``--max-time`` + 15 seconds."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    demo_latent_attention()
    trainer = train_tiny(args)
    demo_generate(trainer.model, args.prompt, args.new_tokens, args.seed)
    demo_cache_size(trainer.model, args.prompt)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
