"""Decode benchmarks: ``mla_decode`` over a paged latent cache, and end-to-end generation.

Decode (absorbed MLA shape: ``H`` query heads over one latent row per token, ``Dk = 576``, ``Dv = 512``,
page size 64, causal, every sequence ``S`` tokens long, pages scattered by a random permutation):

* ``ours``: ``mla_decode(..., backend="triton")`` — the split-KV kernel (CUDA only);
* ``ours fp8 cache``: the same kernel over the FP8 cache (``kv_format="fp8_ds_mla"``: 656 bytes per token
  instead of 1,152; the rows quantized from the same pool), dequantized in registers. Its GB/s count the
  bytes it moves (656 per cache row); its error is against the reference on the unquantized rows, with
  the FP8 tolerance ``FP8_TOL``;
* ``reference``: ``mla_decode(..., backend="reference")`` (gathers the pages; small grids only);
* ``dense latent_attention``: ``latent_attention(q, k, k[..., :512], causal=True)`` on the same rows copied
  into a contiguous ``[B, S, 1, 576]`` cache (``backend="auto"``: the dense kernel on CUDA).

GPU grid: ``B`` in {1, 32, 128}, ``S`` in {1k, 4k, 16k, 64k}, ``Tq = 1`` plus ``Tq = 2`` at 4k (``--full``:
all 24 combinations of ``Tq`` in {1, 2}). Reported: GB/s of compulsory traffic (cache rows, q, out,
lse; ``bench.work.decode_bytes``) and TFLOP/s (``2 · pairs · (Dk + Dv)``).

Generation (``generate`` group): tokens/s of ``MLACausalLM.generate()`` (paged cache, absorbed decode)
against a greedy loop with a contiguous ``LatentCache`` in the naive (expanded) form and a loop without any
cache (the whole prefix recomputed per token), same weights, same prompts, greedy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import torch

from bench.env import Env, rotation_sets
from bench.guards import after_error, force_reference, free_memory, rel_err, to_device_dtype, tolerance
from bench.providers import CPU_TRITON_REASON, interpreter_allowed
from bench.rows import Recorder, Row, timed_row
from bench.timing import CaseTimeout, time_fns, time_limit, time_wall
from bench.work import decode_bytes, decode_pairs
from mla.quant import fp8_ds_mla_row_bytes

DK, DV, PAGE = 576, 512, 64
MLA_SCALE = 192**-0.5
#: Output error allowed for the FP8 cache against the unquantized one: e4m3 keeps 3 mantissa bits (~2.5 %
#: RMS rounding error per value); bench/fp8_cache_accuracy.py measured 3.2e-2 mean, 3.6e-2 worst per row on
#: random N(0, 1) rows at this shape (512 keys), 4.5e-2 over whole outputs in the --smoke run.
FP8_TOL = 0.08


def decode_grid(env: Env) -> list[tuple[int, int, int]]:
    """``(B, S, Tq)`` combinations of this suite."""
    if env.smoke:
        return [(1, 256, 1), (4, 512, 2)]
    if env.is_cuda:
        Bs, Ss = (1, 32, 128), (1024, 4096, 16384, 65536)
        if env.full:
            return [(B, S, Tq) for Tq in (1, 2) for S in Ss for B in Bs]
        if env.quick:
            return [(1, 4096, 1), (128, 4096, 1), (1, 65536, 1), (128, 65536, 1), (32, 4096, 2)]
        return [(B, S, 1) for S in Ss for B in Bs] + [(B, 4096, 2) for B in Bs]
    if env.quick:
        return [(1, 256, 1), (4, 1024, 2)]
    return list(itertools.product((1, 4), (256, 1024), (1, 2)))


def decode_heads(env: Env) -> int:
    return 128 if env.is_cuda and not env.smoke else 16


@dataclasses.dataclass
class DecodeInputs:
    q: torch.Tensor
    pool: torch.Tensor
    block_table: torch.Tensor
    seqlens: torch.Tensor
    pool_fp8: torch.Tensor | None = None  # the pool in the fp8_ds_mla layout, made on first use

    def fp8(self) -> torch.Tensor:
        if self.pool_fp8 is None:
            from mla.quant import quantize_fp8_ds_mla

            self.pool_fp8 = quantize_fp8_ds_mla(self.pool, DV)
        return self.pool_fp8

    def contiguous_cache(self) -> torch.Tensor:
        """The rows of every sequence copied into ``[B, S, 1, Dk]`` (for the dense comparison)."""
        B, n_pages = self.block_table.shape
        S = int(self.seqlens.max())
        rows = self.pool[self.block_table.long()]  # [B, n_pages, page, 1, Dk]
        return rows.reshape(B, n_pages * self.pool.shape[1], 1, self.pool.shape[-1])[:, :S]


def make_decode_inputs(env: Env, B: int, S: int, Tq: int, H: int, seed: int = 0) -> DecodeInputs:
    """Random q ``[B, Tq, H, 576]`` and a paged cache whose pages are a random permutation of the pool."""
    g = torch.Generator(device=env.device).manual_seed(77 + seed)
    n_pages = math.ceil(S / PAGE)
    pool = torch.randn(B * n_pages, PAGE, 1, DK, device=env.device, dtype=env.dtype, generator=g)
    perm = torch.randperm(B * n_pages, generator=torch.Generator().manual_seed(seed)).to(torch.int32)
    table = perm.view(B, n_pages).to(env.device)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=env.device)
    q = torch.randn(B, Tq, H, DK, device=env.device, dtype=env.dtype, generator=g)
    return DecodeInputs(q, pool, table, seqlens)


def _reference_ok(env: Env, B: int, S: int) -> str:
    lim = (128 * 16384 if env.full else 32 * 16384) if env.is_cuda else 8 * 1024
    if B * S > lim:
        return (f"skipped: the reference gathers all B·S = {B * S} rows and runs the chunked PyTorch attention "
                f"(limit {lim} rows in this suite: it is the oracle, not a contender)")
    return ""


def _decode_call(d: DecodeInputs, pool: torch.Tensor, backend: str, kv_format: str | None = None):
    """A no-grad causal ``mla_decode`` of ``d``'s queries over ``pool`` (``d.pool`` or its FP8 copy)."""
    from mla.functional import mla_decode

    def run():
        with torch.no_grad():
            return mla_decode(d.q, pool, d.block_table, d.seqlens, softmax_scale=MLA_SCALE, head_dim_v=DV,
                              causal=True, return_lse=False, backend=backend, check_inputs=False,
                              kv_format=kv_format)

    return run


