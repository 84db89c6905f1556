"""Static performance model (bench/sass.py, bench/static_model.py, bench/reference_kernel.py).

Parsing and model arithmetic are tested on small hand-written SASS / TTGIR snippets (no GPU, no
compile). The compiled checks run ``python -m bench.static_model`` in a subprocess (kernels
cannot be compiled under ``TRITON_INTERPRET=1``, which tests/conftest.py sets here).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from oracle import attention, causal_keep

from bench import sass, static_model
from bench.reference_kernel import reference_attention

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / "tests" / "static_model_baseline.json"


def _sass_line(addr: int, ins: str) -> str:
    return f"        /*{addr:04x}*/                   {ins} ;                 /* 0x000fe20000000000 */"


# Outer loop 0x0100-0x0300 holding an MMA loop 0x0120-0x0200 (waits with one group of slack) and a
# retry loop without MMA; an out-of-line stub after the last EXIT branches backwards (not a loop).
_SASS = "\n".join([
    "\tcode for sm_90a",
    "\t\tFunction : _kernel",
    _sass_line(0x0100, "MOV R1, c[0x0][0x28]"),
    _sass_line(0x0120, "DEPBAR.LE SB0, 0x1"),
    _sass_line(0x0130, "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT"),
    _sass_line(0x0140, "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR12], R24, gsb0"),
    _sass_line(0x0150, "MUFU.EX2 R3, R3"),
    _sass_line(0x0160, "MUFU.EX2 R4, R4"),
    _sass_line(0x0170, "MUFU.RCP R5, R5"),
    _sass_line(0x0180, "HGMMA.64x128x16.F32.BF16 R32, R104, gdesc[UR16].tnspB, R32"),
    _sass_line(0x0190, "DEPBAR.LE SB0, 0x3"),
    _sass_line(0x01a0, "STL [R1], R7"),
    _sass_line(0x0200, "@P0 BRA 0x120"),
    _sass_line(0x0210, "SYNCS.PHASECHK.TRANS64 P1, [UR4], R2"),
    _sass_line(0x0220, "@!P1 BRA 0x210"),
    _sass_line(0x0300, "@P2 BRA 0x100"),
    _sass_line(0x0310, "EXIT"),
    _sass_line(0x0320, "BRA 0x320"),
    "\t\t..........",
])


def test_parse_sass_and_opcodes():
    lines = sass.parse_sass(_SASS)
    assert lines[0] == (0x100, "MOV R1, c[0x0][0x28]")
    assert len(lines) == 16
    assert sass.opcode("@!P1 BRA 0x210") == "BRA"
    assert sass.opcode("HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ, !UPT") == "HGMMA.64x32x16.F32.BF16"


def test_find_loops_ignores_code_after_last_exit():
    assert sass.find_loops(sass.parse_sass(_SASS)) == [(0x100, 0x300), (0x120, 0x200), (0x210, 0x220)]


def test_main_loop_counts():
    loops = sass.main_loops(sass.parse_sass(_SASS))
    assert [(lp.start, lp.end) for lp in loops] == [(0x120, 0x200)]  # the outer loop holds an MMA loop
    lp = loops[0]
    assert lp.n_instr == 10 and lp.mma == 3 and not lp.tf32
    assert lp.shapes == {"64x32x16 A:smem": 2, "64x128x16 A:reg": 1}
    assert lp.hgmma_macs == 2 * 64 * 32 * 16 + 64 * 128 * 16 and lp.hmma_macs == 0
    assert lp.executed_macs(8) == 2 * lp.hgmma_macs  # two warpgroups issue them
    assert (lp.mufu_ex2, lp.mufu_other, lp.local_mem, lp.slack) == (2, 1, 1, 1)


def test_executed_macs_mixes_warpgroup_and_warp_instructions():
    lp = sass.SassLoop(start=0, end=1, n_instr=10, mma=2, hgmma_macs=64 * 16 * 16, hmma_macs=16 * 8 * 16, tf32=False)
    assert lp.executed_macs(4) == 64 * 16 * 16 + 4 * 16 * 8 * 16  # one warpgroup; four warps


@pytest.mark.parametrize("op, expected", [
    ("HGMMA.64x16x16.F32", ("64x16x16", 16384, False)),
    ("HGMMA.64x64x8.F32.TF32", ("64x64x8", 32768, True)),
    ("HMMA.16816.F32.BF16", ("16x8x16", 2048, False)),
    ("HMMA.1688.F32.TF32", ("16x8x8", 1024, True)),
    ("FFMA", None),
])
def test_mma_instr_macs(op, expected):
    assert sass.mma_instr_macs(op) == expected


_TTGIR = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [8, 1], order = [1, 0]}>
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 128, 16]}>
module attributes {"ttg.num-warps" = 8 : i32} {
  tt.func public @k() {
    %0 = ttng.warp_group_dot %q, %k, %c {isAsync = true} : !ttg.memdesc<64x64xf16, #shared, #smem> * \
!ttg.memdesc<64x32xf16, #shared1, #smem, mutable> -> tensor<64x32xf32, #mma> loc(#loc1)
    %1:2 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %cst) -> (tensor<64x256xf32, #mma1>) : i32 {
      %2 = scf.for %j = %c0 to %m step %c1 iter_args(%b = %cst) -> (tensor<64x32xf32, #mma>) : i32 {
        %3 = ttng.warp_group_dot %q, %k, %b {inputPrecision = 0 : i32, isAsync = true} : \
!ttg.memdesc<64x64xf16, #shared, #smem> * !ttg.memdesc<64x32xf16, #shared1, #smem, mutable> -> \
tensor<64x32xf32, #mma> loc(#loc2)
        %4 = ttng.warp_group_dot_wait %3 {pendings = 0 : i32} : tensor<64x32xf32, #mma>
        scf.yield %4 : tensor<64x32xf32, #mma>
      } loc(#loc3)
      %5 = ttng.warp_group_dot %p, %v, %a {isAsync = true} : tensor<64x32xf16, #ttg.dot_op<{opIdx = 0, \
parent = #mma1, kWidth = 2}>> * !ttg.memdesc<32x256xf16, #shared, #smem, mutable> -> tensor<64x256xf32, #mma1> loc(#l)
      scf.yield %5 : tensor<64x256xf32, #mma1>
    } loc(#loc4)
    %6 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %cst) -> (tensor<128x64xf32, #blocked>) : i32 {
      %7 = tt.dot %x, %y, %a, inputPrecision = tf32 : tensor<128x16xf32, #ttg.dot_op<{opIdx = 0, parent = \
#blocked}>> * tensor<16x64xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<128x64xf32, #blocked>
      scf.yield %7 : tensor<128x64xf32, #blocked>
    }
    tt.return
  }
}
""".replace("\\\n", "")


