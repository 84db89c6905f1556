"""Reports from ``results.csv``: ``results.md`` (metadata, ceilings, targets, one table per group,
methods) and PNG plots (TFLOP/s per provider and case, time vs density, time vs K, decode GB/s, memory).

Everything is regenerated from the CSV, so rows appended by several processes of one run end up in one
report (``python -m bench.run --report-only --out DIR``).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections import Counter, OrderedDict
from pathlib import Path

from bench.rows import Row, read_rows, summarize_skips

GROUP_ORDER = ["ceiling", "dense", "fallback", "sparse", "topk", "packed", "decode", "generate", "module", "memory",
               "kv-cache"]
GROUP_TITLES = {
    "ceiling": "Ceilings (measured in this run)",
    "dense": "Dense attention (causal, T = S)",
    "fallback": "CPU fallback: fused CPU kernel dispatch vs the chunked path (naive MLA, causal, T = S)",
    "sparse": "Block-sparse attention: time vs density",
    "topk": "Top-k sparse attention: time vs K",
    "packed": "Packed documents: varlen vs padded batch",
    "decode": "Decode over a paged latent cache",
    "generate": "Generation (tiny model)",
    "module": "Modules (forward, forward+backward)",
    "memory": "Peak memory of forward+backward",
    "kv-cache": "KV-cache bytes per token",
}

TARGET_T = 8192


# ---------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------
def _num(v: float | None, digits: int = 4) -> str:
    if v is None:
        return ""
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.{digits}g}"


def _pct(r: Row) -> str:
    """Fraction of the ceiling: the larger of the compute (F) and bandwidth (B) fractions."""
    cands = [(r.frac_flops, "F"), (r.frac_bw, "B")]
    cands = [(f, k) for f, k in cands if f is not None]
    if not cands:
        return ""
    f, k = max(cands)
    return f"{100 * f:.1f}% {k}"


def _cell(s: str) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def rows_table(rows: list[Row]) -> str:
    """Markdown table of rows: case, shape, provider, pass, times, throughput, % ceiling, value, status, note."""
    head = ["case", "shape", "dtype", "provider", "pass", "median ms", "IQR ms", "TFLOP/s", "GB/s", "% ceiling",
            "value", "status", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = f"{_num(r.value)} {r.unit}".strip() if r.value is not None else ""
        cells = [r.case, r.shape, r.dtype, r.provider, r.mode, _num(r.median_ms), _num(r.iqr_ms, 2), _num(r.tflops),
                 _num(r.gbps), _pct(r), value, r.status, r.note]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def group_rows(rows: list[Row]) -> OrderedDict:
    """Rows by group, in report order (unknown groups last)."""
    out: OrderedDict = OrderedDict()
    for g in GROUP_ORDER + sorted({r.group for r in rows} - set(GROUP_ORDER)):
        sel = [r for r in rows if r.group == g]
        if sel:
            out[g] = sel
    return out


# ---------------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------------
def _find(rows, case: str, provider: str, mode: str) -> Row | None:
    for r in rows:
        if r.group == "dense" and r.case == case and r.provider == provider and r.mode == mode:
            return r
    return None


def _usable(r: Row | None) -> bool:
    return r is not None and r.status in ("ok", "mismatch") and bool(r.median_ms)


def _why(r: Row | None, who: str) -> str:
    if r is None:
        return f"{who}: not measured"
    note = r.note if len(r.note) <= 120 else r.note[:117] + "..."
    return f"{who}: {r.status} — {note}"


def target_checks(rows: list[Row]) -> tuple[list[dict], str]:
    """The performance targets of issue 3/4 evaluated on the dense rows.

    Returns ``(checks, context)``; each check has ``name``, ``value`` (str), ``target`` (str) and ``verdict``
    (``PASS``, ``FAIL`` or ``n/a: why``). Targets are defined for H100/H200, bf16, causal ``T = S = 8192``;
    at another length or on another device the verdicts are indicative only (``context`` says so).
    """
    dense = [r for r in rows if r.group == "dense"]
    Ts = sorted({int(r.x) for r in dense if r.x})
    if not Ts:
        return [], "no dense rows"
    T = TARGET_T if TARGET_T in Ts else Ts[-1]
    device = next((r.device for r in dense if r.device), "")
    context = f"causal T=S={T}, {dense[0].dtype}, on {device}"
    if T != TARGET_T or not re.search(r"H100|H200|H800|H20\b|GH200", device):
        context += " — targets are defined for H100/H200, bf16, T=S=8192: indicative only here"
    naive, absorbed = f"naive causal T=S={T}", f"absorbed causal T=S={T}"
    checks = []

    def ratio(name, case, mode, peer_rows, target):
        ours = _find(rows, case, "ours", mode)
        peers = [p for p in peer_rows if _usable(p)]
        if not _usable(ours):
            checks.append(dict(name=name, value="", target=f">= {target}x", verdict="n/a: " + _why(ours, "ours")))
            return
        if not peers:
            why = "; ".join(_why(p, p.provider) for p in peer_rows if p is not None) or "peer not measured"
            checks.append(dict(name=name, value="", target=f">= {target}x", verdict="n/a: " + why))
            return
        best = min(peers, key=lambda p: p.median_ms)
        val = best.median_ms / ours.median_ms
        checks.append(dict(name=name + (f" ({best.provider})" if len(peer_rows) > 1 else ""), value=f"{val:.2f}x",
                           target=f">= {target}x", verdict="PASS" if val >= target else "FAIL"))

    sdpa = [r for r in rows if r.group == "dense" and r.case == naive and r.mode == "fwd"
            and r.provider.startswith("sdpa-")]
    ratio("naive fwd: speed vs FlexAttention", naive, "fwd", [_find(rows, naive, "flex", "fwd")], 1.0)
    ratio("naive fwd: speed vs fastest SDPA backend", naive, "fwd", sdpa, 0.7)
    ours_abs = _find(rows, absorbed, "ours", "fwd")
    if _usable(ours_abs) and ours_abs.tflops:
        checks.append(dict(name="absorbed fwd: TFLOP/s", value=f"{ours_abs.tflops:.1f}", target=">= 350",
                           verdict="PASS" if ours_abs.tflops >= 350 else "FAIL"))
    else:
        checks.append(dict(name="absorbed fwd: TFLOP/s", value="", target=">= 350",
                           verdict="n/a: " + _why(ours_abs, "ours")))
    ratio("naive bwd: speed vs FlexAttention", naive, "bwd", [_find(rows, naive, "flex", "bwd")], 0.9)
    return checks, context


def targets_table(rows: list[Row]) -> str:
    checks, context = target_checks(rows)
    if not checks:
        return ""
    lines = [f"Measured at {context}. Ratios are peer time / our time (higher is better for us).", "",
             "| target | measured | required | verdict |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {_cell(c['name'])} | {c['value']} | {c['target']} | {_cell(c['verdict'])} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------
def _ok(rows):
    return [r for r in rows if r.status in ("ok", "mismatch")]


def _save(plt, fig, path) -> None:
    """Save with every label and title inside the image (tight layout, then a tight bounding box)."""
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plain_log_ticks(ax, axis: str = "both") -> None:
    """Tick labels of log axes as plain numbers ("16", "0.5", "100,000"; not "1.6×10¹" or "1e+05"); minor
    ticks labelled only when the axis spans less than about a decade and a half (otherwise they crowd)."""
    import math

    from matplotlib import ticker

    plain = ticker.FuncFormatter(lambda v, _: f"{int(v):,}" if v >= 1000 and v == int(v) else f"{v:g}")
    for name in ("x", "y") if axis == "both" else (axis,):
        a = getattr(ax, f"{name}axis")
        if a.get_scale() != "log":
            continue
        lo, hi = sorted(getattr(ax, f"get_{name}lim")())
        a.set_major_formatter(plain)
        few = lo > 0 and math.log10(hi / lo) < 1.5
        a.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.2g}") if few else ticker.NullFormatter())


def _plot_dense(plt, rows, path) -> bool:
    rows = [r for r in _ok(rows) if r.group == "dense" and r.tflops]
    if not rows:
        return False
    modes = [m for m in ("fwd", "bwd", "fwd+bwd") if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    colors = {p: f"C{i % 10}" for i, p in enumerate(OrderedDict.fromkeys(r.provider for r in rows))}
    for ax, m in zip(axes[0], modes):
        sel = [r for r in rows if r.mode == m]
        cases = list(OrderedDict.fromkeys(r.case for r in sel))
        provs = list(OrderedDict.fromkeys(r.provider for r in sel))
        width = 0.8 / max(1, len(provs))
        for j, p in enumerate(provs):
            xs, ys = [], []
            for i, c in enumerate(cases):
                r = next((r for r in sel if r.case == c and r.provider == p), None)
                if r is not None:
                    xs.append(i + (j - (len(provs) - 1) / 2) * width)
                    ys.append(r.tflops)
            ax.bar(xs, ys, width=width, label=p, color=colors[p])
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels([c.replace(" causal ", "\n") for c in cases], fontsize=7)
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"dense {m}")
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def _plot_sparse(plt, rows, path) -> bool:
    rows = [r for r in _ok(rows) if r.group == "sparse" and r.median_ms and r.x is not None]
    if not rows:
        return False
    modes = [m for m in ("fwd", "fwd+bwd", "bwd") if any(r.mode == m for r in rows)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, m in zip(axes[0], modes):
        sel = [r for r in rows if r.mode == m]
        for p in OrderedDict.fromkeys(r.provider for r in sel):
            for fam, marker, ls in (("random", "o", "-"), ("sliding", "s", "--")):
                pts = sorted((r.x, r.median_ms) for r in sel if r.provider == p and r.case.startswith(fam))
                if pts:
                    ax.plot(*zip(*pts), marker=marker, ls=ls, label=f"{p} ({fam})")
            dense = [(r.x, r.median_ms) for r in sel if r.provider == p and r.case.startswith("dense")]
            if dense:
                ax.scatter(*zip(*dense), marker="*", s=120, label=f"{p} dense")
        ax.set_xlabel("density (fraction of T·S pairs kept)")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"block-sparse {m}")
        ax.legend(fontsize=7)
    _save(plt, fig, path)
    return True


def _s_of(r: Row) -> int | None:
    m = re.search(r"\bS=(\d+)", r.case) or re.search(r"\bS=(\d+)", r.shape)
    return int(m.group(1)) if m else None


def _plot_topk(plt, rows, path) -> bool:
    rows = [r for r in _ok(rows) if r.group == "topk" and r.median_ms]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (p, S) in OrderedDict.fromkeys((r.provider, _s_of(r)) for r in rows):
        pts = sorted((r.x, r.median_ms) for r in rows if r.provider == p and _s_of(r) == S and r.x is not None
                     and r.mode == "fwd")
        line = None
        if pts:
            (line,) = ax.plot(*zip(*pts), marker="o", label=f"{p} top-k S={S}")
        dense = [r.median_ms for r in rows if r.provider == p and _s_of(r) == S and r.x is None and r.mode == "fwd"]
        if dense:
            ax.axhline(dense[0], ls="--", color=line.get_color() if line else None, label=f"{p} dense S={S}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("K (keys per query)")
    ax.set_ylabel("median forward time (ms)")
    ax.set_title("top-k sparse attention vs dense")
    ax.legend(fontsize=7)
    plain_log_ticks(ax)
    _save(plt, fig, path)
    return True


def _plot_decode(plt, rows, path) -> bool:
    rows = [r for r in _ok(rows) if r.group == "decode" and r.gbps]
    if not rows:
        return False
    series = Counter((r.provider, re.sub(r"\s*S=\d+", "", r.case)) for r in rows)
    if max(series.values()) <= 1:  # one context length per series (the quick suite): bars, not lone points
        fig, ax = plt.subplots(figsize=(7, 4.5))
        cases = list(OrderedDict.fromkeys(r.case for r in rows))
        provs = list(OrderedDict.fromkeys(r.provider for r in rows))
        width = 0.8 / len(provs)
        for j, p in enumerate(provs):
            pts = [(cases.index(r.case) + (j - (len(provs) - 1) / 2) * width, r.gbps) for r in rows if r.provider == p]
            ax.bar(*zip(*pts), width=width, label=p)
        ax.set_xticks(range(len(cases)))
        ax.set_xticklabels(cases, fontsize=8)
        ax.set_ylabel("GB/s (cache rows + q + out + lse)")
        ax.set_title("decode over a paged latent cache (S = cached tokens)")
        ax.legend(fontsize=7)
        _save(plt, fig, path)
        return True
    tqs = sorted({int(re.search(r"Tq=(\d+)", r.case).group(1)) for r in rows if re.search(r"Tq=(\d+)", r.case)})
    fig, axes = plt.subplots(1, max(1, len(tqs)), figsize=(6.5 * max(1, len(tqs)), 4.5), squeeze=False)
    for ax, tq in zip(axes[0], tqs):
        sel = [r for r in rows if f"Tq={tq}" in r.case]
        keys = OrderedDict.fromkeys((r.provider, re.search(r"B=(\d+)", r.case).group(1)) for r in sel)
        for p, b in keys:
            pts = sorted((r.x, r.gbps) for r in sel if r.provider == p and f"B={b} " in r.case + " ")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{p} B={b}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached tokens S")
        ax.set_ylabel("GB/s")
        ax.set_title(f"decode, Tq={tq}")
        ax.legend(fontsize=7)
        plain_log_ticks(ax)
    _save(plt, fig, path)
    return True


def _plot_memory(plt, rows, path) -> bool:
    mem = [r for r in _ok(rows) if r.group == "memory" and r.value is not None]
    kv = [r for r in _ok(rows) if r.group == "kv-cache" and r.value is not None and "computed" in r.case]
    if not mem and not kv:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(14, 1.5 + 0.6 * max(len(mem), len(kv), 4)))
    if mem:
        axes[0].barh([textwrap.fill(f"{r.provider} T={int(r.x) if r.x else '?'}", 34) for r in mem],
                     [r.value for r in mem])
        axes[0].set_xscale("log")
        axes[0].set_xlabel("peak MiB above the inputs (forward + backward)")
        axes[0].set_title("peak memory of forward + backward\n" + textwrap.fill(mem[0].shape, 60), fontsize=9)
    if kv:
        labels = [textwrap.fill(f"{r.case.split(' ')[0]}: {r.provider}", 34) for r in kv]
        axes[1].barh(labels, [r.value for r in kv])
        axes[1].set_xscale("log")
        axes[1].set_xlabel("bytes per token (all layers, bf16)")
        axes[1].set_title("KV cache per token")
    for ax in axes:
        ax.tick_params(axis="y", labelsize=7)
        plain_log_ticks(ax, "x")
    _save(plt, fig, path)
    return True


def write_plots(rows: list[Row], out_dir: Path) -> list[str]:
    """Write the PNG plots that have data; returns their file names ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - plots are optional
        return []
    made = []
    for name, fn in (("dense.png", _plot_dense), ("sparse.png", _plot_sparse), ("topk.png", _plot_topk),
                     ("decode.png", _plot_decode), ("memory.png", _plot_memory)):
        try:
            if fn(plt, rows, Path(out_dir) / name):
                made.append(name)
        except Exception as e:  # noqa: BLE001 - a broken plot must not lose the tables
            print(f"warning: plot {name} failed: {type(e).__name__}: {e}")
            plt.close("all")
    return made