def dec_provider(name: str, env: Env, d: DecodeInputs, B: int, S: int):
    """Callable computing the decode output for provider ``name``, or the reason it cannot run."""
    from mla import latent_attention
    from mla.functional import resolve_backend

    if name == "ours":
        if not env.is_cuda and not interpreter_allowed(env):
            return CPU_TRITON_REASON
        return _decode_call(d, d.pool, "triton")
    if name == "ours fp8 cache":
        if not env.is_cuda and not interpreter_allowed(env):
            return CPU_TRITON_REASON
        note = f"fp8_ds_mla cache, {FP8_ROW} B/token (bf16: {DK * 2})"
        return _decode_call(d, d.fp8(), "triton", kv_format="fp8_ds_mla"), note
    if name == "reference":
        why = _reference_ok(env, B, S)
        if why:
            return why
        return _decode_call(d, d.pool, "reference")
    if name == "dense latent_attention":
        kc = d.contiguous_cache()
        backend = resolve_backend("auto", kc.device, kc.dtype)

        def run():
            with torch.no_grad():
                return latent_attention(d.q, kc, kc[..., :DV], causal=True, softmax_scale=MLA_SCALE, backend="auto")

        return run, f"contiguous [B, S, 1, 576] copy of the cache; backend auto -> {backend}"
    raise ValueError(name)


