"""Kernel benchmarks: dense forward/backward, block-sparse time vs density, top-k time vs K.

Shapes (GPU suite, bf16, B = 1):

* dense, naive MLA shape: ``Hq = Hkv = 128, Dk = 192, Dv = 128``; absorbed shape: ``Hq = 128, Hkv = 1,
  Dk = 576, Dv = 512, v = k[..., :512]``; causal ``T = S`` in {8192, 1024, 4096} (in this order: the target
  size, then the size where the reference runs, before any time budget runs out); fwd, bwd, fwd+bwd;
  providers ours, flex, every SDPA backend, reference (smallest size only).
* block-sparse: naive shape at ``T = S = 8192``, ``BLOCK_SIZE = 128``: random block patterns of density
  0.1 … 0.9 (non-causal) and causal sliding windows, next to the dense kernel and FlexAttention with the
  same mask.
* top-k: absorbed shape, the last ``T = 4096`` queries of ``S`` in {8192, 32768} keys, ``K`` in
  {256, 1024, 2048} random causal key indices per query, next to dense causal attention over the same keys.
* packed: naive shape, causal documents of mixed lengths (GPU: 16 documents, 32k tokens, the longest
  8k) packed in one row: ``latent_attention_varlen`` (ours and the per-sequence reference) next to the
  same documents as a right-padded batch ``[D, max_len]`` through dense causal ``latent_attention``.

The CPU suite runs the same cases with fewer heads and short sequences (float32). Scale: ``192 ** -0.5``
(DeepSeek's ``(qk_nope + qk_rope) ** -0.5``) for both shapes.
"""

from __future__ import annotations

import math

import torch

from bench.env import Env
from bench.guards import after_error
from bench.providers import CPU_TRITON_REASON, AttnCase, interpreter_allowed, run_attention_case
from bench.rows import Recorder, Row, timed_row
from bench.timing import time_fns, time_limit
from bench.work import causal_pairs

MLA_SCALE = 192**-0.5
DENSE_PROVIDERS = ["ours", "flex", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "reference"]


# ---------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------
def naive_shape(env: Env) -> dict:
    """Naive (expanded) MLA head shape: 128 heads of Dk = 192 (128 nope + 64 rope), Dv = 128 (fewer heads on CPU)."""
    H = 128 if env.is_cuda and not env.smoke else (4 if (env.quick or env.smoke) else 8)
    return dict(B=1, Hq=H, Hkv=H, Dk=192, Dv=128, v_view=False, scale=MLA_SCALE)


def absorbed_shape(env: Env) -> dict:
    """Absorbed MLA shape: 128 query heads over one latent kv head, Dk = 512 + 64, v = k[..., :512]."""
    H = 128 if env.is_cuda and not env.smoke else (8 if (env.quick or env.smoke) else 16)
    return dict(B=1, Hq=H, Hkv=1, Dk=576, Dv=512, v_view=True, scale=MLA_SCALE)


def dense_lengths(env: Env) -> list[int]:
    """Sequence lengths T = S of the dense cases in run order: the target size first, then the smallest
    (where the reference runs: the correctness cross-check), then the rest."""
    if env.smoke:
        return [256, 128]
    if env.is_cuda:
        return [8192, 1024] if env.quick else [8192, 1024, 4096]
    return [256] if env.quick else [1024, 256]


# ---------------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------------
def dense_cases(env: Env) -> list[AttnCase]:
    """Dense causal cases: both MLA shapes at every length of ``dense_lengths``."""
    cases = []
    lengths = dense_lengths(env)
    for T in lengths:
        for label, shp in (("naive", naive_shape(env)), ("absorbed", absorbed_shape(env))):
            cases.append(AttnCase("dense", f"{label} causal T=S={T}", T=T, S=T, causal=True, x=T,
                                  flex_cpu=(label == "naive" and T == min(lengths)), **shp))
    return cases


def run_dense(env: Env, rec: Recorder) -> None:
    """Dense forward / backward / forward+backward of every dense case against all peers."""
    providers = DENSE_PROVIDERS + ([] if env.is_cuda else ["reference-chunked"])  # the fallback's two CPU paths
    for case in dense_cases(env):
        run_attention_case(env, rec, case, providers, ["fwd", "bwd", "fwd+bwd"])


FALLBACK_LENGTHS = (256, 2048, 8192)


