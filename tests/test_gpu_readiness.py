"""GPU-readiness checks that run without a GPU (issue: device guard, fp32 precision, per-arch shared
memory, relaxed atomics, pinned configurations).

* Every kernel launch in ``kernels/`` goes through ``kernels._common.launch``, which makes the first
  tensor's CUDA device current (Triton launches on the current device, not the tensors').
* fp32 matrix products default to IEEE; TF32 only when allowed (argument, or
  ``torch.backends.cuda.matmul.allow_tf32``), checked on the launch arguments under the interpreter
  and in the compiled PTX (``mma``/``wgmma`` on ``tf32`` operands).
* Top-k atomic dK/dV uses relaxed atomics (PTX ``red``/``atom`` ``.relaxed``, never ``acq_rel``).
* Config tables respect each architecture's shared-memory limit (99 KiB parts get their own tiles;
  the compiled sm86 code fits).
* ``kernels.tuning``: pins and deterministic mode replace autotuning in the launchers.

PTX checks compile in a subprocess (this process runs the kernels under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import tuning  # noqa: E402
from kernels._common import dot_precision, launch, tf32_allowed  # noqa: E402
from kernels._config import HAS_TRITON, INTERPRET, SMEM_LIMIT_BYTES, arch_family, smem_limit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
needs_interp = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available() or not INTERPRET,
                                  reason="runs the launchers under the Triton interpreter on CPU")


# --------------------------------------------------------------------------------------------
# 1. one launch helper, entered on the tensors' device
# --------------------------------------------------------------------------------------------


def _direct_launches(path: Path) -> list[str]:
    """``name[grid](...)`` calls in ``path`` (a subscripted callee is how Triton launches)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [f"{path.name}:{n.lineno}: {ast.unparse(n.func)[:60]}" for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Subscript)]


def test_every_kernel_launch_goes_through_the_device_helper():
    files = sorted((ROOT / "kernels").glob("*.py"))
    assert len(files) >= 6
    helper = ROOT / "kernels" / "_common.py"
    assert len(_direct_launches(helper)) == 2  # the helper's own two launches
    offenders = [hit for f in files if f != helper for hit in _direct_launches(f)]
    assert not offenders, "launch these with kernels._common.launch:\n" + "\n".join(offenders)


