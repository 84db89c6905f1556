"""Ahead-of-time compilation of kernel configurations for a GPU that may not be present.

``compile_spec`` runs ``triton.compile`` for a :class:`kernels._config.CompileSpec` on
``GPUTarget("cuda", arch, 32)`` and reports what the hardware would see: registers and spill
bytes (from the ``ptxas`` bundled with Triton, run on the PTX), shared memory (from the kernel
metadata, checked against the architecture's limit ``kernels._config.smem_limit``), whether the PTX
uses Hopper's ``wgmma``, whether any matrix product runs in TF32 (``mma``/``wgmma`` with ``tf32``
operands: allowed only in specs built with ``allow_tf32``), the memory semantics of its atomics, and
how FP8-cache specs convert e4m3. Works with Triton 3.6 and 3.9 (see docs/design.md §9).

``spec_args`` builds a ``CompileSpec`` signature the way a launch would specialize it: ints
equal to 1 become constexpr, ints divisible by 16 and 16-byte aligned pointers get the
``tt.divisibility`` attribute. That keeps the compiled code (vector widths, contiguity) close
to what runs for contiguous inputs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

from kernels._config import DEFAULT_ARCHS, KERNEL_MODULES, CompileSpec, smem_limit

__all__ = [
    "CompileResult",
    "PtxasUnavailable",
    "Pointer",
    "ast_source",
    "collect_specs",
    "compile_all",
    "compile_ptx",
    "compile_spec",
    "find_ptxas",
    "ptx_atomic_semantics",
    "ptx_uses_tf32",
    "quick_selection",
    "spec_args",
    "spec_divisible",
    "target_archs",
]


class PtxasUnavailable(RuntimeError):
    """No bundled ptxas could assemble the PTX (missing binary or too old for the PTX version)."""


@dataclass(frozen=True)
class Pointer:
    """Stand-in for a tensor argument in :func:`spec_args`: element type such as ``"fp16"``."""

    dtype: str
    aligned: bool = True


def spec_args(fn, values: dict) -> tuple[dict, dict, list]:
    """Signature, constexprs and 16-divisible arguments for a launch of ``fn`` with ``values``.

    ``values`` maps every argument name of the ``@triton.jit`` function to a :class:`Pointer`, an
    int, a float, a tuple of those (a tuple argument: its signature entry is the tuple of the elements'
    types, and constexpr or divisible elements are named by their path ``(name, i, ...)``), or (for
    constexpr parameters) its value; arguments with a default (optional features, e.g.
    ``HAS_PARTIAL=False``) may be left out (:func:`spec_divisible` splits the divisible list for
    ``CompileSpec.extra``). Raises ``KeyError`` naming a missing argument.
    """
    signature, constexprs, divisible = {}, {}, []
    defaults = {n: p.default for n, p in inspect.signature(fn.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for name, is_constexpr in _params(fn):
        if name not in values and name not in defaults:
            raise KeyError(f"spec_args: no value for argument {name!r} of {fn.__name__}")
        val = values[name] if name in values else defaults[name]  # defaulted: optional features off
        if is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = val
        else:
            signature[name] = _specialize(val, name, constexprs, divisible)
    return signature, constexprs, divisible


def _specialize(val, path, constexprs: dict, divisible: list):
    """Triton type of one argument value as a launch specializes it (``path``: its name, or ``(name, i,
    ...)`` inside a tuple); records constexpr values and 16-divisible arguments."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    if isinstance(val, tuple):
        key = path if isinstance(path, tuple) else (path,)
        return tuple(_specialize(v, key + (i,), constexprs, divisible) for i, v in enumerate(val))
    if isinstance(val, Pointer):
        if val.aligned:
            divisible.append(path)
        return "*" + val.dtype
    if val is None:
        constexprs[path] = None
        return "constexpr"
    ty, attr = native_specialize_impl(BaseBackend, val, False, True, True)
    if ty == "constexpr":
        constexprs[path] = attr
    elif attr == "D":
        divisible.append(path)
    return ty