DECODE_PROVIDERS = ["ours", "ours fp8 cache", "dense latent_attention", "reference"]
FP8_ROW = fp8_ds_mla_row_bytes(DV, DK - DV)  # 656


def run_decode(env: Env, rec: Recorder) -> None:
    """Decode grid: GB/s and TFLOP/s per provider (see the module docstring)."""
    H = decode_heads(env)
    for B, S, Tq in decode_grid(env):
        case = f"B={B} S={S} Tq={Tq}"
        base = Row("decode", case, "", "fwd", shape=f"B={B} Tq={Tq} H={H} S={S} Dk={DK} Dv={DV} page={PAGE} causal",
                   x=S)
        seqlens = [S] * B
        flops = 2.0 * decode_pairs(seqlens, Tq, H, True) * (DK + DV)
        nbytes = decode_bytes(seqlens, Tq, H, DK, DV, env.elt)
        nbytes_fp8 = nbytes - sum(seqlens) * (DK * env.elt - FP8_ROW)  # the cache rows in 656 bytes
        reason = env.skip_reason()
        set_bytes = int(nbytes)
        n_sets = rotation_sets(env, set_bytes, max_sets=64)
        if not reason and env.is_cuda:
            free = torch.cuda.mem_get_info(env.device)[0]
            need = set_bytes * n_sets + 2 * B * S * DK * env.elt
            if need > 0.8 * free:
                reason = f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        if reason:
            rec.add_all(base, DECODE_PROVIDERS, "skip", reason)
            continue
        try:
            sets = [make_decode_inputs(env, B, S, Tq, H, seed=i) for i in range(n_sets)]
        except Exception as e:  # noqa: BLE001
            rec.add_all(base, DECODE_PROVIDERS, "error", "could not allocate inputs: " + after_error(env, e))
            continue
        rot = f"{n_sets} rotated input sets" if n_sets > 1 else ""
        baseline, baseline_name = None, ""
        if not _reference_ok(env, B, S):
            try:
                with time_limit(env.case_timeout):
                    baseline, baseline_name = dec_provider("reference", env, sets[0], B, S)(), "reference"
            except Exception as e:  # noqa: BLE001 - the reference row will report it
                after_error(env, e)
        for p in DECODE_PROVIDERS:
            row = dataclasses.replace(base, provider=p)
            if rec.skipped(row):
                continue
            try:
                with time_limit(env.case_timeout):
                    fns, note, check = [], "", ""
                    for i, d in enumerate(sets if p != "dense latent_attention" else sets[:1]):
                        res = dec_provider(p, env, d, B, S)
                        if isinstance(res, str):
                            note = res
                            break
                        fn, note = res if isinstance(res, tuple) else (res, "")
                        if i == 0:
                            out = fn()
                            if baseline is None:
                                baseline, baseline_name = out, p
                            elif p != baseline_name:
                                err = rel_err(out, baseline)
                                tol = FP8_TOL if p == "ours fp8 cache" else tolerance(env.dtype)
                                check = ("MISMATCH " if err > tol else "") + \
                                    f"rel.err {err:.1e} vs {baseline_name}"
                        fns.append(fn)
                    if not fns:
                        rec.add(dataclasses.replace(row, status="skip", note=note))
                        continue
                    t = time_fns(env, fns)
                r = timed_row(row, t, flops, nbytes_fp8 if p == "ours fp8 cache" else nbytes)
                r.status = "mismatch" if check.startswith("MISMATCH") else "ok"
                r.note = "; ".join(s for s in (note, check, rot if p != "dense latent_attention" else "") if s)
                rec.add(r)
            except Exception as e:  # noqa: BLE001
                rec.add(dataclasses.replace(row, status="error", note=after_error(env, e)))
            fns = None
        del sets, baseline
        free_memory(env)


