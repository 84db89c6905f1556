"""Compile check (DESIGN §6.3): every kernel configuration the autotuners may pick compiles for
sm80 (A100) and sm90 (H100/H200) without a GPU, spills no registers, fits shared memory, and
uses wgmma on sm90 for fp16/bf16 matrix products.

The kernel modules come from ``kernels._config.KERNEL_MODULES``. Each module is compiled by
``python -m bench.compile_report`` in a subprocess: on a machine without CUDA, tests/conftest.py
sets ``TRITON_INTERPRET=1`` for this process, and kernels decorated under the interpreter cannot be
compiled. Triton's cache and the ptxas-usage cache
(``$TRITON_CACHE_DIR/ptxas-usage``) make reruns fast.

To keep a cold run within a few minutes on 2 cores the default set is ``--quick``: every fp16
spec (every tile configuration the autotuners can pick, on both architectures) plus the bf16 and
fp32 specs of the absorbed MLA shape (576/512). bf16 compiles to the same tiles and MMA shapes as
fp16 and measured the same registers and shared memory for every tile kernel (triton 3.6 and
3.9; only the tiny delta-preprocess kernel differs by a few registers). ``MLA_COMPILE_CHECK_FULL=1`` compiles
every spec (as ``python -m bench.compile_report`` does by default).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from kernels._compile import find_ptxas  # noqa: E402
from kernels._config import KERNEL_MODULES, smem_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (80, 90)
FULL = os.environ.get("MLA_COMPILE_CHECK_FULL", "0") not in ("", "0")


def _modules() -> list[str]:
    """Every kernel module (an import error fails its test: a broken module must not pass silently)."""
    return [name.rsplit(".", 1)[-1] for name in KERNEL_MODULES]


def _compile_report(module: str, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"{module}.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "bench.compile_report", "--kernels", module, "--no-fail",
           "--arch", ",".join(map(str, ARCHS)), "--json", str(out)]
    if not FULL:
        cmd.append("--quick")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "skipped" not in proc.stdout, proc.stdout[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.skipif(not find_ptxas(), reason="no ptxas bundled with triton")
@pytest.mark.parametrize("module", _modules())
def test_configs_compile_clean(module, tmp_path):
    assert hasattr(importlib.import_module(f"kernels.{module}"), "compile_specs"), module
    rows = _compile_report(module, tmp_path)
    assert rows, f"{module}.compile_specs returned nothing"
    assert {r["arch"] for r in rows} == set(ARCHS)
    bad = [r for r in rows if r["status"] != "ok"]
    report = "\n".join(
        f"{r['kernel']} sm{r['arch']} {r['dtype']} {r['head_dims']} {r['tile']} w{r['warps']} s{r['stages']}: "
        f"{r['status']} (regs {r['registers']}, spill {r['spill_bytes']} B, smem {r['shared_bytes']} B)"
        for r in bad
    )
    assert not bad, f"{len(bad)} of {len(rows)} configurations not clean:\n{report}"
    for r in rows:
        assert r["spill_bytes"] == 0 and r["shared_bytes"] <= smem_limit(r["arch"])
    if module == "decode":  # FP8-cache specs: Triton's e4m3 conversion on sm90, the integer path on sm80
        assert {(r["arch"], r["fp8_cvt"]) for r in rows if r["fp8_cvt"]} == {(80, "software"), (90, "e4m3x2")}


def test_attention_specs_cover_autotune_sets():
    """compile_specs lists every autotune candidate of the dense kernels, per dtype, for the
    representative shapes, the absorbed one with 128 packed heads and v aliasing k."""
    from kernels import attention_bwd as bwd
    from kernels import attention_fwd as fwd

    for arch in ARCHS:
        fspecs = fwd.compile_specs(arch)
        bspecs = bwd.compile_specs(arch)
        for dk, dv, _group, _alias in fwd.SPEC_SHAPES:
            for dtype in fwd.SPEC_DTYPES:
                got = {s.extra["config"] for s in fspecs if s.head_dims == (dk, dv) and s.dtype == dtype}
                assert got == set(fwd.fwd_configs(arch, dk, dv, dtype)), (arch, dk, dv, dtype)
                for kind in ("dkdv", "dq"):
                    got = {s.extra["config"] for s in bspecs
                           if s.head_dims == (dk, dv) and s.dtype == dtype and s.kernel.endswith(kind)}
                    assert got == set(bwd.bwd_configs(kind, arch, dk, dv, dtype)), (arch, kind, dk, dv, dtype)
        for s in fspecs + bspecs:
            assert s.arch == arch
        absorbed = [s for s in fspecs + bspecs if s.head_dims == (576, 512) and "preprocess" not in s.kernel]
        assert absorbed and all(s.extra["v_is_k"] and s.extra["group"] == 128 for s in absorbed)
