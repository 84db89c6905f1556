"""Drop-in latent attention for a Hugging Face transformers DeepSeek-V3 / V3.2 / GLM-5 / V4 model: one added line.

    python examples/hf_dropin.py            # about half a minute on a laptop CPU
    python examples/hf_dropin.py --context 4096 --threads 1
    python examples/hf_dropin.py --model deepseek_v32   # or glm_moe_dsa: DeepSeek Sparse Attention (DSA)
    python examples/hf_dropin.py --model deepseek_v4    # sliding window + sinks, CSA (indexer) and HCA layers

1. Builds a small random-weight ``DeepseekV3ForCausalLM`` (``--model deepseek_v3``, the default),
   ``DeepseekV32ForCausalLM``, ``GlmMoeDsaForCausalLM`` or ``DeepseekV4ForCausalLM`` from a config (no download).
   The DSA models keep ``index_topk`` = 256 keys per token chosen by their lightning indexer; patched, the same
   indexer chooses and our top-k attention (prefill) and top-k decode run over the latent cache.
2. Greedy-generates for a left-padded batch of two prompts with transformers' own attention, then
   ``patch_model(model)`` — the one line — and generates again: the tokens are identical.
3. Measures decode speed before and after at a long context. transformers expands the cached latents to
   per-head keys/values at every step; the patched model attends in latent space over the same cache.
   On a CPU this small model (4 heads) does not gain: measured 0.7x at contexts 512 and 2048 on a busy
   2-core machine, 1 thread (``--model deepseek_v4``: 0.8-0.9x at contexts 512 and 1024). The saving is in
   memory traffic at many heads on a GPU (``bench.bench_hf``).
4. Shows the other entry point: ``attn_implementation="mla_latent"`` (our attention function in transformers'
   ``AttentionInterface``; naive form, no module replacement; not for DeepSeek-V4, whose attention is no MLA).

``--model deepseek_v4``: a small random ``DeepseekV4ForCausalLM`` with one layer of each attention type
(sliding window, compressed-sparse with the lightning indexer, heavily compressed); the patched layers attend
over top-k index lists of ``[window | compressed]`` keys (``mla.integrations.deepseek_v4``).
"""

from __future__ import annotations

import os

# Busy machine: spinning OpenMP threads slow the CPU kernels several-fold (as in quickstart.py). Before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import time

from _deps import requirements

with requirements():  # needs the [hf] extra: pip install -e ".[hf]"
    import torch
    import transformers
    from transformers import LogitsProcessor, LogitsProcessorList

    from mla.integrations.transformers import ATTN_IMPLEMENTATION, patch_model, unpatch_model
    from mla.threads import auto_threads, describe_threads


#: --model -> (config class, model class, extra config fields). DSA: a small indexer (4 heads of 64) keeping 256
#: keys per token; GLM-5's second layer reuses the first one's choice ("shared"), as GLM-5 does. V4: its own
#: layout (``small_v4_config``).
MODELS = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", {"rope_interleave": True}),
    "deepseek_v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                     {"index_topk": 256, "index_n_heads": 4, "index_head_dim": 64}),
    "glm_moe_dsa": ("GlmMoeDsaConfig", "GlmMoeDsaForCausalLM",
                    {"index_topk": 256, "index_n_heads": 4, "index_head_dim": 64, "indexer_types": ["full", "shared"]}),
    "deepseek_v4": ("DeepseekV4Config", "DeepseekV4ForCausalLM", {}),
}


def small_config(max_positions: int, model: str = "deepseek_v3"):
    """DeepSeek-V3's attention (q LoRA, 512-wide latent KV, 128 + 64 qk and 128 v head dims, interleaved RoPE,
    YaRN) with 4 heads, 2 layers and dense MLPs; for the DSA models plus their indexer (``MODELS``); for
    ``deepseek_v4`` ``small_v4_config``."""
    if model == "deepseek_v4":
        return small_v4_config(max_positions)
    config_cls, _, extra = MODELS[model]
    return getattr(transformers, config_cls)(
        vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=256, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1, n_group=1, topk_group=1,
        moe_intermediate_size=64, max_position_embeddings=max_positions, **extra,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": max_positions // 4, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
        pad_token_id=0, bos_token_id=None, eos_token_id=None,
    )


