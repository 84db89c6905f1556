"""Utilities shared by the tests: the one comparison (:func:`assert_close`), shape cases (:class:`Case`),
random inputs and NaN-poisoned buffers. The float64 oracle itself is tests/oracle.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

CUDA = torch.cuda.is_available()
#: Where the kernel tests run: compiled on a GPU, else under the Triton interpreter on the CPU.
DEVICE = "cuda" if CUDA else "cpu"


def _kernels_runnable() -> bool:
    from kernels._config import HAS_TRITON, INTERPRET

    return HAS_TRITON and (CUDA or INTERPRET)


#: Skip mark of tests that launch the Triton kernels directly.
needs_kernels = pytest.mark.skipif(not _kernels_runnable(),
                                   reason="needs triton with CUDA, or the triton interpreter (TRITON_INTERPRET=1)")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖x − ref‖ / ‖ref‖`` in float64 (0 when both are 0). Non-finite x gives inf."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(x).all():
        return math.inf
    den = ref.norm()
    num = (x - ref).norm()
    if den == 0:
        return float(num)
    return float(num / den)


def kernel_tol(dtype, interpret: bool = True) -> float:
    """docs/design.md §6 tolerance (``‖x − ref‖ / ‖ref‖`` against float64) for a result computed in ``dtype``:
    fp32 1e-5 with ieee dots (interpreter, CPU) or 1e-3 on a GPU (tf32 dots), fp16 5e-3, bf16 1e-2; float64
    results (the reference path in float64) 1e-12."""
    if dtype == torch.float32:
        return 1e-5 if interpret else 1e-3
    return {torch.float64: 1e-12, torch.float16: 5e-3, torch.bfloat16: 1e-2}[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, dtype=None, name: str = "tensor",
                 tol: float | None = None) -> None:
    """The tests' one comparison against a float64 oracle (docs/design.md §6).

    Same shape; NaN exactly where ``expected`` has NaN (so an unwritten element of a NaN-poisoned buffer
    fails); ``+inf`` / ``-inf`` exactly where ``expected`` has them, with the same sign (empty rows:
    lse ``+inf``, max_logit ``-inf``); over the finite entries ``‖actual − expected‖ / ‖expected‖ <= tol``
    (absolute norm when ``expected`` is all 0). ``tol`` defaults to :func:`kernel_tol` of ``dtype``
    (default ``actual.dtype``), with the tf32 allowance for fp32 results on a CUDA device with TF32
    allowed. ``name`` names the tensor in the failure message.
    """
    dtype = actual.dtype if dtype is None else dtype
    if tol is None:  # fp32 dots run in tf32 only on a GPU with TF32 allowed (kernels._launch.dot_precision)
        tol = kernel_tol(dtype, interpret=not (actual.is_cuda and torch.backends.cuda.matmul.allow_tf32))
    a = actual.detach().cpu().double()
    e = expected.detach().cpu().double()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)}, expected {tuple(e.shape)}"
    for what, fn in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = fn(a), fn(e)
        if not torch.equal(got, want):
            at = tuple(torch.nonzero(got != want)[0].tolist())
            raise AssertionError(f"{name}: {what} pattern differs from the reference, first at index {at} "
                                 f"(got {a[at].item()}, expected {e[at].item()})")
    fin = torch.isfinite(e)
    if fin.any():
        num, den = (a[fin] - e[fin]).norm(), e[fin].norm()
        err = float(num / den) if den > 0 else float(num)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g} ({str(dtype).replace('torch.', '')})"


def random_qkv(B, T, S, Hq, Hkv, Dk, Dv, dtype=torch.float64, device="cpu", seed=0, requires_grad=False,
               alias=False):
    """Random ``q [B,T,Hq,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]`` (float64 masters rounded to ``dtype``);
    ``alias``: v is the prefix view ``k[..., :Dv]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, T, Hq, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    k = torch.randn(B, S, Hkv, Dk, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if alias:
        v = k[..., :Dv]
    else:
        v = torch.randn(B, S, Hkv, Dv, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v


@dataclass(frozen=True)
class Case:
    """One attention shape case of the kernel tests: ``q [B,T,Hq,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]``.

    ``alias``: v is the prefix view ``k[..., :Dv]`` (absorbed MLA); ``strided``: non-contiguous inputs and
    output buffers; ``fwd_cfg`` / ``bwd_cfg``: forced kernel tile configurations. Block-sparse cases add
    the mask: ``block`` (BLOCK_SIZE), ``pattern`` and ``bh`` (mask batch/head dims, 1 or B / Hq);
    ``window`` / ``sinks``: a sliding window and attention sinks.
    ``name`` overrides the id built from the shape.
    """

    T: int
    S: int
    Hq: int
    Hkv: int
    Dk: int
    Dv: int
    causal: bool = False
    dtype: torch.dtype = torch.float32
    alias: bool = False
    strided: bool = False
    B: int = 1
    fwd_cfg: object | None = None
    bwd_cfg: object | None = None
    block: tuple[int, int] | None = None
    pattern: str = "dense"  # block-sparse: "causal" | "random" | "window" | "empty" (all blocks off)
    bh: tuple[int, int] = (1, 1)
    check_determinism: bool = False
    seed: int = 0
    window: tuple[int, int] = (-1, -1)  # (left, right) sliding window, -1 unbounded
    sinks: bool = False  # one attention-sink logit per query head
    name: str = ""

    @property
    def id(self) -> str:
        if self.name:
            return self.name
        heads = "mha" if self.Hq == self.Hkv else ("mqa" if self.Hkv == 1 else "gqa")
        parts = [f"{heads}{self.Hq}:{self.Hkv}", f"d{self.Dk}x{self.Dv}", f"T{self.T}", f"S{self.S}",
                 "causal" if self.causal else "full", str(self.dtype).replace("torch.", "")]
        if self.B != 1:
            parts.insert(0, f"B{self.B}")
        parts += [flag for flag in ("alias", "strided") if getattr(self, flag)]
        if self.fwd_cfg is not None or self.bwd_cfg is not None:
            parts.append("cfg")
        return "-".join(parts)


def backend_params(backends=("reference", "triton")) -> list:
    """``backend`` parameters: ``"triton"`` carries the interpreter mark (it launches the Triton kernels)."""
    return [pytest.param(b, marks=pytest.mark.interpreter) if b == "triton" else b for b in backends]


def case_params(cases, slow) -> list:
    """``pytest.param`` per case with ``id=case.id``; a case for which ``slow(case)`` is true carries the slow
    mark (left out of the everyday ``pytest -m "not slow"``)."""
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if slow(c) else []) for c in cases]


