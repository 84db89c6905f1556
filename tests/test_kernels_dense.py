"""Dense fused attention kernels (kernels.attention_fwd / attention_bwd) against the float64 oracle (tests/oracle.py).

On CPU the kernels run under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1),
so shapes stay small; on CUDA the same cases run compiled, plus bf16 (the interpreter's bf16 dot
is broken, docs/design.md §6). Outputs and gradients are written into NaN-filled buffers so that any
element a kernel fails to write fails the test.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import CUDA, DEVICE, Case, assert_close, case_params, make_inputs, nan_buffer, needs_kernels  # noqa: E402
from oracle import attention, attention_grads, causal_keep, window_keep  # noqa: E402

from kernels import attention_bwd as bwd_mod  # noqa: E402
from kernels import attention_fwd as fwd_mod  # noqa: E402

pytestmark = needs_kernels


def formula(q, k, v, scale: float, causal: bool):
    """The oracle under the bottom-right causal mask (or none)."""
    return attention(q, k, v, scale, causal_keep(q.shape[1], k.shape[1]) if causal else None)


F32, F16 = torch.float32, torch.float16
#: Two value splits with pieces as wide as a chunk: the forward holds the other split's q chunk.
HELD = fwd_mod.FwdConfig(32, 32, nsplit=2, num_stages=1, bc=256)
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
    # More heads per kv head than dK/dV rows per step (DeepSeek's 128 or 16): a step's rows are one token.
    Case(9, 40, 32, 1, 32, 32, True, bwd_cfg=bwd_mod.BwdConfig(16, 32, num_stages=1)),
    Case(9, 40, 32, 1, 32, 32, False, F16, bwd_cfg=bwd_mod.BwdConfig(16, 32, num_stages=1)),
    Case(2, 33, 8, 1, 576, 512, True, F16, alias=True,  # sm90's splits: 8 x 64 columns, 16/32-wide pieces
         bwd_cfg=bwd_mod.BwdConfig(16, 32, nsplit=8, num_stages=1, stream=True, bc=16)),
    # The sm90 tables' 128x128 tiles (192/128: own chunk + 64-column tail), several key steps and a tail.
    Case(129, 260, 2, 1, 128, 128, True, F16, fwd_cfg=fwd_mod.FwdConfig(128, 128, num_warps=8, num_stages=3)),
    Case(70, 260, 2, 1, 192, 128, False, F16, fwd_cfg=fwd_mod.FwdConfig(128, 128, num_warps=8, num_stages=2)),
    Case(3, 40, 8, 1, 576, 512, True, alias=True,  # the GPU's absorbed backward split (4 x 128 columns)
         fwd_cfg=fwd_mod.FwdConfig(32, 32, nsplit=2, num_stages=1, q_resident=False, stream=True),
         bwd_cfg=bwd_mod.BwdConfig(32, 32, nsplit=4, num_stages=1, resident=False, stream=True)),
    # The held-q body (sm90's absorbed tile: the other split's q chunk loaded once, two key loops):
    # unmasked and masked steps, row and key tails, with and without the alias and the rope-like tail.
    Case(5, 70, 8, 1, 576, 512, True, alias=True, fwd_cfg=HELD),
    Case(3, 40, 8, 1, 576, 512, True, F16, fwd_cfg=HELD),
    Case(17, 45, 4, 2, 80, 64, False, F16, fwd_cfg=HELD),  # bk = bv = 32, bt = 16
    Case(17, 40, 2, 2, 64, 64, True, strided=True, fwd_cfg=HELD),  # no tail
    Case(45, 17, 4, 2, 80, 64, True, fwd_cfg=HELD),  # T > S causal: rows without keys
]
if CUDA:  # bf16 only compiled: the interpreter's bf16 dot is wrong
    CASES += [replace(c, dtype=torch.bfloat16) for c in CASES if c.dtype == F16]


def run_fwd(c: Case, q, k, v, scale, return_max_logit=True):
    out = nan_buffer((c.B, c.T, c.Hq, c.Dv), c.dtype, c.strided, DEVICE)
    lse = torch.full((c.B, c.Hq, c.T), math.nan, dtype=torch.float32, device=DEVICE)
    res = fwd_mod.attention_fwd(q, k, v, scale, c.causal, return_max_logit=return_max_logit, out=out, lse=lse,
                                config=c.fwd_cfg)
    assert res[0] is out and res[1] is lse
    return res


def run_bwd(c: Case, do, q, k, v, out, lse, scale):
    dq, dk, dv = (nan_buffer(tuple(x.shape), c.dtype, c.strided, DEVICE) for x in (q, k, v))
    res = bwd_mod.attention_bwd(do, q, k, v, out, lse, scale, c.causal, dq=dq, dk=dk, dv=dv,
                                dkdv_config=c.bwd_cfg, dq_config=c.bwd_cfg)
    assert res[0] is dq and res[1] is dk and res[2] is dv
    return res


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


#: Cases over ~3 s on a 2-core CPU, left out of the everyday run: forward (forced configurations), and every
#: backward case but the quick ones (one per head layout and dims family).
SLOW_FWD = {"gqa6:2-d32x32-T64-S130-causal-float32-cfg", "mha4:4-d128x64-T17-S64-causal-float32-cfg"}
QUICK_BWD = {"mha4:4-d32x32-T17-S17-causal-float32", "mha4:4-d32x32-T1-S1-causal-float32",
             "gqa6:2-d80x80-T17-S33-causal-float32", "mqa8:1-d576x512-T3-S40-causal-float32",
             "mha4:4-d192x128-T17-S64-causal-float32", "gqa6:2-d24x16-T17-S64-full-float16-strided",
             "mqa8:1-d576x512-T2-S17-causal-float32-alias-strided", "mqa32:1-d32x32-T9-S40-causal-float32-cfg"}


@pytest.mark.interpreter
@pytest.mark.parametrize("c", case_params(CASES, slow=lambda c: c.id in SLOW_FWD))
def test_forward(c: Case):
    q, k, v = make_inputs(c, DEVICE)
    assert fwd_mod.is_prefix_alias(k, v) == c.alias
    scale = c.Dk**-0.5
    out, lse, max_logit = run_fwd(c, q, k, v, scale)
    ref_out, ref_lse, ref_max = formula(q, k, v, scale, c.causal)

    assert out.dtype == c.dtype and out.shape == (c.B, c.T, c.Hq, c.Dv)
    assert lse.dtype == torch.float32 and lse.shape == (c.B, c.Hq, c.T)
    assert max_logit.dtype == torch.float32 and max_logit.shape == (c.B, c.Hq)
    assert_close(out, ref_out, name="out")
    # Rows without keys: exact zeros.
    empty = torch.isinf(ref_lse).permute(0, 2, 1).cpu()  # [B, T, Hq]
    assert (out.cpu()[empty] == 0).all()
    assert_close(lse, ref_lse, name="lse")
    assert_close(max_logit, ref_max, name="max_logit")


@pytest.mark.interpreter
@pytest.mark.parametrize("c", case_params(CASES, slow=lambda c: c.id not in QUICK_BWD))
def test_backward(c: Case):
    q, k, v = make_inputs(c, DEVICE)
    scale = c.Dk**-0.5
    out, lse, _ = run_fwd(c, q, k, v, scale, return_max_logit=False)
    g = torch.Generator().manual_seed(1)
    do = torch.randn(c.B, c.T, c.Hq, c.Dv, generator=g).to(c.dtype).to(DEVICE)
    if c.strided:
        do = do.transpose(1, 2).contiguous().transpose(1, 2)

    dq, dk, dv = run_bwd(c, do, q, k, v, out, lse, scale)

    # float64 autograd of the oracle; with the alias, v is its own leaf so dk is the score path only.
    keep = causal_keep(c.T, c.S) if c.causal else None
    for name, x, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), attention_grads(q, k, v, scale, do, keep)):
        assert x.dtype == c.dtype, name
        assert_close(x, ref, name=name)

    # Deterministic: no atomics, so a second run is bitwise identical.
    dq2, dk2, dv2 = run_bwd(c, do, q, k, v, out, lse, scale)
    assert torch.equal(dq, dq2) and torch.equal(dk, dk2) and torch.equal(dv, dv2)


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [F32, F16])
def test_held_q_varlen_window_sinks_and_block_sparse(dtype):
    """The held-q body (:data:`HELD`) in the launch modes that share it: varlen (per-sequence key
    walks, empty sequences), a sliding window with sinks (one masked loop) and a block-sparse causal
    list (one masked loop) against the float64 oracle; outputs poisoned with NaN."""
    from kernels import block_sparse as bs
    from kernels.attention_fwd import attention_fwd_varlen
    from mla.sparsity import causal_block_mask

    Hq, Hkv, Dk, Dv, scale = 4, 2, 80, 64, 0.2
    g = torch.Generator().manual_seed(3)
    lq, lk = [3, 0, 17, 9], [5, 2, 40, 9]
    q = torch.randn(sum(lq), Hq, Dk, generator=g).to(dtype)
    k = torch.randn(sum(lk), Hkv, Dk, generator=g).to(dtype)
    v = torch.randn(sum(lk), Hkv, Dv, generator=g).to(dtype)
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(x).cumsum(0).tolist()], dtype=torch.int32) for x in (lq, lk))
    out = torch.full((sum(lq), Hq, Dv), math.nan, dtype=dtype)
    lse = torch.full((Hq, sum(lq)), math.nan)
    attention_fwd_varlen(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, True, out=out, lse=lse, config=HELD)
    for b in range(len(lq)):
        qs, ks = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        ref, ref_lse, _ = attention(q[qs][None], k[ks][None], v[ks][None], scale, causal_keep(lq[b], lk[b]))
        assert_close(out[qs], ref[0], name=f"varlen out {b}")
        assert_close(lse[:, qs], ref_lse[0], name=f"varlen lse {b}")

    c = Case(20, 45, Hq, Hkv, Dk, Dv, dtype=dtype)
    q, k, v = make_inputs(c, DEVICE)
    sinks = torch.randn(Hq, generator=g).to(DEVICE)
    out = nan_buffer((1, c.T, Hq, Dv), dtype, False, DEVICE)
    fwd_mod.attention_fwd(q, k, v, scale, True, out=out, window_size=(7, -1), sinks=sinks, config=HELD)
    ref, _, _ = attention(q, k, v, scale, window_keep(c.T, c.S, 7, -1) & causal_keep(c.T, c.S), sinks=sinks)
    assert_close(out, ref, name="window+sinks out")

    mask = causal_block_mask(c.T, c.S, 16)
    kvn, kvi = mask.kv_num_blocks.to(DEVICE), mask.kv_indices.to(DEVICE)
    out = nan_buffer((1, c.T, Hq, Dv), dtype, False, DEVICE)
    bs.block_sparse_attention_fwd(q, k, v, kvn, kvi, mask.BLOCK_SIZE, scale, True, out=out, config=HELD)
    ref, _, _ = attention(q, k, v, scale, causal_keep(c.T, c.S))
    assert_close(out, ref, name="block-sparse out")


@pytest.mark.interpreter
def test_no_keys_at_all():
    """S = 0: every row is empty -> out 0, lse +inf, max_logit -inf, dq 0."""
    c = Case(5, 0, 4, 2, 32, 32, False)
    q, k, v = make_inputs(c, DEVICE)
    out, lse, max_logit = run_fwd(c, q, k, v, 0.2)
    assert (out == 0).all() and torch.isposinf(lse).all() and torch.isneginf(max_logit).all()
    do = torch.ones_like(out)
    dq, dk, dv = run_bwd(c, do, q, k, v, out, lse, 0.2)
    assert (dq == 0).all() and dk.numel() == 0 and dv.numel() == 0


def test_empty_query():
    """T = 0: nothing to compute; gradients of k and v are zero."""
    c = Case(0, 7, 4, 2, 32, 16, True)
    q, k, v = make_inputs(c, DEVICE)
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


def test_needs_off64_threshold():
    """Per-step key offsets switch to int64 exactly where ``S * token stride`` reaches 2**31 elements."""
    from types import SimpleNamespace

    def kv(S, stride):
        return SimpleNamespace(shape=(1, S, 1, 128), stride=lambda dim: stride)

    assert not fwd_mod.needs_off64(kv(2**20, 2**11 - 1), kv(2**20, 128))
    assert fwd_mod.needs_off64(kv(2**20, 128), kv(2**20, 2**11))
    assert fwd_mod.needs_off64(kv(2**31, 1), kv(2**31, 1))


@pytest.mark.interpreter
@pytest.mark.parametrize("c", [Case(17, 130, 6, 2, 32, 32, True), Case(64, 70, 4, 1, 192, 128, False, F16),
                               Case(5, 40, 8, 1, 576, 512, True, alias=True)], ids=lambda c: c.id)
def test_forward_off64_path(monkeypatch, c: Case):
    """The int64 key-offset variant (``OFF64``, taken for keys/values past 2**31 elements per batch entry)
    forced on small shapes: same results as the oracle."""
    monkeypatch.setattr(fwd_mod, "needs_off64", lambda k, v: True)
    q, k, v = make_inputs(c, DEVICE)
    scale = c.Dk**-0.5
    out, lse, _ = run_fwd(c, q, k, v, scale, return_max_logit=False)
    ref_out, ref_lse, _ = formula(q, k, v, scale, c.causal)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")


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
    q, k, v = make_inputs(c, DEVICE)
    scale = c.Dk**-0.5
    out = torch.full((1, c.T, c.Hq, c.Dv), math.nan)
    lse = torch.full((1, c.Hq, c.T), math.nan)
    out, lse, max_logit = fwd_mod._launch_autotuned(q, k, v, out, lse, scale, True, False, True, "ieee")
    ref_out, ref_lse, ref_max = formula(q, k, v, scale, True)
    assert_close(out, ref_out, name="out")
    assert_close(lse, ref_lse, name="lse")
    assert_close(max_logit, ref_max, name="max_logit")

    do = torch.randn_like(out)
    dq, dk, dv = (torch.full(x.shape, math.nan) for x in (q, k, v))
    delta = torch.full((1, c.Hq, c.T), math.nan)
    bwd_mod._launch_bwd(do, q, k, v, out, lse, delta, dq, dk, dv, scale, True, False, True, None, None, None, "ieee")
    for name, x, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), attention_grads(q, k, v, scale, do, causal_keep(40, 50))):
        assert_close(x, ref, name=name)


@pytest.mark.interpreter
@pytest.mark.parametrize("scale", [-0.3, 0.0, math.nan, math.inf])
def test_forward_rejects_nonpositive_scale(scale):
    """The forward scales the row max, not each score (valid for softmax_scale > 0 only): a direct
    launcher call with a scale <= 0 (or not finite) raises instead of writing NaN (it did before)."""
    from kernels.attention_fwd import attention_fwd_varlen

    q, k, v = (torch.randn(1, n, 2, 16).to(DEVICE) for n in (5, 7, 7))
    with pytest.raises(ValueError, match="softmax_scale"):
        fwd_mod.attention_fwd(q, k, v, scale, False)
    cu_q, cu_k = (torch.tensor([0, n], dtype=torch.int32, device=DEVICE) for n in (5, 7))
    with pytest.raises(ValueError, match="softmax_scale"):
        attention_fwd_varlen(q[0], k[0], v[0], cu_q, cu_k, 5, 7, scale, False)