def spec_divisible(divisible) -> dict:
    """``CompileSpec.extra`` entries of a :func:`spec_args` divisible list: ``divisible`` (argument names)
    and ``divisible_elems`` (paths ``(name, i, ...)`` of tuple-argument elements)."""
    return {"divisible": [d for d in divisible if isinstance(d, str)],
            "divisible_elems": [tuple(d) for d in divisible if not isinstance(d, str)]}


def ast_source(fn, signature: dict, constexprs: dict, divisible=()):
    """``triton.compiler.ASTSource`` of ``fn`` for a :func:`spec_args` result: names and ``(name, i, ...)``
    paths become Triton's argument-index paths; ``divisible`` ones get ``tt.divisibility = 16``."""
    from triton.compiler import ASTSource

    index = {p.name: i for i, p in enumerate(fn.params)}

    def to_path(key):
        return (index[key],) if isinstance(key, str) else (index[key[0]], *key[1:])

    attrs = {to_path(n): [["tt.divisibility", 16]] for n in divisible}
    consts = {to_path(k): v for k, v in constexprs.items()}
    return ASTSource(fn=fn, signature=dict(signature), constexprs=consts, attrs=attrs)


def _params(fn) -> list[tuple[str, bool]]:
    """(name, is constexpr) of every argument of a ``@triton.jit`` function. Under
    ``TRITON_INTERPRET=1`` the decorator returns an interpreter wrapper: read its Python signature
    (specs can be listed there; compiling them needs a process without the interpreter)."""
    if hasattr(fn, "params"):
        return [(p.name, p.is_constexpr) for p in fn.params]
    sig = inspect.signature(fn.fn)
    return [(n, "constexpr" in str(p.annotation)) for n, p in sig.parameters.items()]


@dataclass
class CompileResult:
    """What ``ptxas`` and Triton report for one compiled configuration."""

    spec: CompileSpec
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: bool
    has_dot: bool
    seconds: float
    #: FP8-cache specs (``KV_FP8``): "e4m3x2" when the PTX converts with ``cvt.rn.{f16x2,bf16x2}.e4m3x2`` (sm89+),
    #: "software" when it decodes e4m3 with integer bit operations (sm80); "" for other specs.
    fp8_cvt: str = ""
    tf32: bool = False
    atomics: tuple[str, ...] = ()

    @property
    def tf32_allowed(self) -> bool:
        return bool(self.spec.extra.get("allow_tf32", False))

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def fits_shared(self) -> bool:
        return self.shared <= smem_limit(self.spec.arch)

    @property
    def needs_wgmma(self) -> bool:
        """fp16/bf16 matrix products on sm90 should run on Hopper's wgmma (sm90a only: Blackwell has none),
        unless the spec says its tile is deliberately below wgmma's 64 rows (``extra["wgmma"] = False``:
        a shape whose every wgmma tile spills; its reason is written at the config)."""
        wants = self.spec.extra.get("wgmma", True)
        return wants and self.has_dot and self.spec.arch == 90 and self.spec.dtype in ("fp16", "bf16")

    @property
    def status(self) -> str:
        """"ok", or what is wrong: spills, shared memory over the limit, no wgmma where expected."""
        bad = []
        if self.spills:
            bad.append("spills")
        if not self.fits_shared:
            bad.append("smem")
        if self.needs_wgmma and not self.wgmma:
            bad.append("no-wgmma")
        if self.fp8_cvt and self.spec.arch >= 89 and self.fp8_cvt != "e4m3x2":
            bad.append("no-e4m3-cvt")
        if self.tf32 and not self.tf32_allowed:
            bad.append("tf32")
        if any(sem != "relaxed" for sem in self.atomics):
            bad.append("atomic-sem")
        return ",".join(bad) or "ok"

    def row(self) -> dict:
        """Flat dict for tables / JSON."""
        s = self.spec
        return {
            "kernel": s.kernel,
            "arch": s.arch,
            "dtype": s.dtype,
            "head_dims": f"{s.head_dims[0]}/{s.head_dims[1]}",
            "group": s.extra.get("group", 1),
            "alias": bool(s.extra.get("v_is_k", False)),
            "tile": s.tile,
            "warps": s.num_warps,
            "stages": s.num_stages,
            "registers": self.registers,
            "spill_bytes": self.spills,
            "shared_bytes": self.shared,
            "smem_limit": smem_limit(s.arch),
            "wgmma": self.wgmma,
            "fp8_cvt": self.fp8_cvt,
            "tf32": self.tf32,
            "atomics": ",".join(sorted(set(self.atomics))),
            "status": self.status,
            "compile_s": round(self.seconds, 2),
        }


