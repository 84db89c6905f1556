"""Tile tables of the dense-family kernels (forward, dK/dV, dQ; block-sparse fits them to its mask): the
autotune candidates per architecture family, head class and dtype, and the single interpreter
configuration. Every entry is compiled by the compile check (:mod:`kernels._specs`)."""

from __future__ import annotations

from kernels._common import TileConfig, head_class, next_pow2
from kernels._config import arch_family

__all__ = ["PRE_BLOCK_T", "PRE_WARPS", "bwd_configs", "bwd_interp_config", "fwd_configs", "fwd_interp_config",
           "pre_block_d"]


# --------------------------------------------------------------------------------------------
# Forward (kernels.attention_fwd)
# --------------------------------------------------------------------------------------------


# Tables per architecture family and head class, chosen from the compile report (registers,
# spills, shared memory of every candidate; bench/compile_report.py) and kept small: every entry
# is compiled by the compile check (tests/test_compile_check.py) for sm80, sm86, sm89 and sm90.
# Keys are kernels._config.arch_family values (90: Hopper+, 80: 163 KiB, 86: 99 KiB parts). Triton/ptxas
# register allocation is erratic near 255 registers, so entries keep a margin where one exists.
# d576 (absorbed MLA) splits the value dim in two: one program per 256 value columns.
# sm90 d576: 128 packed rows (with G >= 128 the heads of one token) over 8 warps, so no warpgroup
# computes the same rows twice (64-row tiles replicated 6 of 7 dots), and all of q held in shared
# memory (bc=256: 3 chained products a step): 216 KiB, 222-255 registers, modeled serial 0.41
# (triton 3.9, bench.static_model). Only 2 stages fit (3: 252 KiB). Tried and left out: the other
# half of q hoisted into registers with 3 stages (204 KiB, modeled 0.35-0.36, 255 registers, spills
# 16 bytes in the block-sparse partial-block variant); streaming q from L2 (280 KiB at 128 rows).
_FWD_TABLE: dict[int, dict[str, list[TileConfig]]] = {
    90: {
        "d64": [TileConfig(128, 64, num_warps=8, num_stages=3), TileConfig(64, 64, num_warps=4, num_stages=3)],
        # 128x128 with 3 stages: 224 KiB, 255 registers, no spills (triton 3.9)
        "d128": [TileConfig(128, 128, num_warps=8, num_stages=3), TileConfig(128, 64, num_warps=8, num_stages=3)],
        "d256": [TileConfig(128, 64, num_warps=8, num_stages=2), TileConfig(128, 32, num_warps=8, num_stages=3)],
        # 192/128 (DeepSeek's non-absorbed MLA): 128x128 needs 208 KiB with 2 stages (3: 288 KiB)
        "d192": [TileConfig(128, 128, num_warps=8, num_stages=2), TileConfig(128, 64, num_warps=8, num_stages=3)],
        "d576": [TileConfig(128, 32, nsplit=2, num_warps=8, num_stages=2, bc=256)],
    },
    80: {
        "d64": [TileConfig(128, 64, num_warps=8, num_stages=3), TileConfig(64, 64, num_warps=4, num_stages=3)],
        "d128": [TileConfig(128, 32, num_warps=8, num_stages=3)],
        "d256": [TileConfig(128, 32, num_warps=8, num_stages=3)],
        "d576": [
            TileConfig(64, 32, nsplit=2, num_warps=8, num_stages=2),
            TileConfig(64, 64, nsplit=2, num_warps=8, num_stages=2),
        ],
    },
    # 99 KiB parts (sm86, sm89, sm120): the sm80 entries that fit, smaller ones where none does
    # (shared bytes measured for sm86: d64 64x64 40 KiB, d256 at 256/256 68 KiB, d576 92 KiB; the
    # sm80 128x64 d64 tile spills 16 bytes there and d576 64x32/v2 needs 112 KiB).
    86: {
        "d64": [TileConfig(64, 64, num_warps=4, num_stages=3)],
        "d128": [TileConfig(128, 32, num_warps=8, num_stages=3)],
        # 4 warps: with 8 ptxas caps 64x32 at 128 registers and spills 8 bytes at 192/128 (mma.sync)
        "d256": [TileConfig(64, 32, num_warps=4, num_stages=2)],
        "d576": [TileConfig(64, 16, nsplit=2, num_warps=8, num_stages=2)],
    },
}