# ---------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------
METHODS = """\
* Time: median of repeated runs, warm-up excluded; IQR = p75 − p25. CPU: `torch.utils.benchmark`
  (`blocked_autorange`, all torch threads). CUDA: `triton.testing.do_bench` (L2 flushed before every run),
  with several input sets rotated when one set fits in L2. Forward passes run with inputs that require
  grad (as in training); `bwd` times `torch.autograd.grad` of a retained forward graph; `fwd+bwd` both.
* FLOPs (matmul only; `pairs` = score entries computed, summed over batch and query heads; bottom-right
  causal counted exactly): forward `2·pairs·(Dk+Dv)`, backward `2·pairs·(3·Dk+2·Dv)` (scores
  recomputed: QKᵀ, dV, dP, dQ, dK), fwd+bwd the sum; decode `2·pairs·(Dk+Dv)`.
* Bytes (compulsory traffic, each tensor once): forward `|q|+|k|+|v|+|o|+lse`, backward
  `2(|q|+|k|+|v|+|o|)+lse` (v free when it is a view of k); decode: cache rows + q + out + lse.
* % ceiling: the larger of TFLOP/s ÷ measured matmul ceiling (F) and GB/s ÷ measured copy ceiling (B).
* status: ok; skip = not run (note says why); error = tried and failed (note has the error);
  mismatch = ran but its output differs from the reference (or the first provider) beyond tolerance.
* Memory: CUDA `max_memory_allocated` above the inputs; CPU proxy = peak-RSS growth (lower bound).
  KV-cache GQA rows are an explicit assumption (8 KV heads × 128, same depth).
"""


