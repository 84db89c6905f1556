"""Memory: peak memory of attention forward+backward, and KV-cache bytes per token.

Peak memory (group ``memory``), naive MLA shape, causal, ``T = S`` long (GPU: 128 heads, T = 8192, bf16;
CPU: 4 heads, T = 1024 with --quick else 2048, float32), one forward+backward per provider:

* CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus the memory
  allocated before the call (inputs and ``dout`` excluded; outputs, saved tensors, workspaces and the
  gradients included).
* CPU: ``tracemalloc`` does not see torch's allocations, so the proxy is the growth of the process's peak
  resident set: ``VmHWM`` (reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``, Linux)
  after the call, minus ``VmRSS`` before it. A lower bound: pages already resident from earlier work can
  be reused without raising the peak. Reported as n/a where ``/proc`` does not allow it.
* computed rows: the minimum a fused kernel needs (``out``, ``lse``, ``dq``, ``dk``, ``dv`` and the
  backward's ``delta``) and the size of one materialised ``B·H·T·S`` score matrix (the math path keeps
  several).

KV cache (group ``kv-cache``), bytes per token over all layers, bf16 (2 bytes per value):

* MLA latent cache: ``L · (kv_lora_rank + qk_rope_head_dim) · 2``;
* expanded multi-head cache (what the naive form materialises): ``L · H · (qk_nope + qk_rope + v) · 2``;
* a GQA cache, ASSUMED for comparison: the same depth ``L`` with 8 KV heads of head dim 128 for K and V
  (``L · 2 · 8 · 128 · 2``), the configuration of common GQA models (Llama-3-70B-style). Whether such a
  model has equal quality is an assumption, not something this benchmark measures.

Computed for the ``deepseek-v3``, ``deepseek-v3.2``, ``glm-5``, ``deepseek-v2-lite`` and ``deepseek-v4-flash``
presets (the DSA ones with their indexer keys), and measured on the ``tiny`` model:
``LatentCache.bytes_per_token()`` and ``PagedLatentCache`` pool bytes per token slot against the bytes of
an expanded K/V cache actually allocated from the same latents (``kv_b_proj``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc

import torch

from bench.env import Env
from bench.guards import after_error, free_memory
from bench.providers import ATTN_PROVIDERS, AttnCase, make_inputs, wrap_mode
from bench.rows import Recorder, Row
from bench.timing import time_limit

MIB = float(1 << 20)
GQA_KV_HEADS, GQA_HEAD_DIM = 8, 128
MEMORY_PROVIDERS = ["ours", "flex", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "reference"]


# ---------------------------------------------------------------------------------------------------
# CPU peak-RSS proxy
# ---------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_bytes(fn) -> int | None:
    """Growth of the peak RSS while ``fn()`` runs, in bytes (None where /proc cannot reset the peak)."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def cuda_peak_bytes(fn, device) -> int:
    """``max_memory_allocated`` during ``fn()`` minus what was allocated before, in bytes."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - before)


# ---------------------------------------------------------------------------------------------------
# Peak memory of forward + backward
# ---------------------------------------------------------------------------------------------------
def memory_cases(env: Env) -> list[AttnCase]:
    """The long-sequence cases of the peak-memory comparison (GPU: T = 8192, and 4096 where the SDPA math
    backend still fits)."""
    if env.smoke:
        Ts, H = [256], 4
    elif env.is_cuda:
        Ts, H = [8192, 4096], 128
    else:
        Ts, H = [1024 if env.quick else 2048], 4
    return [AttnCase("memory", f"naive causal T=S={T} fwd+bwd", B=1, T=T, S=T, Hq=H, Hkv=H, Dk=192, Dv=128,
                     causal=True, scale=192**-0.5, x=T, flex_cpu=True) for T in Ts]


def fused_minimum_bytes(case: AttnCase, elt: int) -> int:
    """Bytes a fused forward+backward must allocate beyond its inputs: out, lse, dq, dk, dv, delta."""
    q = case.B * case.T * case.Hq * case.Dk
    k = case.B * case.S * case.Hkv * case.Dk
    v = 0 if case.v_view else case.B * case.S * case.Hkv * case.Dv
    o = case.B * case.T * case.Hq * case.Dv
    return (o + q + k + v) * elt + 2 * 4 * case.B * case.Hq * case.T


def run_memory(env: Env, rec: Recorder) -> None:
    """Peak memory of one forward+backward per provider, plus the computed reference values."""
    for case in memory_cases(env):
        _run_memory_case(env, rec, case)


def _run_memory_case(env: Env, rec: Recorder, case: AttnCase) -> None:
    base = Row("memory", case.name, "", "fwd+bwd", shape=case.shape_str(), unit="MiB", x=case.T)
    method = ("torch.cuda.max_memory_allocated above the inputs" if env.is_cuda else
              "CPU proxy: peak-RSS growth (VmHWM after /proc/self/clear_refs), a lower bound")
    rec.add(dataclasses.replace(base, provider="computed: fused minimum (out, lse, dq, dk, dv, delta)",
                                value=fused_minimum_bytes(case, env.elt) / MIB, note="formula, not measured"))
    score = case.B * case.Hq * case.T * case.S * env.elt
    rec.add(dataclasses.replace(base, provider=f"computed: one B·H·T·S score matrix ({env.dtype_name})",
                                value=score / MIB, note="formula; the math path keeps several (scores, probs, grads)"))
    reason = env.skip_reason()
    if reason:
        rec.add_all(base, MEMORY_PROVIDERS, "skip", reason)
        return
    try:
        inp = make_inputs(case, env, seed=0)
    except Exception as e:  # noqa: BLE001
        rec.add_all(base, MEMORY_PROVIDERS, "error", "could not allocate inputs: " + after_error(env, e))
        return
    env.extra["reference_limit"] = 1e10  # one call only: the reference is measured at the long length too
    for p in MEMORY_PROVIDERS:
        row = dataclasses.replace(base, provider=p)
        if rec.skipped(row):
            continue
        try:
            with time_limit(env.case_timeout):
                res = ATTN_PROVIDERS[p](case, inp, "fwd+bwd", env)
                if isinstance(res, str):
                    rec.add(dataclasses.replace(row, status="skip", note=res))
                    continue
                fn, note = res if isinstance(res, tuple) else (res, "")
                step = wrap_mode(fn, inp, "fwd+bwd")
                step()  # warm-up: compilation, autotuning, workspaces
                if env.is_cuda:
                    peak = cuda_peak_bytes(step, env.device)
                else:
                    peak = cpu_peak_bytes(step)
            if peak is None:
                rec.add(dataclasses.replace(row, status="skip", note="n/a on this CPU: /proc/self/clear_refs "
                                            "is not writable, and tracemalloc does not see torch's allocations"))
                continue
            rec.add(dataclasses.replace(row, value=peak / MIB, note="; ".join(s for s in (note, method) if s)))
        except Exception as e:  # noqa: BLE001
            rec.add(dataclasses.replace(row, status="error", note=after_error(env, e)))
        free_memory(env)
    env.extra.pop("reference_limit", None)
    del inp
    free_memory(env)


# ---------------------------------------------------------------------------------------------------
# KV-cache bytes per token
# ---------------------------------------------------------------------------------------------------
def kv_bytes_per_token(cfg, elt: int = 2) -> dict[str, int]:
    """Bytes per token over all layers: MLA latent, expanded multi-head, assumed GQA (8 × 128)."""
    L = cfg.num_hidden_layers
    return {
        "mla": L * cfg.cache_values_per_token * elt,
        "expanded": L * cfg.expanded_cache_values_per_token * elt,
        "gqa": L * 2 * GQA_KV_HEADS * GQA_HEAD_DIM * elt,
    }


#: Presets with DeepSeek Sparse Attention: their cache also holds the indexer's keys.
DSA_PRESETS = ("deepseek-v3.2", "glm-5")


def run_kv_cache(env: Env, rec: Recorder) -> None:
    """KV-cache bytes per token: computed for the DeepSeek presets, measured on the tiny model."""
    from mla.config import PRESETS

    for name in ("deepseek-v3", "deepseek-v3.2", "glm-5", "deepseek-v2-lite", "deepseek-v4-flash"):
        cfg = PRESETS[name]()
        b = kv_bytes_per_token(cfg, 2)
        L, H = cfg.num_hidden_layers, cfg.num_attention_heads
        shape = (f"{name}: L={L} H={H} dc={cfg.kv_lora_rank} dr={cfg.qk_rope_head_dim} dn={cfg.qk_nope_head_dim} "
                 f"dv={cfg.v_head_dim}")
        base = Row("kv-cache", f"{name} (computed)", "", "-", shape=shape, dtype="bfloat16", unit="B/token")
        rec.add(dataclasses.replace(base, provider="MLA latent cache (c_kv + k_rope)", value=b["mla"],
                                    note=f"{L} layers x ({cfg.kv_lora_rank}+{cfg.qk_rope_head_dim}) values x 2 B"))
        rec.add(dataclasses.replace(
            base, provider="expanded multi-head K/V", value=b["expanded"],
            note=f"{L} x {H} heads x ({cfg.qk_head_dim}+{cfg.v_head_dim}) x 2 B; {b['expanded'] / b['mla']:.1f}x MLA"))
        if name in DSA_PRESETS:  # the lightning indexer caches one key per token and layer too
            idx = L * cfg.index_head_dim * 2
            rec.add(dataclasses.replace(
                base, provider="DSA indexer keys (k_idx, bf16)", value=idx,
                note=f"{L} layers x {cfg.index_head_dim} values x 2 B; latent + indexer {b['mla'] + idx:,} B, "
                     f"{b['expanded'] / (b['mla'] + idx):.1f}x smaller than expanded"))
        rec.add(dataclasses.replace(
            base, provider=f"GQA {GQA_KV_HEADS} kv heads x {GQA_HEAD_DIM} (assumed)", value=b["gqa"],
            note=(f"ASSUMPTION: same depth, {GQA_KV_HEADS} KV heads of dim {GQA_HEAD_DIM} (K and V), as in common "
                  f"GQA models; {b['gqa'] / b['mla']:.2f}x MLA")))
    # measured on the tiny model
    base = Row("kv-cache", "tiny (measured)", "", "-", unit="B/token")
    reason = env.skip_reason()
    if reason:
        rec.add(dataclasses.replace(base, provider="measured", status="skip", note=reason))
        return
    try:
        with time_limit(env.case_timeout), torch.no_grad():
            from mla.block import MLACausalLM

            cfg = PRESETS["tiny"]()
            torch.manual_seed(0)
            dt = env.dtype
            model = MLACausalLM(cfg).to(device=env.device, dtype=dt).eval()
            B, T = 2, 64
            elt = torch.empty((), dtype=dt).element_size()
            shape = (f"tiny: L={cfg.num_hidden_layers} H={cfg.num_attention_heads} dc={cfg.kv_lora_rank} "
                     f"dr={cfg.qk_rope_head_dim} dn={cfg.qk_nope_head_dim} dv={cfg.v_head_dim}; B={B} T={T}")
            base = dataclasses.replace(base, shape=shape, dtype=env.dtype_name)
            prompt = torch.randint(0, cfg.vocab_size, (B, T), device=env.device)
            cache = model.new_cache()
            model(prompt, cache=cache)
            latent = cache.bytes_per_token()
            paged = model.new_paged_cache(B, T, page_size=16)
            pool = sum(paged.kv_cache(i).numel() * paged.kv_cache(i).element_size()
                       for i in range(cfg.num_hidden_layers))
            slots = paged.num_pages * paged.page_size
            expanded = 0
            dc, dn, dr, dv, H = (cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                 cfg.num_attention_heads)
            for i, layer in enumerate(model.layers):
                rows = cache.update(i, torch.zeros(B, 0, cfg.cache_values_per_token, device=env.device, dtype=dt))
                S = rows.shape[1]
                kv = layer.self_attn.kv_b_proj(rows[..., :dc]).view(B, S, H, dn + dv)
                k = torch.cat([kv[..., :dn], rows[:, :, None, dc:].expand(B, S, H, dr)], dim=-1).contiguous()
                v = kv[..., dn:].contiguous()
                expanded += k.numel() * k.element_size() + v.numel() * v.element_size()
            expanded_bpt = expanded / (B * S)
            computed = kv_bytes_per_token(cfg, elt)
        rec.add(dataclasses.replace(base, provider="LatentCache.bytes_per_token()", value=latent,
                                    note=f"computed {computed['mla']}"))
        rec.add(dataclasses.replace(base, provider="PagedLatentCache pool bytes / token slots", value=pool / slots,
                                    note=f"bytes_per_token() = {paged.bytes_per_token()}; {paged.num_pages} pages "
                                         f"of {paged.page_size}"))
        rec.add(dataclasses.replace(base, provider="expanded K/V allocated from the latents", value=expanded_bpt,
                                    note=f"computed {computed['expanded']}; {expanded_bpt / max(latent, 1):.1f}x "
                                         f"the latent cache"))
        del model, cache, paged
    except Exception as e:  # noqa: BLE001
        rec.add(dataclasses.replace(base, provider="measured", status="error", note=after_error(env, e)))
    free_memory(env)