# fp32 inputs (IEEE dots by default, TF32 when allowed): twice the bytes per operand; one
# conservative config per class, the same on every architecture (fp32 attention on a GPU is for
# checks, not speed).
# IEEE products lower to FMAs that keep whole operand rows in registers: 32-row tiles (or 8 warps)
# for d128/d256 (64-row tiles spill 0.3-3.8 KiB on sm80/sm90, triton 3.9).
_FWD_TABLE_FP32: dict[int, dict[str, list[TileConfig]]] = {
    fam: {
        "d64": [TileConfig(64, 32, num_warps=8, num_stages=2)],
        "d128": [TileConfig(32, 32, num_warps=8, num_stages=1)],
        "d256": [TileConfig(32, 32, num_warps=8, num_stages=1)],
        # one stage on the 99 KiB parts (two: 110-118 KiB)
        "d576": [TileConfig(32, 16, nsplit=4, num_warps=4, num_stages=1 if fam == 86 else 2, stream=True)],
    }
    for fam in (80, 86, 90)
}

# The absorbed class without the v alias (a separate 512-column value buffer per pipeline stage),
# keyed (family, fp32): where the alias tables do not fit (sm80 64x64/v2: 184 KiB; sm86 64x16/v2:
# 100 KiB; sm86 fp32: 118 KiB; sm90 128x32 held q: 248 KiB) the entries that do. sm90: 16 keys per
# step hold q in 222 KiB with 3 stages (128x32 with q hoisted spills 48 bytes in the varlen variant).
_FWD_NO_ALIAS: dict[tuple[int, bool], list[TileConfig]] = {
    (90, False): [TileConfig(128, 16, nsplit=2, num_warps=8, num_stages=3, bc=256)],
    (80, False): [TileConfig(64, 32, nsplit=2, num_warps=8, num_stages=2)],
    (86, False): [TileConfig(64, 16, nsplit=2, num_warps=8, num_stages=1)],
}


# Varlen launches (kernels.attention_fwd.attention_fwd_varlen: per-sequence offsets and lengths live in
# registers), keyed (family, head class), where the dense 16-bit table spills: sm90 192/128 128x128 s2
# spills 40 bytes (triton 3.9).
_FWD_VARLEN: dict[tuple[int, str], list[TileConfig]] = {
    (90, "d192"): [TileConfig(128, 64, num_warps=8, num_stages=3)],
}


#: The one configuration used under the interpreter (autotuning there would run every config).
_INTERP_CONFIG = TileConfig(32, 32, nsplit=1, num_warps=4, num_stages=1)


def fwd_configs(arch: int, dk: int, dv: int, dtype: str = "fp16", v_is_k: bool = True,
                varlen: bool = False) -> list[TileConfig]:
    """Autotune candidates for ``arch`` and head dims (Dk, Dv); ``dtype`` "fp16"/"bf16" or "fp32"
    (IEEE or TF32 dots: twice the shared memory and operand registers, its own smaller table).
    The table is the one of :func:`kernels._config.arch_family` (every entry fits that family's
    shared memory); the first entry is the preferred one (deterministic mode, :mod:`kernels.tuning`).
    ``v_is_k=False`` with the absorbed head class (a separate ``v`` tile): :data:`_FWD_NO_ALIAS`.
    192/128 heads (Dk <= 192, Dv <= 128) have their own 16-bit entries (``"d192"``); ``varlen``: the
    packed-sequence launch, :data:`_FWD_VARLEN` where the dense entries spill.
    """
    fam, cls = arch_family(arch), head_class(dk, dv)
    if cls == "d576" and not v_is_k and (fam, dtype == "fp32") in _FWD_NO_ALIAS:
        return list(_FWD_NO_ALIAS[(fam, dtype == "fp32")])
    table = _FWD_TABLE_FP32 if dtype == "fp32" else _FWD_TABLE
    if cls == "d256" and dk <= 192 and dv <= 128 and "d192" in table[fam]:
        cls = "d192"  # its own (larger) tiles where the whole d256 class would not fit
    if varlen and dtype != "fp32" and (fam, cls) in _FWD_VARLEN:
        return list(_FWD_VARLEN[(fam, cls)])
    return list(table[fam][cls])


def fwd_interp_config(dk: int, dv: int) -> TileConfig:
    """The single interpreter configuration (value dim split in two above 256 to exercise that path)."""
    return TileConfig(_INTERP_CONFIG.block_m, _INTERP_CONFIG.block_n, nsplit=2 if dv > 256 else 1, num_warps=4,
                      num_stages=1)


