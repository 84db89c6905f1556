"""Attention implementations under test ("providers") and the attention-case runner.

A provider is a function ``(case, inputs, mode, env) -> callable | (callable, note) | str``: the callable
runs one forward on prepared inputs and returns the output ``[B, T, Hq, Dv]`` (any strides), a string is
the reason the provider cannot run the case (recorded as a ``skip`` row). Providers:

* ``ours``: ``mla.latent_attention(..., backend="triton")`` — the fused kernels (CUDA only here).
* ``reference``: ``latent_attention(..., backend="reference")`` — the CPU fallback as users get it: torch's
  fused flash-attention CPU kernel where it computes our function exactly, else the chunked path.
* ``reference-chunked``: ``mla.reference.attention_reference(..., fused_cpu=False)`` — always the chunked
  pure-PyTorch path (the oracle).
* ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``: ``scaled_dot_product_attention``
  restricted to one backend with ``torch.nn.attention.sdpa_kernel``; a backend that rejects the shape
  is reported with the warning torch gives for it.
* ``flex``: ``torch.nn.attention.flex_attention`` (``torch.compile``d on CUDA, eager on CPU), with the
  same block mask as ours converted through ``BlockMask.from_kv_blocks`` (full blocks separated from
  partial diagonal blocks, as ``create_block_mask`` would).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.env import Env, rotation_sets
from bench.guards import after_error, free_memory, rel_err, tolerance
from bench.rows import Recorder, Row, timed_row
from bench.timing import time_fns, time_limit
from bench.work import attention_bytes, attention_flops, block_mask_pairs, topk_pairs, visible_pairs

CPU_TRITON_REASON = (
    "n/a on CPU: the fused Triton kernels need a CUDA GPU (the Triton interpreter is a correctness tool, "
    "far too slow to time)"
)


# ---------------------------------------------------------------------------------------------------
# Cases and inputs
# ---------------------------------------------------------------------------------------------------
@dataclass
class AttnCase:
    """One attention problem. Layout B, T, H, D (DESIGN §3).

    v_view: ``v = k[..., :Dv]`` (absorbed MLA). block_mask: ``mla.sparsity.BlockMask`` or None.
    topk: int32 ``[B, T, Hkv, K]`` or None. x: plot axis value. label: shown after the shape.
    flex_cpu: run eager FlexAttention on CPU for this case even with --quick.
    window_size: FlashAttention ``(left, right)`` sliding window per token (``(-1, -1)``: none).
    """

    group: str
    name: str
    B: int
    T: int
    S: int
    Hq: int
    Hkv: int
    Dk: int
    Dv: int
    causal: bool = True
    v_view: bool = False
    scale: float | None = None
    block_mask: object = None
    topk: torch.Tensor | None = None
    x: float | None = None
    label: str = ""
    flex_cpu: bool = False
    window_size: tuple[int, int] = (-1, -1)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.Dk**-0.5

    def shape_str(self) -> str:
        s = (f"B={self.B} T={self.T} S={self.S} Hq={self.Hq} Hkv={self.Hkv} Dk={self.Dk} Dv={self.Dv}"
             + (" causal" if self.causal else "") + (" v=k[..., :Dv]" if self.v_view else ""))
        return s + (f" {self.label}" if self.label else "")

    def pairs(self) -> float:
        """(query, key) pairs computed, summed over batch and query heads."""
        if self.topk is not None:
            return float(topk_pairs(self.topk, self.S, self.causal, self.Hq))
        if self.block_mask is not None:
            return block_mask_pairs(self.block_mask, self.causal) * self.B * self.Hq
        if self.window_size != (-1, -1):
            return window_pairs(self.T, self.S, self.window_size, self.causal) * self.B * self.Hq
        return float(visible_pairs(self.T, self.S, self.causal) * self.B * self.Hq)

    def flops(self, mode: str) -> float:
        return attention_flops(self.pairs(), self.Dk, self.Dv, mode)

    def nbytes(self, mode: str, elt: int) -> float:
        return attention_bytes(self.B, self.T, self.S, self.Hq, self.Hkv, self.Dk, self.Dv, elt, mode, self.v_view)


@dataclass
class AttnInputs:
    """q, k, v (leaf tensors requiring grad; ``v`` may be a view of ``k``), the leaves to differentiate
    and a random output gradient ``dout``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    leaves: tuple
    dout: torch.Tensor