def run_fallback(env: Env, rec: Recorder) -> None:
    """The CPU fallback (``backend="reference"``: torch's fused flash-attention CPU kernel where exact) against
    the chunked path it replaces and SDPA's math backend: naive MLA shape, causal ``T = S`` in
    ``FALLBACK_LENGTHS`` (``--quick``: 256 and 2k); fwd and fwd+bwd up to 256 (``--quick``) or 2k, forward
    only above. Timed on at least one run after the warm-up (not three), with at least 300 s per
    measurement: a chunked 8k forward takes 10–20 s on one core. CPU suite only."""
    if env.is_cuda:
        rec.add(Row("fallback", "(whole group)", "-", status="skip",
                    note="CPU suite only: on CUDA the fused Triton kernels run, not the CPU fallback"))
        return
    saved, saved_timeout = dict(env.extra), env.case_timeout
    env.extra.update(reference_limit=float("inf"), min_samples=1)
    env.case_timeout = max(env.case_timeout or 0, 300.0)
    try:
        for T in FALLBACK_LENGTHS[:2] if env.quick else FALLBACK_LENGTHS:
            case = AttnCase("fallback", f"naive causal T=S={T}", T=T, S=T, causal=True, x=T, **naive_shape(env))
            long = T >= 8192  # sdpa-math would hold several [H, T, T] fp32 score tensors (GBs)
            both = T <= (256 if env.quick else 2048)
            run_attention_case(env, rec, case, ["reference", "reference-chunked"] + ([] if long else ["sdpa-math"]),
                               ["fwd", "fwd+bwd"] if both else ["fwd"])
    finally:
        env.extra.clear()
        env.extra.update(saved)
        env.case_timeout = saved_timeout