# ---------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def greedy_loop(model, prompt: torch.Tensor, n: int, use_cache: bool) -> torch.Tensor:
    """Greedy decoding with a contiguous ``LatentCache`` (``use_cache``) or by recomputing the prefix."""
    if not use_cache:
        seq = prompt
        for _ in range(n):
            nxt = model(seq).logits[:, -1].argmax(dim=-1)
            seq = torch.cat([seq, nxt[:, None]], dim=1)
        return seq
    cache = model.new_cache()
    logits = model(prompt, cache=cache).logits[:, -1]
    out = [prompt]
    for step in range(n):
        nxt = logits.argmax(dim=-1)
        out.append(nxt[:, None])
        if step < n - 1:
            logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return torch.cat(out, dim=1)


def generate_plan(env: Env) -> tuple[int, int, int, int]:
    """``(batch, prompt length, new tokens, repeats)``."""
    if env.smoke or (env.quick and not env.is_cuda):
        return 2, 16, 16, 2
    if env.is_cuda:
        return 8, 128, 64, 3
    return 4, 32, 32, 3


def run_generate(env: Env, rec: Recorder) -> None:
    """Tokens/s of ``MLACausalLM.generate`` (tiny preset) against naive-form and cache-less greedy loops."""
    from mla.block import MLACausalLM
    from mla.config import PRESETS

    B, P, N, reps = generate_plan(env)
    shape = f"tiny preset, B={B} prompt={P} new={N}"
    names = ["generate() paged cache, absorbed decode", "LatentCache loop, naive (expanded) form",
             "no cache (recompute prefix)"]
    base = Row("generate", f"greedy B={B} prompt={P} new={N}", "", "decode", shape=shape, unit="tok/s", x=B)
    reason = env.skip_reason()
    if reason:
        rec.add_all(base, names, "skip", reason)
        return
    try:
        torch.manual_seed(0)
        cfg = PRESETS["tiny"]()
        model = to_device_dtype(MLACausalLM(cfg), env.device, env.dtype).eval()
        naive = to_device_dtype(MLACausalLM(cfg, form="naive"), env.device, env.dtype).eval()
        naive.load_state_dict(model.state_dict())
        prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(1)).to(env.device)
    except Exception as e:  # noqa: BLE001
        rec.add_all(base, names, "error", after_error(env, e))
        return
    fns = {
        names[0]: lambda: model.generate(prompt, N, temperature=0.0),
        names[1]: lambda: greedy_loop(naive, prompt, N, use_cache=True),
        names[2]: lambda: greedy_loop(model, prompt, N, use_cache=False),
    }
    first = None
    fallback = ""
    for name, fn in fns.items():
        row = dataclasses.replace(base, provider=name)
        if rec.skipped(row):
            continue
        try:
            with time_limit(env.case_timeout):
                try:
                    toks = fn()
                except CaseTimeout:
                    raise
                except Exception as e:  # noqa: BLE001 - the kernels failed: retry on the reference path
                    why = after_error(env, e)
                    if env.cuda_broken or not (force_reference(model) | force_reference(naive)):
                        raise
                    fallback = f"backend auto failed ({why[:200]}); fell back to backend='reference'"
                    toks = fn()
                same = ""
                if first is None:
                    first = toks
                else:
                    agree = float((toks == first).float()[:, P:].mean())
                    same = f"{agree:.0%} of new tokens equal to generate()'s"
                t = time_wall(fn, repeats=reps, warmup=0, cuda=env.is_cuda)
            r = timed_row(row, t)
            r.value = B * N / (t.median_ms / 1e3)
            r.note = "; ".join(s for s in (f"{N} tokens x {B} sequences per call", same, fallback) if s)
            rec.add(r)
        except Exception as e:  # noqa: BLE001
            rec.add(dataclasses.replace(row, status="error", note=after_error(env, e)))
    fns = first = None
    free_memory(env)
