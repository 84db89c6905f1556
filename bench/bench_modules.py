"""Module benchmarks: ``MultiHeadLatentAttention`` naive vs absorbed, transformers' eager MLA, and
``LatentSparseAttention`` (block and top-k modes), forward and forward+backward, same weights.

GPU: DeepSeek-V3 attention sizes (hidden 7168, 128 heads, q_lora 1536, kv_lora 512, 128 + 64 qk dims,
v 128) with plain RoPE, ``B = 1``, ``T = 2048``, bf16. CPU: the ``tiny`` preset, ``B = 2``, ``T = 64``
(``--quick``) or 128, float32. Whole-module time (projections + RoPE + attention + output projection);
no TFLOP/s is given for these rows. Outputs of every variant are compared with the naive form.
"""

from __future__ import annotations

import dataclasses

import torch

from bench.env import Env
from bench.guards import after_error, force_reference, free_memory, rel_err, to_device_dtype, tolerance
from bench.rows import Recorder, Row, timed_row
from bench.timing import CaseTimeout, time_fns, time_limit

DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def module_plan(env: Env):
    """``(config, B, T)`` of the module benchmark."""
    from mla.config import PRESETS

    if env.is_cuda and not env.smoke:
        cfg = PRESETS["deepseek-v3"]().replace(rope_parameters=dict(DEFAULT_ROPE), num_hidden_layers=1,
                                               index_topk=512, max_position_embeddings=8192)
        return cfg, 1, (1024 if env.quick else 2048)
    cfg = PRESETS["tiny"]().replace(index_topk=32)
    return cfg, 2, (64 if (env.quick or env.smoke) else 128)


def hf_eager_attention(cfg, base, env: Env, T: int):
    """transformers' ``DeepseekV3Attention`` (eager) with ``base``'s weights, and a function running it.

    Returns ``(module, run(x) -> out, note)`` or a reason string.
    """
    try:
        import transformers
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
    except Exception as e:  # noqa: BLE001 - optional dependency, any import failure is a reason
        return f"n/a: transformers' DeepseekV3 does not import ({type(e).__name__}: {e})"
    hcfg = transformers.DeepseekV3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=1, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=10000.0, rope_parameters=dict(DEFAULT_ROPE), rope_interleave=cfg.rope_interleave,
        attention_bias=cfg.attention_bias, max_position_embeddings=max(T, cfg.max_position_embeddings),
        rms_norm_eps=cfg.rms_norm_eps,
    )
    hcfg._attn_implementation = "eager"
    attn = hf.DeepseekV3Attention(hcfg, layer_idx=0)
    res = attn.load_state_dict(base.state_dict(), strict=False)
    attn = to_device_dtype(attn, env.device, env.dtype)
    if res.missing_keys:
        return f"n/a: weights do not map onto transformers' module (missing {res.missing_keys[:4]})"
    rot = to_device_dtype(hf.DeepseekV3RotaryEmbedding(hcfg), env.device, torch.float32)
    pos = torch.arange(T, device=env.device)[None]
    mask = torch.full((T, T), float("-inf"), device=env.device, dtype=env.dtype).triu(1)[None, None]

    def run(x):
        cos, sin = rot(x, pos)
        return attn(x, position_embeddings=(cos, sin), attention_mask=mask)[0]

    return attn, run, f"transformers {transformers.__version__} eager"


