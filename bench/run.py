"""Benchmark entry point.

    python -m bench.run --suite cpu --quick --out bench_out/cpu      # CI-sized, ~1 minute on 2 cores
    python -m bench.run --suite gpu --out bench_out/gpu              # the GPU suite (bf16)
    python -m bench.run --suite gpu --full --out bench_out/gpu       # + the full decode grid, more sizes
    python -m bench.run --suite gpu --only dense,decode --append ... # more groups into the same report
    python -m bench.run --report-only --out DIR                      # rebuild results.md / PNGs from CSV

Writes ``DIR/results.csv`` (one row per case × provider × pass, appended as each finishes, so a killed run
keeps what it measured), ``DIR/results.md`` (metadata, ceilings, targets, tables, method), PNG plots and
``DIR/metadata.json``, and prints the Markdown table (``--short``: a compact summary).

Groups, in run order: ceiling, dense, fallback (CPU suite), decode, memory, kv-cache, sparse, topk, module, generate.
A case that cannot run on a provider becomes a row saying why; nothing is left out silently.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path

import torch

from bench import report
from bench.env import Env, device_name, l2_cache_bytes, metadata
from bench.rows import Recorder, Row, read_rows
from bench.timing import load_ceilings, measure_ceilings
from mla.threads import auto_threads

GROUPS = ["ceiling", "dense", "fallback", "decode", "memory", "kv-cache", "sparse", "topk", "packed", "module",
          "generate"]


def _group_fns():
    from bench.bench_decode import run_decode, run_generate
    from bench.bench_kernels import run_dense, run_fallback, run_packed, run_sparse, run_topk
    from bench.bench_memory import run_kv_cache, run_memory
    from bench.bench_modules import run_modules

    return {"dense": run_dense, "fallback": run_fallback, "decode": run_decode, "memory": run_memory,
            "kv-cache": run_kv_cache, "sparse": run_sparse, "topk": run_topk, "packed": run_packed,
            "module": run_modules, "generate": run_generate}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=["cpu", "gpu"], default="cpu",
                   help="cpu: float32 on the CPU, small shapes; gpu: bfloat16 on CUDA, the kernel targets' shapes")
    p.add_argument("--quick", action="store_true", help="fewest sizes (CI: the cpu suite in about a minute)")
    p.add_argument("--full", action="store_true", help="every size (full decode grid, more densities / windows)")
    p.add_argument("--out", default=None, help="output folder (default bench_out/<suite>)")
    p.add_argument("--only", default="", help=f"comma-separated groups to run (of {','.join(GROUPS)})")
    p.add_argument("--skip", default="", help="comma-separated groups not to run")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in OUT/results.csv (reuse their ceilings) and add to them")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds after which no new case starts (the rest are recorded as skipped)")
    p.add_argument("--case-timeout", type=float, default=None,
                   help="seconds one measurement may take (default 60 on CPU, 150 on CUDA)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="input dtype (default: float32 for cpu, bfloat16 for gpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the idle cores, from the load average; 1 when the "
                        "machine is busy — oversubscribed OpenMP threads make CPU timings meaningless)")
    p.add_argument("--report-only", action="store_true", help="only rebuild results.md and the PNGs from results.csv")
    p.add_argument("--short", action="store_true", help="print a compact summary instead of the full table")
    p.add_argument("--fill-missing", action="store_true",
                   help="with --report-only: add a row for every group without rows (a phase that never ran)")
    p.add_argument("--no-print", action="store_true", help="do not print the table")
    p.add_argument("--smoke", action="store_true",
                   help="developer check: the gpu plan with tiny shapes, on whatever device is present")
    args = p.parse_args(argv)
    for flag, names in (("--only", args.only), ("--skip", args.skip)):
        unknown = [g.strip() for g in names.split(",") if g.strip() and g.strip() not in GROUPS]
        if unknown:
            p.error(f"{flag}: unknown group {', '.join(map(repr, unknown))}; groups: {', '.join(GROUPS)}")
    if args.quick and args.full:
        p.error("--quick and --full exclude each other")
    for flag, value in (("--time-budget", args.time_budget), ("--case-timeout", args.case_timeout)):
        if value is not None and not value > 0:
            p.error(f"{flag}: expected seconds > 0, got {value}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads: expected >= 1, got {args.threads}")
    if args.fill_missing and not args.report_only:
        p.error("--fill-missing needs --report-only")
    return args


def _groups(args) -> list[str]:
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    skip = {g.strip() for g in args.skip.split(",") if g.strip()}
    sel = only or GROUPS
    return [g for g in GROUPS if g in sel and g not in skip]


def make_env(args) -> Env:
    """The run's ``Env`` from the command line (raises SystemExit for --suite gpu without CUDA)."""
    if args.suite == "gpu" and not torch.cuda.is_available() and not args.smoke:
        raise SystemExit("--suite gpu needs a CUDA device (torch.cuda.is_available() is False); "
                         "use --suite cpu, or --smoke to check the script's logic")
    cuda = args.suite == "gpu" and torch.cuda.is_available()
    torch.set_num_threads(args.threads if args.threads else auto_threads())
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype_name = args.dtype or ("bfloat16" if cuda else "float32")
    env = Env(suite=args.suite, device=device, dtype=getattr(torch, dtype_name), quick=args.quick, full=args.full,
              smoke=args.smoke)
    env.case_timeout = args.case_timeout if args.case_timeout is not None else (150.0 if cuda else 60.0)
    if args.time_budget:
        env.budget_s = float(args.time_budget)
        env.deadline = time.monotonic() + env.budget_s
    env.l2_bytes = l2_cache_bytes(device)
    env.device_name = device_name(device)
    if not cuda:
        env.min_run_time = 0.05 if (args.quick or args.smoke) else 0.2
    elif args.quick or args.smoke:
        env.warmup_ms, env.rep_ms = 10, 40
    return env