def make_inputs(case: AttnCase, env: Env, seed: int = 0) -> AttnInputs:
    """Random normal inputs on ``env.device`` in ``env.dtype`` (deterministic per ``seed``)."""
    g = torch.Generator(device=env.device).manual_seed(1234 + seed)
    kw = dict(device=env.device, dtype=env.dtype, generator=g)
    q = torch.randn(case.B, case.T, case.Hq, case.Dk, **kw).requires_grad_()
    k = torch.randn(case.B, case.S, case.Hkv, case.Dk, **kw).requires_grad_()
    if case.v_view:
        v = k[..., : case.Dv]
        leaves = (q, k)
    else:
        v = torch.randn(case.B, case.S, case.Hkv, case.Dv, **kw).requires_grad_()
        leaves = (q, k, v)
    dout = torch.randn(case.B, case.T, case.Hq, case.Dv, **kw)
    return AttnInputs(q, k, v, leaves, dout)


def input_set_bytes(case: AttnCase, elt: int) -> int:
    """Bytes of one input set incl. output and gradients (for the L2 rotation decision)."""
    q = case.B * case.T * case.Hq * case.Dk
    k = case.B * case.S * case.Hkv * case.Dk
    v = 0 if case.v_view else case.B * case.S * case.Hkv * case.Dv
    o = case.B * case.T * case.Hq * case.Dv
    return 2 * (q + k + v + 2 * o) * elt


# ---------------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------------
def interpreter_allowed(env: Env) -> bool:
    """``--smoke`` on CPU with ``TRITON_INTERPRET=1``: run our kernels under the interpreter (logic check)."""
    import os

    return not env.is_cuda and env.smoke and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def prov_ours(case: AttnCase, inp: AttnInputs, mode: str, env: Env):
    """The fused Triton kernels through ``latent_attention(backend="triton")``."""
    if not env.is_cuda and not interpreter_allowed(env):
        return CPU_TRITON_REASON
    from mla import latent_attention
    from mla.functional import WINDOW_WITH_SPARSE

    try:
        import mla.autograd  # noqa: F401  (imports the kernels and triton)
    except ImportError as e:
        return f"n/a: the Triton kernels do not import ({e})"
    if tuple(case.window_size) != (-1, -1) and (case.block_mask is not None or case.topk is not None):
        return f"n/a: {WINDOW_WITH_SPARSE}"

    def run():
        return latent_attention(inp.q, inp.k, inp.v, causal=case.causal, softmax_scale=case.softmax_scale,
                                block_mask=case.block_mask, topk_indices=case.topk, backend="triton",
                                check_indices=False, window_size=case.window_size)

    return run


def window_pairs(T: int, S: int, window_size: tuple[int, int], causal: bool) -> float:
    """(query, key) pairs a FlashAttention window (combined with bottom-right ``causal``) keeps, per head."""
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    pos = torch.arange(T, dtype=torch.float64) + (S - T)
    lo = torch.zeros(T, dtype=torch.float64) if left < 0 else (pos - left).clamp(min=0)
    hi = torch.full((T,), S - 1.0, dtype=torch.float64) if right < 0 else (pos + right).clamp(max=S - 1)
    return float((hi - lo + 1).clamp(min=0).sum())