def run_modules(env: Env, rec: Recorder) -> None:
    """Forward and forward+backward of each MLA module variant on the same input and weights."""
    from mla.attention import LatentSparseAttention, MultiHeadLatentAttention

    cfg, B, T = module_plan(env)
    shape = (f"B={B} T={T} E={cfg.hidden_size} H={cfg.num_attention_heads} q_lora={cfg.q_lora_rank} "
             f"dc={cfg.kv_lora_rank} dn={cfg.qk_nope_head_dim} dr={cfg.qk_rope_head_dim} dv={cfg.v_head_dim}")
    variants = ["MLA naive", "MLA absorbed", "HF DeepseekV3Attention eager", "LatentSparseAttention block",
                "LatentSparseAttention topk"]
    modes = ["fwd", "fwd+bwd"]
    base = Row("module", f"causal T={T}", "", shape=shape, x=T)
    reason = env.skip_reason()
    if reason:
        rec.add_all(base, variants, "skip", reason, modes)
        return
    try:
        torch.manual_seed(0)
        mla = to_device_dtype(MultiHeadLatentAttention(cfg), env.device, env.dtype)
        g = torch.Generator(device=env.device).manual_seed(5)
        x = torch.randn(B, T, cfg.hidden_size, device=env.device, dtype=env.dtype, generator=g).requires_grad_()
        dout = torch.randn(B, T, cfg.hidden_size, device=env.device, dtype=env.dtype, generator=g)
    except Exception as e:  # noqa: BLE001
        note = after_error(env, e)
        for v in variants:
            for m in modes:
                rec.add(dataclasses.replace(base, provider=v, mode=m, status="error", note=note))
        return

    def build(name):
        """(module, run(x) -> out, note) or a reason."""
        if name == "MLA naive":
            return mla, lambda inp: mla(inp, form="naive")[0], ""
        if name == "MLA absorbed":
            return mla, lambda inp: mla(inp, form="absorbed")[0], ""
        if name.startswith("HF"):
            return hf_eager_attention(cfg, mla, env, T)
        mode = name.rsplit(" ", 1)[1]
        sparse = LatentSparseAttention(cfg, mode=mode)
        sparse.load_state_dict(mla.state_dict(), strict=False)
        sparse = to_device_dtype(sparse, env.device, env.dtype)
        note = (f"sink {cfg.num_sink_blocks} + local {cfg.num_local_blocks} + top {cfg.topk_blocks} blocks of "
                f"{cfg.sparse_block_size}" if mode == "block" else f"indexer top-{cfg.index_topk} tokens")
        return sparse, lambda inp: sparse(inp)[0], note

    state = {"baseline": None}

    def measure(name, module, run, m):
        """Time one (variant, mode); returns (timing, check note, backend note)."""
        check = backend = ""
        if m == "fwd":
            out = run(x)
            if state["baseline"] is None:
                state["baseline"] = out.detach()
            else:
                err = rel_err(out, state["baseline"])
                tag = "MISMATCH " if err > 5 * tolerance(env.dtype) else ""
                check = f"{tag}rel.err {err:.1e} vs MLA naive"
                if name.startswith("LatentSparse"):
                    check = f"sparse: differs from dense by design (rel. diff {err:.1e})"
            del out
            try:  # which attention path ran (our modules report it in their stats)
                if hasattr(module, "form"):
                    res = module(x.detach())
                    if isinstance(res, tuple) and len(res) > 1 and hasattr(res[1], "backend"):
                        backend = f"attention backend: {res[1].backend}"
            except Exception:  # noqa: BLE001 - informative only
                pass
            fn = lambda: run(x)  # noqa: E731
        else:
            leaves = [x, *[p for p in module.parameters() if p.requires_grad]]
            fn = lambda: torch.autograd.grad(run(x), leaves, dout, allow_unused=True)  # noqa: E731
        return time_fns(env, [fn]), check, backend

    for name in variants:
        built = None
        for m in modes:
            row = dataclasses.replace(base, provider=name, mode=m)
            if rec.skipped(row):
                continue
            try:
                with time_limit(env.case_timeout):
                    if built is None:
                        built = build(name)
                    if isinstance(built, str):
                        rec.add(dataclasses.replace(row, status="skip", note=built))
                        continue
                    module, run, note = built
                    try:
                        t, check, backend = measure(name, module, run, m)
                    except CaseTimeout:
                        raise
                    except Exception as e:  # noqa: BLE001 - the kernels failed: retry on the reference path
                        why = after_error(env, e)
                        if env.cuda_broken or not force_reference(module):
                            raise
                        note = "; ".join(s for s in (note, f"backend auto failed ({why[:200]}); fell back to "
                                                           "backend='reference'") if s)
                        built = (module, run, note)
                        t, check, backend = measure(name, module, run, m)
                r = timed_row(row, t)
                r.status = "mismatch" if check.startswith("MISMATCH") else "ok"
                r.note = "; ".join(s for s in (note, backend, check) if s)
                rec.add(r)
            except Exception as e:  # noqa: BLE001
                rec.add(dataclasses.replace(row, status="error", note=after_error(env, e)))
        built = None
    free_memory(env)
