"""Compile report: every kernel configuration the launchers may pick, compiled for each GPU architecture.

    python -m bench.compile_report                      # table on stdout (sm80, sm86, sm89, sm90, +100/120)
    python -m bench.compile_report --json rows.json     # the same rows as a JSON list
    python -m bench.compile_report --kernels attention_fwd,decode --arch 90 --jobs 2

No GPU needed: each configuration is compiled with ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``; registers and spill bytes come from the ptxas bundled with
Triton, shared bytes from the kernel metadata (``smem_limit``: the architecture's per-block
maximum, ``kernels._config.SMEM_LIMIT_BYTES``), ``wgmma``, ``tf32`` (a TF32 tensor-core product)
and the atomics' memory semantics from the PTX (see ``kernels/_compile.py``). The default
architectures are ``kernels._compile.target_archs()``: 80, 86, 89, 90, and 100 / 120 when the
installed Triton can compile for them. Kernel modules are listed in
``kernels._config.KERNEL_MODULES``; a module that does not import yet is reported as skipped. Exit
status 1 when a configuration fails to compile, spills, exceeds the architecture's shared memory,
uses TF32 without the spec allowing it, or has non-relaxed atomics (``--no-fail`` to always exit 0);
2 on an unknown ``--kernels`` / ``--arch`` / ``--dtypes`` name, or without Triton (the ``[triton]`` extra).
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned fixed-width table: ``header``, a dash rule, then ``rows`` (cells already strings)."""
    cells = [header, *rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _format_table(rows: list[dict]) -> str:
    cols = [
        ("kernel", "kernel"), ("arch", "arch"), ("dtype", "dtype"), ("head_dims", "dk/dv"), ("group", "G"),
        ("tile", "tile"), ("warps", "warps"), ("stages", "stages"), ("registers", "regs"),
        ("spill_bytes", "spill B"), ("shared_bytes", "smem B"), ("smem_limit", "limit B"), ("wgmma", "wgmma"),
        ("tf32", "tf32"), ("fp8_cvt", "fp8 cvt"), ("status", "status"),
    ]
    return text_table([h for _, h in cols],
                      [[("yes" if r.get(k) else "no") if k in ("wgmma", "tf32") else str(r.get(k, "")) for k, _ in cols]
                       for r in rows])


def add_compile_args(ap: argparse.ArgumentParser, arch_default: str, arch_help: str, quick_help: str) -> None:
    """The options every compile-without-a-GPU tool takes: ``--json``, ``--kernels``, ``--arch``, ``--dtypes``,
    ``--quick`` and ``--jobs``."""
    ap.add_argument("--json", metavar="PATH", help="also write the rows as a JSON list")
    ap.add_argument("--kernels", default="", help="comma-separated kernel module names (e.g. attention_fwd)")
    ap.add_argument("--arch", default=arch_default, help=arch_help)
    ap.add_argument("--dtypes", default="", help="only these dtypes (e.g. fp16); default: all the specs list")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--jobs", type=int, default=0, help="parallel compile processes (default: CPU count)")


def cannot_compile() -> str:
    """Why kernels cannot be compiled in this process (Triton missing, or the interpreter on), or ``""``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return 'triton is not installed: nothing to compile. Install it with:  pip install -e ".[triton]"'
    from kernels._config import INTERPRET

    if INTERPRET:
        return ("TRITON_INTERPRET is set: kernels are interpreter wrappers and cannot be compiled; "
                "run with TRITON_INTERPRET=0")
    return ""


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (see module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m bench.compile_report", description=__doc__.splitlines()[0])
    add_compile_args(ap, "", "comma-separated compute capabilities (default: 80,86,89,90 and 100,120 if "
                         "targetable)",
                     "fp16 specs plus every dtype of the absorbed 576/512 shape with 128 heads (the compile check's "
                     "set)")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even when a configuration is not clean")
    args = ap.parse_args(argv)
    from kernels._config import KERNEL_MODULES, SMEM_LIMIT_BYTES

    names = [m.rsplit(".", 1)[-1] for m in KERNEL_MODULES]
    unknown = [k for k in args.kernels.split(",") if k and k not in names and k not in KERNEL_MODULES]
    if unknown:
        ap.error(f"--kernels: unknown {', '.join(map(repr, unknown))}; valid: {', '.join(names)}")
    bad_arch = [a for a in args.arch.split(",") if a and (not a.isdigit() or int(a) not in SMEM_LIMIT_BYTES)]
    if bad_arch or (args.arch and not args.arch.strip(",")):
        ap.error(f"--arch: unknown {', '.join(map(repr, bad_arch)) or repr(args.arch)}; valid: "
                 f"{', '.join(map(str, SMEM_LIMIT_BYTES))}")

    why = cannot_compile()
    if why:
        print(why, file=sys.stderr)
        return 2
    from kernels._compile import compile_all, find_ptxas, quick_selection, target_archs

    if not find_ptxas():
        print("no ptxas bundled with triton: cannot measure registers", file=sys.stderr)
        return 0
    archs = tuple(int(a) for a in args.arch.split(",") if a) or target_archs()
    kernels = tuple(k for k in args.kernels.split(",") if k) or None
    dtypes = tuple(d for d in args.dtypes.split(",") if d) or None
    if dtypes:
        from kernels._compile import collect_specs

        known = sorted({s.dtype for s in collect_specs(archs, kernels)[0]})
        if set(dtypes) - set(known):
            ap.error(f"--dtypes: unknown {', '.join(repr(d) for d in dtypes if d not in known)}; "
                     f"valid: {', '.join(known)}")

    t0 = time.perf_counter()
    rows, skipped = compile_all(archs=archs, kernels=kernels, dtypes=dtypes, jobs=args.jobs or None,
                                select=quick_selection if args.quick else None)
    print(_format_table(rows))
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    bad = [r for r in rows if r["status"] != "ok"]
    print(f"{len(rows)} configurations, {len(bad)} not clean, {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad and not args.no_fail else 0


if __name__ == "__main__":
    sys.exit(main())