def test_parse_mma_layouts_and_replication():
    lay = sass.parse_mma_layouts(_TTGIR)
    assert set(lay) == {"#mma", "#mma1"}
    assert lay["#mma"] == sass.MmaLayout(version=3, warps=(8, 1), instr=(16, 32, 16))
    assert lay["#mma"].replication(64, 32) == 2  # two warpgroups on the same 64 rows
    assert lay["#mma"].replication(128, 32) == 1
    assert lay["#mma1"].replication(64, 256) == 1  # warpgroups split N instead
    assert lay["#mma1"].replication(64, 128) == 2
    assert sass.MmaLayout(version=2, warps=(4, 1), instr=(16, 8)).replication(32, 64) == 2


def test_parse_ttgir_dots():
    dots = sass.parse_ttgir_dots(_TTGIR)
    assert [(d.m, d.n, d.k, d.a_src, d.b_src) for d in dots] == [
        (64, 32, 64, "smem", "smem"), (64, 32, 64, "smem", "smem"), (64, 256, 32, "reg", "smem"),
        (128, 64, 16, "reg", "reg")]
    assert [d.replication for d in dots] == [2, 2, 1, 1]
    assert dots[-1].layout is None  # FMA dot: no MMA layout, nothing replicated


def test_ttgir_dot_loops_innermost():
    loops = sass.ttgir_dot_loops(_TTGIR)
    # The inner j-loop (not its parent, which also holds a dot) and the last loop; the dot before any loop is out.
    assert [[(d.m, d.n, d.k) for d in lp] for lp in loops] == [[(64, 32, 64)], [(128, 64, 16)]]