# --------------------------------------------------------------------------------------------
# Backward (kernels.attention_bwd)
# --------------------------------------------------------------------------------------------


# dkdv: BLOCK_N keys fixed per program, BLOCK_M packed query rows per step; dq: the other way
# round. Chosen from the compile report like the forward tables (kernels/attention_fwd.py) and
# compiled by the compile check. The absorbed shape (d576) splits dK/dV (dQ) columns over 4
# programs of 128 columns (sm90 dK/dV: 8 of 64): two 256-column accumulators plus the rope tail do
# not fit the registers.
# sm90: the chained dot of dK/dV (P = exp(K·Qᵀ)) has the key block as M, so 8 warps need 128 keys
# (64 keys x 8 warps computed every score twice: the static model's replicated dots); 3 stages keep
# a step of load slack (bench/static_model.py).
_DKDV_TABLE: dict[int, dict[str, list[TileConfig]]] = {
    90: {
        "d64": [TileConfig(64, 128, num_warps=8, num_stages=3)],
        # 64x128: models 0.65-0.69 (32x128: 0.59-0.62); the block-sparse variant caps its rows
        # at 32 (64 spills 180-232 bytes there)
        "d128": [TileConfig(64, 128, num_warps=8, num_stages=3)],
        # 32x128: 0 spills, models 0.60-0.63 (16x128: 0.54); block-sparse caps its rows at 16 (32
        # spills 72 bytes there); 64x128 spills 1.1 KiB, 32x64 with 4 warps 88 bytes
        "d256": [TileConfig(32, 128, num_warps=8, num_stages=3)],
        # 128 keys x 8 warps, 8 column splits of 64 (4 splits of 128 spill 56-1180 bytes with 64 or 128
        # keys); one stage: the streamed pieces need 324 KiB with two; 32-wide pieces: 64-wide ones
        # spill 72 bytes with a sliding window
        "d576": [TileConfig(32, 128, nsplit=8, num_warps=8, num_stages=1, stream=True, bc=32)],
    },
    80: {
        "d64": [TileConfig(32, 128, num_warps=8, num_stages=2)],
        "d128": [TileConfig(32, 64, num_warps=8, num_stages=2), TileConfig(16, 128, num_warps=8, num_stages=2)],
        "d256": [TileConfig(16, 32, num_warps=4, num_stages=2)],
        "d576": [TileConfig(16, 32, nsplit=4, num_warps=8, num_stages=2)],
    },
}
# 99 KiB parts (sm86, sm89, sm120): every sm80 dK/dV entry fits (at most 72 KiB on sm86).
_DKDV_TABLE[86] = _DKDV_TABLE[80]
_DQ_TABLE: dict[int, dict[str, list[TileConfig]]] = {
    90: {
        "d64": [TileConfig(128, 64, num_warps=8, num_stages=3)],
        "d128": [TileConfig(128, 64, num_warps=8, num_stages=3), TileConfig(128, 32, num_warps=8, num_stages=3)],
        "d256": [TileConfig(128, 64, num_warps=8, num_stages=2), TileConfig(128, 32, num_warps=8, num_stages=3)],
        # 64 rows need 4 warps (8 replicate the score dots); 16-wide pieces of the other splits' chunks
        # (64-wide: 64x32 spills 128 bytes, 64x16 24-48 with 16 heads); 2 stages need 268 KiB
        "d576": [TileConfig(64, 32, nsplit=4, num_warps=4, num_stages=1, stream=True, bc=16)],
    },
    80: {
        "d64": [TileConfig(128, 64, num_warps=8, num_stages=2)],
        "d128": [TileConfig(32, 64, num_warps=4, num_stages=3), TileConfig(64, 32, num_warps=4, num_stages=2)],
        "d256": [TileConfig(32, 32, num_warps=4, num_stages=2)],
        # 64-row tiles spilled 24 bytes with 16 heads per kv head and need 170 KiB without the alias
        "d576": [TileConfig(32, 16, nsplit=4, num_warps=8, num_stages=2, stream=True)],
    },
    # 99 KiB parts: sm80's entries fit (at most 84 KiB on sm86) except d576 (154 KiB): 32 rows.
    86: {
        "d64": [TileConfig(128, 64, num_warps=8, num_stages=2)],
        "d128": [TileConfig(32, 64, num_warps=4, num_stages=3), TileConfig(64, 32, num_warps=4, num_stages=2)],
        "d256": [TileConfig(32, 32, num_warps=4, num_stages=2)],
        "d576": [TileConfig(32, 16, nsplit=4, num_warps=8, num_stages=2, stream=True)],
    },
}

