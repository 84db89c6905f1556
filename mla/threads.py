"""CPU thread count for the command-line tools (``python -m mla.train``, ``bench.run``, the examples).

PyTorch starts one OpenMP thread per core. When other processes already keep some cores busy, those
threads are oversubscribed: they spin-wait on each other at every parallel region and a CPU training step
runs several times slower than on fewer threads (measured: 30 steps of ``python -m mla.train`` on a busy
2-core machine took 3–3.7 min with 2 threads, 26 s with 1). ``auto_threads`` keeps torch's count but
never more than the cores left idle, split between the processes of a ``torchrun`` job.
"""

from __future__ import annotations

import os

import torch

__all__ = ["auto_threads", "describe_threads"]


def auto_threads(processes: int | None = None) -> int:
    """Torch CPU threads to use in this process: ``torch.get_num_threads()`` limited to the cores left idle
    by other processes, divided among ``processes`` local processes.

    Args:
        processes: processes sharing this machine (default: ``$LOCAL_WORLD_SIZE`` as set by ``torchrun``,
            else 1).

    Returns:
        An int >= 1: ``max(1, min(torch threads, (cpu_count - 1-minute load average) // processes))``;
        torch's count where the load average is unavailable (not on Unix).
    """
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    processes = max(1, processes)
    n = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        return max(1, n // processes)
    idle = int((os.cpu_count() or 1) - load + 0.5)
    return max(1, min(n, idle // processes))


def describe_threads(chosen: int | None) -> str:
    """A log fragment saying how many torch threads run and why, e.g. ``"1 torch thread (auto: 2 cores,
    load 1.9; --threads N to override)"``. ``chosen`` is the user's explicit count, or None for automatic."""
    n = torch.get_num_threads()
    head = f"{n} torch thread{'s' if n != 1 else ''}"
    if chosen is not None:
        return f"{head} (--threads)"
    try:
        load = f", load {os.getloadavg()[0]:.1f}"
    except (OSError, AttributeError):
        load = ""
    return f"{head} (auto: {os.cpu_count()} cores{load}; --threads N to override)"
