"""Static performance model: what each kernel configuration's main loop does per iteration, and how
fast that could run on one SM (modeled, not measured; method and caveats in docs/static-model.md).

    python -m bench.static_model                          # every spec of the compile report, sm80 + sm90
    python -m bench.static_model --quick --arch 90        # the compile check's subset, sm90 only
    python -m bench.static_model --kernels attention_fwd,decode --json rows.json

Every configuration the kernels' tables / autotuners may pick (``compile_specs`` of each module in
``kernels._config.KERNEL_MODULES``, the same selection as ``python -m bench.compile_report``) plus
the in-repo reference forward (:mod:`bench.reference_kernel`) is compiled for
``GPUTarget("cuda", arch, 32)``; the SASS (``cuobjdump -sass`` bundled with Triton) and the TTGIR
are read by :mod:`bench.sass`. One row per main loop (innermost loop with matrix instructions):

* ``regs``/``spill``/``smem KB``/``CTA/SM``: ptxas registers and spill bytes, shared memory, CTAs
  per SM (registers, shared memory and warps; 228 KiB / 164 KiB per SM on sm90 / sm80).
* ``instr``: SASS instructions per iteration (per warp); ``mma``: HGMMA (per warpgroup) or HMMA
  (per warp) and their shapes, ``A:reg`` / ``A:smem`` = where the A operand comes from.
* ``useful``: ``useful_macs / exec_macs`` (both in the JSON): the MACs the algorithm needs for the
  tile (:func:`useful_macs`: padding rows, value-split recompute and replicated warpgroups
  excluded) over the MACs one iteration executes for the whole program.
* ``repl``: dots of the loop whose MMA layout (``warpsPerCTA`` in the TTGIR) computes each
  result element more than once; ``slack``: the ``n`` of ``DEPBAR.LE SB0, n`` the loop waits on
  (0: waits for every load it issued; "-": no cp.async wait, e.g. TMA); ``ex2``: MUFU.EX2 per warp.
* ``eff ser`` / ``eff ovl``: modeled fraction of dense tensor peak for the useful MACs, with
  softmax / address work serialised after the MMAs or fully overlapped; ``÷ref``: ``eff ser`` over
  the reference kernel's (same arch).

``--check`` adds the headline table (:data:`HEADLINES`: the configurations the kernels are judged
by, with their targets) and fails on any replicated dot or missed target (:func:`check`).

Exit status: 0; 1 when a kernel module fails to import or ``--check`` finds a problem; 2 for
unknown ``--kernels`` / ``--arch`` names (the message lists the valid ones) or when the kernels
cannot be compiled here (``TRITON_INTERPRET`` set, no Triton). A configuration that fails to compile is a row whose
``status`` starts with ``error``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

from bench import sass
from bench.compile_report import add_compile_args, cannot_compile, text_table

#: Dense fp16/bf16 tensor-core MACs per clock per SM (H100/H200: 989 TFLOP/s at 1.83 GHz over 132
#: SMs; A100: 312 TFLOP/s at 1.41 GHz over 108 SMs). tf32 runs at half that rate.
PEAK_MAC = {90: 2048, 80: 1024}
#: Per SM: 32-bit registers, shared memory (bytes, 1 KiB of it reserved per CTA), resident warps.
SM_LIMITS = {90: (65536, 233472, 64), 80: (65536, 167936, 64)}
SUBPARTITIONS = 4  # warp schedulers per SM, one instruction per clock each
MUFU_CLK = 8  # clocks per warp-wide MUFU.EX2 on one sub-partition (16 lanes per clock per SM)
ARCHS = tuple(sorted(PEAK_MAC))
REFERENCE = "reference_fwd"


def kernel_names() -> list[str]:
    """Valid ``--kernels`` names: the short module names of ``KERNEL_MODULES`` and ``reference``
    (the reference forward alone; it is modeled in every run as the yardstick)."""
    from kernels._config import KERNEL_MODULES

    return [m.rsplit(".", 1)[-1] for m in KERNEL_MODULES] + ["reference"]


def parse_names(text: str, valid, what: str) -> list[str]:
    """Comma-separated names, each checked against ``valid``; ``ValueError`` lists the valid ones."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in [str(v) for v in valid]]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; valid: {', '.join(str(v) for v in valid)}")
    return names


# --------------------------------------------------------------------------------------------
# Useful work per main-loop iteration
# --------------------------------------------------------------------------------------------