class _FakeCuda(torch.Tensor):
    """A CPU tensor that reports ``cuda:1`` as its device (nothing else is needed by ``launch``)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_enters_the_first_tensors_cuda_device(monkeypatch):
    entered, calls = [], []

    @contextlib.contextmanager
    def fake_device(dev):
        entered.append(torch.device(dev))
        yield

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                calls.append((grid, len(entered), kwargs))
                return "launched"
            return run

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    x = torch.zeros(2).as_subclass(_FakeCuda)
    assert launch(Kernel(), (3,), 7, x, torch.zeros(1), BLOCK=4) == "launched"
    assert entered == [torch.device("cuda", 1)]
    assert calls == [((3,), 1, {"BLOCK": 4})]  # launched inside the device context
    entered.clear()
    assert launch(Kernel(), (1,), torch.zeros(1), x) == "launched"  # CPU first tensor: no context
    assert entered == []


# --------------------------------------------------------------------------------------------
# 2. fp32 products: IEEE unless TF32 is allowed
# --------------------------------------------------------------------------------------------


@pytest.fixture
def set_tf32():
    """Setter for ``torch.backends.cuda.matmul.allow_tf32``, restored after the test (monkeypatch
    cannot restore attributes of torch's cuBLAS settings module)."""
    old = torch.backends.cuda.matmul.allow_tf32

    def set_(flag: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = flag

    yield set_
    torch.backends.cuda.matmul.allow_tf32 = old


def test_dot_precision_follows_torch_switch(set_tf32):
    set_tf32(False)
    assert dot_precision(torch.float32) == "ieee" and dot_precision("fp32") == "ieee"
    assert dot_precision(torch.float32, True) == "tf32" and not tf32_allowed()
    for dt in (torch.float16, torch.bfloat16, "fp16", "bf16"):
        assert dot_precision(dt) == "tf32" and dot_precision(dt, False) == "tf32"  # ignored for 16-bit
    set_tf32(True)
    assert dot_precision(torch.float32) == "tf32" and tf32_allowed()
    assert dot_precision(torch.float32, False) == "ieee"  # an explicit argument wins


def _record(monkeypatch, *modules):
    """Wrap ``launch`` in each kernel module: record (kernel name, kwargs), then launch."""
    seen = []

    def rec(kernel, grid, *args, **kwargs):
        seen.append((getattr(kernel, "__name__", type(kernel).__name__), kwargs))
        return launch(kernel, grid, *args, **kwargs)

    for m in modules:
        monkeypatch.setattr(m, "launch", rec)
    return seen


def _precisions(seen) -> set:
    return {kw.get("DOT", kw.get("DOT_PRECISION")) for _, kw in seen} - {None}


@needs_interp
@pytest.mark.parametrize("allow", [None, True, False, "torch"])
@pytest.mark.interpreter
def test_dense_and_block_sparse_launchers_pass_dot_precision(monkeypatch, set_tf32, allow):
    from kernels import attention_bwd, attention_fwd, block_sparse

    set_tf32(allow == "torch")
    kw = {} if allow in (None, "torch") else {"allow_tf32": allow}
    want = "tf32" if allow in (True, "torch") else "ieee"
    seen = _record(monkeypatch, attention_fwd, attention_bwd, block_sparse)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 2, 16, generator=g) for _ in range(3))
    out, lse, _ = attention_fwd.attention_fwd(q, k, v, 0.25, True, **kw)
    attention_bwd.attention_bwd(torch.randn_like(out), q, k, v, out, lse, 0.25, True, **kw)
    num = torch.ones(1, 1, 1, dtype=torch.int32)
    idx = torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    out, lse, _ = block_sparse.block_sparse_attention_fwd(q, k, v, num, idx, (8, 8), 0.25, True, **kw)
    block_sparse.block_sparse_attention_bwd(torch.randn_like(out), q, k, v, out, lse, num, idx, num, idx, (8, 8),
                                            0.25, True, **kw)
    names = [n for n, _ in seen]
    assert names.count("_attn_fwd_kernel") == 2 and names.count("bwd_preprocess") == 2
    assert names.count("_attn_bwd_dkdv_kernel") == 2 and names.count("_attn_bwd_dq_kernel") == 2
    assert _precisions(seen) == {want}
    assert all(kw_["DOT"] == want for n, kw_ in seen if n != "bwd_preprocess")
    # 16-bit inputs: the switch is irrelevant, tensor-core products
    seen.clear()
    attention_fwd.attention_fwd(q.half(), k.half(), v.half(), 0.25, True, **kw)
    assert _precisions(seen) == {"tf32"}


@needs_interp
@pytest.mark.parametrize("allow", [None, True])
@pytest.mark.slow
@pytest.mark.interpreter
def test_topk_and_decode_launchers_pass_dot_precision(monkeypatch, set_tf32, allow):
    from kernels import decode, topk_sparse

    set_tf32(False)
    kw = {} if allow is None else {"allow_tf32": allow}
    want = "tf32" if allow else "ieee"
    seen = _record(monkeypatch, topk_sparse, decode)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 4, 2, 16, generator=g) for _ in range(3))
    rows = torch.tensor([[0, 1], [1, 2], [0, 3], [2, 3]], dtype=torch.int32)
    idx = rows[None, :, None, :].expand(1, 4, 2, 2).contiguous()  # [B, T, Hkv, K]
    out, lse, _ = topk_sparse.topk_attention_fwd(q, k, v, idx, 0.25, True, **kw)
    for det in (True, False):
        topk_sparse.topk_attention_bwd(torch.randn_like(out), q, k, v, out, lse, idx, 0.25, True,
                                       deterministic=det, **kw)
    cache = torch.randn(2, 4, 1, 24, generator=g)
    decode.mla_decode_fwd(torch.randn(1, 1, 2, 24, generator=g), cache, torch.tensor([[0, 1]], dtype=torch.int32),
                          torch.tensor([6], dtype=torch.int32), 0.2, 16, **kw)
    names = {n for n, _ in seen}
    assert {"_topk_fwd_kernel", "_topk_bwd_pre_kernel", "_topk_bwd_q_kernel", "_topk_bwd_kv_det_kernel",
            "_mla_decode_split_kernel"} <= names
    assert _precisions(seen) == {want}


