"""Read what a compiled Triton kernel does: SASS main loops and TTGIR dot layouts.

Used by ``python -m bench.static_model`` (docs/static-model.md). Everything here works on text
(``cuobjdump -sass`` output, TTGIR), so it is unit-tested on small snippets without a GPU; only
:func:`compile_kernel` and :func:`disassemble` need Triton and its bundled NVIDIA binaries.

SASS vocabulary (sm80/sm90, as printed by ``cuobjdump -sass``):

* ``HGMMA.64xNxK.F32[.BF16|.TF32] Rd, A, gdesc[..]`` is one Hopper ``wgmma`` issued by a warpgroup
  (4 warps): ``64*N*K`` MACs. ``A`` is a register (``R104``, operand held in registers) or a
  shared-memory descriptor (``gdesc[UR..]``).
* ``HMMA.16816.F32`` (sm80 ``mma.sync``) is one warp's 16x8x16 product (2048 MACs);
  ``HMMA.1688.F32.TF32`` is 16x8x8.
* ``DEPBAR.LE SB0, n`` waits until at most ``n`` cp.async groups are in flight: the loads the
  loop still has ahead of it when it waits ("pipeline slack"; 0 = it waits for every load).
* A loop is a backward branch ``BRA target`` with ``target`` <= its own address; code after the
  last ``EXIT`` (out-of-line barrier-wait stubs) is not part of the kernel body.

TTGIR vocabulary: ``ttng.warp_group_dot`` (sm90) / ``tt.dot`` (sm80) with operand types
``A * B -> C``; ``C``'s layout alias ``#mma`` is defined by a line
``#mma = #ttg.nvidia_mma<{versionMajor = 3, ..., warpsPerCTA = [8, 1], instrShape = [16, 32, 16]}>``.
One warp covers 16 rows of an MMA tile and a warpgroup 64 rows (4 warps stacked along M), so a
layout whose warps cover ``warpsPerCTA[0] * 16`` rows > ``M`` computes the same rows in more than
one warp (warpgroup) — a *replicated* dot. Likewise along N with ``warpsPerCTA[1] * instrShape[1]``.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass, field

__all__ = [
    "Dot",
    "MmaLayout",
    "SassLoop",
    "compile_kernel",
    "disassemble",
    "find_loops",
    "have_cuobjdump",
    "main_loops",
    "mma_instr_macs",
    "opcode",
    "parse_mma_layouts",
    "parse_sass",
    "parse_ttgir_dots",
    "res_usage",
    "sass_loop",
    "ttgir_dot_loops",
]


# --------------------------------------------------------------------------------------------
# SASS
# --------------------------------------------------------------------------------------------

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA_TARGET = re.compile(r"\bBRA(?:\.\S+)?\s+0x([0-9a-f]+)")
_DEPBAR_SB0 = re.compile(r"^DEPBAR\.LE\s+SB0,\s*0x([0-9a-f]+)")
_HGMMA = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.(\S+)")
_HMMA = re.compile(r"^HMMA\.(\d+)\.(\S+)")
_HMMA_SHAPES = {"16816": (16, 8, 16), "1688": (16, 8, 8), "16832": (16, 8, 32)}


def parse_sass(text: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` pairs of ``cuobjdump -sass`` output, in address order.

    The instruction keeps its predicate (``@P0 BRA 0x2600``) and drops the trailing ``;`` and the
    encoding comment. Lines that are not instructions (headers, ``.L_x`` labels) are skipped.
    """
    out = []
    for ln in text.splitlines():
        m = _LINE.search(ln)
        if m:
            out.append((int(m.group(1), 16), m.group(2)))
    return out


def opcode(ins: str) -> str:
    """Opcode with modifiers (``HGMMA.64x16x16.F32``) of an instruction, predicate stripped."""
    s = ins.strip()
    if s.startswith("@"):
        s = s.split(None, 1)[1] if " " in s else ""
    return s.split()[0] if s else ""