def _triton_bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@functools.cache
def find_ptxas() -> tuple[str, ...]:
    """Candidate ptxas binaries, newest-PTX-capable last: bundled ``ptxas``, ``ptxas-blackwell``,
    then ``$TRITON_PTXAS_PATH`` / PATH. Empty when none exists."""
    out = []
    for cand in (
        os.path.join(_triton_bin_dir(), "ptxas"),
        os.path.join(_triton_bin_dir(), "ptxas-blackwell"),
        os.environ.get("TRITON_PTXAS_PATH") or "",
        shutil.which("ptxas") or "",
    ):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK) and cand not in out:
            out.append(cand)
    return tuple(out)


_RE_REGS = re.compile(r"Used (\d+) registers")
#: A TF32 matrix product in PTX: ``mma.sync....tf32.tf32...`` (sm80) or ``wgmma.mma_async....tf32`` (sm90).
_RE_TF32_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:wgmma|mma)\S*\.tf32\b", re.M)
#: Global atomics / reductions and their memory-order qualifier (Triton always writes one).
_RE_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(atom|red)\.global\.(?:gpu\.|sys\.|cta\.)?(\w+)", re.M)


def ptx_uses_tf32(ptx: str) -> bool:
    """Whether ``ptx`` has an ``mma`` / ``wgmma`` instruction on TF32 operands."""
    return _RE_TF32_MMA.search(ptx) is not None


def ptx_atomic_semantics(ptx: str) -> tuple[str, ...]:
    """Memory-order qualifier of every global ``atom`` / ``red`` instruction of ``ptx`` (e.g.
    ``("relaxed", "relaxed")``; ``"acq_rel"`` is Triton's default for ``tl.atomic_add``)."""
    return tuple(m.group(2) for m in _RE_ATOMIC.finditer(ptx))
_RE_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _usage_cache_dir() -> str:
    base = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(base, "ptxas-usage")


def ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """Cached :func:`_ptxas_usage` (keyed by the PTX text and the ptxas binaries available)."""
    key = hashlib.sha256((ptx + "|" + "|".join(find_ptxas())).encode()).hexdigest()
    path = os.path.join(_usage_cache_dir(), key + ".json")
    try:
        with open(path) as f:
            return tuple(json.load(f))
    except (OSError, ValueError):
        pass
    usage = _ptxas_usage(ptx)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(list(usage), f)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs time
        pass
    return usage


