"""Tile configurations of the top-k sparse kernels (``kernels/topk_sparse.py``): the column plan that cuts
the head dims into power-of-two tiles, the per-arch tables and :func:`topk_config`, the one place the
launchers and the compile specs pick a configuration. Measurements behind every entry: DESIGN §9.1
(docs/design.md). Host-side only (no Triton needed).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from kernels._common import cut_head_dims, dtype_name
from kernels._config import INTERPRET, arch_family

__all__ = ["KINDS", "ColumnPlan", "TopkConfig", "column_plan", "plan_constexprs", "topk_config"]


@dataclass(frozen=True)
class ColumnPlan:
    """How the head dims are cut into power-of-two tiles (DESIGN §9.1, "Column plan").

    ``Dk`` = ``nsplit`` chunks of ``bk`` columns + a tail of ``nsplit`` pieces of ``bt`` columns (0: no
    tail); ``Dv`` = ``nsplit`` chunks of ``bv`` columns. Split ``s`` owns chunk ``s`` and tail piece
    ``s``. Chunks may overhang the dims (masked loads).
    """

    nsplit: int
    bk: int
    bt: int
    bv: int


def column_plan(dk: int, dv: int, v_is_k: bool, nsplit: int) -> ColumnPlan:
    """Cut ``Dk`` / ``Dv`` for ``nsplit`` (1 or 2) column splits (1 when ``Dv`` fits one 16-column tile);
    ``v_is_k`` forces ``bk == bv`` so that the own key chunk is the value tile.

    Raises ``ValueError`` for non-positive sizes, ``nsplit`` outside {1, 2}, or ``v_is_k`` with ``dv > dk``.
    """
    if dk < 1 or dv < 1 or nsplit not in (1, 2):
        raise ValueError(f"column_plan: need dk, dv >= 1 and nsplit in (1, 2), got dk={dk}, dv={dv}, "
                         f"nsplit={nsplit}")
    if v_is_k and dv > dk:
        raise ValueError(f"column_plan: v aliasing k needs dv <= dk, got dk={dk}, dv={dv}")
    nsplit, bk, bt, bv = cut_head_dims(dk, dv, v_is_k, nsplit, tail_per_split=True)
    return ColumnPlan(nsplit=nsplit, bk=bk, bt=bt, bv=bv)


@dataclass(frozen=True)
class TopkConfig:
    """Tile configuration of one top-k kernel.

    ``block_m``: query-major kernels: packed head rows per program; deterministic dK/dV: packed
    (token, head) rows per step. ``block_n``: query-major: top-k lanes per step; deterministic dK/dV:
    keys per program (<= 64). ``nsplit``: column splits (1 or 2; grid axis). ``stream``: how the fixed
    side of the loop (query-major: the q / dO tiles; deterministic dK/dV: the key block's K / V tiles) is
    held: 0 = loaded once before the loop, 1 = the other split's chunk re-read every step, 2 = every
    tile re-read every step (L1 / L2 hits instead of registers or shared memory for the whole loop).
    ``rows_per_item``: deterministic dK/dV: most packed rows one program walks (longer lists are split
    over several programs and reduced in a fixed order; doubled while the shape-derived bound on the fp32
    partials exceeds the launcher's budget). ``split_dkdv``: dK/dV kinds: dV and dK in two
    launches (each holds one accumulator set; the dV launch needs no dP). ``wgmma``: False for a
    tile deliberately below wgmma's 64 rows on sm90 (the compile check then does not ask for wgmma).
    ``load_v``: deterministic dK/dV: load the value tiles on their own even when ``v`` is a prefix of
    ``k`` (the shared tile held for both products spills on the 2-warp mma.sync tile).
    """

    block_m: int
    block_n: int
    nsplit: int = 1
    num_warps: int = 4
    num_stages: int = 2
    stream: int = 0
    rows_per_item: int = 4096
    split_dkdv: bool = False
    wgmma: bool = True
    load_v: bool = False

    @property
    def tile(self) -> str:
        """Report label ``MxN`` (``/vN`` column splits, ``/sN`` stream level, ``/p`` dV and dK launched apart)."""
        return (f"{self.block_m}x{self.block_n}" + (f"/v{self.nsplit}" if self.nsplit > 1 else "")
                + (f"/s{self.stream}" if self.stream else "") + ("/p" if self.split_dkdv else ""))


KINDS = ("fwd", "dq", "dkdv_atomic", "dkdv_det")

# GPU tables for fp16 / bf16: (arch family, kind, head class, group class) -> config. Head class
# "big" = the absorbed 576/512 class (a head dim > 256), "small" = the rest; group class "g16" =
# at most 16 heads per kv head. Every entry is compiled by compile_specs (sm80 and sm90 with triton 3.9
# and 3.6, sm86 / sm89 with 3.9): DESIGN §9.1 has the measurements.
_C = TopkConfig
_GPU_TABLE: dict[tuple[int, str, str, str], TopkConfig] = {}
for _g in ("g16", "g"):
    _GPU_TABLE.update({
        # sm90: every query-major tile has 64 rows (wgmma's M; small groups pad), 4 warps = one
        # warpgroup: a chained product (scores -> P -> next dot) gets all warps along M from Triton,
        # so 8 warps on 64 rows would compute the scores twice.
        (90, "fwd", "big", _g): _C(64, 32, nsplit=2, num_warps=4, num_stages=2),
        (90, "dq", "big", _g): _C(64, 32, nsplit=2, num_warps=4, num_stages=2),
        (90, "dkdv_atomic", "big", _g): _C(64, 16, nsplit=2, num_warps=4, num_stages=2, split_dkdv=True),
        # keys on M: 32 keys per program on mma.sync with 2 warps (16 keys each), so no warp repeats the
        # scores; wgmma's 64 keys need 8 warps to fit the dK accumulators (the scores computed twice)
        # and spill with 4 (176 bytes); value tiles loaded apart (the shared tile spills 1272 bytes)
        (90, "dkdv_det", "big", _g): _C(16, 32, nsplit=2, num_warps=2, num_stages=2, split_dkdv=True, wgmma=False,
                                        load_v=True),
        (90, "fwd", "small", _g): _C(64, 64, num_warps=4, num_stages=2),
        (90, "dq", "small", _g): _C(64, 32, num_warps=4, num_stages=2),
        (90, "dkdv_atomic", "small", _g): _C(64, 32, num_warps=4, num_stages=2),
        (90, "dkdv_det", "small", _g): _C(16, 64, num_warps=4, num_stages=2),
        # sm80 (mma.sync takes its operands from registers): 16-row tiles and re-read fixed-side
        # tiles in the 576/512 backward (64-row variants spill kilobytes)
        (80, "dq", "big", _g): _C(16, 32, nsplit=2, num_warps=4, num_stages=2, stream=2),
        (80, "dkdv_atomic", "big", _g): _C(16, 16, nsplit=2, num_warps=4, num_stages=2, stream=2, split_dkdv=True),
        (80, "dkdv_det", "big", _g): _C(16, 16, nsplit=2, num_warps=4, num_stages=2, stream=2, split_dkdv=True),
        (80, "dkdv_det", "small", _g): _C(16, 64, num_warps=4, num_stages=2),
    })
_GPU_TABLE.update({
    (80, "fwd", "big", "g"): _C(64, 32, nsplit=2, num_warps=8, num_stages=2),
    (80, "fwd", "big", "g16"): _C(16, 32, nsplit=2, num_warps=4, num_stages=2),
    (80, "fwd", "small", "g"): _C(64, 64, num_warps=4, num_stages=2),
    (80, "fwd", "small", "g16"): _C(16, 64, num_warps=4, num_stages=2),
    (80, "dq", "small", "g"): _C(64, 32, num_warps=4, num_stages=2),
    (80, "dq", "small", "g16"): _C(16, 32, num_warps=4, num_stages=2),
    (80, "dkdv_atomic", "small", "g"): _C(64, 32, num_warps=4, num_stages=2),
    # 8 warps: with relaxed atomics 4 warps hit 255 registers and spill 16 bytes (192/128, one head
    # per kv head; 40 on sm86)
    (80, "dkdv_atomic", "small", "g16"): _C(16, 32, num_warps=8, num_stages=2),
})
# 99 KiB parts (sm86, sm89, sm120): the sm80 entries (at most 72 KiB on sm86) except the 64-row
# absorbed forward (112 KiB): 16 keys per step (92 KiB, 0 spills).
_GPU_TABLE.update({(86,) + key[1:]: cfg for key, cfg in _GPU_TABLE.items() if key[0] == 80})
_GPU_TABLE[(86, "fwd", "big", "g")] = _C(64, 16, nsplit=2, num_warps=8, num_stages=2)
# The absorbed class without the v alias (a separate value buffer), any group, where the alias
# entries do not fit (triton 3.9): sm90 dQ 64x32 needs 272 KiB, the atomic dK 256 KiB; sm86
# forward / dQ need 100-103 KiB. (The sm90 deterministic dK/dV entry loads its value tiles apart anyway.)
_NO_ALIAS: dict[tuple[int, str], TopkConfig] = {
    (90, "dq"): _C(64, 16, nsplit=2, num_warps=4, num_stages=2),
    (90, "dkdv_atomic"): _C(64, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    (86, "fwd"): _C(64, 16, nsplit=2, num_warps=8, num_stages=1),
    (86, "dq"): _C(16, 32, nsplit=2, num_warps=4, num_stages=1, stream=2),
}
# fp32 inputs (IEEE products on CUDA cores): a correctness path with small tiles (compiled by the
# compile check for the absorbed shapes; their spills are listed in the README).
_GPU_TABLE_FP32: dict[tuple[str, str], TopkConfig] = {
    ("fwd", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1),
    ("dq", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1),
    ("dkdv_atomic", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    ("dkdv_det", "big"): _C(16, 16, nsplit=2, num_warps=4, num_stages=1, split_dkdv=True),
    ("fwd", "small"): _C(16, 32, num_warps=4, num_stages=1),
    ("dq", "small"): _C(16, 16, num_warps=4, num_stages=1),
    ("dkdv_atomic", "small"): _C(16, 16, num_warps=4, num_stages=1),
    ("dkdv_det", "small"): _C(16, 32, num_warps=4, num_stages=1),
}


def _head_class(dk: int, dv: int) -> str:
    return "big" if max(dk, dv) > 256 else "small"


def topk_config(kind: str, arch: int, dk: int, dv: int, group: int, dtype="fp16", *, interpret=None,
                v_is_k: bool = True) -> TopkConfig:
    """The configuration the launchers pick for ``kind`` (one of ``KINDS``: "fwd", "dq", "dkdv_atomic",
    "dkdv_det") on compute capability ``arch`` with head dims (``dk``, ``dv``), ``group`` = Hq // Hkv heads
    per kv head, and ``dtype`` (torch dtype or "fp16"/"bf16"/"fp32").

    Under the Triton interpreter (``interpret``, default ``kernels._config.INTERPRET``) one small
    configuration: 16 x 16 tiles, the value dim split in two above 256 columns (to exercise that path),
    work items of 64 rows. On a GPU an entry of the per-arch tables (DESIGN §9.1).
    In the absorbed class without the ``v`` alias (a separate value tile) :data:`_NO_ALIAS` replaces
    the entries that do not fit or spill there.
    Raises ``ValueError`` for an unknown kind.
    """
    if kind not in KINDS:
        raise ValueError(f"topk_config: kind must be one of {KINDS}, got {kind!r}")
    if INTERPRET if interpret is None else interpret:
        return TopkConfig(16, 16, nsplit=2 if dv > 256 else 1, num_warps=4, num_stages=1, rows_per_item=64)
    cls = _head_class(dk, dv)
    if dtype_name(dtype) == "fp32":
        cfg = _GPU_TABLE_FP32[(kind, cls)]
        if (kind, cls) == ("dq", "big") and arch_family(arch) == 86:
            return replace(cfg, stream=2)  # q / dO pieces re-read: 84 KiB (resident: 100 KiB, over 99)
        return cfg
    fam = arch_family(arch)
    if cls == "big" and not v_is_k and (fam, kind) in _NO_ALIAS:
        return _NO_ALIAS[(fam, kind)]
    return _GPU_TABLE[(fam, kind, cls, "g16" if group <= 16 else "g")]



def plan_constexprs(cfg: TopkConfig, dk: int, dv: int, v_is_k: bool) -> dict:
    """The tile constexprs of a top-k kernel launch with ``cfg``: ``BLOCK_M``, ``BLOCK_N``, ``STREAM`` and
    ``PLAN`` = the column plan as ``(NSPLIT, BK, BT, BV)``."""
    plan = column_plan(dk, dv, v_is_k, cfg.nsplit)
    return dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PLAN=(plan.nsplit, plan.bk, plan.bt, plan.bv),
                STREAM=int(cfg.stream))