def _work_per_entry(kernel: str, dk: int, dv: int) -> float | None:
    """MACs per (query row, key) score entry that ``kernel``'s outputs need (see :func:`useful_macs`)."""
    if kernel.endswith("_fwd"):
        return dk + dv
    if kernel.endswith("_dq"):
        return 2 * dk + dv
    if "dkdv" not in kernel:
        return None
    if kernel.endswith("_dv"):  # dV alone: S and dV, half of S charged here
        return dk / 2 + dv
    if kernel.endswith("_dk"):  # dK alone: S, dP and dK, the other half of S
        return 1.5 * dk + dv
    return 2 * dk + 2 * dv


def useful_macs(spec) -> float | None:
    """MACs per main-loop iteration (one key step of one program) that the algorithm needs.

    Per score entry of the tile: forward ``Dk + Dv`` (``S = QKᵀ``, ``O = PV``); dK/dV
    ``2 Dk + 2 Dv`` (``S``, ``dP = dO Vᵀ``, ``dV = Pᵀ dO``, ``dK = dSᵀ Q``); dQ ``2 Dk + Dv``
    (``S``, ``dP``, ``dQ = dS K``). With ``n`` value/column splits each program owns ``1/n`` of
    that (the score products every split repeats are waste); a top-k dK/dV launched as separate dV
    and dK kernels (``_dv`` / ``_dk``) charges half of ``S`` to each. Rows: the tile's rows, except
    where a program's rows are the heads of one token (top-k query-major kernels: ``min(BLOCK_M,
    G)``; decode: ``min(BLOCK_H, Tq * H)``, top-k decode ``min(BLOCK_H, H)``), whose padding rows are
    waste. ``Dk``/``Dv`` are the true head dims (power-of-two padding is waste). None for kernels
    without a matrix product loop (preprocess, combine, reduce).
    """
    dk, dv = spec.head_dims
    k = spec.kernel
    if k == REFERENCE:
        return spec.extra["block_m"] * spec.extra["block_n"] * (dk + dv)
    if k.startswith("mla_decode_split"):
        c = spec.constexprs
        heads, tq = spec.extra["num_heads"], spec.extra["q_len"]
        rows = min(c["BLOCK_H"], heads if spec.extra["mode"].startswith("topk") else heads * tq)
        return rows * c["BLOCK_N"] * (dk + dv) / c["DV_SPLIT"]
    work, cfg = _work_per_entry(k, dk, dv), spec.extra.get("config")
    if work is None or cfg is None:
        return None
    rows = cfg.block_m
    if k.startswith("topk_") and "det" not in k:  # query-major: the rows are one token's G heads
        rows = min(rows, spec.extra.get("group", rows))
    return rows * cfg.block_n * work / cfg.nsplit


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