class _Terminated(BaseException):
    """SIGTERM (e.g. from ``timeout``): not an ``Exception``, so per-case handlers do not swallow it."""


def _on_sigterm(signum, frame):
    raise _Terminated(f"signal {signum}")


def _write_metadata(out: Path, env: Env, argv, append: bool) -> None:
    path = out / "metadata.json"
    md = metadata(env, argv)
    if append and path.exists():
        try:
            old = json.loads(path.read_text())
            old.setdefault("runs", []).append(f"{md['date']}: {md['command']}")
            path.write_text(json.dumps(old, indent=1))
            return
        except ValueError:
            pass
    md["runs"] = [f"{md['date']}: {md['command']}"]
    path.write_text(json.dumps(md, indent=1))


def _fill_missing(out: Path) -> None:
    """Append a ``skip`` row for each group with no row in ``out/results.csv`` (no silent holes)."""
    import csv

    from bench.rows import FIELDS, row_to_dict

    path = out / "results.csv"
    rows = read_rows(path)
    have = {r.group for r in rows}
    missing = [g for g in GROUPS if g not in have]
    if not missing:
        return
    new_file = not path.exists()
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new_file:
            w.writeheader()
        for g in missing:
            w.writerow(row_to_dict(Row(g, "(whole group)", "-", status="skip",
                                       note="no rows: this group's phase did not run or was killed before its "
                                            "first row (time cap / timeout; see logs/)")))


def main(argv=None) -> int:
    """Run the selected groups, write the reports, print the table. Returns the exit status
    (0 = finished, even with error rows; 124 = stopped by SIGTERM/SIGINT, outputs still written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out or f"bench_out/{args.suite}")
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        if args.fill_missing:
            _fill_missing(out)
        text, plots = report.write_report(out)
        rows = read_rows(out / "results.csv")
        if not args.no_print:
            print(report.short_summary(rows) if args.short else report.console_text(rows, plots))
        return 0
    env = make_env(args)
    groups = _groups(args)
    t0 = time.monotonic()
    rec = Recorder(out, env, append=args.append)
    _write_metadata(out, env, argv, args.append)
    print(f"bench: suite={args.suite}{' quick' if args.quick else ''}{' full' if args.full else ''} "
          f"device={env.device_name} dtype={env.dtype_name} groups={','.join(groups)} out={out}", flush=True)
    status = 0
    current = ""
    old_term = None
    try:
        old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread
        pass
    try:
        if "ceiling" in groups:
            measure_ceilings(env, rec)
        elif not load_ceilings(env, read_rows(out / "results.csv") if args.append else []):
            measure_ceilings(env, rec)
        fns = _group_fns()
        for g in groups:
            if g == "ceiling":
                continue
            current = g
            tg = time.monotonic()
            try:
                fns[g](env, rec)
            except (_Terminated, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - a bug in one group must not lose the others
                from bench.guards import after_error

                rec.add(Row(g, "(group)", "-", status="error", note="group aborted: " + after_error(env, e)))
            rec.print_skips()
            print(f"bench: group {g} done in {time.monotonic() - tg:.1f} s", flush=True)
    except (_Terminated, KeyboardInterrupt) as e:
        print(f"bench: interrupted ({e or 'SIGINT'}); writing what was measured", flush=True)
        status = 124
        later = groups[groups.index(current) + 1:] if current in groups else []
        for g in [current, *later]:
            if g and g != "ceiling":
                rec.add(Row(g, "(remaining cases)", "-", status="skip",
                            note=f"not run: interrupted ({e or 'SIGINT'}, e.g. the phase timeout) before these cases"))
    finally:
        rec.print_skips()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        text, plots = report.write_report(out)
        rows = read_rows(out / "results.csv")
        if not args.no_print:
            print(report.short_summary(rows) if args.short else report.console_text(rows, plots))
        print(f"bench: {len(rec.rows)} rows in {time.monotonic() - t0:.1f} s -> {out}/results.csv, results.md"
              + (", " + ", ".join(plots) if plots else ""), flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