def find_loops(lines: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """Loops as ``(first address, address of the backward branch)``, sorted, from the backward
    branches before the last ``EXIT`` (what follows it are out-of-line stubs, e.g. the
    ``BRA self`` trap and mbarrier retry loops)."""
    exits = [a for a, i in lines if opcode(i) == "EXIT"]
    last_exit = max(exits) if exits else 1 << 62
    loops = set()
    for addr, ins in lines:
        if addr > last_exit:
            break
        if opcode(ins).split(".")[0] != "BRA":
            continue
        m = _BRA_TARGET.search(ins)
        if m and int(m.group(1), 16) <= addr:
            loops.add((int(m.group(1), 16), addr))
    return sorted(loops)


def mma_instr_macs(op: str) -> tuple[str, int, bool] | None:
    """``(shape label, MACs, tf32)`` of one matrix instruction's opcode, or None for other opcodes.

    ``HGMMA.64x16x16.F32`` -> ``("64x16x16", 16384, False)`` (per warpgroup);
    ``HMMA.16816.F32.BF16`` -> ``("16x8x16", 2048, False)`` (per warp);
    ``HMMA.1688.F32.TF32`` -> ``("16x8x8", 1024, True)``.
    """
    m = _HGMMA.match(op)
    if m:
        a, b, c = (int(m.group(i)) for i in (1, 2, 3))
        return f"{a}x{b}x{c}", a * b * c, "TF32" in m.group(4)
    m = _HMMA.match(op)
    if m and m.group(1) in _HMMA_SHAPES:
        a, b, c = _HMMA_SHAPES[m.group(1)]
        return f"{a}x{b}x{c}", a * b * c, "TF32" in m.group(2)
    return None


@dataclass
class SassLoop:
    """Counts of one loop body (one iteration, per warp; HGMMA per warpgroup)."""

    start: int
    end: int
    n_instr: int
    mma: int  # HGMMA (sm90) and HMMA (mma.sync; sm80, and some sm90 dots) instructions
    hgmma_macs: int  # MACs of the HGMMA, per warpgroup
    hmma_macs: int  # MACs of the HMMA, per warp
    tf32: bool
    shapes: dict[str, int] = field(default_factory=dict)  # "64x16x16 A:smem" -> count
    mufu_ex2: int = 0
    mufu_other: int = 0
    local_mem: int = 0  # LDL/STL: spill traffic inside the loop
    slack: int | None = None  # smallest n of the loop's ``DEPBAR.LE SB0, n`` (None: no such wait)
    tma_loads: int = 0

    def executed_macs(self, num_warps: int) -> int:
        """MACs one iteration executes for the whole program: every warpgroup issues the HGMMA,
        every warp the HMMA."""
        return self.hgmma_macs * max(1, num_warps // 4) + self.hmma_macs * num_warps


def sass_loop(lines: list[tuple[int, str]], start: int, end: int) -> SassLoop:
    """Count the instructions of the loop ``[start, end]`` (addresses) of ``lines``."""
    body = [i for a, i in lines if start <= a <= end]
    shapes: Counter = Counter()
    hg_macs, hm_macs, n_mma, tf32 = 0, 0, 0, False
    ex2 = other = local = tma = 0
    slacks = []
    for ins in body:
        op = opcode(ins)
        mm = mma_instr_macs(op)
        if mm:
            label, mac, is_tf32 = mm
            n_mma += 1
            tf32 |= is_tf32
            if op.startswith("HGMMA"):
                hg_macs += mac
                # Operands after the opcode: D, A, B[, C]; A in registers prints as ``R<n>``.
                ops = ins.split(op, 1)[1].split(",")
                src = "A:reg" if len(ops) > 1 and re.fullmatch(r"\s*R\d+", ops[1]) else "A:smem"
                shapes[f"{label} {src}"] += 1
            else:
                hm_macs += mac
                shapes[label] += 1
        elif op.startswith("MUFU.EX2"):
            ex2 += 1
        elif op.startswith("MUFU"):
            other += 1
        elif op.startswith(("LDL", "STL")):
            local += 1
        elif op.startswith("UTMALDG"):
            tma += 1
        else:
            m = _DEPBAR_SB0.match(ins.split(" ", 1)[1] if ins.startswith("@") else ins)
            if m:
                slacks.append(int(m.group(1), 16))
    return SassLoop(start=start, end=end, n_instr=len(body), mma=n_mma, hgmma_macs=hg_macs, hmma_macs=hm_macs,
                    tf32=tf32, shapes=dict(shapes), mufu_ex2=ex2, mufu_other=other, local_mem=local,
                    slack=min(slacks) if slacks else None, tma_loads=tma)


def main_loops(lines: list[tuple[int, str]]) -> list[SassLoop]:
    """The kernel's main loops: loops with matrix instructions that contain no other such loop
    (a nested loop without MMA, e.g. a barrier retry, stays part of its parent)."""
    loops = find_loops(lines)
    stats = {lp: sass_loop(lines, *lp) for lp in loops}
    mma_loops = [lp for lp in loops if stats[lp].mma]
    res = []
    for a, b in mma_loops:
        inner = [(x, y) for x, y in mma_loops if a <= x and y <= b and (x, y) != (a, b)]
        if not inner:
            res.append(stats[(a, b)])
    return res


# --------------------------------------------------------------------------------------------
# TTGIR
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MmaLayout:
    """An ``#ttg.nvidia_mma`` encoding: version 2 = ``mma.sync`` (sm80), 3 = ``wgmma`` (sm90)."""

    version: int
    warps: tuple[int, ...]
    instr: tuple[int, ...]

    def replication(self, m: int, n: int) -> int:
        """How many times each element of an ``[m, n]`` result is computed (1 = no waste)."""
        rows = self.warps[0] * 16
        cols = self.warps[1] * (self.instr[1] if len(self.instr) > 1 else 8)
        return max(1, rows // m) * max(1, cols // n)


_LAYOUT_DEF = re.compile(r"^(#\w+)\s*=\s*#(?:ttg|triton_gpu)\.nvidia_mma<\{(.*)\}>", re.M)


def _parse_mma_body(body: str) -> MmaLayout:
    ver = re.search(r"versionMajor\s*=\s*(\d+)", body)
    warps = re.search(r"warpsPerCTA\s*=\s*\[([\d,\s]+)\]", body)
    instr = re.search(r"instrShape\s*=\s*\[([\d,\s]+)\]", body)
    return MmaLayout(
        version=int(ver.group(1)) if ver else 0,
        warps=tuple(int(x) for x in warps.group(1).split(",")) if warps else (1, 1),
        instr=tuple(int(x) for x in instr.group(1).split(",")) if instr else (16, 8),
    )


def parse_mma_layouts(ttgir: str) -> dict[str, MmaLayout]:
    """``{"#mma": MmaLayout, ...}`` from the layout alias definitions at the top of a TTGIR module."""
    return {m.group(1): _parse_mma_body(m.group(2)) for m in _LAYOUT_DEF.finditer(ttgir)}


@dataclass(frozen=True)
class Dot:
    """One matrix product of the TTGIR: ``[m, k] x [k, n]``, where its operands live, its layout."""

    line: int  # 0-based line number in the TTGIR text
    m: int
    n: int
    k: int
    a_src: str  # "smem" (memdesc) or "reg" (tensor in a dot-operand layout)
    b_src: str
    layout: MmaLayout | None

    @property
    def macs(self) -> int:
        return self.m * self.n * self.k

    @property
    def replication(self) -> int:
        return self.layout.replication(self.m, self.n) if self.layout else 1


_DOT_LINE = re.compile(r"=\s*(?:ttng\.warp_group_dot|tt\.dot)\s")
_TYPE_SHAPE = re.compile(r"<(\d+)x(\d+)x")


def _split_top(s: str, sep: str) -> list[str]:
    """Split ``s`` on ``sep`` outside ``<...>`` / ``{...}`` / ``(...)`` brackets."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        ch = s[i]
        depth += ch in "<{(" and 1 or 0
        depth -= ch in ">})" and 1 or 0
        cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return parts


def parse_ttgir_dots(ttgir: str) -> list[Dot]:
    """Every ``ttng.warp_group_dot`` / ``tt.dot`` of a TTGIR module, with its shapes and layout."""
    layouts = parse_mma_layouts(ttgir)
    dots = []
    for n, ln in enumerate(ttgir.splitlines()):
        if not _DOT_LINE.search(ln):
            continue
        sig = _split_top(ln, " : ")
        if len(sig) < 2:
            continue
        types = sig[-1].split(" loc(")[0]
        ab, _, c = types.partition(" -> ")
        ops = _split_top(ab, " * ")
        if len(ops) != 2:
            continue
        sa, sb, sc = (_TYPE_SHAPE.search(t) for t in (ops[0], ops[1], c))
        if not (sa and sb and sc):
            continue
        m, k = int(sa.group(1)), int(sa.group(2))
        n_ = int(sc.group(2))
        lay_ref = re.search(r",\s*(#\w+)\s*>\s*$", c.strip())
        inline = re.search(r"nvidia_mma<\{(.*?)\}>", c)
        layout = layouts.get(lay_ref.group(1)) if lay_ref else (_parse_mma_body(inline.group(1)) if inline else None)
        dots.append(Dot(line=n, m=m, n=n_, k=k, a_src="smem" if "memdesc" in ops[0] else "reg",
                        b_src="smem" if "memdesc" in ops[1] else "reg", layout=layout))
    return dots


def ttgir_dot_loops(ttgir: str) -> list[list[Dot]]:
    """Dots of each innermost ``scf.for`` / ``scf.while`` that contains dots, in text order.

    Region ends are found by brace depth (attribute braces ``<{...}>`` balance within a line).
    """
    lines = ttgir.splitlines()
    dots = parse_ttgir_dots(ttgir)
    regions = []
    for i, ln in enumerate(lines):
        if not re.search(r"\bscf\.(for|while)\b", ln):
            continue
        depth = 0
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            if depth <= 0 and j > i:
                regions.append((i, j))
                break
    with_dots = [(a, b) for a, b in regions if any(a < d.line < b for d in dots)]
    innermost = [(a, b) for a, b in with_dots
                 if not any(a < x and y < b and any(x < d.line < y for d in dots) for x, y in with_dots)]
    return [[d for d in dots if a < d.line < b] for a, b in innermost]


# --------------------------------------------------------------------------------------------
# Compiling and disassembling
# --------------------------------------------------------------------------------------------


def triton_bin(tool: str) -> str:
    """Path of an NVIDIA binary bundled with Triton (``cuobjdump``, ``ptxas``)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_kernel(fn, signature: dict, constexprs: dict, divisible=(), num_warps: int = 4,
                   num_stages: int = 2, arch: int = 90):
    """``triton.compile`` of ``fn`` for ``GPUTarget("cuda", arch, 32)`` (no GPU needed); ``divisible``
    names the arguments (or tuple-element paths) given the ``tt.divisibility = 16`` hint. Returns Triton's
    compiled kernel (``.asm["cubin" | "ttgir" | "ptx"]``, ``.metadata.shared``)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels._compile import ast_source

    src = ast_source(fn, signature, constexprs, divisible)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def have_cuobjdump() -> bool:
    """True when Triton is installed with its bundled ``cuobjdump``."""
    try:
        return os.access(triton_bin("cuobjdump"), os.X_OK)
    except ImportError:
        return False


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([triton_bin("cuobjdump"), flag, path], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump {flag} failed: {(proc.stdout + proc.stderr)[:300]}")
    return proc.stdout


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` text of a cubin. Raises ``RuntimeError`` when cuobjdump fails."""
    return _cuobjdump(cubin, "-sass")


def res_usage(cubin: bytes) -> dict[str, int]:
    """``cuobjdump -res-usage`` of a cubin's kernel: ``{"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}``."""
    txt = _cuobjdump(cubin, "-res-usage")
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", txt)}