# fp32 inputs (IEEE dots by default, TF32 when allowed): one conservative config per class (fp32
# on a GPU is for checks, not speed); no wgmma needed, so small M tiles are fine.
# IEEE products (FMAs holding operand rows in registers) need narrower tiles than TF32 did; chosen
# from the compile report (triton 3.9): clean except the d576 dQ and, on sm90, d576 in general.
# d576 dK/dV: 16-key steps (32 with 8 splits needs 206 KiB without the v alias); one stage on
# the 99 KiB parts.
_DKDV_TABLE_FP32: dict[int, dict[str, list[TileConfig]]] = {
    fam: {
        "d64": [TileConfig(32, 32, num_warps=4, num_stages=2)],
        "d128": [TileConfig(16, 32, num_warps=8, num_stages=2)],
        "d256": [TileConfig(16, 32, num_warps=8, num_stages=2 if fam == 90 else 1)],
        "d576": [TileConfig(16, 16, nsplit=8, num_warps=4, num_stages=1 if fam == 86 else 2, stream=True)],
    }
    for fam in (80, 86, 90)
}
_DQ_TABLE_FP32: dict[int, dict[str, list[TileConfig]]] = {
    fam: {
        "d64": [TileConfig(32, 16, num_warps=4, num_stages=2)],
        "d128": [TileConfig(32, 32, num_warps=8, num_stages=2)],
        "d256": [TileConfig(32, 32, num_warps=8, num_stages=2)],
        "d576": [TileConfig(32, 16, nsplit=8, num_warps=8, num_stages=1, stream=True)],
    }
    for fam in (80, 86, 90)
}

# The absorbed class without the v alias (a separate value buffer), keyed (kind, family, fp32), where
# the alias tables do not fit or spill (measured, triton 3.9): sm90 dK/dV has its own entry (the same
# tile today); sm86 dK/dV and dQ need 103 KiB with two stages.
_NO_ALIAS: dict[tuple[str, int, bool], list[TileConfig]] = {
    ("dkdv", 90, False): [TileConfig(32, 128, nsplit=8, num_warps=8, num_stages=1, stream=True, bc=32)],
    ("dkdv", 86, False): [TileConfig(16, 32, nsplit=4, num_warps=8, num_stages=1)],
    ("dq", 86, False): [TileConfig(32, 16, nsplit=4, num_warps=8, num_stages=1, stream=True)],
}

def bwd_configs(kind: str, arch: int, dk: int, dv: int, dtype: str = "fp16", v_is_k: bool = True) -> list[TileConfig]:
    """Autotune candidates of backward kernel ``kind`` ("dkdv" or "dq") for ``arch``, (Dk, Dv) and
    ``dtype`` ("fp16"/"bf16", or "fp32" with its own smaller table), from the table of
    :func:`kernels._config.arch_family` (entries fit its shared memory; the first is the preferred
    one, used in deterministic mode). ``v_is_k=False`` in the absorbed class: :data:`_NO_ALIAS`
    where the alias tables do not fit or spill."""
    fam, cls = arch_family(arch), head_class(dk, dv)
    if dtype == "fp32":
        table = {"dkdv": _DKDV_TABLE_FP32, "dq": _DQ_TABLE_FP32}[kind]
    else:
        table = {"dkdv": _DKDV_TABLE, "dq": _DQ_TABLE}[kind]
    if cls == "d576" and not v_is_k and (kind, fam, dtype == "fp32") in _NO_ALIAS:
        return list(_NO_ALIAS[(kind, fam, dtype == "fp32")])
    return list(table[fam][cls])


def bwd_interp_config(dk: int, dv: int) -> TileConfig:
    """The single interpreter configuration (value split in two above 256 to exercise that path)."""
    return TileConfig(32, 32, nsplit=2 if dv > 256 else 1, num_warps=4, num_stages=1)


#: Tokens per program and warps of the delta preprocess.
PRE_BLOCK_T = 64
PRE_WARPS = 4


def pre_block_d(dv: int) -> int:
    """Head-dim chunk of the delta preprocess (:func:`kernels._jit.bwd_preprocess`) for ``Dv``."""
    return min(128, max(16, next_pow2(dv)))