def make_inputs(c: Case, device="cpu"):
    """Random ``(q, k, v)`` of case ``c`` in ``c.dtype`` (seed ``c.seed``). ``strided``: q a head-major
    ``[B, H, T, 2·Dk]`` buffer seen as ``[B, T, H, Dk]`` with last stride 2, k rows padded (row stride
    Dk + 8), v head-major with padded rows."""
    g = torch.Generator().manual_seed(c.seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(c.dtype).to(device)

    if c.strided:
        q = rnd(c.B, c.Hq, c.T, 2 * c.Dk).transpose(1, 2)[..., ::2]
        k = rnd(c.B, c.S, c.Hkv, c.Dk + 8)[..., : c.Dk]
        v = k[..., : c.Dv] if c.alias else rnd(c.B, c.Hkv, c.S, c.Dv + 3).transpose(1, 2)[..., : c.Dv]
    else:
        q = rnd(c.B, c.T, c.Hq, c.Dk)
        k = rnd(c.B, c.S, c.Hkv, c.Dk)
        v = k[..., : c.Dv] if c.alias else rnd(c.B, c.S, c.Hkv, c.Dv)
    return q, k, v


def usage_error(main, argv, capsys) -> str:
    """Run a command line's ``main``/``parse_args`` on ``argv``; assert it exits with argparse's usage code 2
    and return what it wrote to stderr (the caller checks the message)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def nan_buffer(shape, dtype, strided: bool = False, device="cpu") -> torch.Tensor:
    """A NaN-filled ``[B, T, H, D]`` output buffer (``strided``: head-major storage seen as ``[B, T, H, D]``)."""
    if strided:
        b, t, h, d = shape
        return torch.full((b, h, t, d), math.nan, dtype=dtype, device=device).transpose(1, 2)
    return torch.full(shape, math.nan, dtype=dtype, device=device)


def paged_cache(seqlens, dk, page_size, dtype, *, scatter=True, extra_pages=2, seed=0, poison=True,
                table_width=None, device="cpu"):
    """A paged latent cache holding random rows per sequence (float64 masters rounded to ``dtype``).

    Returns ``(kv_cache [pages, page_size, 1, dk], block_table int32 [B, width], cache_seqlens int32 [B],
    rows)`` with ``rows[b]`` the ``[L_b, dk]`` float64 values of sequence b (as stored, for the oracle).
    Pages are taken in random order (``scatter``) or in order (the same rows either way); unused slots
    and spare pages hold NaN (``poison``); block-table entries past a sequence's pages are -1 (even b)
    or a huge garbage id (odd b), never read.
    """
    g = torch.Generator().manual_seed(seed)
    n_pages = [math.ceil(L / page_size) for L in seqlens]
    total = sum(n_pages) + extra_pages
    perm = torch.randperm(total, generator=g)  # drawn either way so that the rows are the same
    order = perm if scatter else torch.arange(total)
    pool = torch.full((total, page_size, 1, dk), math.nan if poison else 0.0, dtype=torch.float64)
    width = table_width or max(n_pages + [1]) + 2
    table = torch.full((len(seqlens), width), -1, dtype=torch.int32)
    rows, nxt = [], 0
    for b, L in enumerate(seqlens):
        r = torch.randn(L, dk, generator=g, dtype=torch.float64).to(dtype).double()
        rows.append(r)
        for p in range(n_pages[b]):
            pid = int(order[nxt])
            nxt += 1
            table[b, p] = pid
            chunk = r[p * page_size:(p + 1) * page_size]
            pool[pid, :chunk.shape[0], 0] = chunk
        table[b, n_pages[b]:] = -1 if b % 2 == 0 else 2**30 + 7
    seq = torch.tensor(seqlens, dtype=torch.int32)
    return pool.to(device, dtype), table.to(device), seq.to(device), rows