def small_v4_config(max_positions: int):
    """DeepSeek-V4's attention layout (one shared key = value head with partial interleaved RoPE, 128-token sliding
    window, per-head sinks, compressed-sparse layer with rate 4 and an indexer keeping 64 entries, heavily
    compressed layer with rate 128, grouped low-rank output) with 4 heads of 128, 3 layers (one of each type) and
    a small MoE."""
    return transformers.DeepseekV4Config(
        vocab_size=512, hidden_size=256, moe_intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        head_dim=128, q_lora_rank=128, partial_rotary_factor=0.25, n_routed_experts=2, num_experts_per_tok=1,
        layer_types=["sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"],
        mlp_layer_types=["moe"] * 3, hc_mult=2, sliding_window=128, o_groups=2, o_lora_rank=64, index_n_heads=4,
        index_head_dim=32, index_topk=64, max_position_embeddings=max_positions, pad_token_id=0,
        bos_token_id=None, eos_token_id=None,
    )


def random_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights of unit gain (transformers' 0.02-std init makes a near-constant toy model)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            p.copy_(r / p.shape[-1] ** 0.5 if p.dim() > 1 else (1 + 0.1 * r if "norm" in name else 0.1 * r))


class StepTimer(LogitsProcessor):
    """Records when ``generate`` asks for each next token: the gaps are the decode steps (prefill excluded)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def decode_tokens_per_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s of ``model.generate`` after the prefill (timed between generation steps)."""
    timer = StepTimer()
    with torch.no_grad():
        model.generate(input_ids=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([timer]))
    return (len(timer.times) - 1) * prompt.shape[0] / (timer.times[-1] - timer.times[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="deepseek_v3", help="transformers model type")
    p.add_argument("--context", type=int, default=2048, help="prompt length of the speed measurement")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, limited to the cores other processes leave idle)")
    args = p.parse_args()
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected >= 1, got {args.threads}")
    torch.set_num_threads(args.threads or auto_threads())
    torch.manual_seed(0)
    config = small_config(max_positions=max(4096, 2 * args.context), model=args.model)
    model_cls = getattr(transformers, MODELS[args.model][1])
    model = model_cls(config).eval()
    random_weights(model)

    # -- 1. identical greedy output, batch of two prompts, the second left-padded -----------------------
    g = torch.Generator().manual_seed(1)
    T = 300 if args.model == "deepseek_v4" else 12  # V4: long enough that the window and compression cut keys
    input_ids = torch.randint(1, config.vocab_size, (2, T), generator=g)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, :5], attention_mask[1, :5] = 0, 0
    gen = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        before = model.generate(**gen)
        patch_model(model)  # <- the one line: every supported attention module (MLA, DSA, V4) is replaced
        after = model.generate(**gen)
    print("transformers:", before[:, T:].tolist())
    print("patched:     ", after[:, T:].tolist())
    print("identical greedy output:", torch.equal(before, after))
    print("layer 0 attention is now:", type(model.model.layers[0].self_attn).__name__)

    # -- 2. decode speed at a long context --------------------------------------------------------------
    prompt = torch.randint(1, config.vocab_size, (1, args.context), generator=g)
    unpatch_model(model)
    slow = decode_tokens_per_s(model, prompt, args.new_tokens)
    patch_model(model)
    fast = decode_tokens_per_s(model, prompt, args.new_tokens)
    print(
        f"decode at context {args.context}: transformers {slow:.1f} tok/s, patched {fast:.1f} tok/s "
        f"({fast / slow:.1f}x), {describe_threads(args.threads)}"
    )

    # -- 3. or: our kernel as a transformers attention implementation (naive form) ----------------------
    if args.model == "deepseek_v4":  # no MLA attention: nothing for the attention function to run
        return
    other = model_cls._from_config(config, attn_implementation=ATTN_IMPLEMENTATION).eval()
    other.load_state_dict(model.state_dict())  # the patched model's state dict has the original keys
    with torch.no_grad():
        same = torch.equal(other.generate(**gen), before)
    print(f'attn_implementation="{ATTN_IMPLEMENTATION}" gives the same greedy output:', same)


if __name__ == "__main__":
    main()