def reference_limit(env: Env) -> float:
    """Largest number of score entries (pairs) the reference path is timed on (time budget);
    ``env.extra["reference_limit"]`` overrides it (the memory group measures one call at long T)."""
    if "reference_limit" in env.extra:
        return float(env.extra["reference_limit"])
    if not env.is_cuda:
        return 1.2e8 if env.full else 4e7
    return 1e9 if env.full else 1.6e8


def prov_reference(case: AttnCase, inp: AttnInputs, mode: str, env: Env):
    """The chunked pure-PyTorch reference (``backend="reference"``), skipped above ``reference_limit``."""
    from mla import latent_attention

    cost = float(case.B * case.Hq * case.T * case.S)  # it scores whole query chunks against all keys
    lim = reference_limit(env)
    if cost > lim:
        return (f"skipped: the reference path would compute {cost:.3g} score entries (B·H·T·S; limit {lim:.3g} in "
                f"this suite: it is the oracle, not a contender — it runs on the smallest sizes, --full raises it)")

    def run():
        return latent_attention(inp.q, inp.k, inp.v, causal=case.causal, softmax_scale=case.softmax_scale,
                                block_mask=case.block_mask, topk_indices=case.topk, backend="reference",
                                check_indices=False, window_size=case.window_size)

    return run


def prov_reference_chunked(case: AttnCase, inp: AttnInputs, mode: str, env: Env):
    """The chunked pure-PyTorch path with the fused CPU dispatch off (``fused_cpu=False``), same size limit."""
    from mla.reference import attention_reference

    res = prov_reference(case, inp, mode, env)
    if isinstance(res, str):
        return res

    def run():
        return attention_reference(inp.q, inp.k, inp.v, causal=case.causal, softmax_scale=case.softmax_scale,
                                   block_mask=case.block_mask, topk_indices=case.topk, fused_cpu=False,
                                   window_size=case.window_size)[0]

    return run