def _fake_result(**kw):
    from kernels._compile import CompileResult
    from kernels._config import CompileSpec

    spec = CompileSpec(kernel="k", fn=None, signature={}, constexprs={}, num_warps=4, num_stages=2,
                       arch=kw.pop("arch", 86), dtype=kw.pop("dtype", "fp32"), head_dims=(64, 64), tile="64x64",
                       extra={"allow_tf32": kw.pop("allow_tf32", False)})
    base = dict(registers=100, spill_stores=0, spill_loads=0, shared=1024, wgmma=False, has_dot=True, seconds=0.1)
    base.update(kw)
    return CompileResult(spec=spec, **base)


def test_compile_rows_report_arch_limit_tf32_and_atomics():
    r = _fake_result()
    row = r.row()
    assert row["arch"] == 86 and row["smem_limit"] == 99 * 1024 and row["tf32"] is False
    assert row["status"] == "ok"
    assert _fake_result(tf32=True).status == "tf32"  # TF32 without the switch fails the check
    assert _fake_result(tf32=True, allow_tf32=True).status == "ok"
    assert _fake_result(shared=99 * 1024 + 1).status == "smem"
    assert _fake_result(arch=80, shared=99 * 1024 + 1).status == "ok"
    assert _fake_result(atomics=("relaxed", "acq_rel")).status == "atomic-sem"
    assert _fake_result(atomics=("relaxed",)).row()["atomics"] == "relaxed"


def test_ptx_scanners():
    from kernels._compile import ptx_atomic_semantics, ptx_uses_tf32

    sm80 = "\tmma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
    sm90 = "\twgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {%f1}, %rd1, %rd2, 1, 1, 1;\n"
    fp16 = "\tmma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%f1}, {%r1}, {%r2}, {%f2};\n"
    assert ptx_uses_tf32(sm80) and ptx_uses_tf32(sm90) and not ptx_uses_tf32(fp16)
    assert not ptx_uses_tf32("\tcvt.rna.tf32.f32 %r1, %f1;\n\tfma.rn.f32 %f1, %f2, %f3, %f4;\n")
    ptx = ("\t@%p1 red.global.gpu.relaxed.add.f32 [%rd1], %f1;\n"
           "\t@%p2 atom.global.gpu.acq_rel.add.f32 %f2, [%rd2], %f3;\n\tld.global.f32 %f4, [%rd3];\n")
    assert ptx_atomic_semantics(ptx) == ("relaxed", "acq_rel")


# --------------------------------------------------------------------------------------------
# 3. shared memory per architecture
# --------------------------------------------------------------------------------------------


def test_shared_memory_table_and_families():
    # CUDA C++ Programming Guide, max shared memory per block (opt-in), KiB
    kib = {80: 163, 86: 99, 87: 163, 89: 99, 90: 227, 100: 227, 120: 99}
    for arch, k in kib.items():
        assert smem_limit(arch) == SMEM_LIMIT_BYTES[arch] == k * 1024
    assert smem_limit(75) == 99 * 1024  # unknown: the smallest listed, never a larger guess
    assert {a: arch_family(a) for a in (80, 86, 87, 89, 90, 100, 120)} == {
        80: 80, 86: 86, 87: 80, 89: 86, 90: 90, 100: 90, 120: 86}


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_consumer_gpus_get_their_own_tiles():
    """sm86/sm89/sm120 (99 KiB) must not get the sm80 tiles that need 112 KiB (decode 576/512,
    top-k forward with 128 heads, dense forward 576/512) or 154 KiB (dense dQ 576/512)."""
    from kernels import attention_bwd, attention_fwd, decode, topk_sparse

    for arch in (86, 89, 120):
        assert decode.decode_config(576, 512, torch.float16, arch, interpret=False)["BLOCK_N"] == 16
        assert decode.decode_config(576, 512, torch.float16, 80, interpret=False)["BLOCK_N"] == 32
        big = topk_sparse.topk_config("fwd", arch, 576, 512, 128, "fp16", interpret=False)
        assert big.tile == "64x16/v2", big
        assert all(c.block_n == 16 for c in attention_fwd.fwd_configs(arch, 576, 512, "fp16"))
        assert all(c.block_m <= 32 for c in attention_bwd.bwd_configs("dq", arch, 576, 512, "fp16"))