def _spec(kernel, head_dims, **extra):
    return SimpleNamespace(kernel=kernel, head_dims=head_dims, extra=extra, constexprs=extra.pop("constexprs", {}))


def test_useful_macs_per_kernel_family():
    cfg = SimpleNamespace(block_m=64, block_n=32, nsplit=2)
    assert static_model.useful_macs(_spec("attention_fwd", (576, 512), config=cfg)) == 64 * 32 * 1088 / 2
    assert static_model.useful_macs(_spec("attention_bwd_dkdv", (128, 128), config=cfg)) == 64 * 32 * 512 / 2
    assert static_model.useful_macs(_spec("block_sparse_dq", (128, 128), config=cfg)) == 64 * 32 * 384 / 2
    # Top-k query-major rows are one token's heads: 16 of 64 rows carry work with G = 16.
    assert static_model.useful_macs(_spec("topk_fwd", (576, 512), config=cfg, group=16)) == 16 * 32 * 1088 / 2
    dv = static_model.useful_macs(_spec("topk_dkdv_det_dv", (576, 512), config=cfg, group=16))
    dk = static_model.useful_macs(_spec("topk_dkdv_det_dk", (576, 512), config=cfg, group=16))
    assert dv + dk == 64 * 32 * (2 * 576 + 2 * 512) / 2  # the split launches share S once
    dec = dict(BLOCK_H=64, BLOCK_N=32, DV_SPLIT=2)
    assert static_model.useful_macs(_spec("mla_decode_split", (576, 512), constexprs=dec, num_heads=16, q_len=2,
                                          mode="dense-causal-split")) == 32 * 32 * 1088 / 2
    assert static_model.useful_macs(_spec("mla_decode_split", (576, 512), constexprs=dec, num_heads=128, q_len=1,
                                          mode="topk-causal-split")) == 64 * 32 * 1088 / 2
    assert static_model.useful_macs(_spec("mla_decode_combine", (512, 512))) is None


def test_model_arithmetic():
    lp = sass.SassLoop(start=0, end=1, n_instr=500, mma=16, hgmma_macs=8 * 64 * 128 * 16 * 2, hmma_macs=0,
                       tf32=False, mufu_ex2=66)
    useful = 128 * 128 * 256
    m = static_model.model_loop(90, 8, lp, useful)
    assert m["exec_macs"] == 2 * lp.hgmma_macs and m["t_tc"] == 2048
    assert m["t_issue"] == 1000 and m["t_mufu"] == 66 * 8 * 2
    assert m["eff_serial"] == pytest.approx(2048 / (2048 + max((500 - 16) * 2, 66 * 8 * 2)))
    assert m["eff_overlap"] == pytest.approx(2048 / 2048)
    assert m["useful_share"] == 1.0
    assert static_model.model_loop(90, 8, lp, useful / 2)["useful_share"] == 0.5
    assert static_model.ctas_per_sm(90, 128, 80 * 1024, 8) == 2  # registers: 2 x 8 warps x 128 x 32
    assert static_model.ctas_per_sm(90, 255, 96 * 1024, 8) == 1
    assert static_model.ctas_per_sm(80, 64, 100 * 1024, 4) == 1  # shared memory


@pytest.mark.parametrize("argv, bad, valid", [
    (["--kernels", "attention_fwd,no_such_kernel"], "no_such_kernel", "attention_fwd, attention_bwd"),
    (["--arch", "90,75"], "75", "valid: 80, 90"),
])
def test_unknown_names_are_errors(argv, bad, valid, capsys):
    assert static_model.main(argv) == 2
    err = capsys.readouterr().err
    assert f"unknown --{argv[0][2:]}" in err and bad in err and valid in err


@pytest.mark.interpreter
@pytest.mark.parametrize("causal, T, S", [(True, 40, 40), (False, 40, 23)])
def test_reference_kernel_matches_float64(causal, T, S):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, T, 3, 16), torch.randn(2, S, 3, 16), torch.randn(2, S, 3, 16)
    out, lse = reference_attention(q, k, v, causal=causal, block_m=16, block_n=16, num_warps=4, num_stages=1)
    ref, ref_lse, _ = attention(q, k, v, 16**-0.5, causal_keep(T, S) if causal else None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-5, atol=1e-5)


