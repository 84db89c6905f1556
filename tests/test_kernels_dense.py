"""Dense fused attention kernels (kernels.attention_fwd / attention_bwd) against a float64 formula.

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; on CUDA the same cases run compiled, plus bf16 (the interpreter's bf16 dot
is broken, DESIGN §6). Outputs and gradients are written into NaN-filled buffers so that any
element a kernel fails to write fails the test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import assert_stat as _assert_stat  # noqa: E402
from helpers import kernel_tol  # noqa: E402
from helpers import rel_err as rel  # noqa: E402

from kernels import attention_bwd as bwd_mod  # noqa: E402
from kernels import attention_fwd as fwd_mod  # noqa: E402
from kernels._config import INTERPRET  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")


# ---------------------------------------------------------------------------------------------
# Independent float64 oracle (full score matrix)
# ---------------------------------------------------------------------------------------------


def formula(q, k, v, scale: float, causal: bool):
    """float64 ``(out [B,T,Hq,Dv], lse [B,Hq,T], max_logit [B,Hq])``; bottom-right causal;
    rows without keys: out 0, lse +inf; heads without keys: max_logit -inf. Differentiable."""
    q, k, v = q.double(), k.double(), v.double()
    T, S = q.shape[1], k.shape[1]
    G = q.shape[2] // k.shape[2]
    kk = k.repeat_interleave(G, dim=2)
    vv = v.repeat_interleave(G, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) * scale
    if causal:
        i = torch.arange(T, device=q.device)[:, None]
        j = torch.arange(S, device=q.device)[None, :]
        s = s.masked_fill(~(j <= i + (S - T)), -math.inf)
    m = s.amax(dim=-1, keepdim=True).detach() if S > 0 else s.new_full(s.shape[:-1] + (1,), -math.inf)
    empty = torch.isneginf(m)
    e = torch.exp(s - torch.where(empty, 0.0, m))
    l_ = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(l_ == 0, 1.0, l_)
    out = torch.einsum("bhts,bshe->bthe", p, vv)
    lse = torch.where(empty, math.inf, torch.where(empty, 0.0, m) + torch.log(torch.where(l_ == 0, 1.0, l_)))
    max_logit = m.squeeze(-1).amax(dim=-1) if T > 0 else s.new_full(s.shape[:2], -math.inf)
    return out, lse.squeeze(-1), max_logit


def assert_stat(x, ref, what: str, dtype, bad_sign: float):
    _assert_stat(x, ref, what, tol(dtype), bad_sign)


def tol(dtype) -> float:
    return kernel_tol(dtype, INTERPRET)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    T: int
    S: int
    Hq: int
    Hkv: int
    Dk: int
    Dv: int
    causal: bool
    dtype: torch.dtype = torch.float32
    alias: bool = False  # v = k[..., :Dv]
    strided: bool = False  # non-contiguous inputs and output buffers
    B: int = 1
    fwd_cfg: fwd_mod.FwdConfig | None = None
    bwd_cfg: bwd_mod.BwdConfig | None = None

    @property
    def id(self) -> str:
        heads = "mha" if self.Hq == self.Hkv else ("mqa" if self.Hkv == 1 else "gqa")
        parts = [
            f"{heads}{self.Hq}:{self.Hkv}", f"d{self.Dk}x{self.Dv}", f"T{self.T}", f"S{self.S}",
            "causal" if self.causal else "full", str(self.dtype).replace("torch.", ""),
        ]
        if self.B != 1:
            parts.insert(0, f"B{self.B}")
        if self.alias:
            parts.append("alias")
        if self.strided:
            parts.append("strided")
        if self.fwd_cfg is not None or self.bwd_cfg is not None:
            parts.append("cfg")
        return "-".join(parts)


F32, F16 = torch.float32, torch.float16
CASES = [
    Case(17, 17, 4, 4, 32, 32, True),
    Case(64, 130, 4, 4, 32, 32, False, B=2),
    Case(130, 64, 4, 4, 32, 32, True),  # T > S causal: the first 66 rows see no key
    Case(17, 257, 6, 2, 32, 32, True, F16),
    Case(257, 17, 6, 2, 32, 32, True),
    Case(64, 64, 8, 1, 32, 32, True, F16),
    Case(1, 1, 4, 4, 32, 32, True),
    Case(1, 257, 8, 1, 32, 32, False, F16),
    Case(64, 64, 4, 4, 64, 64, False, F16),
    Case(17, 130, 8, 1, 24, 16, True),
    Case(130, 17, 8, 1, 24, 16, True, alias=True),
    Case(1, 257, 6, 2, 24, 16, False, F16),
    Case(17, 64, 4, 4, 192, 128, True),
    Case(64, 17, 6, 2, 192, 128, False, F16),
    Case(17, 33, 6, 2, 80, 80, True),
    Case(5, 64, 8, 1, 576, 512, True, alias=True),
    Case(1, 130, 8, 1, 576, 512, False, F16, alias=True),
    Case(3, 40, 8, 1, 576, 512, True),  # absorbed dims without the alias: separate V loads
    Case(64, 130, 4, 4, 32, 32, True, strided=True),
    Case(17, 64, 6, 2, 24, 16, False, F16, strided=True),
    Case(2, 17, 8, 1, 576, 512, True, alias=True, strided=True),
    # Forced configurations: the non-resident (re-load) paths, uneven tiles, and value splits.
    Case(64, 130, 6, 2, 32, 32, True,
         fwd_cfg=fwd_mod.FwdConfig(16, 32, num_stages=1, q_resident=False),
         bwd_cfg=bwd_mod.BwdConfig(16, 64, num_stages=1, resident=False)),
    Case(17, 64, 4, 4, 128, 64, True,  # Dv split in two: the other splits' chunks are re-loaded
         fwd_cfg=fwd_mod.FwdConfig(32, 16, nsplit=2, num_stages=1),
         bwd_cfg=bwd_mod.BwdConfig(16, 32, nsplit=2, num_stages=1)),
    Case(3, 40, 8, 1, 576, 512, True, alias=True,  # the GPU's absorbed backward split (4 x 128 columns)
         fwd_cfg=fwd_mod.FwdConfig(32, 32, nsplit=2, num_stages=1, q_resident=False, stream=True),
         bwd_cfg=bwd_mod.BwdConfig(32, 32, nsplit=4, num_stages=1, resident=False, stream=True)),
]
if CUDA:  # bf16 only compiled: the interpreter's bf16 dot is wrong
    CASES += [replace(c, dtype=torch.bfloat16) for c in CASES if c.dtype == F16]


def make_inputs(c: Case, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(c.dtype).to(DEVICE)

    if c.strided:
        # [B, H, T, D] storage seen as [B, T, H, D], and every other element of a wider head dim.
        q = rnd(c.B, c.Hq, c.T, 2 * c.Dk).transpose(1, 2)[..., ::2]
        latent = rnd(c.B, c.S, c.Hkv, c.Dk + 8)[..., : c.Dk]  # padded rows: row stride != Dk
        k = latent
        v = k[..., : c.Dv] if c.alias else rnd(c.B, c.Hkv, c.S, c.Dv + 3).transpose(1, 2)[..., : c.Dv]
    else:
        q = rnd(c.B, c.T, c.Hq, c.Dk)
        k = rnd(c.B, c.S, c.Hkv, c.Dk)
        v = k[..., : c.Dv] if c.alias else rnd(c.B, c.S, c.Hkv, c.Dv)
    return q, k, v


def nan_buffer(shape, dtype, strided: bool):
    if strided:  # head-major storage, seen as [B, T, H, D]
        b, t, h, d = shape
        return torch.full((b, h, t, d), math.nan, dtype=dtype, device=DEVICE).transpose(1, 2)
    return torch.full(shape, math.nan, dtype=dtype, device=DEVICE)


def run_fwd(c: Case, q, k, v, scale, return_max_logit=True):
    out = nan_buffer((c.B, c.T, c.Hq, c.Dv), c.dtype, c.strided)
    lse = torch.full((c.B, c.Hq, c.T), math.nan, dtype=torch.float32, device=DEVICE)
    res = fwd_mod.attention_fwd(q, k, v, scale, c.causal, return_max_logit=return_max_logit, out=out, lse=lse,
                                config=c.fwd_cfg)
    assert res[0] is out and res[1] is lse
    return res


def run_bwd(c: Case, do, q, k, v, out, lse, scale):
    dq = nan_buffer(tuple(q.shape), c.dtype, c.strided)
    dk = nan_buffer(tuple(k.shape), c.dtype, c.strided)
    dv = nan_buffer(tuple(v.shape), c.dtype, c.strided)
    res = bwd_mod.attention_bwd(do, q, k, v, out, lse, scale, c.causal, dq=dq, dk=dk, dv=dv,
                                dkdv_config=c.bwd_cfg, dq_config=c.bwd_cfg)
    assert res[0] is dq and res[1] is dk and res[2] is dv
    return res


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


@pytest.mark.interpreter
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_forward(c: Case):
    q, k, v = make_inputs(c)
    assert fwd_mod.is_prefix_alias(k, v) == c.alias
    scale = c.Dk**-0.5
    out, lse, max_logit = run_fwd(c, q, k, v, scale)
    ref_out, ref_lse, ref_max = formula(q, k, v, scale, c.causal)

    assert out.dtype == c.dtype and out.shape == (c.B, c.T, c.Hq, c.Dv)
    assert lse.dtype == torch.float32 and lse.shape == (c.B, c.Hq, c.T)
    assert max_logit.dtype == torch.float32 and max_logit.shape == (c.B, c.Hq)
    assert not torch.isnan(out).any(), "output has NaN (unwritten element?)"
    err = rel(out, ref_out)
    assert err <= tol(c.dtype), f"out rel err {err:.3g}"
    # Rows without keys: exact zeros.
    empty = torch.isinf(ref_lse).permute(0, 2, 1).cpu()  # [B, T, Hq]
    assert (out.cpu()[empty] == 0).all()
    assert_stat(lse, ref_lse, "lse", c.dtype, bad_sign=+1)
    assert_stat(max_logit, ref_max, "max_logit", c.dtype, bad_sign=-1)


@pytest.mark.interpreter
@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_backward(c: Case):
    q, k, v = make_inputs(c)
    scale = c.Dk**-0.5
    out, lse, _ = run_fwd(c, q, k, v, scale, return_max_logit=False)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(c.B, c.T, c.Hq, c.Dv, generator=g).to(c.dtype).to(DEVICE)
    if c.strided:
        do = do.transpose(1, 2).contiguous().transpose(1, 2)

    dq, dk, dv = run_bwd(c, do, q, k, v, out, lse, scale)

    # float64 autograd of the formula; with the alias, v is its own leaf so dk is the score path only.
    qr = q.detach().double().requires_grad_()
    kr = k.detach().double().requires_grad_()
    vr = v.detach().double().clone().requires_grad_()
    ref_out, _, _ = formula(qr, kr, vr, scale, c.causal)
    ref_out.backward(do.double())
    for name, x, ref in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert x.dtype == c.dtype and x.shape == ref.shape, name
        err = rel(x, ref)
        assert err <= tol(c.dtype), f"{name} rel err {err:.3g}"

    # Deterministic: no atomics, so a second run is bitwise identical.
    dq2, dk2, dv2 = run_bwd(c, do, q, k, v, out, lse, scale)
    assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)


@pytest.mark.interpreter
def test_no_keys_at_all():
    """S = 0: every row is empty -> out 0, lse +inf, max_logit -inf, dq 0."""
    c = Case(5, 0, 4, 2, 32, 32, False)
    q, k, v = make_inputs(c)
    out, lse, max_logit = run_fwd(c, q, k, v, 0.2)
    assert (out == 0).all() and torch.isposinf(lse).all() and torch.isneginf(max_logit).all()
    do = torch.ones_like(out)
    dq, dk, dv = run_bwd(c, do, q, k, v, out, lse, 0.2)
    assert (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


@pytest.mark.interpreter
def test_empty_query():
    """T = 0: nothing to compute; gradients of k and v are zero."""
    c = Case(0, 7, 4, 2, 32, 16, True)
    q, k, v = make_inputs(c)
    out, lse, max_logit = run_fwd(c, q, k, v, 0.2)
    assert out.shape == (1, 0, 4, 16) and lse.shape == (1, 4, 0) and torch.isneginf(max_logit).all()
    dq, dk, dv = run_bwd(c, out, q, k, v, out, lse, 0.2)
    assert (dk == 0).all() and (dv == 0).all()


def test_prefix_alias_detection():
    k = torch.randn(2, 5, 1, 24)
    assert fwd_mod.is_prefix_alias(k, k[..., :16])
    assert fwd_mod.is_prefix_alias(k, k)
    assert not fwd_mod.is_prefix_alias(k, k[..., 8:])  # different start
    assert not fwd_mod.is_prefix_alias(k, k[..., :16].clone())
    assert not fwd_mod.is_prefix_alias(k, k[:, ::2][..., :16])  # different S stride and length


@pytest.mark.parametrize("v_is_k", [False, True], ids=["separate", "alias"])
@pytest.mark.parametrize("nsplit", [1, 2, 4])
def test_head_plan_covers_dims(nsplit, v_is_k):
    """Pure-Python plan: power-of-two tiles >= 16 that cover Dk and Dv, pieces that tile the chunks."""
    for dk in list(range(1, 70)) + [80, 96, 100, 120, 128, 160, 192, 256, 320, 576, 640]:
        for dv in (1, 8, 16, 24, 64, 80, 128, 512):
            if v_is_k and dv > dk:
                continue
            p = fwd_mod.head_plan(dk, dv, v_is_k, nsplit)
            for t in (p.bk, p.bv, p.bc) + ((p.bt,) if p.bt else ()):
                assert t >= 16 and t & (t - 1) == 0, (dk, dv, p)
            assert p.nsplit * p.bk + p.bt >= dk and p.nsplit * p.bv >= dv, (dk, dv, p)
            assert p.bk % p.bc == 0 and p.bv % p.bc == 0, (dk, dv, p)
            if v_is_k:
                assert p.bk == p.bv
            # No wasted split: every split's own chunk starts inside the dims.
            assert (p.nsplit - 1) * p.bv < max(dv, 16), (dk, dv, p)


def test_head_plan_known_shapes():
    assert fwd_mod.head_plan(576, 512, True, 2) == fwd_mod.HeadPlan(nsplit=2, bk=256, bt=64, bv=256, bc=64)
    assert fwd_mod.head_plan(192, 128, False, 1) == fwd_mod.HeadPlan(nsplit=1, bk=128, bt=64, bv=128, bc=64)
    assert fwd_mod.head_plan(24, 16, False, 1).bk == 32  # one padded tile, not 16 + 16
    assert fwd_mod.head_plan(80, 80, False, 1) == fwd_mod.HeadPlan(nsplit=1, bk=64, bt=16, bv=128, bc=64)


def test_kernel_modules_do_not_import_mla():
    """DESIGN §2: the dependency is one-way (mla -> kernels -> triton)."""
    import ast
    from pathlib import Path

    import kernels._compile as comp

    for mod in (fwd_mod, bwd_mod, comp):
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "mla" or n.startswith("mla.") for n in names), (mod.__name__, names)


@pytest.mark.interpreter
@pytest.mark.skipif(CUDA, reason="on CUDA every test above takes the autotuned path")
def test_autotuned_launch_path(monkeypatch):
    """The GPU launch path (triton.autotune, grid from META, max-logit partial buffer) run under the
    interpreter: sm80's 192/128 tables have one candidate each, so the autotuner launches it
    without benchmarking."""
    monkeypatch.setattr(fwd_mod, "device_arch", lambda device: 80)
    monkeypatch.setattr(bwd_mod, "device_arch", lambda device: 80)
    assert len(fwd_mod.fwd_configs(80, 192, 128)) == 1
    assert all(len(bwd_mod.bwd_configs(kind, 80, 192, 128)) == 1 for kind in ("dkdv", "dq"))
    c = Case(40, 50, 4, 2, 192, 128, True)
    q, k, v = make_inputs(c)
    scale = c.Dk**-0.5
    out = torch.full((1, c.T, c.Hq, c.Dv), math.nan)
    lse = torch.full((1, c.Hq, c.T), math.nan)
    out, lse, max_logit = fwd_mod._launch_autotuned(q, k, v, out, lse, scale, True, False, True, "ieee")
    ref_out, ref_lse, ref_max = formula(q, k, v, scale, True)
    assert rel(out, ref_out) <= 1e-5
    assert_stat(lse, ref_lse, "lse", c.dtype, bad_sign=+1)
    assert_stat(max_logit, ref_max, "max_logit", c.dtype, bad_sign=-1)

    do = torch.randn_like(out)
    dq, dk, dv = (torch.full(x.shape, math.nan) for x in (q, k, v))
    delta = torch.full((1, c.Hq, c.T), math.nan)
    bwd_mod._launch_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, scale, True, False, True, None, None, None, "ieee")
    qr, kr, vr = (x.detach().double().requires_grad_() for x in (q, k, v))
    formula(qr, kr, vr, scale, True)[0].backward(do.double())
    for x, ref in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert rel(x, ref) <= 1e-5