# --------------------------------------------------------------------------------------------
# 8. pinned / deterministic configurations
# --------------------------------------------------------------------------------------------


@pytest.fixture
def clean_tuning(monkeypatch):
    monkeypatch.delenv(tuning.ENV, raising=False)
    tuning.clear_pins()
    tuning.set_deterministic(False)
    yield
    tuning.clear_pins()
    tuning.set_deterministic(False)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_choose_pins_and_deterministic(clean_tuning, monkeypatch):
    from kernels._common import TileConfig

    # Two candidates of the d576 class (the tables may list fewer; the choice logic is what is tested).
    cands = [TileConfig(128, 32, nsplit=2, num_warps=8, num_stages=2, bc=256),
             TileConfig(64, 32, nsplit=2, num_warps=8, num_stages=2, stream=True)]
    assert tuning.choose("attention_fwd", "d576", cands) is None  # default: autotune
    with tuning.deterministic():
        assert tuning.choose("attention_fwd", "d576", cands) == cands[0]
    assert not tuning.is_deterministic()
    name = tuning.config_name(cands[1])
    tuning.pin_config("attention_fwd", "d576", name)
    assert tuning.choose("attention_fwd", "d576", cands) == cands[1]
    tuning.pin_config("attention_fwd", "d576", cands[1])
    assert tuning.choose("attention_fwd", "d576", cands) == cands[1]
    tuning.pin_config("attention_fwd", "d576", "#0")
    assert tuning.choose("attention_fwd", "d576", cands) == cands[0]
    tuning.pin_config("attention_fwd", "d576", "1x1:w1s1")
    with pytest.raises(ValueError, match="not a candidate"):
        tuning.choose("attention_fwd", "d576", cands)
    tuning.clear_pins()
    monkeypatch.setenv(tuning.ENV, f"deterministic; attention_fwd:d576={name}")
    assert tuning.is_deterministic() and tuning.choose("attention_fwd", "d576", cands) == cands[1]
    assert tuning.choose("attention_bwd_dq", "d576", [cands[0]]) == cands[0]
    for bad in ("attention_fwd=64x64", "nope:d64=#0", "attention_fwd:d99=#0"):
        monkeypatch.setenv(tuning.ENV, bad)
        with pytest.raises(ValueError):
            tuning.is_deterministic()
    with pytest.raises(ValueError):
        tuning.pin_config("attention_fwd", "d1000", "#0")
    with pytest.raises(TypeError):
        tuning.pin_config("attention_fwd", "d64", 3)


@needs_interp
def test_launchers_use_pinned_configs_and_never_autotune(clean_tuning, monkeypatch):
    """With deterministic mode or a pin the GPU launch path takes a fixed table entry (no timing:
    safe inside CUDA-graph capture); without either it autotunes."""
    from kernels import attention_bwd, attention_fwd, block_sparse

    for m in (attention_fwd, attention_bwd, block_sparse):
        monkeypatch.setattr(m, "compiled_launch", lambda q: True)
        monkeypatch.setattr(m, "device_arch", lambda device: 80)
    fixed, tuned = [], []
    monkeypatch.setattr(attention_fwd, "_launch", lambda *a, **kw: fixed.append(a[9]))
    monkeypatch.setattr(attention_fwd, "_launch_autotuned", lambda *a, **kw: tuned.append("fwd"))
    monkeypatch.setattr(attention_bwd, "_launch_bwd", lambda *a, **kw: fixed.append((a[14], a[15])))
    monkeypatch.setattr(block_sparse, "launch", lambda kernel, grid, *a, **kw: (
        tuned.append("bs") if hasattr(kernel, "configs") else fixed.append(kw.get("BLOCK_M"))))
    q = torch.randn(1, 8, 2, 64)
    out, lse = torch.zeros(1, 8, 2, 64), torch.zeros(1, 2, 8)
    cands = attention_fwd.fwd_configs(80, 64, 64, "fp32")

    attention_fwd.attention_fwd(q, q, q, 0.1, True)
    assert tuned == ["fwd"] and not fixed
    tuned.clear()
    tuning.set_deterministic(True)
    attention_fwd.attention_fwd(q, q, q, 0.1, True)
    attention_bwd.attention_bwd(out, q, q, q, out, lse, 0.1, True)
    assert fixed == [cands[0], (attention_bwd.bwd_configs("dkdv", 80, 64, 64, "fp32")[0],
                                attention_bwd.bwd_configs("dq", 80, 64, 64, "fp32")[0])]
    num, idx = torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    block_sparse.block_sparse_attention_fwd(q, q, q, num, idx, (8, 8), 0.1, True)
    assert not tuned
    tuning.set_deterministic(False)
    fixed.clear()
    tuning.pin_config("attention_fwd", "d64", "#0")
    attention_fwd.attention_fwd(q, q, q, 0.1, True)
    assert fixed == [cands[0]] and not tuned