def test_reference_kernel_rejects_bad_input():
    q = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="causal needs T == S"):
        reference_attention(q, torch.randn(1, 9, 2, 16), torch.randn(1, 9, 2, 16), causal=True)
    with pytest.raises(TypeError, match="k must be"):
        reference_attention(q, q.half(), q)


def _static_model(tmp_path: Path, *args: str) -> list[dict]:
    out = tmp_path / "rows.json"
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run([sys.executable, "-m", "bench.static_model", *args, "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.skipif(not sass.have_cuobjdump(), reason="no cuobjdump bundled with triton")
def test_reference_row_is_clean(tmp_path):
    """The yardstick itself: no replicated dot, every executed MAC useful, no spills, ÷ref = 1."""
    rows = _static_model(tmp_path, "--kernels", "reference", "--arch", "90")
    main = [r for r in rows if r["kernel"] == static_model.REFERENCE]
    assert main and all(r["status"] == "ok" for r in main)
    for r in main:
        assert r["replicated_dots"] == 0 and r["dots"] == 2
        assert r["useful_share"] == pytest.approx(1.0)
        assert r["spill_bytes"] == 0 and r["mma"] == 16
    assert main[0]["vs_reference"] == pytest.approx(1.0)
    assert 0.3 < main[0]["eff_serial"] < 1.0


def _summary(rep, useful, eff):
    return {"replicated_dots": rep, "useful_share": useful, "eff_serial": eff}


def test_compare_flags_every_regression():
    base = {"k sm90 fp16 576/512 G128 64x32 w8 s2": _summary(6, 0.39, 0.19),
            "k sm90 fp16 576/512 G128 64x16 w8 s2": _summary(6, 0.39, 0.13)}
    ok = {"k sm90 fp16 576/512 G128 64x32 w8 s2": _summary(0, 0.65, 0.36)}
    assert static_model.compare(ok, base, 0.03) == []
    worse = {"k sm90 fp16 576/512 G128 64x32 w8 s2": _summary(7, 0.38, 0.18)}
    problems = static_model.compare(worse, base, 0.03)
    assert len(problems) == 3 and "replicated" in problems[0] and "useful" in problems[1] and "serial" in problems[2]
    assert static_model.compare({"k sm90 fp16 576/512 G128 64x32 w8 s2": _summary(6, 0.39, 0.185)}, base, 0.03) == []
    # A new tile is held to the worst recorded config of its class; an unknown class passes.
    new = {"k sm90 fp16 576/512 G128 128x32 w8 s2": _summary(6, 0.39, 0.12)}
    assert "worst recorded" in static_model.compare(new, base, 0.03)[0]
    assert static_model.compare({"other sm90 fp16 64/64 G1 64x64 w4 s2": _summary(2, 0.1, 0.1)}, base, 0.03) == []
    assert "error" in static_model.compare({"k sm90 fp16 576/512 G128 64x32 w8 s2": {"status": "error: X"}}, base,
                                           0.03)[0]


def test_summarize_takes_worst_share_and_best_loop():
    row = dict(kernel="k", arch=90, dtype="fp16", head_dims="128/128", group=1, tile="128x64", warps=8, stages=2,
               variant="", status="ok")
    rows = [dict(row, loop="1/2", replicated_dots=0, useful_share=1.0, eff_serial=0.56),
            dict(row, loop="2/2", replicated_dots=1, useful_share=0.5, eff_serial=0.48),
            dict(row, kernel="pre", loop="-", replicated_dots=None, useful_share=None, eff_serial=None)]
    assert static_model.summarize(rows) == {"k sm90 fp16 128/128 G1 128x64 w8 s2": _summary(1, 0.5, 0.56)}


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory) -> list[dict]:
    """``python -m bench.static_model --quick --arch 90`` over every kernel module, run once for the
    ratchet and the target check (about 1 min on 2 cores with a warm Triton cache, 3-4 min cold)."""
    if not sass.have_cuobjdump():
        pytest.skip("no cuobjdump bundled with triton")
    rows = _static_model(tmp_path_factory.mktemp("static_model"), "--quick", "--arch", "90")
    ref = [r for r in rows if r["kernel"] == static_model.REFERENCE]
    assert ref and ref[0]["status"] == "ok" and ref[0]["replicated_dots"] == 0
    return rows


@pytest.mark.slow
def test_no_selectable_config_gets_worse(quick_rows):
    """Ratchet over the sm90 ``--quick`` configurations of every kernel module: no configuration may get
    more replicated dots, a lower useful-MAC share or a lower modeled serial efficiency than recorded
    in tests/static_model_baseline.json, so later kernel work can only improve them (record
    improvements with the command in the baseline's ``command`` field). A new configuration is held
    to the worst recorded one of its kernel / dtype / head dims / G."""
    import triton

    assert {r["kernel"] for r in quick_rows} > {static_model.REFERENCE, "attention_fwd", "mla_decode_split"}
    baseline = json.loads(BASELINE.read_text())
    tol = static_model.EFF_TOLERANCE["same_triton" if baseline["triton"] == triton.__version__ else "other_triton"]
    problems = static_model.compare(static_model.summarize(quick_rows), baseline["configs"], tol)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_no_replicated_dot_and_headline_targets(quick_rows):
    """The targets (``bench.static_model.check``, the same as ``python -m bench.static_model --quick
    --arch 90 --check``): no dot of any selectable sm90 configuration is replicated across
    warpgroups, and every headline class (``HEADLINES``) reaches its modeled target, or the floor
    ``SHORT_OF_TARGET`` records for it. Fails as soon as a change brings the waste back."""
    assert {h.name for h in static_model.HEADLINES} <= {t["name"] for t in static_model.headline_table(quick_rows)}
    problems = static_model.check(quick_rows)
    assert not problems, "\n".join(problems)


def _headline_row(**kw) -> dict:
    row = dict(kernel="attention_fwd", arch=90, dtype="fp16", head_dims="576/512", group=128, tile="128x32/v2",
               warps=8, stages=2, variant="", loop="1/1", status="ok", replicated_dots=0, dots=3, useful_share=0.65,
               eff_serial=0.36, vs_reference=0.56)
    row.update(kw)
    return row


def test_check_flags_replication_and_missed_targets(monkeypatch):
    ok = [_headline_row(), _headline_row(group=16)]
    assert static_model.check(ok) == []
    assert "replicated" in static_model.check(ok + [_headline_row(kernel="topk_fwd", replicated_dots=1)])[0]
    problems = static_model.check([_headline_row(useful_share=0.39, eff_serial=0.19)])
    assert len(problems) == 2 and "useful 0.390 < target 0.65" in problems[0] and "serial" in problems[1]
    # A recorded shortfall holds a floor instead, and must be removed once the target is met.
    monkeypatch.setitem(static_model.SHORT_OF_TARGET, "absorbed fwd G=128", ({"serial": 0.3}, "why"))
    assert static_model.check([_headline_row(eff_serial=0.31)]) == []
    assert "floor" in static_model.check([_headline_row(eff_serial=0.29)])[0]
    assert "remove it" in static_model.check([_headline_row(eff_serial=0.36)])[0]
    # "every": the worst selectable configuration counts; window tiles and fp32 rows are not headlines.
    bwd = dict(kernel="attention_bwd_dkdv", head_dims="128/128", group=4, dots=4, useful_share=1.0)
    assert static_model.check([_headline_row(**bwd, tile="32x128", eff_serial=0.62),
                               _headline_row(**bwd, tile="32x64", eff_serial=0.61)]) == []
    assert "serial 0.310 < target 0.6" in static_model.check([_headline_row(**bwd, tile="32x128", eff_serial=0.62),
                                                              _headline_row(**bwd, tile="32x64", eff_serial=0.31)])[0]
    assert static_model.check([_headline_row(tile="128x32/v2/win", useful_share=0.1),
                               _headline_row(dtype="fp32", useful_share=0.1)]) == []
