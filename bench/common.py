"""Shared benchmark machinery: result rows, work formulas, timers, guards and run metadata.

Units everywhere: time in milliseconds (ms), throughput in TFLOP/s (10¹² floating-point operations per
second) and GB/s (10⁹ bytes per second), memory in bytes (reports show MiB = 2²⁰ bytes).

Work formulas (DESIGN §7). ``pairs`` is the number of (query, key) score entries actually computed,
summed over batch and query heads: ``B · Hq · T · S_eff`` where ``S_eff`` is the average number of keys
a query sees. Bottom-right causal (query ``i`` sees key ``j`` iff ``j <= i + S - T``) gives exactly
``Σ_i clamp(i + S - T + 1, 0, S)`` per head (``causal_pairs``), which is ``T·(T+1)/2`` for ``T = S``.

* forward:  ``2 · pairs · (Dk + Dv)``     (``S = Q·Kᵀ``: 2·Dk per pair; ``O = P·V``: 2·Dv per pair)
* backward: ``2 · pairs · (3·Dk + 2·Dv)`` (FlashAttention-2 style, recomputing the scores: ``S = Q·Kᵀ``
  2·Dk, ``dV = Pᵀ·dO`` 2·Dv, ``dP = dO·Vᵀ`` 2·Dv, ``dQ = dS·K`` 2·Dk, ``dK = dSᵀ·Q`` 2·Dk per pair).
  For ``Dk = Dv`` this is the usual 2.5 × forward.
* forward + backward: the sum, ``2 · pairs · (4·Dk + 3·Dv)``.

Softmax exponentials and scaling are not counted (they are not matmul FLOPs; the ceiling is a matmul).

Bytes are the compulsory HBM/DRAM traffic, every tensor read or written exactly once (``e`` = element
size, ``lse`` fp32; when ``v`` is a prefix view of ``k``, as in absorbed MLA, ``v`` costs nothing extra
and its gradient is part of ``dk``):

* forward:  ``e·(|q| + |k| + |v| + |o|) + 4·B·Hq·T``
* backward: reads ``q, k, v, o, dO, lse``, writes ``dq, dk, dv``: ``e·(2|q| + 2|k| + 2|v| + 2|o|) + 4·B·Hq·T``
* decode:   ``e·(Σ_b L_b · Dk + B·Tq·H·(Dk + Dv)) + 4·B·H·Tq`` (cache rows of every sequence, ``q``,
  ``out``, ``lse``; the block table is ignored).

GB/s and TFLOP/s are these counts divided by the median time; ``frac_flops`` / ``frac_bw`` divide them by
the ceilings measured in the same run (``measure_ceilings``: a large matmul and a large copy).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import datetime as _dt
import gc
import itertools
import math
import os
import platform
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
STATUSES = ("ok", "skip", "error", "mismatch")


@dataclass
class Row:
    """One line of ``results.csv``.

    group: ``ceiling | dense | sparse | topk | decode | generate | module | memory | kv-cache``.
    case: human label of the inputs; shape: the sizes (``B=.. T=.. ..``); dtype: input dtype.
    provider: implementation measured. mode: ``fwd``, ``bwd``, ``fwd+bwd`` (or what was measured).
    median_ms / iqr_ms: median time and inter-quartile range (p75 − p25) of the timed runs, in ms.
    tflops / gbps: work formulas (module docstring) over the median time.
    frac_flops / frac_bw: those as fractions of the ceilings measured in the same run.
    value / unit: a non-time measurement (peak MiB, bytes per token, tokens/s, ...).
    x: the plot axis of the group (T, density, K, S, ...). status: ``ok``, ``skip`` (not run, ``note``
    says why), ``error`` (tried and failed, ``note`` holds the error), ``mismatch`` (ran, but the output
    differs from the baseline by more than the tolerance). note: free text.
    """

    group: str
    case: str
    provider: str
    mode: str = "-"
    shape: str = ""
    dtype: str = ""
    median_ms: float | None = None
    iqr_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    frac_flops: float | None = None
    frac_bw: float | None = None
    value: float | None = None
    unit: str = ""
    x: float | None = None
    status: str = "ok"
    note: str = ""
    suite: str = ""
    device: str = ""


FIELDS = [f.name for f in dataclasses.fields(Row)]
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(Row) if "float" in str(f.type)}


def row_to_dict(row: Row) -> dict:
    """CSV-ready dict (floats with 6 significant digits, None as empty)."""
    out = {}
    for k in FIELDS:
        v = getattr(row, k)
        if v is None:
            out[k] = ""
        elif isinstance(v, float):
            out[k] = f"{v:.6g}"
        else:
            out[k] = str(v)
    return out


def row_from_dict(d: dict) -> Row:
    """Inverse of ``row_to_dict`` (unknown columns ignored, missing ones default)."""
    kw = {}
    for k in FIELDS:
        if k not in d:
            continue
        v = d[k]
        if k in _FLOAT_FIELDS:
            try:
                kw[k] = float(v) if v not in ("", None) else None
            except ValueError:
                kw[k] = None
        else:
            kw[k] = v or ""
    kw.setdefault("group", "?")
    kw.setdefault("case", "?")
    kw.setdefault("provider", "?")
    return Row(**kw)


def read_rows(path: Path) -> list[Row]:
    """Rows of a ``results.csv`` ([] when the file does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [row_from_dict(d) for d in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------
# Work formulas
# ---------------------------------------------------------------------------------------------------
MODES = ("fwd", "bwd", "fwd+bwd")


def causal_pairs(T: int, S: int) -> int:
    """(query, key) pairs of one head under bottom-right causal masking: ``Σ_i clamp(i + S − T + 1, 0, S)``.

    Rows ``i < T − S`` see nothing; row ``i >= max(0, T − S)`` sees ``i + S − T + 1`` keys (at most ``S``),
    an arithmetic series. ``T = S`` gives ``T·(T+1)/2``.
    """
    if T <= 0 or S <= 0:
        return 0
    i0 = max(0, T - S)
    first, last, count = i0 + S - T + 1, S, T - i0
    return (first + last) * count // 2


def visible_pairs(T: int, S: int, causal: bool) -> int:
    """Pairs of one head for a dense attention: ``T·S``, or ``causal_pairs(T, S)``."""
    return causal_pairs(T, S) if causal else max(T, 0) * max(S, 0)


def attention_flops(pairs: int | float, Dk: int, Dv: int, mode: str) -> float:
    """Matmul FLOPs of an attention over ``pairs`` score entries (summed over batch and heads).

    fwd ``2·pairs·(Dk+Dv)``; bwd ``2·pairs·(3·Dk+2·Dv)`` (scores recomputed); fwd+bwd the sum.
    """
    fwd = 2.0 * pairs * (Dk + Dv)
    bwd = 2.0 * pairs * (3 * Dk + 2 * Dv)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def attention_bytes(B: int, T: int, S: int, Hq: int, Hkv: int, Dk: int, Dv: int, elt: int, mode: str,
                    v_view: bool = False) -> float:
    """Compulsory bytes of an attention pass (each tensor touched once; ``lse`` fp32).

    ``elt``: bytes per element of q/k/v/out. ``v_view``: ``v`` is a prefix view of ``k`` (no extra bytes).
    fwd ``e(|q|+|k|+|v|+|o|) + 4·B·Hq·T``; bwd ``e(2|q|+2|k|+2|v|+2|o|) + 4·B·Hq·T``; fwd+bwd the sum.
    """
    q = B * T * Hq * Dk * elt
    k = B * S * Hkv * Dk * elt
    v = 0 if v_view else B * S * Hkv * Dv * elt
    o = B * T * Hq * Dv * elt
    lse = 4 * B * Hq * T
    fwd = q + k + v + o + lse
    bwd = 2 * (q + k + v + o) + lse
    return float({"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode])


def block_mask_pairs(block_mask, causal: bool) -> float:
    """Pairs per (batch, head) kept by an ``mla.sparsity.BlockMask`` (averaged over its batch/head dims).

    Every token of a listed block is kept, except what bottom-right ``causal`` removes. Exact count.
    """
    T, S = block_mask.seq_lengths
    bm, bn = block_mask.BLOCK_SIZE
    grid = block_mask.to_dense()  # [Bm, Hm, nQ, nK]
    nk = grid.shape[-1]
    dev = grid.device
    i = torch.arange(T, device=dev)
    kstart = torch.arange(nk, device=dev) * bn
    kend = torch.clamp(kstart + bn, max=S)
    if causal:
        cnt = (torch.minimum(i[:, None] + (S - T) + 1, kend[None, :]) - kstart[None, :]).clamp(min=0)
    else:
        cnt = (kend - kstart)[None, :].expand(T, nk)
    rows = grid[:, :, i // bm, :]  # [Bm, Hm, T, nK]
    total = (rows.to(torch.float64) * cnt.to(torch.float64)).sum(dim=(-1, -2))
    return float(total.mean())


def topk_pairs(topk_indices: torch.Tensor, S: int, causal: bool, Hq: int) -> int:
    """Pairs computed for top-k indices ``[B, T, Hkv, K]`` (summed over batch and the ``Hq`` query heads).

    A lane counts when ``0 <= idx < S`` and, if ``causal``, ``idx <= i + S − T``.
    """
    B, T, Hkv, _ = topk_indices.shape
    idx = topk_indices.long()
    valid = (idx >= 0) & (idx < S)
    if causal:
        lim = torch.arange(T, device=idx.device) + (S - T)
        valid &= idx <= lim[None, :, None, None]
    return int(valid.sum()) * (Hq // Hkv)


def decode_pairs(seqlens: Sequence[int], Tq: int, H: int, causal: bool) -> int:
    """Pairs of a decode step: per sequence of length ``L`` query ``j < Tq`` sees ``L − Tq + j + 1`` keys
    (clamped to ``[0, L]``) when ``causal``, else ``L``; times ``H`` heads."""
    total = 0
    for L in seqlens:
        for j in range(Tq):
            total += min(max(L - Tq + j + 1, 0), L) if causal else L
    return total * H


def decode_bytes(seqlens: Sequence[int], Tq: int, H: int, Dk: int, Dv: int, elt: int) -> float:
    """Compulsory bytes of a decode step: ``e·(ΣL·Dk + B·Tq·H·(Dk+Dv)) + 4·B·H·Tq`` (cache, q, out, lse)."""
    B = len(seqlens)
    return float(elt * (sum(seqlens) * Dk + B * Tq * H * (Dk + Dv)) + 4 * B * H * Tq)


def matmul_flops(m: int, n: int, k: int) -> float:
    """``2·m·n·k``."""
    return 2.0 * m * n * k


# ---------------------------------------------------------------------------------------------------
# Environment of a run
# ---------------------------------------------------------------------------------------------------
@dataclass
class Env:
    """What a run measures on and how.

    suite: ``cpu`` or ``gpu``. device / dtype: where and in what the kernels run (CPU suite: float32,
    GPU suite: bfloat16). quick / full / smoke: plan size (``smoke``: the GPU plan shrunk to tiny shapes,
    for checking the script on any device). case_timeout: seconds per (case, provider, mode).
    deadline: ``time.monotonic()`` after which no new case starts (None: no budget).
    peak_flops / peak_bw: measured ceilings (FLOP/s, bytes/s). l2_bytes: L2 size (input rotation).
    min_run_time: CPU seconds per ``torch.utils.benchmark`` measurement; warmup_ms / rep_ms: ``do_bench``.
    cuda_broken: set after an unrecoverable CUDA error; later cases are skipped with this reason.
    """

    suite: str
    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    full: bool = False
    smoke: bool = False
    case_timeout: float = 120.0
    deadline: float | None = None
    budget_s: float | None = None
    peak_flops: float | None = None
    peak_bw: float | None = None
    l2_bytes: int = 0
    min_run_time: float = 0.2
    warmup_ms: int = 25
    rep_ms: int = 100
    cuda_broken: str = ""
    device_name: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def elt(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def skip_reason(self) -> str:
        """Why no new case may start now ('' if it may)."""
        if self.cuda_broken:
            return f"not run: the CUDA context is unusable after an earlier error ({self.cuda_broken[:160]})"
        if self.out_of_time():
            return f"not run: the time budget of this run ({self.budget_s:.0f} s, --time-budget) was used up"
        return ""


def device_name(device: torch.device) -> str:
    """Readable name of the device under test (GPU model, or the CPU model and core count)."""
    if device.type == "cuda":
        try:
            return torch.cuda.get_device_name(device)
        except Exception:  # pragma: no cover
            return "cuda"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def l2_cache_bytes(device: torch.device) -> int:
    """L2 size of a CUDA device in bytes (50 MiB if torch does not say); 0 on CPU."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or getattr(props, "l2_cache_size", 0) or 50 * 2**20)


def rotation_sets(env: Env, set_bytes: int, max_sets: int = 32) -> int:
    """How many independent input sets to cycle through so that timings do not profit from L2 residency.

    One set when a set is larger than the L2 cache (or on CPU); otherwise enough sets to cover twice the
    L2 size, at most ``max_sets``.
    """
    if not env.is_cuda or set_bytes <= 0 or set_bytes >= env.l2_bytes:
        return 1
    return int(min(max_sets, max(2, math.ceil(2 * env.l2_bytes / set_bytes))))


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Median and inter-quartile range of a timed callable, in ms; ``n`` timed runs (None if unknown)."""

    median_ms: float
    iqr_ms: float
    n: int | None = None


def cycle_calls(fns: Sequence[Callable]) -> Callable:
    """One callable that calls ``fns[0], fns[1], ...`` in turn (input rotation)."""
    if len(fns) == 1:
        return fns[0]
    it = itertools.cycle(fns)
    return lambda: next(it)()


def _median_iqr_ms(times_s: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(times_s), dtype=torch.float64) * 1e3
    return float(t.median()), float(t.quantile(0.75) - t.quantile(0.25))


def time_cpu(fns: Sequence[Callable], min_run_time: float = 0.2, min_samples: int = 3) -> Timing:
    """CPU timing with ``torch.utils.benchmark`` (all torch threads): one warm-up call (excluded), then
    ``blocked_autorange`` (topped up with single runs to at least ``min_samples`` measurements so that the
    spread means something); returns the median and IQR of the per-run times in ms."""
    from torch.utils import benchmark

    fn = cycle_calls(fns)
    fn()  # warm-up, excluded
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)
    while len(times) < min_samples:
        times += list(timer.timeit(number=1).times)
    med, iqr = _median_iqr_ms(times)
    return Timing(med, iqr, len(times))


def time_cuda(fns: Sequence[Callable], warmup_ms: int = 25, rep_ms: int = 100) -> Timing:
    """CUDA timing with ``triton.testing.do_bench`` (L2 flushed before each run by do_bench; ``fns`` are
    rotated input sets): median and IQR (p75 − p25) in ms."""
    from triton.testing import do_bench

    fn = cycle_calls(fns)
    q = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.25, 0.75])
    return Timing(float(q[0]), float(q[2] - q[1]), None)


def time_wall(fn: Callable, repeats: int = 3, warmup: int = 1, cuda: bool = False) -> Timing:
    """Whole-program timing (e.g. ``generate``): ``warmup`` untimed calls, then the median and IQR of
    ``repeats`` ``time.perf_counter`` measurements in ms (synchronising CUDA around each)."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(max(1, repeats)):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    med, iqr = _median_iqr_ms([t / 1e3 for t in ts])
    return Timing(med, iqr, len(ts))


def time_fns(env: Env, fns: Sequence[Callable]) -> Timing:
    """The timer of ``env``'s device: ``do_bench`` on CUDA, ``torch.utils.benchmark`` on CPU."""
    if env.is_cuda:
        return time_cuda(fns, env.warmup_ms, env.rep_ms)
    return time_cpu(fns, env.min_run_time, env.extra.get("min_samples", 3))


# ---------------------------------------------------------------------------------------------------
# Guards
# ---------------------------------------------------------------------------------------------------
class CaseTimeout(Exception):
    """Raised (via SIGALRM) when one measurement runs past ``Env.case_timeout``."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise ``CaseTimeout`` in the main thread after ``seconds`` (no-op elsewhere, or for None/<=0).

    Python-level work (compilation, autotuning, Python loops) is interrupted; a single hung GPU call is
    not — the outer ``timeout`` of ``gpu_check.sh`` covers that.
    """
    if (not seconds or seconds <= 0 or threading.current_thread() is not threading.main_thread()
            or not hasattr(signal, "setitimer")):
        yield
        return

    def _raise(signum, frame):
        raise CaseTimeout(f"exceeded the per-case limit of {seconds:.0f} s (--case-timeout)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


_FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert",
               "misaligned address", "illegal instruction", "CUDA-capable device", "launch timed out")


def describe_error(e: BaseException, limit: int = 400) -> str:
    """``Type: message`` on one line, shortened to ``limit`` characters."""
    msg = " ".join(str(e).split())
    text = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def after_error(env: Env, e: BaseException) -> str:
    """Clean up after a failed measurement; returns the note for the row.

    Out-of-memory frees the cache; an unrecoverable CUDA error marks the context broken so later cases
    are skipped with a reason instead of failing one by one.
    """
    note = describe_error(e)
    if env.is_cuda:
        if any(s in str(e) for s in _FATAL_CUDA):
            env.cuda_broken = note
        else:
            try:
                torch.cuda.synchronize()
            except Exception as e2:  # the error surfaced late: the context is gone
                env.cuda_broken = describe_error(e2)
        free_memory(env)
    return note


def to_device_dtype(module, device, dtype):
    """``module.to(device, dtype)`` keeping every ``inv_freq`` RoPE buffer in float32 (as transformers does):
    a bfloat16 ``inv_freq`` shifts rotary angles by radians at long positions. Returns the module."""
    saved = [(m, m.inv_freq.detach().float().clone()) for m in module.modules()
             if isinstance(getattr(m, "inv_freq", None), torch.Tensor)]
    module.to(device=device, dtype=dtype)
    for m, f in saved:
        m.inv_freq = f.to(device)
    return module


def force_reference(module) -> bool:
    """Switch every submodule with a ``backend`` attribute to ``"reference"``; True if one was not already."""
    changed = False
    for m in module.modules():
        if isinstance(getattr(m, "backend", None), str) and m.backend != "reference":
            m.backend = "reference"
            changed = True
    return changed


def free_memory(env: Env) -> None:
    """Collect garbage and release cached CUDA memory."""
    gc.collect()
    if env.is_cuda and not env.cuda_broken:
        try:
            torch.cuda.empty_cache()
        except Exception:  # pragma: no cover
            pass


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` computed in float32 chunks (inf when x is not finite)."""
    x = x.detach().reshape(-1)
    ref = ref.detach().reshape(-1)
    num = den = 0.0
    step = 1 << 24
    for s in range(0, x.numel(), step):
        a, b = x[s: s + step].float(), ref[s: s + step].float()
        if not torch.isfinite(a).all():
            return math.inf
        num += float(((a - b) ** 2).sum())
        den += float((b**2).sum())
    return math.sqrt(num) / math.sqrt(den) if den > 0 else math.sqrt(num)


def tolerance(dtype: torch.dtype) -> float:
    """Relative error above which a benchmark output is flagged ``mismatch`` (2× DESIGN §6's tolerance)."""
    return {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 2e-2, torch.float64: 1e-6}.get(dtype, 2e-2)


# ---------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------
class Recorder:
    """Collects rows, appends each one to ``results.csv`` at once (flushed: a killed run keeps its rows)
    and prints a progress line (``skip`` rows are counted instead and printed as one line per group by
    ``print_skips``).

    Args:
        out_dir: output folder. env: the run's ``Env`` (fills suite/device and ceiling fractions).
        append: keep the rows already in ``results.csv`` (later groups of the same run in other processes).
    """

    def __init__(self, out_dir: Path, env: Env, append: bool = False, verbose: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "results.csv"
        self.env = env
        self.verbose = verbose
        self.rows: list[Row] = []
        self._skips: list[Row] = []
        if not append or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def add(self, row: Row) -> Row:
        env = self.env
        row.suite = row.suite or env.suite
        row.device = row.device or env.device_name
        row.dtype = row.dtype or env.dtype_name
        if row.tflops is not None and env.peak_flops:
            row.frac_flops = row.tflops * 1e12 / env.peak_flops
        if row.gbps is not None and env.peak_bw:
            row.frac_bw = row.gbps * 1e9 / env.peak_bw
        if row.status not in STATUSES:
            row.status = "error"
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row_to_dict(row))
        if self.verbose and row.status == "skip":
            self._skips.append(row)
        elif self.verbose:
            print(progress_line(row), flush=True)
        return row

    def print_skips(self) -> None:
        """Print the ``skip`` rows added since the last call as one line per group: the count and the most
        common reasons (every row, with its reason, is in results.csv / results.md)."""
        for group, line in summarize_skips(self._skips).items():
            print(f"[{group}] {line}", flush=True)
        self._skips.clear()


def summarize_skips(rows: list[Row]) -> dict[str, str]:
    """``{group: "N cases skipped: reason (xk); reason; M other reasons"}`` over the ``skip`` rows of ``rows``
    (reasons cut before their first ``;`` or parenthesis and shortened to 70 characters at a word; the two most
    common shown)."""
    import textwrap

    def reason(note: str) -> str:
        return textwrap.shorten(note.split(";")[0].split(" (")[0], 70, placeholder=" ...")

    out = {}
    for group in dict.fromkeys(r.group for r in rows if r.status == "skip"):
        notes = collections.Counter(reason(r.note) for r in rows if r.group == group and r.status == "skip")
        n = sum(notes.values())
        why = "; ".join(f"{note} (x{k})" if k > 1 else note for note, k in notes.most_common(2))
        more = f"; {len(notes) - 2} other reasons" if len(notes) > 2 else ""
        out[group] = f"{n} case{'s' if n != 1 else ''} skipped: {why}{more}"
    return out


def progress_line(row: Row) -> str:
    """One-line summary of a row for the console."""
    parts = [f"[{row.group}]", row.case, row.provider, row.mode]
    if row.median_ms is not None:
        parts.append(f"{row.median_ms:.4g} ms")
    if row.tflops is not None:
        parts.append(f"{row.tflops:.4g} TFLOP/s")
    if row.gbps is not None:
        parts.append(f"{row.gbps:.4g} GB/s")
    if row.value is not None:
        parts.append(f"{row.value:.6g} {row.unit}")
    parts.append(row.status)
    if row.note:
        parts.append(row.note[:160])
    return " | ".join(parts)


def timed_row(base: Row, timing: Timing, flops: float | None = None, nbytes: float | None = None) -> Row:
    """``base`` with the timing and the derived TFLOP/s and GB/s filled in."""
    row = dataclasses.replace(base)
    row.median_ms, row.iqr_ms = timing.median_ms, timing.iqr_ms
    sec = timing.median_ms / 1e3
    if sec > 0:
        if flops:
            row.tflops = flops / sec / 1e12
        if nbytes:
            row.gbps = nbytes / sec / 1e9
    return row


# ---------------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------------
def measure_ceilings(env: Env, rec: Recorder) -> None:
    """Measure the matmul (FLOP/s) and copy (bytes read + written per second) ceilings of the device
    under test in the suite's dtype; stores them in ``env`` and records two ``ceiling`` rows.

    GPU: ``8192³`` bf16 matmul and a 512 MiB copy (1 GiB moved). CPU: float32 ``n³`` matmul
    (n = 1024 with --quick, else 2048) and a 64 MiB copy.
    """
    dev, dt = env.device, env.dtype
    if env.is_cuda:
        n = 256 if env.smoke else 8192
        numel = (1 << 20) if env.smoke else (1 << 28)
    else:
        n = 1024 if (env.quick or env.smoke) else 2048
        numel = 1 << 24
    for what in ("matmul", "copy"):
        reason = env.skip_reason()
        if reason:
            rec.add(Row("ceiling", what, "torch", status="skip", note=reason))
            continue
        try:
            with time_limit(env.case_timeout):
                if what == "matmul":
                    a = torch.randn(n, n, device=dev, dtype=dt)
                    b = torch.randn(n, n, device=dev, dtype=dt)
                    c = torch.empty(n, n, device=dev, dtype=dt)
                    t = time_fns(env, [lambda a=a, b=b, c=c: torch.mm(a, b, out=c)])
                    flops = matmul_flops(n, n, n)
                    env.peak_flops = flops / (t.median_ms / 1e3)
                    rec.add(timed_row(Row("ceiling", f"matmul {n}x{n}x{n}", "torch.mm", "-",
                                          shape=f"M=N=K={n}", value=env.peak_flops / 1e12, unit="TFLOP/s",
                                          note="FLOP/s ceiling: 2·n³ / median time"), t, flops=flops))
                    del a, b, c
                else:
                    src = torch.empty(numel, device=dev, dtype=dt).uniform_()
                    dst = torch.empty_like(src)
                    t = time_fns(env, [lambda dst=dst, src=src: dst.copy_(src)])
                    nbytes = 2.0 * src.numel() * src.element_size()
                    env.peak_bw = nbytes / (t.median_ms / 1e3)
                    rec.add(timed_row(Row("ceiling", f"copy {src.numel() * src.element_size() >> 20} MiB", "copy_",
                                          "-", shape=f"numel={numel}", value=env.peak_bw / 1e9, unit="GB/s",
                                          note="bandwidth ceiling: bytes read + written / median time"),
                                      t, nbytes=nbytes))
                    del src, dst
        except Exception as e:  # noqa: BLE001 - every failure becomes a row
            rec.add(Row("ceiling", what, "torch", status="error", note=after_error(env, e)))
        free_memory(env)


def load_ceilings(env: Env, rows: Sequence[Row]) -> bool:
    """Take the ceilings from rows of an earlier process of the same run (``--append``); True if both found."""
    for r in rows:
        if r.group != "ceiling" or r.status != "ok" or r.value is None:
            continue
        if r.unit == "TFLOP/s":
            env.peak_flops = r.value * 1e12
        elif r.unit == "GB/s":
            env.peak_bw = r.value * 1e9
    return bool(env.peak_flops and env.peak_bw)


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------
def git_commit() -> str:
    """``<sha>[+dirty]`` of the checkout, or a sentence saying there is none."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0:
            return os.environ.get("BENCH_GIT_COMMIT", "unknown (no git checkout)")
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("BENCH_GIT_COMMIT", "unknown (git not available)")


def _version(mod: str) -> str:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001 - an optional package may fail to import in any way
        return "not installed"


def metadata(env: Env, argv: Sequence[str]) -> dict:
    """Date, versions, device, git commit and the command of this run."""
    md = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "suite": env.suite + (" --quick" if env.quick else "") + (" --full" if env.full else "")
        + (" --smoke" if env.smoke else ""),
        "device": env.device_name,
        "dtype": env.dtype_name,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "git commit": git_commit(),
        "host": platform.node(),
        "command": "python -m bench.run " + " ".join(argv),
    }
    if env.is_cuda:
        md["cuda"] = str(torch.version.cuda)
        props = torch.cuda.get_device_properties(env.device)
        md["gpu memory"] = f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
    return md