# --------------------------------------------------------------------------------------------
# PTX checks (compiled for real GPUs in a subprocess: ptxas bundled with triton, no GPU)
# --------------------------------------------------------------------------------------------

_PTX_SCRIPT = r"""
import json, warnings
warnings.filterwarnings("ignore")
import torch
from kernels._compile import compile_spec
from kernels.attention_fwd import FwdConfig, fwd_spec
from kernels import decode, topk_sparse as tk

rows = {}
cfg = FwdConfig(64, 32, num_warps=4, num_stages=2)
for arch in (80, 90):
    for allow in (False, True):
        r = compile_spec(fwd_spec(arch, "fp32", 64, 64, 1, False, cfg, allow_tf32=allow))
        rows[f"fwd{arch}-{allow}"] = dict(tf32=r.tf32, status=r.status)
    for part in (1, 2):
        s = tk.topk_spec("dkdv_atomic", arch, "fp16", 64, 64, 8, 2, False,
                         cfg=tk.TopkConfig(64, 32, num_warps=4, num_stages=2), part=part)
        r = compile_spec(s)
        rows[f"atomic{arch}-{part}"] = dict(atomics=list(r.atomics), status=r.status)
s = decode._split_spec(86, torch.float16, 576, 512, 128, 1, causal=True, topk=True, direct=False)
r = compile_spec(s)
rows["decode86"] = dict(shared=r.shared, status=r.status)
print("ROWS" + json.dumps(rows))
"""


@pytest.fixture(scope="module")
def ptx_rows():
    pytest.importorskip("triton")
    from kernels._compile import find_ptxas

    if not find_ptxas():
        pytest.skip("no ptxas bundled with triton")
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                         if p]))
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS"))
    return json.loads(line[4:])


@pytest.mark.slow
def test_ptx_fp32_has_tf32_only_when_allowed(ptx_rows):
    for arch in (80, 90):
        assert ptx_rows[f"fwd{arch}-False"]["tf32"] is False
        assert "tf32" not in ptx_rows[f"fwd{arch}-False"]["status"]
        assert ptx_rows[f"fwd{arch}-True"]["tf32"] is True  # the switch does reach the PTX
        assert "tf32" not in ptx_rows[f"fwd{arch}-True"]["status"]  # allowed in that spec


@pytest.mark.slow
def test_ptx_topk_atomics_are_relaxed(ptx_rows):
    for arch in (80, 90):
        for part in (1, 2):
            atomics = ptx_rows[f"atomic{arch}-{part}"]["atomics"]
            assert atomics and set(atomics) == {"relaxed"}, atomics
            assert ptx_rows[f"atomic{arch}-{part}"]["status"] == "ok"


@pytest.mark.slow
def test_ptx_decode_fits_consumer_gpus(ptx_rows):
    r = ptx_rows["decode86"]
    assert r["status"] == "ok" and 0 < r["shared"] <= smem_limit(86), r
    assert math.isfinite(r["shared"])
