"""The environment of a benchmark run: ``Env`` (device, dtype, limits, measured ceilings), device facts
(name, L2 size, input-set rotation) and the run metadata (git commit, versions)."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

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