def _ptxas_usage(ptx: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on ``ptx``.

    The target (``sm_80``, ``sm_90a``) is read from the PTX. Tries each bundled ptxas in turn
    (Triton 3.9 emits PTX 9.x for sm_90a, which only ``ptxas-blackwell`` accepts).
    Raises :class:`PtxasUnavailable` when none succeeds.
    """
    m = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    if not m:
        raise ValueError("ptxas_usage: no .target line in PTX")
    arch = m.group(1).rstrip(",")
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        for exe in find_ptxas():
            proc = subprocess.run(
                [exe, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                capture_output=True, text=True,
            )
            log = proc.stdout + proc.stderr
            if proc.returncode != 0:
                errors.append(f"{os.path.basename(exe)}: {log.strip().splitlines()[-1:] or proc.returncode}")
                continue
            regs = _RE_REGS.search(log)
            spill = _RE_SPILL.search(log)
            if not regs or not spill:
                errors.append(f"{os.path.basename(exe)}: unparsed output {log[:200]!r}")
                continue
            return int(regs.group(1)), int(spill.group(1)), int(spill.group(2))
    raise PtxasUnavailable("; ".join(errors) or "no ptxas binary found")


def _triton_compile(spec: CompileSpec):
    """``triton.compile`` of ``spec`` for ``GPUTarget("cuda", spec.arch, 32)``."""
    import triton
    from triton.backends.compiler import GPUTarget

    if not hasattr(spec.fn, "params"):
        raise RuntimeError("compile_spec: kernels were decorated under TRITON_INTERPRET=1; compile in a "
                           "process without it (python -m bench.compile_report)")
    divisible = list(spec.extra.get("divisible", ())) + list(spec.extra.get("divisible_elems", ()))
    src = ast_source(spec.fn, spec.signature, spec.constexprs, divisible)
    return triton.compile(
        src,
        target=GPUTarget("cuda", spec.arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )


def compile_spec(spec: CompileSpec) -> CompileResult:
    """Compile ``spec`` for ``GPUTarget("cuda", spec.arch, 32)`` and measure it (see module doc)."""
    t0 = time.perf_counter()
    k = _triton_compile(spec)
    seconds = time.perf_counter() - t0
    ptx = k.asm["ptx"]
    regs, st, ld = ptxas_usage(ptx)
    return CompileResult(
        spec=spec, registers=regs, spill_stores=st, spill_loads=ld, shared=int(k.metadata.shared),
        wgmma="wgmma" in ptx, has_dot="tt.dot" in k.asm["ttir"], seconds=seconds,
        tf32=ptx_uses_tf32(ptx), atomics=ptx_atomic_semantics(ptx),
        fp8_cvt=(("e4m3x2" if re.search(r"cvt\.rn\.b?f16x2\.e4m3x2", ptx) else "software")
                 if spec.constexprs.get("KV_FP8") else ""),
    )


def compile_ptx(spec: CompileSpec) -> str:
    """The PTX of ``spec`` (compiled as :func:`compile_spec` does, without running ptxas)."""
    return _triton_compile(spec).asm["ptx"]


@functools.cache
def target_archs() -> tuple[int, ...]:
    """:data:`kernels._config.DEFAULT_ARCHS`, plus 100 and 120 when the installed Triton's CUDA backend
    can compile for them (its ``ptxas`` accepts ``sm_100a`` / ``sm_120a``; checked by compiling a
    one-line kernel)."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def _probe(X):
        tl.store(X, 1.0)

    out = list(DEFAULT_ARCHS)
    for arch in (100, 120):
        try:
            k = triton.compile(ASTSource(fn=_probe, signature={"X": "*fp32"}, constexprs={}),
                               target=GPUTarget("cuda", arch, 32))
            ptxas_usage(k.asm["ptx"])
        except Exception:  # noqa: BLE001 - any failure means: this Triton cannot target it
            continue
        out.append(arch)
    return tuple(out)


def collect_specs(archs=(80, 90), kernels=None) -> tuple[list[CompileSpec], dict[str, str]]:
    """All ``CompileSpec`` of the kernel modules in ``KERNEL_MODULES`` (optionally filtered by short
    module name, e.g. ``attention_fwd``) for ``archs``. Modules that fail to import (not written
    yet) or have no ``compile_specs`` are reported in the second value, never raised."""
    specs, skipped = [], {}
    for mod_name in KERNEL_MODULES:
        short = mod_name.rsplit(".", 1)[-1]
        if kernels and short not in kernels and mod_name not in kernels:
            continue
        try:
            mod = importlib.import_module(mod_name)
            builders = importlib.import_module("kernels._specs").SPEC_BUILDERS
        except Exception as e:  # a module being written by someone else must not break the report
            skipped[short] = f"import failed: {type(e).__name__}: {e}"
            continue
        fn = builders.get(short) or getattr(mod, "compile_specs", None)
        if fn is None:
            skipped[short] = "no compile_specs()"
            continue
        for arch in archs:
            specs.extend(fn(arch))
    return specs, skipped


ABSORBED_HEAD_DIMS = (576, 512)


def quick_selection(spec: CompileSpec) -> bool:
    """The compile check's default subset: every fp16 spec (every tile configuration, every shape)
    plus all dtypes of the absorbed MLA shape with 128 heads and ``v`` aliasing ``k`` (bf16 compiles
    to the same tiles and MMA shapes as fp16; the other absorbed group sizes share fp32's tiles)."""
    if spec.dtype == "fp16":
        return True
    many = 128 in (spec.extra.get("group"), spec.extra.get("num_heads"))  # dense/top-k, decode
    return tuple(spec.head_dims) == ABSORBED_HEAD_DIMS and many and spec.extra.get("v_is_k", True)


def _filter(specs, dtypes, select):
    return [s for s in specs if (not dtypes or s.dtype in dtypes) and (select is None or select(s))]


_WORKER_SPECS: list[CompileSpec] = []


def _worker_init(archs, kernels, dtypes, select) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # one FP-fusion notice per process is noise here
    _WORKER_SPECS[:] = _filter(collect_specs(archs, kernels)[0], dtypes, select)


def _compile_row(spec: CompileSpec) -> dict:
    try:
        return compile_spec(spec).row()
    except Exception as e:  # report, do not abort: one broken config must not hide the others
        msg = _error_line(e)
        return {
            "kernel": spec.kernel, "arch": spec.arch, "dtype": spec.dtype,
            "head_dims": f"{spec.head_dims[0]}/{spec.head_dims[1]}", "group": spec.extra.get("group", 1),
            "alias": bool(spec.extra.get("v_is_k", False)), "tile": spec.tile, "warps": spec.num_warps,
            "stages": spec.num_stages, "registers": None, "spill_bytes": None, "shared_bytes": None,
            "smem_limit": smem_limit(spec.arch), "wgmma": None, "tf32": None, "atomics": None, "fp8_cvt": None,
            "status": f"error: {type(e).__name__}: {msg}", "compile_s": None,
        }


def _error_line(e: BaseException) -> str:
    """One informative line: the root cause (a CompilationError's message starts with source)."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
    return (lines[-1] if lines else "")[:200]


def _worker_compile(i: int) -> dict:
    return _compile_row(_WORKER_SPECS[i])


def compile_all(archs=(80, 90), kernels=None, dtypes=None, jobs: int | None = None, select=None):
    """Compile every spec of :func:`collect_specs`, optionally only ``dtypes`` (e.g. ``("fp16",)``)
    and those for which ``select(spec)`` is true.

    Returns ``(rows, skipped)``: one :meth:`CompileResult.row` dict per spec, in spec order (a
    failed compile gives a row whose ``status`` starts with ``"error"``), and the modules skipped.
    ``jobs`` > 1 compiles in that many forked processes (each rebuilds the spec list: specs hold
    Triton functions, which do not pickle); default: the CPU count; 1 where fork is unavailable.
    """
    import multiprocessing as mp

    specs, skipped = collect_specs(archs, kernels)
    specs = _filter(specs, dtypes, select)
    jobs = min(jobs or os.cpu_count() or 1, len(specs))
    if jobs <= 1 or "fork" not in mp.get_all_start_methods():
        return [_compile_row(s) for s in specs], skipped
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs, mp_context=mp.get_context("fork"), initializer=_worker_init,
                             initargs=(archs, kernels, dtypes, select)) as ex:
        rows = list(ex.map(_worker_compile, range(len(specs))))
    return rows, skipped
