"""Benchmark result rows: ``Row`` (one measurement, one CSV line), CSV round trip, and the ``Recorder`` that
writes ``results.csv`` / ``results.jsonl`` as a run goes."""

from __future__ import annotations

import collections
import csv
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only (bench.timing imports this module)
    from bench.env import Env
    from bench.timing import Timing

# ---------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------
STATUSES = ("ok", "skip", "error", "mismatch")


@dataclass
class Row:
    """One line of ``results.csv``.

    group: ``ceiling | dense | sparse | topk | decode | generate | module | memory | kv-cache``.
    case: human label of the inputs; shape: the sizes (``B=.. T=.. ..``); dtype: input dtype.
    provider: implementation measured. mode: ``fwd``, ``bwd``, ``fwd+bwd`` (or what was measured).
    median_ms / iqr_ms: median time and inter-quartile range (p75 − p25) of the timed runs, in ms.
    tflops / gbps: work formulas (module docstring) over the median time.
    frac_flops / frac_bw: those as fractions of the ceilings measured in the same run.
    value / unit: a non-time measurement (peak MiB, bytes per token, tokens/s, ...).
    x: the plot axis of the group (T, density, K, S, ...). status: ``ok``, ``skip`` (not run, ``note``
    says why), ``error`` (tried and failed, ``note`` holds the error), ``mismatch`` (ran, but the output
    differs from the baseline by more than the tolerance). note: free text.
    """

    group: str
    case: str
    provider: str
    mode: str = "-"
    shape: str = ""
    dtype: str = ""
    median_ms: float | None = None
    iqr_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    frac_flops: float | None = None
    frac_bw: float | None = None
    value: float | None = None
    unit: str = ""
    x: float | None = None
    status: str = "ok"
    note: str = ""
    suite: str = ""
    device: str = ""


FIELDS = [f.name for f in dataclasses.fields(Row)]
_FLOAT_FIELDS = {f.name for f in dataclasses.fields(Row) if "float" in str(f.type)}


def row_to_dict(row: Row) -> dict:
    """CSV-ready dict (floats with 6 significant digits, None as empty)."""
    out = {}
    for k in FIELDS:
        v = getattr(row, k)
        if v is None:
            out[k] = ""
        elif isinstance(v, float):
            out[k] = f"{v:.6g}"
        else:
            out[k] = str(v)
    return out


def row_from_dict(d: dict) -> Row:
    """Inverse of ``row_to_dict`` (unknown columns ignored, missing ones default)."""
    kw = {}
    for k in FIELDS:
        if k not in d:
            continue
        v = d[k]
        if k in _FLOAT_FIELDS:
            try:
                kw[k] = float(v) if v not in ("", None) else None
            except ValueError:
                kw[k] = None
        else:
            kw[k] = v or ""
    kw.setdefault("group", "?")
    kw.setdefault("case", "?")
    kw.setdefault("provider", "?")
    return Row(**kw)


