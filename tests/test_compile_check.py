"""Compile check (DESIGN §6.3): every kernel configuration the launchers may pick compiles without a
GPU for sm80 (A100), sm86 (RTX 30xx / A10), sm89 (RTX 40xx / L4) and sm90 (H100/H200); fits each
architecture's shared memory (``kernels._config.SMEM_LIMIT_BYTES``); uses wgmma on sm90 for
fp16/bf16 matrix products; has no TF32 product unless the spec allows it and only relaxed atomics;
and spills no registers: fp16/bf16 everywhere, fp32 (IEEE products) except the rows listed in
:data:`FP32_SPILLS_DOCUMENTED` (also listed with their bytes in the README).

The kernel modules come from ``kernels._config.KERNEL_MODULES``. Each module is compiled by
``python -m bench.compile_report`` in a subprocess: on a machine without CUDA, tests/conftest.py
sets ``TRITON_INTERPRET=1`` for this process, and kernels decorated under the interpreter cannot be
compiled. Triton's cache and the ptxas-usage cache
(``$TRITON_CACHE_DIR/ptxas-usage``) make reruns fast.

To keep a cold run short the default set is ``--quick``: every fp16 spec (every tile
configuration the launchers can pick, on every architecture, every shape) plus the bf16 and fp32
specs of the absorbed MLA shape with 128 heads and ``v`` aliasing ``k``. bf16 compiles to the same
tiles and MMA shapes as fp16 and measured the same registers and shared memory for every tile
kernel (triton 3.6 and 3.9; only the tiny delta-preprocess kernel differs by a few registers).
``MLA_COMPILE_CHECK_FULL=1`` compiles every spec (as ``python -m bench.compile_report`` does by default).
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
from kernels._config import DEFAULT_ARCHS, KERNEL_MODULES, smem_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# sm100 / sm120 are in ``python -m bench.compile_report``'s default set when Triton can target them
# (``kernels._compile.target_archs``), not in this check yet: a few sm100 configurations spill.
ARCHS = DEFAULT_ARCHS
FULL = os.environ.get("MLA_COMPILE_CHECK_FULL", "0") not in ("", "0")
#: fp32 kernels (IEEE products on CUDA cores: a correctness path) whose spills are known and listed
#: in the README: (kernel name prefix, Dk/Dv). Everything else must be clean.
FP32_SPILLS_DOCUMENTED = {("mla_decode_split", "576/512"), ("topk_", "576/512"), ("attention_", "576/512"),
                          ("block_sparse_", "576/512")}


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
    bad = [r for r in rows if r["status"] != "ok" and not _documented_fp32_spill(r)]
    report = "\n".join(
        f"{r['kernel']} sm{r['arch']} {r['dtype']} {r['head_dims']} {r['tile']} w{r['warps']} s{r['stages']}: "
        f"{r['status']} (regs {r['registers']}, spill {r['spill_bytes']} B, smem {r['shared_bytes']} B)"
        for r in bad
    )
    assert not bad, f"{len(bad)} of {len(rows)} configurations not clean:\n{report}"
    for r in rows:
        assert r["shared_bytes"] <= smem_limit(r["arch"]) == r["smem_limit"]
        assert r["spill_bytes"] == 0 or _documented_fp32_spill(r)
        assert not r["tf32"] or r["dtype"] != "fp32" or "tf32" not in r["status"]
    if module == "decode":  # FP8-cache specs: Triton's e4m3 conversion on sm89+, the integer path below
        fp8 = [(r["arch"], r["fp8_cvt"]) for r in rows if r["fp8_cvt"]]
        assert fp8 and all(cvt == ("e4m3x2" if arch >= 89 else "software") for arch, cvt in fp8), fp8


def _documented_fp32_spill(r: dict) -> bool:
    if r["status"] != "spills":
        return False
    return r["dtype"] == "fp32" and any(r["kernel"].startswith(k) and r["head_dims"] == hd
                                        for k, hd in FP32_SPILLS_DOCUMENTED)


def test_attention_specs_cover_autotune_sets():
    """compile_specs lists every autotune candidate of the dense kernels, per dtype and architecture,
    for the representative shapes and the absorbed deployment shapes; fp32 specs use IEEE products
    except the ones built with TF32 allowed."""
    from kernels import attention_bwd as bwd
    from kernels import attention_fwd as fwd

    for arch in ARCHS:
        fspecs = fwd.compile_specs(arch)
        bspecs = bwd.compile_specs(arch)
        for dk, dv, group, alias in fwd.SPEC_SHAPES:
            for dtype in fwd.SPEC_DTYPES:
                key = ((dk, dv), dtype, group, alias, False)

                def same(s, key=key):
                    return (s.head_dims, s.dtype, s.extra.get("group"), s.extra.get("v_is_k"),
                            bool(s.extra.get("allow_tf32"))) == key
                got = {s.extra["config"] for s in fspecs if same(s)}
                assert got == set(fwd.fwd_configs(arch, dk, dv, dtype, alias)), (arch, dk, dv, dtype)
                for kind in ("dkdv", "dq"):
                    got = {s.extra["config"] for s in bspecs if same(s) and s.kernel.endswith(kind)}
                    assert got == set(bwd.bwd_configs(kind, arch, dk, dv, dtype, alias)), (arch, kind, dk, dv, dtype)
        for s in fspecs + bspecs:
            assert s.arch == arch
        absorbed = [s for s in fspecs + bspecs if s.head_dims == (576, 512) and "preprocess" not in s.kernel]
        # deployment shapes: 128 heads (one GPU), 16 (8-way tensor parallel), 1; v aliasing k or not
        want = {(g, True) for g in (1, 16, 128)} | {(128, False)}
        for kernel in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"):
            for dtype in fwd.SPEC_DTYPES:
                got = {(s.extra["group"], s.extra["v_is_k"]) for s in absorbed
                       if s.kernel == kernel and s.dtype == dtype}
                assert got == want, (arch, kernel, dtype, got)
        tf32 = [s for s in fspecs + bspecs if s.extra.get("allow_tf32")]
        assert tf32 and all(s.dtype == "fp32" and s.constexprs["DOT"] == "tf32" for s in tf32)
        for s in fspecs + bspecs:
            if "preprocess" not in s.kernel and not s.extra.get("allow_tf32"):
                assert s.constexprs["DOT"] == ("ieee" if s.dtype == "fp32" else "tf32"), s