def ctas_per_sm(arch: int, regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM allowed by registers (allocated per warp in 256-register units),
    shared memory (plus 1 KiB reserved per CTA) and the 64-warp limit."""
    reg_file, smem, max_warps = SM_LIMITS[arch]
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = (reg_file // per_warp) // warps if per_warp else 64
    return max(0, min(by_regs, smem // (shared + 1024), max_warps // warps))


@dataclass
class LoopRow:
    """One main loop of one compiled configuration (see the module docstring for the columns)."""

    kernel: str
    arch: int
    dtype: str
    head_dims: str
    group: int
    tile: str
    warps: int
    stages: int
    variant: str  # launch mode where one tile serves several (decode: "dense-split", "topk-causal-split", ...)
    loop: str  # "i/n": i-th of the program's n main loops, in code order
    registers: int
    spill_bytes: int
    shared_bytes: int
    ctas_per_sm: int
    instr: int
    mma: int
    mma_shapes: str
    exec_macs: int
    useful_macs: float | None
    useful_share: float | None
    replicated_dots: int | None  # None: the TTGIR loop could not be matched
    dots: int | None
    ttgir_macs: int | None  # Σ M·N·K × replication of the matched TTGIR dots (= exec_macs when matched exactly)
    slack: int | None
    mufu_ex2: int
    t_tc: float
    t_issue: float
    t_mufu: float
    eff_serial: float | None
    eff_overlap: float | None
    vs_reference: float | None = None
    status: str = "ok"


def model_loop(arch: int, warps: int, loop: sass.SassLoop, useful: float | None) -> dict:
    """Per-iteration clocks on one SM and modeled efficiencies (docs/static-model.md):

    ``T_tc = executed MACs / peak`` (tf32: half the peak), ``T_issue = instr × warps per
    sub-partition``, ``T_mufu = MUFU.EX2 × 8 × warps per sub-partition``;
    serial ``T = T_tc + max(T_issue − MMA issue, T_mufu)``, overlap ``T = max(T_tc, T_issue, T_mufu)``;
    efficiency ``= useful / peak / T``."""
    peak = PEAK_MAC[arch] / (2 if loop.tf32 else 1)
    executed = loop.executed_macs(warps)
    wps = warps / SUBPARTITIONS
    t_tc = executed / peak
    t_issue = loop.n_instr * wps
    t_other = (loop.n_instr - loop.mma) * wps
    t_mufu = loop.mufu_ex2 * MUFU_CLK * wps
    t_ser = t_tc + max(t_other, t_mufu)
    t_ovl = max(t_tc, t_issue, t_mufu)
    out = dict(exec_macs=executed, t_tc=t_tc, t_issue=t_issue, t_mufu=t_mufu, eff_serial=None, eff_overlap=None,
               useful_share=None)
    if useful is not None and executed:
        out.update(eff_serial=useful / peak / t_ser, eff_overlap=useful / peak / t_ovl,
                   useful_share=useful / executed)
    return out


def match_ttgir(sass_loops: list[sass.SassLoop], ttgir_loops: list[list[sass.Dot]], num_warps: int):
    """TTGIR dot loop of each SASS main loop: the first unused one whose executed MACs
    (``Σ m·n·k × replication``) equal the SASS loop's, else the same position when the counts agree."""
    used, out = set(), []
    for i, lp in enumerate(sass_loops):
        executed = lp.executed_macs(num_warps)
        pick = next((j for j, dots in enumerate(ttgir_loops) if j not in used
                     and sum(d.macs * d.replication for d in dots) == executed), None)
        if pick is None and len(ttgir_loops) == len(sass_loops) and i not in used:
            pick = i
        if pick is not None:
            used.add(pick)
        out.append(ttgir_loops[pick] if pick is not None else None)
    return out


def analyse(spec) -> list[LoopRow]:
    """Compile ``spec`` and model each of its main loops (one :class:`LoopRow` each; a kernel
    without a matrix-instruction loop gives one row with ``loop = "-"``; a failed compile one row
    whose ``status`` starts with ``error``)."""
    from kernels._compile import ptxas_usage

    dk, dv = spec.head_dims
    base = dict(kernel=spec.kernel, arch=spec.arch, dtype=spec.dtype, head_dims=f"{dk}/{dv}",
                group=int(spec.extra.get("group", spec.extra.get("num_heads", 1))), tile=spec.tile,
                warps=spec.num_warps, stages=spec.num_stages, variant=str(spec.extra.get("mode", "")))
    empty = dict(loop="-", registers=0, spill_bytes=0, shared_bytes=0, ctas_per_sm=0, instr=0, mma=0, mma_shapes="",
                 exec_macs=0, useful_macs=None, useful_share=None, replicated_dots=None, dots=None, ttgir_macs=None,
                 slack=None, mufu_ex2=0, t_tc=0.0, t_issue=0.0, t_mufu=0.0, eff_serial=None, eff_overlap=None)
    try:
        divisible = list(spec.extra.get("divisible", ())) + list(spec.extra.get("divisible_elems", ()))
        k = sass.compile_kernel(spec.fn, spec.signature, spec.constexprs, divisible,
                                spec.num_warps, spec.num_stages, spec.arch)
        regs, st, ld = ptxas_usage(k.asm["ptx"])
        lines = sass.parse_sass(sass.disassemble(k.asm["cubin"]))
    except Exception as e:  # one broken config must not hide the others
        msg = str(e).strip().splitlines()
        return [LoopRow(**base, **empty, status=f"error: {type(e).__name__}: {(msg[-1] if msg else '')[:160]}")]
    shared = int(k.metadata.shared)
    common = dict(registers=regs, spill_bytes=st + ld, shared_bytes=shared,
                  ctas_per_sm=ctas_per_sm(spec.arch, regs, shared, spec.num_warps))
    loops = sass.main_loops(lines)
    if not loops:
        return [LoopRow(**base, **{**empty, **common})]
    dot_loops = match_ttgir(loops, sass.ttgir_dot_loops(k.asm["ttgir"]), spec.num_warps)
    useful = useful_macs(spec)
    rows = []
    for i, (lp, dots) in enumerate(zip(loops, dot_loops)):
        m = model_loop(spec.arch, spec.num_warps, lp, useful)
        shapes = ", ".join(f"{n}×{s}" for s, n in sorted(lp.shapes.items()))
        rows.append(LoopRow(
            **base, **common, loop=f"{i + 1}/{len(loops)}", instr=lp.n_instr, mma=lp.mma, mma_shapes=shapes,
            useful_macs=useful, replicated_dots=None if dots is None else sum(d.replication > 1 for d in dots),
            dots=None if dots is None else len(dots),
            ttgir_macs=None if dots is None else sum(d.macs * d.replication for d in dots), slack=lp.slack,
            mufu_ex2=lp.mufu_ex2, **m,
        ))
    return rows


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def collect(archs, kernels=None, dtypes=None, quick=False) -> list:
    """The specs to model: the compile report's selection (``collect_specs`` + ``quick_selection``)
    and the reference forward for each arch, first."""
    from bench.reference_kernel import reference_spec
    from kernels._compile import collect_specs, quick_selection

    refs = [reference_spec(a) for a in archs]
    if kernels is not None and not [k for k in kernels if k != "reference"]:
        return refs
    specs, skipped = collect_specs(archs, kernels)
    if skipped:
        raise RuntimeError(f"kernel modules failed to import: {skipped}")
    specs = [s for s in specs if (not dtypes or s.dtype in dtypes) and (not quick or quick_selection(s))]
    return refs + specs


_SPECS: list = []


def _analyse_index(i: int) -> list[dict]:
    import warnings

    warnings.filterwarnings("ignore")
    return [asdict(r) for r in analyse(_SPECS[i])]


def run(archs=(80, 90), kernels=None, dtypes=None, quick=False, jobs: int | None = None) -> list[dict]:
    """Model every selected spec; returns the rows (dicts of :class:`LoopRow` fields) with
    ``vs_reference`` filled in. ``jobs`` > 1 analyses in that many forked processes."""
    import multiprocessing as mp

    _SPECS[:] = collect(archs, kernels, dtypes, quick)
    jobs = min(jobs or os.cpu_count() or 1, len(_SPECS))
    if jobs > 1 and "fork" in mp.get_all_start_methods():
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork")) as ex:
            per_spec = list(ex.map(_analyse_index, range(len(_SPECS))))
    else:
        per_spec = [_analyse_index(i) for i in range(len(_SPECS))]
    rows = [r for rs in per_spec for r in rs]
    ref = {r["arch"]: r["eff_serial"] for r in rows if r["kernel"] == REFERENCE and r["loop"].startswith("1/")}
    for r in rows:
        if r["eff_serial"] is not None and ref.get(r["arch"]):
            r["vs_reference"] = r["eff_serial"] / ref[r["arch"]]
    return rows


# --------------------------------------------------------------------------------------------
# Ratchet: per-configuration summary and comparison with a recorded baseline
# --------------------------------------------------------------------------------------------

#: Relative slack on modeled serial efficiency: instruction counts move a little between Triton
#: releases and code-generation details; a real regression (a lost stage, a replicated dot) is larger.
EFF_TOLERANCE = {"same_triton": 0.03, "other_triton": 0.10}


def _config_key(r: dict) -> str:
    return (f"{r['kernel']} sm{r['arch']} {r['dtype']} {r['head_dims']} G{r['group']} {r['tile']} "
            f"w{r['warps']} s{r['stages']}" + (f" {r['variant']}" if r.get("variant") else ""))


def _class_key(key: str) -> str:
    return " ".join(key.split()[:5])  # kernel, arch, dtype, head dims, group: what a config serves


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per configuration (kernel, arch, dtype, dims, G, tile, warps, stages): the most replicated
    dots of any main loop, the lowest useful share and the best modeled serial efficiency (the
    steady-state loop; masked / tail loops are slower by design). Configurations without a matrix
    loop are left out; a row that failed to compile gives ``{"status": ...}``."""
    out: dict[str, dict] = {}
    for r in rows:
        key = _config_key(r)
        if r["status"] != "ok":
            out[key] = {"status": r["status"]}
            continue
        if r["useful_share"] is None:
            continue
        cur = out.setdefault(key, {"replicated_dots": 0, "useful_share": 1e9, "eff_serial": 0.0})
        rep, old = r["replicated_dots"], cur["replicated_dots"]
        cur["replicated_dots"] = None if rep is None or old is None else max(old, rep)
        cur["useful_share"] = round(min(cur["useful_share"], r["useful_share"]), 4)
        cur["eff_serial"] = round(max(cur["eff_serial"], r["eff_serial"]), 4)
    return out


def compare(current: dict[str, dict], baseline: dict[str, dict], tolerance: float) -> list[str]:
    """What got worse than ``baseline`` (both from :func:`summarize`): more replicated dots, a lower
    useful share, or a modeled serial efficiency lower by more than ``tolerance`` (relative). A
    configuration not in the baseline is held to the worst recorded one of its class (same kernel,
    arch, dtype, head dims, G); a class never recorded passes. Returns one line per problem."""
    problems = []
    classes: dict[str, list[dict]] = {}
    for key, b in baseline.items():
        if "status" not in b:
            classes.setdefault(_class_key(key), []).append(b)
    for key, c in sorted(current.items()):
        if "status" in c:
            problems.append(f"{key}: {c['status']}")
            continue
        if key in baseline and "status" not in baseline[key]:
            ref, what = baseline[key], "recorded"
        elif classes.get(_class_key(key)):
            same = classes[_class_key(key)]
            reps = [b["replicated_dots"] for b in same if b["replicated_dots"] is not None]
            ref = {"replicated_dots": max(reps) if reps else None,
                   "useful_share": min(b["useful_share"] for b in same),
                   "eff_serial": min(b["eff_serial"] for b in same)}
            what = "worst recorded of its class"
        else:
            continue
        if ref["replicated_dots"] is not None and (c["replicated_dots"] is None
                                                   or c["replicated_dots"] > ref["replicated_dots"]):
            problems.append(f"{key}: {c['replicated_dots']} replicated dots > {ref['replicated_dots']} ({what})")
        if c["useful_share"] < ref["useful_share"] - 1e-3:
            problems.append(f"{key}: useful share {c['useful_share']:.3f} < {ref['useful_share']:.3f} ({what})")
        if c["eff_serial"] < ref["eff_serial"] * (1 - tolerance):
            problems.append(f"{key}: modeled serial efficiency {c['eff_serial']:.3f} < {ref['eff_serial']:.3f} "
                            f"- {tolerance:.0%} ({what})")
    return problems


# --------------------------------------------------------------------------------------------
# Targets: what the kernels must reach (issue 12), checked by ``--check`` and a CI test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Headline:
    """A headline configuration class and its modeled targets (sm90, fp16/bf16, steady-state loops;
    window tiles are left out: their band loop is slower by design).

    ``kernel``/``head_dims``/``groups`` select the rows (``groups`` empty: any G; ``variant``: the
    decode mode must start with it). ``min_useful`` applies to every selectable configuration of the
    class (replication and recompute are structural), ``min_serial`` (modeled serial efficiency) and
    ``min_vs_reference`` (serial ÷ the in-repo reference's) to the best one, or to every one when
    ``every`` is set (the backward: each config the autotuner may pick must reach it)."""

    name: str
    kernel: str
    head_dims: str
    groups: tuple[int, ...] = ()
    variant: str = ""
    min_useful: float = 0.0
    min_serial: float = 0.0
    min_vs_reference: float = 0.0
    every: bool = False


#: The issue's targets. Dense forward: at least the reference kernel's serial efficiency; the
#: absorbed 576/512 forward and decode with >= 64 heads per kv head: 0.65 useful, 0.35 serial;
#: backward d128 and 192/128: 0.6 serial for every selectable configuration.
HEADLINES: tuple[Headline, ...] = (
    Headline("dense fwd d128", "attention_fwd", "128/128", min_vs_reference=1.0),
    Headline("dense fwd 192/128", "attention_fwd", "192/128", min_vs_reference=1.0),
    Headline("absorbed fwd G=128", "attention_fwd", "576/512", (128,), min_useful=0.65, min_serial=0.35),
    Headline("absorbed fwd G=16", "attention_fwd", "576/512", (16,), min_useful=0.65, min_serial=0.35),
    Headline("decode H=128", "mla_decode_split", "576/512", (128,), "dense", min_useful=0.65, min_serial=0.35),
    Headline("bwd dK/dV d128", "attention_bwd_dkdv", "128/128", min_serial=0.6, every=True),
    Headline("bwd dQ d128", "attention_bwd_dq", "128/128", min_serial=0.6, every=True),
    Headline("bwd dK/dV 192/128", "attention_bwd_dkdv", "192/128", min_serial=0.6, every=True),
    Headline("bwd dQ 192/128", "attention_bwd_dq", "192/128", min_serial=0.6, every=True),
)

#: Targets not reached yet, by headline name: the floor the check holds instead (so they cannot get
#: worse) and why. A headline that reaches its target while listed here fails the check too, so
#: the entry is removed when the work lands.
SHORT_OF_TARGET: dict[str, tuple[dict, str]] = {}


def _headline_rows(rows: list[dict], h: Headline) -> list[dict]:
    return [r for r in rows if r["kernel"] == h.kernel and r["arch"] == 90 and r["dtype"] in ("fp16", "bf16")
            and r["head_dims"] == h.head_dims and (not h.groups or r["group"] in h.groups)
            and r.get("variant", "").startswith(h.variant) and "/win" not in r["tile"]
            and r["status"] == "ok" and r["useful_share"] is not None]


def headline_table(rows: list[dict]) -> list[dict]:
    """Per :data:`HEADLINES` entry found in ``rows``: configurations, lowest useful share, most
    replicated dots, best and worst modeled serial efficiency (each configuration's best loop) and
    the best ÷ reference."""
    out = []
    for h in HEADLINES:
        sel = _headline_rows(rows, h)
        if not sel:
            continue
        per_cfg = summarize(sel)
        best = {}
        for r in sel:
            k = _config_key(r)
            best[k] = max(best.get(k, 0.0), r["vs_reference"] or 0.0)
        out.append({"name": h.name, "configs": len(per_cfg),
                    "useful": min(c["useful_share"] for c in per_cfg.values()),
                    "replicated": max(c["replicated_dots"] or 0 for c in per_cfg.values()),
                    "serial_best": max(c["eff_serial"] for c in per_cfg.values()),
                    "serial_worst": min(c["eff_serial"] for c in per_cfg.values()),
                    "vs_reference": max(best.values())})
    return out


def check(rows: list[dict]) -> list[str]:
    """Problems in sm90 ``rows`` (from :func:`run`): every replicated dot of any configuration, and
    every :data:`HEADLINES` target missed (or a :data:`SHORT_OF_TARGET` floor missed, or a listed
    shortfall that is in fact met). Returns one line per problem; empty when all pass."""
    problems = [f"{_config_key(r)} loop {r['loop']}: {r['replicated_dots']} of {r['dots']} dots replicated "
                "across warpgroups" for r in rows
                if r["arch"] == 90 and r["status"] == "ok" and r["replicated_dots"]]
    table = {t["name"]: t for t in headline_table(rows)}
    for h in HEADLINES:
        t = table.get(h.name)
        if t is None:
            continue
        serial = t["serial_worst"] if h.every else t["serial_best"]
        want = {"useful": h.min_useful, "serial": h.min_serial, "vs_reference": h.min_vs_reference}
        got = {"useful": t["useful"], "serial": serial, "vs_reference": t["vs_reference"]}
        floor, why = SHORT_OF_TARGET.get(h.name, ({}, ""))
        for what, target in want.items():
            if not target:
                continue
            if what in floor:
                if got[what] >= target - 1e-3:
                    problems.append(f"{h.name}: {what} {got[what]:.3f} now meets the target {target}; remove it "
                                    "from SHORT_OF_TARGET")
                elif got[what] < floor[what] - 1e-3:
                    problems.append(f"{h.name}: {what} {got[what]:.3f} < recorded floor {floor[what]} ({why})")
            elif got[what] < target - 1e-3:
                problems.append(f"{h.name}: {what} {got[what]:.3f} < target {target}")
    return problems


def format_headlines(rows: list[dict]) -> str:
    """The :func:`headline_table` as fixed-width text with each target."""
    targets = {h.name: h for h in HEADLINES}
    body = []
    for t in headline_table(rows):
        h = targets[t["name"]]
        goal = ", ".join(s for s in (f"useful >= {h.min_useful}" if h.min_useful else "",
                                      f"serial >= {h.min_serial}" if h.min_serial else "",
                                      f"÷ref >= {h.min_vs_reference}" if h.min_vs_reference else "") if s)
        body.append([t["name"], str(t["configs"]), f"{t['useful']:.2f}", str(t["replicated"]),
                     f"{t['serial_best']:.2f}", f"{t['serial_worst']:.2f}", f"{t['vs_reference']:.2f}",
                     goal + (" (every config)" if h.every else "")])
    return text_table(["headline (sm90)", "configs", "useful min", "repl max", "serial best", "serial worst",
                       "÷ref best", "target"], body)


def write_baseline(rows: list[dict], path: str, command: str) -> None:
    """Record :func:`summarize` of ``rows`` with the Triton version and the command that produced them."""
    import triton

    with open(path, "w") as f:
        json.dump({"triton": triton.__version__, "command": command, "configs": summarize(rows)}, f, indent=1,
                  sort_keys=True)
        f.write("\n")


_COLUMNS = [
    ("kernel", "kernel"), ("arch", "sm"), ("dtype", "dtype"), ("head_dims", "dk/dv"), ("group", "G"),
    ("tile", "tile"), ("warps", "w"), ("stages", "s"), ("variant", "mode"), ("loop", "loop"), ("registers", "regs"),
    ("spill_bytes", "spill"), ("shared_bytes", "smem KB"), ("ctas_per_sm", "CTA/SM"), ("instr", "instr"),
    ("mma_shapes", "mma / iter (shape, A from)"), ("useful_share", "useful"), ("replicated_dots", "repl"),
    ("slack", "slack"), ("mufu_ex2", "ex2"), ("eff_serial", "eff ser"), ("eff_overlap", "eff ovl"),
    ("vs_reference", "÷ref"), ("status", "status"),
]


def _cell(key: str, row: dict) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "-"
    if key == "shared_bytes":
        return f"{v / 1024:.0f}"
    if key == "replicated_dots":
        return f"{v}/{row['dots']}"
    if isinstance(v, float):
        return f"{v:.2f}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table of :func:`run` rows."""
    return text_table([h for _, h in _COLUMNS], [[_cell(k, r) for k, _ in _COLUMNS] for r in rows])


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see module docstring)."""
    summary = " ".join(__doc__.split("\n\n")[0].split())  # the first paragraph (its first line stops mid-sentence)
    ap = argparse.ArgumentParser(prog="python -m bench.static_model", description=summary)
    add_compile_args(ap, "80,90", "comma-separated compute capabilities (default 80,90)",
                     "fp16 specs plus every dtype of the absorbed 576/512 shape (the compile check's set)")
    ap.add_argument("--check", action="store_true",
                    help="print the headline targets table; exit 1 on a replicated dot or a missed target (sm90)")
    ap.add_argument("--write-baseline", metavar="PATH",
                    help="record the per-configuration summary for the ratchet test (tests/static_model_baseline.json)")
    args = ap.parse_args(argv)
    try:
        kernels = parse_names(args.kernels, kernel_names(), "--kernels name(s)") or None
        archs = [int(a) for a in parse_names(args.arch, ARCHS, "--arch value(s)")] or list(ARCHS)
    except ValueError as e:
        print(f"python -m bench.static_model: {e}", file=sys.stderr)
        return 2
    why = cannot_compile()
    if why:
        print(why, file=sys.stderr)
        return 2
    dtypes = tuple(d for d in args.dtypes.split(",") if d) or None
    t0 = time.perf_counter()
    try:
        rows = run(tuple(archs), kernels, dtypes, args.quick, args.jobs or None)
    except RuntimeError as e:
        print(f"python -m bench.static_model: {e}", file=sys.stderr)
        return 1
    print(format_table(rows))
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} loops, {len(bad)} not analysed, {time.perf_counter() - t0:.0f} s "
          "(modeled, not measured: docs/static-model.md)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    status = 0
    if args.check:
        print()
        print(format_headlines(rows))
        problems = check(rows)
        for p in problems:
            print(f"FAIL {p}")
        print(f"{len(problems)} problem(s) against the targets (sm90)")
        status = 1 if problems else 0
    if args.write_baseline:
        opts = [f"--{k} {v}" for k, v in (("kernels", args.kernels), ("arch", args.arch), ("dtypes", args.dtypes)) if v]
        cmd = " ".join(["python -m bench.static_model", *(["--quick"] if args.quick else []), *opts,
                        "--write-baseline", args.write_baseline])
        write_baseline(rows, args.write_baseline, cmd)
    return status


if __name__ == "__main__":
    sys.exit(main())