# ---------------------------------------------------------------------------------------------------
# Block-sparse
# ---------------------------------------------------------------------------------------------------
def random_block_grid(nq: int, nk: int, density: float, seed: int, device) -> torch.Tensor:
    """Bool ``[nq, nk]`` grid with each block kept with probability ``density`` (at least one per row)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    grid = torch.rand(nq, nk, generator=g) < density
    grid[torch.arange(nq), torch.randint(0, nk, (nq,), generator=g)] = True
    return grid.to(device)


def sparse_plan(env: Env) -> dict:
    """Sizes of the block-sparse sweep for this suite."""
    if env.smoke:
        return dict(T=512, block=64, densities=[0.25, 0.75], windows=[128], modes=["fwd", "fwd+bwd"])
    if env.is_cuda:
        if env.quick:
            return dict(T=8192, block=128, densities=[0.1, 0.5, 0.9], windows=[128, 1024], modes=["fwd"])
        dens = [0.1, 0.2, 0.3, 0.5, 0.7, 0.9] if env.full else [0.1, 0.3, 0.5, 0.7, 0.9]
        wins = [128, 512, 1024, 2048, 4096] if env.full else [128, 512, 2048]
        return dict(T=8192, block=128, densities=dens, windows=wins, modes=["fwd", "fwd+bwd"] if env.full else ["fwd"])
    if env.quick:
        return dict(T=512, block=64, densities=[0.25, 0.5, 0.75], windows=[128], modes=["fwd"])
    return dict(T=1024, block=64, densities=[0.1, 0.3, 0.5, 0.7, 0.9], windows=[128, 256, 512],
                modes=["fwd", "fwd+bwd"])


def sparse_cases(env: Env) -> list[AttnCase]:
    """Random block patterns (non-causal) and causal sliding windows, each family with its dense case."""
    from mla.sparsity import BlockMask, sliding_window_block_mask

    plan = sparse_plan(env)
    T, bs = plan["T"], plan["block"]
    shp = naive_shape(env)
    n = math.ceil(T / bs)
    cases = [AttnCase("sparse", f"dense (no mask) T=S={T}", T=T, S=T, causal=False, x=1.0,
                      label="reference point for the random patterns", **shp)]
    for i, d in enumerate(plan["densities"]):
        bm = BlockMask.from_dense(random_block_grid(n, n, d, seed=100 + i, device=env.device), bs, (T, T))
        c = AttnCase("sparse", f"random blocks p={d:g} T=S={T}", T=T, S=T, causal=False, block_mask=bm,
                     **shp)
        dens = c.pairs() / (c.B * c.Hq * T * T)
        c.x, c.label = dens, f"BLOCK_SIZE={bs} density={dens:.3f}"
        c.flex_cpu = i == len(plan["densities"]) // 2
        cases.append(c)
    cases.append(AttnCase("sparse", f"dense causal T=S={T}", T=T, S=T, causal=True,
                          x=causal_pairs(T, T) / (T * T), label="reference point for the windows", **shp))
    for w in plan["windows"]:
        bm = sliding_window_block_mask(T, T, w, bs, device=env.device)
        c = AttnCase("sparse", f"sliding window {w} T=S={T}", T=T, S=T, causal=True, block_mask=bm, **shp)
        dens = c.pairs() / (c.B * c.Hq * T * T)
        c.x, c.label = dens, f"BLOCK_SIZE={bs} density={dens:.3f}"
        cases.append(c)
        # The same window per token in the dense kernels (window_size: exact, no block rounding).
        c = AttnCase("sparse", f"dense window_size=({w - 1}, 0) T=S={T}", T=T, S=T, causal=True,
                     window_size=(w - 1, 0), **shp)
        dens = c.pairs() / (c.B * c.Hq * T * T)
        c.x, c.label = dens, f"per-token window density={dens:.3f}"
        cases.append(c)
    return cases


def run_sparse(env: Env, rec: Recorder) -> None:
    """Block-sparse sweep: ours (block_mask, backend="triton") and FlexAttention with the same mask,
    reference where small enough; the dense cases use the same providers without a mask."""
    plan = sparse_plan(env)
    for case in sparse_cases(env):
        run_attention_case(env, rec, case, ["ours", "flex", "reference"], plan["modes"])


# ---------------------------------------------------------------------------------------------------
# Top-k
# ---------------------------------------------------------------------------------------------------
def random_topk_indices(B: int, T: int, S: int, Hkv: int, K: int, causal: bool, seed: int, device) -> torch.Tensor:
    """int32 ``[B, T, Hkv, K]``: per query ``K`` distinct random keys among the visible ones (bottom-right
    causal), ascending; ``-1`` lanes when fewer than ``K`` keys are visible."""
    g = torch.Generator(device=device).manual_seed(seed)
    K = min(K, S)
    out = torch.empty(B, T, Hkv, K, dtype=torch.int32, device=device)
    chunk = max(1, (1 << 25) // max(1, B * Hkv * S))
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        r = torch.rand(B, t1 - t0, Hkv, S, generator=g, device=device)
        if causal:
            lim = torch.arange(t0, t1, device=device) + (S - T)
            hide = torch.arange(S, device=device)[None, :] > lim[:, None]  # [chunk, S]
            r.masked_fill_(hide[None, :, None, :], -1.0)
        vals, idx = r.topk(K, dim=-1)
        idx = torch.where(vals < 0, torch.full_like(idx, -1), idx)
        out[:, t0:t1] = torch.sort(idx, dim=-1).values.to(torch.int32)
    return out


def topk_plan(env: Env) -> dict:
    """Sizes of the top-k sweep for this suite."""
    if env.smoke:
        return dict(T=64, S=[256], K=[16, 64], modes=["fwd", "fwd+bwd"])
    if env.is_cuda:
        if env.quick:
            return dict(T=4096, S=[32768], K=[256, 2048], modes=["fwd"])
        return dict(T=4096, S=[8192, 32768], K=[256, 1024, 2048],
                    modes=["fwd", "fwd+bwd"] if env.full else ["fwd"])
    if env.quick:
        return dict(T=128, S=[512], K=[32, 128], modes=["fwd"])
    return dict(T=256, S=[512, 2048], K=[32, 128, 256], modes=["fwd", "fwd+bwd"])


def run_topk(env: Env, rec: Recorder) -> None:
    """Top-k sweep (absorbed shape, Hkv = 1): ours (topk_indices, backend="triton") and the reference,
    next to dense causal attention over all ``S`` keys (ours and reference)."""
    plan = topk_plan(env)
    shp = absorbed_shape(env)
    T = plan["T"]
    for S in plan["S"]:
        dense = AttnCase("topk", f"dense causal (all keys) T={T} S={S}", T=T, S=S, causal=True, x=None,
                         label="reference point: every visible key", **shp)
        run_attention_case(env, rec, dense, ["ours", "reference"], plan["modes"])
        for K in plan["K"]:
            reason = env.skip_reason()
            idx = None
            if not reason:
                try:
                    idx = random_topk_indices(shp["B"], T, S, shp["Hkv"], K, True, seed=K, device=env.device)
                except Exception as e:  # noqa: BLE001
                    reason = "could not build indices: " + after_error(env, e)
            case = AttnCase("topk", f"top-k K={K} T={T} S={S}", T=T, S=S, causal=True, topk=idx, x=K,
                            label=f"K={K}", **shp)
            if idx is None:
                for p in ("ours", "flex", "reference"):
                    for m in plan["modes"]:
                        rec.add(Row("topk", case.name, p, m, shape=case.shape_str(), x=K, status="skip", note=reason))
                continue
            run_attention_case(env, rec, case, ["ours", "flex", "reference"], plan["modes"])
            del idx, case


# ---------------------------------------------------------------------------------------------------
# Packed documents (varlen)
# ---------------------------------------------------------------------------------------------------
def packed_lengths(env: Env) -> list[int]:
    """Document lengths of the packed case (fixed, mixed: one long document and many short ones)."""
    if env.smoke:
        return [9, 1, 17, 0, 5]
    if env.is_cuda:
        return [8192, 512, 4096, 128, 1024, 3000, 700, 1600, 2500, 876, 4000, 300, 2048, 1100, 333, 1359]
    return [128, 17, 90, 40] if env.quick else [512, 64, 300, 900, 200, 31, 441]


def run_packed(env: Env, rec: Recorder) -> None:
    """Packed causal documents: varlen (ours, reference) vs the right-padded batch (ours, reference).

    FLOPs count the causal pairs of the real documents only (``4 · pairs · (Dk + Dv) / 2`` per head for
    the forward; ×3.5 for fwd+bwd, as the dense cases), so the padded batch's wasted work shows as a
    lower TFLOP/s. The padded rows' outputs are discarded; the varlen output is checked against the
    padded one."""
    from mla import latent_attention, latent_attention_varlen

    shp = naive_shape(env)
    lens = packed_lengths(env)
    D, L, total = len(lens), max(lens), sum(lens)
    H, Dk, Dv = shp["Hq"], shp["Dk"], shp["Dv"]
    case = f"{D} causal documents, {total} tokens, longest {L}"
    shape = f"docs={D} total={total} max={L} H={H} Dk={Dk} Dv={Dv}"
    pairs = sum(n * (n + 1) // 2 for n in lens)
    fwd_flops = 2.0 * pairs * H * (Dk + Dv)
    pad_note = f"padded batch: {D * L} rows, {100 * (1 - total / (D * L)):.0f}% padding"
    ours = env.is_cuda or interpreter_allowed(env)
    providers = [("ours-varlen", "triton"), ("ours-padded", "triton"), ("reference-varlen", "reference"),
                 ("reference-padded", "reference")]
    modes = ["fwd", "fwd+bwd"]
    reason = env.skip_reason()
    if not reason:
        try:
            g = torch.Generator().manual_seed(0)
            dev, dt = env.device, env.dtype
            q = torch.randn(total, H, Dk, generator=g).to(dev, dt)
            k = torch.randn(total, H, Dk, generator=g).to(dev, dt)
            v = torch.randn(total, H, Dv, generator=g).to(dev, dt)
            cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
            pad = [torch.zeros(D, L, H, t.shape[-1], dtype=dt, device=dev) for t in (q, k, v)]
            for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
                for dst, src in zip(pad, (q, k, v)):
                    dst[i, : b - a] = src[a:b]
        except Exception as e:  # noqa: BLE001
            reason = "could not allocate inputs: " + after_error(env, e)
    baseline = None
    for name, backend in providers:
        for mode in modes:
            row = Row("packed", case, name, mode, shape=shape, x=total)
            why = reason or ("" if backend == "reference" or ours else CPU_TRITON_REASON)
            if backend == "triton" and not env.is_cuda and mode != "fwd":
                why = why or "interpreter (--smoke): forward only, a backward runs past the case limit"
            if backend == "reference" and env.is_cuda and total > 16384:
                why = why or "reference: too slow at this size on GPU (the varlen kernels are checked in tests)"
            if why:
                rec.add(Row("packed", case, name, mode, shape=shape, x=total, status="skip", note=why))
                continue
            varlen = name.endswith("varlen")
            ins = [t.detach().requires_grad_(mode != "fwd") for t in ((q, k, v) if varlen else pad)]

            def call(ins=ins, varlen=varlen, backend=backend):
                if varlen:
                    return latent_attention_varlen(*ins, cu, cu, L, L, causal=True, softmax_scale=shp["scale"],
                                                   backend=backend)
                return latent_attention(*ins, causal=True, softmax_scale=shp["scale"], backend=backend)

            def fwd_bwd(call=call, ins=ins):
                call().sum().backward()
                for t in ins:
                    t.grad = None

            try:
                with time_limit(env.case_timeout):
                    note = pad_note if not varlen else ""
                    if mode == "fwd":
                        with torch.no_grad():
                            out = call()
                        out = out if varlen else torch.cat([out[i, :n] for i, n in enumerate(lens)])
                        if baseline is None:
                            baseline = out.float()
                        else:
                            err = float((out.float() - baseline).norm() / baseline.norm().clamp_min(1e-30))
                            note = "; ".join(s for s in (note, f"rel.err {err:.1e} vs {providers[0][0]}") if s)
                        del out
                        t = time_fns(env, [lambda: call()])
                    else:
                        t = time_fns(env, [fwd_bwd])
                r = timed_row(row, t, fwd_flops * (1.0 if mode == "fwd" else 3.5))
                r.note = note
                rec.add(r)
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                rec.add(Row("packed", case, name, mode, shape=shape, x=total, status="error", note=after_error(env, e)))
