"""The benchmark package: work formulas against hand counts, helpers, and the CPU quick suite end to end."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import usage_error

from bench import report
from bench.env import Env, rotation_sets
from bench.rows import Recorder, Row, read_rows, timed_row
from bench.timing import CaseTimeout, Timing, time_cpu, time_limit
from bench.work import (
    attention_bytes,
    attention_flops,
    block_mask_pairs,
    causal_pairs,
    decode_bytes,
    decode_pairs,
    topk_pairs,
    visible_pairs,
)
from mla.sparsity import BlockMask, causal_block_mask, sliding_window_block_mask

REPO = Path(__file__).resolve().parent.parent


def _brute_causal(T, S):
    return sum(1 for i in range(T) for j in range(S) if j <= i + S - T)


# ---------------------------------------------------------------------------------------------------
# Formulas
# ---------------------------------------------------------------------------------------------------
def test_causal_pairs_hand_counts():
    # T = S = 4: rows see 1, 2, 3, 4 keys
    assert causal_pairs(4, 4) == 10
    # T = 2, S = 4 (bottom-right): rows see 3 and 4 keys
    assert causal_pairs(2, 4) == 7
    # T = 4, S = 2: rows 0, 1 see nothing, rows 2, 3 see 1 and 2 keys
    assert causal_pairs(4, 2) == 3
    assert causal_pairs(1, 5) == 5  # decode: one query sees the whole cache
    assert causal_pairs(0, 5) == 0 and causal_pairs(5, 0) == 0
    for T, S in [(1, 1), (3, 7), (7, 3), (16, 16), (13, 29), (29, 13)]:
        assert causal_pairs(T, S) == _brute_causal(T, S)
    assert visible_pairs(3, 5, causal=False) == 15
    assert visible_pairs(4, 4, causal=True) == 10


def test_attention_flops_hand_counts():
    # one pair with Dk = 2, Dv = 3: forward QK (2·2) + PV (2·3) = 10
    assert attention_flops(1, 2, 3, "fwd") == 10
    # backward: QK recompute 2·2, dV 2·3, dP 2·3, dQ 2·2, dK 2·2 = 24
    assert attention_flops(1, 2, 3, "bwd") == 24
    assert attention_flops(1, 2, 3, "fwd+bwd") == 34
    # Dk = Dv: backward is 2.5 × forward
    assert attention_flops(100, 64, 64, "bwd") == 2.5 * attention_flops(100, 64, 64, "fwd")
    # B=1, H=2, T=S=4 causal, Dk=Dv=8: pairs = 2·10 → fwd = 2·20·16
    assert attention_flops(2 * causal_pairs(4, 4), 8, 8, "fwd") == 640


def test_attention_bytes_hand_counts():
    # B=1 T=2 S=3 Hq=2 Hkv=1 Dk=4 Dv=2, 2-byte elements
    q, k, v, o, lse = 1 * 2 * 2 * 4 * 2, 1 * 3 * 1 * 4 * 2, 1 * 3 * 1 * 2 * 2, 1 * 2 * 2 * 2 * 2, 4 * 1 * 2 * 2
    assert (q, k, v, o, lse) == (32, 24, 12, 16, 16)
    assert attention_bytes(1, 2, 3, 2, 1, 4, 2, 2, "fwd") == 32 + 24 + 12 + 16 + 16
    assert attention_bytes(1, 2, 3, 2, 1, 4, 2, 2, "bwd") == 2 * (32 + 24 + 12 + 16) + 16
    assert attention_bytes(1, 2, 3, 2, 1, 4, 2, 2, "fwd+bwd") == 100 + 184
    # v a prefix view of k: no bytes of its own
    assert attention_bytes(1, 2, 3, 2, 1, 4, 2, 2, "fwd", v_view=True) == 32 + 24 + 16 + 16


def test_block_mask_pairs_match_element_mask():
    g = torch.Generator().manual_seed(0)
    for T, S, bs in [(10, 10, 4), (13, 20, (4, 8)), (20, 13, 4), (64, 64, 16)]:
        bm_, bn_ = (bs, bs) if isinstance(bs, int) else bs
        grid = torch.rand(math.ceil(T / bm_), math.ceil(S / bn_), generator=g) < 0.5
        mask = BlockMask.from_dense(grid, bs, (T, S))
        for causal in (False, True):
            assert block_mask_pairs(mask, causal) == int(mask.to_element_mask(causal).sum())
    # whole causal grid with causal=True is exactly the dense causal count
    assert block_mask_pairs(causal_block_mask(37, 37, 8), True) == causal_pairs(37, 37)
    # hand count: T=S=4, block 2, sliding window 1 → blocks (0,0), (1,0)?, (1,1); causal inside
    sw = sliding_window_block_mask(4, 4, 1, 2)
    assert block_mask_pairs(sw, True) == int(sw.to_element_mask(True).sum())


def test_topk_pairs_hand_count():
    # B=1, T=2, Hkv=1, K=3, S=4 (bottom-right: row 0 sees keys <= 2, row 1 keys <= 3)
    idx = torch.tensor([[[[0, 3, -1]], [[1, 2, 3]]]], dtype=torch.int32)
    assert topk_pairs(idx, 4, causal=False, Hq=1) == 5
    assert topk_pairs(idx, 4, causal=True, Hq=1) == 4  # key 3 is in row 0's future
    assert topk_pairs(idx, 4, causal=True, Hq=8) == 32


def test_decode_formulas_hand_counts():
    # two sequences of 5 and 3 tokens, Tq = 2, H = 4, causal: (4 + 5) + (2 + 3) visible per head
    assert decode_pairs([5, 3], 2, 4, causal=True) == 14 * 4
    assert decode_pairs([5, 3], 2, 4, causal=False) == 16 * 4
    # bytes: cache (5 + 3)·Dk, q B·Tq·H·Dk, out B·Tq·H·Dv, lse 4·B·H·Tq
    Dk, Dv, e = 6, 4, 2
    expect = e * (8 * Dk + 2 * 2 * 4 * Dk + 2 * 2 * 4 * Dv) + 4 * 2 * 4 * 2
    assert decode_bytes([5, 3], 2, 4, Dk, Dv, e) == expect == 96 + 192 + 128 + 64


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------
def _env(**kw) -> Env:
    return Env(suite="cpu", device=torch.device("cpu"), dtype=torch.float32, **kw)


def test_timed_row_and_fractions(tmp_path):
    env = _env(peak_flops=2e12, peak_bw=1e11)
    rec = Recorder(tmp_path, env, verbose=False)
    r = rec.add(timed_row(Row("dense", "c", "p", "fwd"), Timing(2.0, 0.1), flops=2e9, nbytes=1e8))
    assert r.tflops == pytest.approx(1.0) and r.gbps == pytest.approx(50.0)
    assert r.frac_flops == pytest.approx(0.5) and r.frac_bw == pytest.approx(0.5)
    back = read_rows(tmp_path / "results.csv")
    assert len(back) == 1 and back[0].tflops == pytest.approx(1.0) and back[0].mode == "fwd"


def test_rotation_sets():
    cpu = _env()
    assert rotation_sets(cpu, 1000) == 1
    gpu = Env(suite="gpu", device=torch.device("cuda"), dtype=torch.bfloat16, l2_bytes=50 << 20)
    assert rotation_sets(gpu, 100 << 20) == 1  # bigger than L2: no rotation
    assert rotation_sets(gpu, 10 << 20) == 10  # 2 × L2 / set
    assert rotation_sets(gpu, 1 << 10, max_sets=32) == 32


def test_time_limit_raises():
    with pytest.raises(CaseTimeout):
        with time_limit(0.2):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 5:
                pass


def test_time_cpu_returns_positive():
    t = time_cpu([lambda: torch.ones(64, 64) @ torch.ones(64, 64)], min_run_time=0.01)
    assert t.median_ms > 0 and t.iqr_ms >= 0


def test_targets_from_rows():
    def row(case, prov, mode, ms, tflops=None):
        return Row("dense", case, prov, mode, median_ms=ms, tflops=tflops, x=8192, device="NVIDIA H200",
                   dtype="bfloat16")

    rows = [
        row("naive causal T=S=8192", "ours", "fwd", 10.0),
        row("naive causal T=S=8192", "flex", "fwd", 12.0),
        row("naive causal T=S=8192", "sdpa-efficient", "fwd", 8.0),
        row("naive causal T=S=8192", "sdpa-math", "fwd", 50.0),
        row("absorbed causal T=S=8192", "ours", "fwd", 5.0, tflops=400.0),
        row("naive causal T=S=8192", "ours", "bwd", 30.0),
        dataclasses.replace(row("naive causal T=S=8192", "flex", "bwd", 0.0), status="error", median_ms=None,
                          note="boom"),
    ]
    checks, context = report.target_checks(rows)
    verdicts = {c["name"]: c for c in checks}
    assert verdicts["naive fwd: speed vs FlexAttention"]["verdict"] == "PASS"
    sdpa = next(c for n, c in verdicts.items() if n.startswith("naive fwd: speed vs fastest SDPA"))
    assert sdpa["value"] == "0.80x" and sdpa["verdict"] == "PASS" and "sdpa-efficient" in sdpa["name"]
    assert verdicts["absorbed fwd: TFLOP/s"]["verdict"] == "PASS"
    assert verdicts["naive bwd: speed vs FlexAttention"]["verdict"].startswith("n/a")
    assert "indicative" not in context


# ---------------------------------------------------------------------------------------------------
# The CPU quick suite end to end (the CI-sized run)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_cpu_quick_suite_writes_all_outputs(tmp_path):
    out = tmp_path / "bench"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "bench.run", "--suite", "cpu", "--quick", "--out", str(out),
                           "--no-print"], cwd=REPO, env=env, capture_output=True, text=True, timeout=175)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert took < 175
    assert (out / "results.csv").exists() and (out / "results.md").exists()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "dense.png" in pngs, pngs
    rows = list(csv.DictReader(open(out / "results.csv")))
    groups = {r["group"] for r in rows}
    assert {"ceiling", "dense", "sparse", "topk", "decode", "generate", "module", "memory", "kv-cache"} <= groups
    for r in rows:
        assert r["status"] in ("ok", "skip"), (r["group"], r["case"], r["provider"], r["mode"], r["status"], r["note"])
        if r["status"] != "ok":
            assert r["note"], r  # every row that did not run says why
    # peers side by side: the reference and SDPA math ran the dense cases, ours says why it could not
    dense = [r for r in rows if r["group"] == "dense"]
    assert any(r["provider"] == "reference" and r["status"] == "ok" and float(r["tflops"]) > 0 for r in dense)
    assert any(r["provider"] == "sdpa-math" and r["status"] == "ok" for r in dense)
    assert any(r["provider"] == "flex" and r["status"] == "ok" for r in dense)
    assert all(r["note"] for r in dense if r["provider"] == "ours")
    ceilings = [r for r in rows if r["group"] == "ceiling"]
    assert len(ceilings) == 2 and all(r["status"] == "ok" and float(r["value"]) > 0 for r in ceilings)
    ok_timed = [r for r in rows if r["status"] == "ok" and r["median_ms"]]
    assert all(float(r["median_ms"]) > 0 for r in ok_timed)
    md = (out / "results.md").read_text()
    for key in ("| torch |", "| git commit |", "| device |", "## Targets", "## Dense attention", "median ms"):
        assert key in md, key


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "dense,decod"], "--only: unknown group 'decod'; groups: ceiling, dense"),
        (["--skip", "nope"], "--skip: unknown group 'nope'"),
        (["--quick", "--full"], "--quick and --full"),
        (["--time-budget", "0"], "--time-budget: expected seconds > 0"),
        (["--case-timeout", "-1"], "--case-timeout"),
        (["--threads", "0"], "--threads"),
        (["--fill-missing"], "--fill-missing needs --report-only"),
        (["--dtype", "float8"], "--dtype"),
    ],
)
def test_bench_run_rejects_bad_options(argv, message, capsys):
    from bench.run import parse_args

    assert message in usage_error(parse_args, argv, capsys)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kernels", "attention_fwdd"], "--kernels: unknown 'attention_fwdd'; valid: attention_fwd, attention_bwd"),
        (["--arch", "80,91"], "--arch: unknown '91'; valid: 80"),
        (["--arch", "sm90"], "--arch: unknown 'sm90'"),
    ],
)
def test_compile_report_rejects_unknown_names(argv, message, capsys):
    from bench.compile_report import main

    assert message in usage_error(main, argv, capsys)


@pytest.mark.parametrize("module", ["bench.compile_report", "bench.static_model"])
def test_compile_tools_without_triton_say_what_to_install(module, monkeypatch, capsys):
    import importlib

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` raises ImportError, as when not installed
    assert importlib.import_module(module).main(["--kernels", "decode", "--arch", "90"]) == 2
    assert 'pip install -e ".[triton]"' in capsys.readouterr().err


def test_skip_rows_fold_into_one_line_per_group(tmp_path, capsys):
    from bench.report import console_text
    from bench.rows import summarize_skips

    rec = Recorder(tmp_path, _env())
    rec.add(Row("dense", "T=64", "ref", "fwd", status="ok", median_ms=1.0))
    for i in range(30):
        rec.add(Row("dense", f"T={i}", "ours", "fwd", status="skip", note="CUDA only; the interpreter is not timed"))
    rec.add(Row("dense", "T=9", "flex", "bwd", status="skip", note="no CPU backward"))
    rec.print_skips()
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2 and "| ok" in out.splitlines()[0]  # the ok row's line, one summary line
    assert "[dense] 31 cases skipped: CUDA only (x30); no CPU backward" in out
    assert summarize_skips(rec.rows) == {"dense": "31 cases skipped: CUDA only (x30); no CPU backward"}
    text = console_text(rec.rows, [])
    assert "Rows: 1 ok, 31 skip" in text and text.count("| skip |") == 0 and "31 cases skipped" in text


def test_plain_log_ticks():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.report import plain_log_ticks

    fig, ax = plt.subplots()
    ax.plot([16, 32, 64], [12.0, 15.0, 19.0])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    plain_log_ticks(ax)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_yticklabels(minor=True) + ax.get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert labels and not any("times" in s or "^" in s for s in labels), labels
    assert "16" in labels


def test_bench_hf_quick_keeps_explicit_options():
    from bench.bench_hf import parse_args

    args = parse_args(["--quick", "--contexts", "64", "--budget", "0.1"])
    assert (args.contexts, args.budget, args.min_steps) == ([64], 0.1, 2)
    args = parse_args([])
    assert (args.contexts, args.budget, args.min_steps) == ([512, 2048, 8192], 2.0, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--contexts", "128", "0"], "--contexts: expected integers >= 1, got 0"),
        (["--batch", "0"], "--batch"),
        (["--budget", "0"], "--budget: expected seconds > 0"),
        (["--min-steps", "5", "--max-steps", "4"], "--max-steps: expected >= --min-steps (5), got 4"),
        (["--dtype", "float8"], "--dtype"),
        (["--model", "llama"], "--model"),
    ],
)
def test_bench_hf_rejects_bad_options(argv, message, capsys):
    from bench.bench_hf import parse_args

    assert message in usage_error(parse_args, argv, capsys)
