"""Timing of benchmark cases: CPU / CUDA timers with median and IQR, a per-case time limit, and the
matmul / copy ceilings measured with them. Times in milliseconds."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bench.env import Env
from bench.guards import after_error, free_memory
from bench.rows import Recorder, Row, timed_row
from bench.work import matmul_flops


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
        if rec.skipped(Row("ceiling", what, "torch")):
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