def write_markdown(rows: list[Row], out_dir: Path, plots: list[str]) -> str:
    """Write ``results.md``; returns its text."""
    text = markdown_text(rows, out_dir, plots)
    (Path(out_dir) / "results.md").write_text(text)
    return text


def console_text(rows: list[Row], plots: list[str], out_dir: Path | None = None) -> str:
    """``results.md``'s text for a terminal: ``skip`` rows folded into one line per group (count and the
    most common reason) instead of one table row each; results.md keeps them all."""
    kept = [r for r in rows if r.status != "skip"]
    text = markdown_text(kept, out_dir, plots, counts_of=rows)
    folded = [f"* {GROUP_TITLES.get(g, g)}: {line}" for g, line in summarize_skips(rows).items()]
    if folded:
        text += "\n## Skipped (not run; every row and reason in results.md)\n\n" + "\n".join(folded) + "\n"
    return text


def markdown_text(rows: list[Row], out_dir: Path | None, plots: list[str], counts_of: list[Row] | None = None) -> str:
    """The text of ``results.md`` (metadata from ``out_dir/metadata.json`` when present); the ``Rows:`` counts
    come from ``counts_of`` (default ``rows``)."""
    meta = {}
    mpath = Path(out_dir) / "metadata.json" if out_dir is not None else None
    if mpath is not None and mpath.exists():
        try:
            meta = json.loads(mpath.read_text())
        except ValueError:
            meta = {}
    lines = ["# MLA benchmark results", ""]
    if meta:
        lines += ["| | |", "|---|---|"]
        for k, v in meta.items():
            if k == "runs":
                continue
            lines.append(f"| {k} | {_cell(v)} |")
        for run in meta.get("runs", [])[1:]:
            lines.append(f"| appended | {_cell(run)} |")
        lines.append("")
    counts = {s: sum(r.status == s for r in (rows if counts_of is None else counts_of))
              for s in ("ok", "skip", "error", "mismatch")}
    lines.append("Rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".")
    lines.append("")
    tt = targets_table(rows)
    if tt:
        lines += ["## Targets", "", tt, ""]
    for g, sel in group_rows(rows).items():
        lines += [f"## {GROUP_TITLES.get(g, g)}", "", rows_table(sel), ""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Method", "", METHODS]
    return "\n".join(lines)


def short_summary(rows: list[Row]) -> str:
    """Compact table for consoles: ceilings, dense rows (ms, TFLOP/s), best decode GB/s, targets."""
    out = []
    for r in rows:
        if r.group == "ceiling":
            why = r.note[:80] if r.status != "ok" else ""
            out.append(f"ceiling {r.case}: {_num(r.value)} {r.unit} [{r.status}] {why}")
    dense = [r for r in rows if r.group == "dense"]
    if dense:
        out.append("")
        out.append(f"{'case':28} {'provider':15} {'pass':8} {'ms':>9} {'TFLOP/s':>9} {'status':8} note")
        for r in dense:
            ms = _num(r.median_ms) if r.median_ms else "-"
            tf = _num(r.tflops) if r.tflops else "-"
            out.append(f"{r.case:28} {r.provider:15} {r.mode:8} {ms:>9} {tf:>9} {r.status:8} "
                       f"{r.note[:70] if r.status != 'ok' else ''}")
    dec = [r for r in rows if r.group == "decode" and r.gbps]
    if dec:
        out.append("")
        for p in OrderedDict.fromkeys(r.provider for r in dec):
            best = max((r for r in dec if r.provider == p), key=lambda r: r.gbps)
            out.append(f"decode best {p}: {_num(best.gbps)} GB/s at {best.case}")
    checks, context = target_checks(rows)
    if checks:
        out.append("")
        out.append(f"targets ({context}):")
        for c in checks:
            value = c["value"] or "not measured"
            out.append(f"  {c['name']}: {value} (need {c['target']}) -> {c['verdict']}")
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "skip", "error", "mismatch")}
    out.append("")
    out.append("rows: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return "\n".join(out)


def write_report(out_dir: Path) -> tuple[str, list[str]]:
    """Regenerate ``results.md`` and the PNGs from ``results.csv``; returns (markdown, plot names)."""
    rows = read_rows(Path(out_dir) / "results.csv")
    plots = write_plots(rows, out_dir)
    return write_markdown(rows, out_dir, plots), plots