_SDPA = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
         "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def _free_bytes(env: Env) -> int:
    if env.is_cuda:
        return int(torch.cuda.mem_get_info(env.device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def make_sdpa_provider(name: str) -> Callable:
    """Provider for ``scaled_dot_product_attention`` forced to one backend (``name`` in ``_SDPA``)."""
    attr = _SDPA[name]

    def prov(case: AttnCase, inp: AttnInputs, mode: str, env: Env):
        if case.block_mask is not None or case.topk is not None:
            return ("n/a: SDPA takes no block-sparse or top-k layout (a dense T×S boolean mask would be a "
                    "different, O(T·S) algorithm)")
        if case.causal and case.T != case.S:
            return "n/a: SDPA's is_causal is top-left aligned; this case has T != S (bottom-right causal)"
        if not env.is_cuda and attr in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            return "n/a on CPU: CUDA-only SDPA backend"
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = getattr(SDPBackend, attr)
        except (ImportError, AttributeError):
            return f"n/a: this torch ({torch.__version__}) has no SDPBackend.{attr}"
        B, T, S, Hq, Hkv = case.B, case.T, case.S, case.Hq, case.Hkv
        if attr == "MATH":
            # the math backend materialises scores and probabilities (and their gradients) in fp32
            # (it upcasts half precision unless allow_fp16_bf16_reduction_math_sdp is set)
            per = B * Hq * T * S * 4
            need = per * (2 if mode == "fwd" else 4)
            free = _free_bytes(env)
            if need > 0.7 * free:
                return (f"skipped: the math backend materialises B·H·T·S score matrices, ~{need / 2**30:.1f} GiB "
                        f"for this pass, {free / 2**30:.1f} GiB free")
        qh = inp.q.transpose(1, 2)
        variants = []
        if Hq == Hkv:
            variants.append(("", inp.k.transpose(1, 2), inp.v.transpose(1, 2), {}))
        else:
            variants.append(("enable_gqa", inp.k.transpose(1, 2), inp.v.transpose(1, 2), {"enable_gqa": True}))
            if Hkv == 1:
                variants.append(("k/v broadcast to Hq heads (stride-0 view)",
                                 inp.k.expand(B, S, Hq, case.Dk).transpose(1, 2),
                                 inp.v.expand(B, S, Hq, case.Dv).transpose(1, 2), {}))
        reasons = []
        for note, kh, vh, kw in variants:
            def run(kh=kh, vh=vh, kw=kw):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qh, kh, vh, is_causal=case.causal,
                                                          scale=case.softmax_scale, **kw).transpose(1, 2)

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    run()  # probe in grad mode, as timed (a backend may accept a shape only without grad)
                    return (run, note) if note else run
                except (RuntimeError, TypeError, ValueError) as e:
                    why = [" ".join(str(w.message).split()) for w in caught]
                    why = [w.split(" (Triggered internally")[0] for w in why if "kernel not used because" not in w]
                    msg = "; ".join(dict.fromkeys(why)) or " ".join(str(e).split())
                    reasons.append((f"[{note}] " if note else "") + msg[:300])
                    free_memory(env)
        return "n/a: backend rejects this shape: " + " | ".join(reasons)

    prov.__name__ = f"prov_{name.replace('-', '_')}"
    return prov


# -- FlexAttention ---------------------------------------------------------------------------------
_FLEX_COMPILED = None


def _causal_mod(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod of (T = S) causal attention."""
    return kv_idx <= q_idx


def _indices(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted True columns of a bool grid ``[..., R, C]`` -> (count int32 ``[..., R]``, idx int32 ``[..., R, C]``)."""
    num = grid.sum(dim=-1, dtype=torch.int32)
    idx = torch.sort(grid.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


def _grid_mod(grid: torch.Tensor, bm: int, bn: int, causal: bool, offset: int):
    """FlexAttention mask_mod reading a block grid ``[Bm, Hm, nQ, nK]`` (and bottom-right causality).

    The compiled kernel only calls it on partial blocks; eager FlexAttention applies the mask_mod to every
    (query, key) pair and ignores the block lists, so the pattern must be in the mask_mod as well.
    """
    Bm, Hm = grid.shape[:2]

    def mod(b, h, q_idx, kv_idx):
        keep = grid[b % Bm, h % Hm, q_idx // bm, kv_idx // bn]
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        return keep

    return mod


def to_flex_block_mask(block_mask, T: int, S: int, causal: bool, device, block_size: int = 128,
                       eager: bool = False):
    """FlexAttention ``BlockMask`` equal to ours (or to dense causal when ``block_mask`` is None).

    Blocks that causality leaves untouched become FlexAttention "full" blocks (no mask_mod call), the
    others partial blocks — what ``create_block_mask`` would build. The compiled kernel skips unlisted
    blocks and calls the mask_mod only inside partial blocks, where only causality remains to apply: the
    mask_mod is then the module-level causal one (``None`` without causality), the same function object
    for every case so that ``torch.compile`` does not recompile per mask. ``eager=True`` (eager
    FlexAttention applies the mask_mod to every pair and ignores the block lists): the mask_mod reads our
    block grid too. Returns None for dense non-causal attention.
    """
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    if block_mask is None:
        if not causal:
            return None
        from mla.sparsity import causal_block_mask

        block_mask = causal_block_mask(T, S, block_size, device=device)
        grid_mod = None
    else:
        grid_mod = True
    grid = block_mask.to_dense().to(device)
    bm, bn = block_mask.BLOCK_SIZE
    nq, nk = grid.shape[-2:]
    if causal:
        qstart = torch.arange(nq, device=device) * bm
        klast = torch.clamp((torch.arange(nk, device=device) + 1) * bn, max=S) - 1
        full = grid & (klast[None, :] <= qstart[:, None] + (S - T))
        partial = grid & ~full
    else:
        full, partial = grid, torch.zeros_like(grid)
    if grid_mod and eager:
        mask_mod = _grid_mod(grid, bm, bn, causal, S - T)
    elif not causal:
        mask_mod = None
    elif T == S:
        mask_mod = _causal_mod
    else:
        mask_mod = _grid_mod(torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), T + 1, S + 1, True, S - T)
    kv_num, kv_idx = _indices(partial)
    full_num, full_idx = _indices(full)
    return FlexBlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=(bm, bn),
                                        mask_mod=mask_mod, seq_lengths=(T, S))


def compiled_flex():
    """``torch.compile(flex_attention)`` (one per process), with dynamo's recompile limit raised so that
    every benchmark shape gets a compiled kernel instead of a silent eager fallback."""
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention

        cfg = torch._dynamo.config
        for name, val in (("cache_size_limit", 256), ("recompile_limit", 256), ("accumulated_cache_size_limit", 4096),
                          ("accumulated_recompile_limit", 4096)):
            if hasattr(cfg, name):
                try:
                    setattr(cfg, name, max(int(getattr(cfg, name)), val))
                except Exception:  # noqa: BLE001 - config names vary between torch versions
                    pass
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=False)
    return _FLEX_COMPILED


def prov_flex(case: AttnCase, inp: AttnInputs, mode: str, env: Env):
    """FlexAttention with the case's block mask (compiled on CUDA; eager forward only on CPU)."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
    except ImportError:
        return f"n/a: this torch ({torch.__version__}) has no FlexAttention"
    if case.topk is not None:
        return ("n/a: FlexAttention has no per-query key-index list (top-k would need a T×S bitmap in a "
                "mask_mod: a different algorithm)")
    if case.window_size != (-1, -1):
        return "n/a: the per-token window case compares our dense kernels; FlexAttention runs the block-mask rows"
    gqa = case.Hq != case.Hkv
    if env.is_cuda:
        fn = compiled_flex()
        q, k, v = inp.q, inp.k, inp.v
        note = "torch.compile(flex_attention)"
    else:
        if mode != "fwd":
            return "n/a on CPU: FlexAttention has no CPU backward (torch raises NotImplementedError)"
        if env.quick and not case.flex_cpu:
            return ("skipped in --quick: eager FlexAttention on CPU re-traces its mask for every new shape "
                    "(1–10 s each); it runs on one case here and on all without --quick")
        fn = flex_attention
        q, k, v = inp.q.detach(), inp.k.detach(), inp.v.detach()
        note = "eager (unfused: materialises the scores); torch.compile on CPU not used (compile time)"
    mask = to_flex_block_mask(case.block_mask, case.T, case.S, case.causal, env.device, eager=not env.is_cuda)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    kw = {"enable_gqa": True} if gqa else {}

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(qh, kh, vh, block_mask=mask, scale=case.softmax_scale, **kw).transpose(1, 2)

    return run, note


ATTN_PROVIDERS: dict[str, Callable] = {
    "ours": prov_ours,
    "flex": prov_flex,
    "sdpa-flash": make_sdpa_provider("sdpa-flash"),
    "sdpa-efficient": make_sdpa_provider("sdpa-efficient"),
    "sdpa-cudnn": make_sdpa_provider("sdpa-cudnn"),
    "sdpa-math": make_sdpa_provider("sdpa-math"),
    "reference": prov_reference,
    "reference-chunked": prov_reference_chunked,
}


# ---------------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------------
def wrap_mode(fn: Callable, inp: AttnInputs, mode: str) -> Callable:
    """The callable timed for ``mode``: the forward itself; for ``bwd`` one forward is run now and the
    timed call is ``torch.autograd.grad`` of its output (graph retained); ``fwd+bwd`` does both.
    Gradients are returned, not accumulated into ``.grad``."""
    if mode == "fwd":
        return fn
    if mode == "bwd":
        out = fn()
        return lambda: torch.autograd.grad(out, inp.leaves, inp.dout, retain_graph=True)
    if mode == "fwd+bwd":
        return lambda: torch.autograd.grad(fn(), inp.leaves, inp.dout)
    raise ValueError(f"mode: expected one of fwd, bwd, fwd+bwd, got {mode!r}")


def _unpack(res):
    if isinstance(res, tuple):
        return res[0], res[1]
    return res, ""


def run_attention_case(env: Env, rec: Recorder, case: AttnCase, providers: list[str], modes: list[str],
                       skip_providers: dict[str, str] | None = None) -> list[Row]:
    """Time every (provider, mode) of ``case`` and record one row each (a reason when it cannot run).

    The forward output of each provider is compared with the reference (when it runs at this size) or
    with the first provider that ran; a relative error above ``tolerance(dtype)`` gives ``mismatch``.
    ``skip_providers``: provider -> reason, recorded without trying.
    """
    rows: list[Row] = []
    skip_providers = skip_providers or {}
    base = Row(case.group, case.name, "", shape=case.shape_str(), x=case.x)
    reason = env.skip_reason()
    if reason:
        return rec.add_all(base, providers, "skip", reason, modes)
    try:
        n_sets = rotation_sets(env, input_set_bytes(case, env.elt))
        sets = [make_inputs(case, env, seed=i) for i in range(n_sets)]
    except Exception as e:  # noqa: BLE001
        return rec.add_all(base, providers, "error", "could not allocate inputs: " + after_error(env, e), modes)
    rot = f"{n_sets} rotated input sets" if n_sets > 1 else ""
    baseline, baseline_name = None, ""
    if "reference" in providers and "fwd" in modes and callable(prov_reference(case, sets[0], "fwd", env)):
        try:
            with time_limit(env.case_timeout), torch.no_grad():
                baseline = prov_reference(case, sets[0], "fwd", env)()
            baseline_name = "reference"
        except Exception as e:  # noqa: BLE001
            after_error(env, e)
            baseline = None
    fwd_failed: dict[str, str] = {}
    for p in providers:
        for m in modes:
            row = dataclasses.replace(base, provider=p, mode=m)
            reason = env.skip_reason() or skip_providers.get(p, "")
            if not reason and p in fwd_failed:
                reason = f"not run: this provider's forward failed on this case ({fwd_failed[p][:200]})"
            if reason:
                rows.append(rec.add(dataclasses.replace(row, status="skip", note=reason)))
                continue
            prov = ATTN_PROVIDERS[p]
            try:
                with time_limit(env.case_timeout):
                    fns, note = [], ""
                    check = ""
                    for i, inp in enumerate(sets):
                        res = prov(case, inp, m, env)
                        if isinstance(res, str):
                            note = res
                            break
                        fn, note = _unpack(res)
                        if i == 0 and m == "fwd":
                            out = fn()  # first call: compile / autotune, output check
                            if baseline is None:
                                baseline, baseline_name = out.detach(), p
                            elif p != baseline_name:
                                err = rel_err(out, baseline)
                                tag = "MISMATCH " if err > tolerance(env.dtype) else ""
                                check = f"{tag}rel.err {err:.1e} vs {baseline_name}"
                            del out
                        fns.append(wrap_mode(fn, inp, m))
                    if not fns:
                        rows.append(rec.add(dataclasses.replace(row, status="skip", note=note)))
                        continue
                    t = time_fns(env, fns)
                notes = "; ".join(s for s in (note, check, rot) if s)
                r = timed_row(row, t, case.flops(m), case.nbytes(m, env.elt))
                r.status = "mismatch" if check.startswith("MISMATCH") else "ok"
                r.note = notes
                rows.append(rec.add(r))
            except Exception as e:  # noqa: BLE001 - every failure becomes a row
                note = after_error(env, e)
                if m == "fwd":
                    fwd_failed[p] = note  # do not pay a failing compile / autotune again for bwd
                rows.append(rec.add(dataclasses.replace(row, status="error", note=note)))
            finally:
                fns = None
    del sets, baseline
    free_memory(env)
    return rows