def read_rows(path: Path) -> list[Row]:
    """Rows of a ``results.csv`` ([] when the file does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [row_from_dict(d) for d in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------------
class Recorder:
    """Collects rows, appends each one to ``results.csv`` at once (flushed: a killed run keeps its rows)
    and prints a progress line (``skip`` rows are counted instead and printed as one line per group by
    ``print_skips``).

    Args:
        out_dir: output folder. env: the run's ``Env`` (fills suite/device and ceiling fractions).
        append: keep the rows already in ``results.csv`` (later groups of the same run in other processes).
    """

    def __init__(self, out_dir: Path, env: Env, append: bool = False, verbose: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "results.csv"
        self.env = env
        self.verbose = verbose
        self.rows: list[Row] = []
        self._skips: list[Row] = []
        if not append or not self.path.exists():
            with open(self.path, "w", newline="") as f:
                csv.DictWriter(f, fieldnames=FIELDS).writeheader()

    def add(self, row: Row) -> Row:
        env = self.env
        row.suite = row.suite or env.suite
        row.device = row.device or env.device_name
        row.dtype = row.dtype or env.dtype_name
        if row.tflops is not None and env.peak_flops:
            row.frac_flops = row.tflops * 1e12 / env.peak_flops
        if row.gbps is not None and env.peak_bw:
            row.frac_bw = row.gbps * 1e9 / env.peak_bw
        if row.status not in STATUSES:
            row.status = "error"
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=FIELDS).writerow(row_to_dict(row))
        if self.verbose and row.status == "skip":
            self._skips.append(row)
        elif self.verbose:
            print(progress_line(row), flush=True)
        return row

    def add_all(self, base: Row, providers, status: str, note: str, modes=(None,)) -> list[Row]:
        """One row per provider (and per mode, unless ``modes`` is ``(None,)``: ``base``'s mode) with the same
        ``status`` and ``note``: a case skipped or failed as a whole."""
        return [
            self.add(dataclasses.replace(base, provider=p, status=status, note=note,
                                         **({} if m is None else {"mode": m})))
            for p in providers for m in modes
        ]

    def skipped(self, row: Row) -> bool:
        """When the run must not start another measurement (``Env.skip_reason``: time budget spent, CUDA
        context lost), record ``row`` as ``skip`` with that reason and return True."""
        reason = self.env.skip_reason()
        if reason:
            self.add(dataclasses.replace(row, status="skip", note=reason))
        return bool(reason)

    def print_skips(self) -> None:
        """Print the ``skip`` rows added since the last call as one line per group: the count and the most
        common reasons (every row, with its reason, is in results.csv / results.md)."""
        for group, line in summarize_skips(self._skips).items():
            print(f"[{group}] {line}", flush=True)
        self._skips.clear()


def summarize_skips(rows: list[Row]) -> dict[str, str]:
    """``{group: "N cases skipped: reason (xk); reason; M other reasons"}`` over the ``skip`` rows of ``rows``
    (reasons cut before their first ``;`` or parenthesis and shortened to 70 characters at a word; the two most
    common shown)."""
    import textwrap

    def reason(note: str) -> str:
        return textwrap.shorten(note.split(";")[0].split(" (")[0], 70, placeholder=" ...")

    out = {}
    for group in dict.fromkeys(r.group for r in rows if r.status == "skip"):
        notes = collections.Counter(reason(r.note) for r in rows if r.group == group and r.status == "skip")
        n = sum(notes.values())
        why = "; ".join(f"{note} (x{k})" if k > 1 else note for note, k in notes.most_common(2))
        more = f"; {len(notes) - 2} other reasons" if len(notes) > 2 else ""
        out[group] = f"{n} case{'s' if n != 1 else ''} skipped: {why}{more}"
    return out


def progress_line(row: Row) -> str:
    """One-line summary of a row for the console."""
    parts = [f"[{row.group}]", row.case, row.provider, row.mode]
    if row.median_ms is not None:
        parts.append(f"{row.median_ms:.4g} ms")
    if row.tflops is not None:
        parts.append(f"{row.tflops:.4g} TFLOP/s")
    if row.gbps is not None:
        parts.append(f"{row.gbps:.4g} GB/s")
    if row.value is not None:
        parts.append(f"{row.value:.6g} {row.unit}")
    parts.append(row.status)
    if row.note:
        parts.append(row.note[:160])
    return " | ".join(parts)


def timed_row(base: Row, timing: Timing, flops: float | None = None, nbytes: float | None = None) -> Row:
    """``base`` with the timing and the derived TFLOP/s and GB/s filled in."""
    row = dataclasses.replace(base)
    row.median_ms, row.iqr_ms = timing.median_ms, timing.iqr_ms
    sec = timing.median_ms / 1e3
    if sec > 0:
        if flops:
            row.tflops = flops / sec / 1e12
        if nbytes:
            row.gbps = nbytes / sec / 1e9
    return row
