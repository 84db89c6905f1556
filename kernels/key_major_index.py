"""Key-major transposed top-k index for the deterministic top-k dK/dV kernel (``kernels/topk_sparse.py``):
for each (batch, kv head, key block) the sorted query tokens that selected one of its keys, with a bit
mask of which keys, built on the device with one sort and sized by the shapes (no host sync; DESIGN §9.1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels._common import cdiv

__all__ = ["MAX_DET_BLOCK_N", "KeyMajorIndex", "build_key_major_index"]

#: The deterministic dK/dV kernel's key-block bit masks are two int32 words: at most 64 keys per block.
MAX_DET_BLOCK_N = 64


@dataclass
class KeyMajorIndex:
    """Transposed top-k index for the deterministic dK/dV kernel (see :func:`build_key_major_index`).

    Every tensor has a size fixed by the shapes (an upper bound), so building and using the index
    needs no host sync and can run inside CUDA-graph capture; the tails past the real content are padding.
    ``ent_t`` int32 ``[E_cap]``: query token of entry e; ``ent_lo`` / ``ent_hi`` int32 ``[E_cap]``: bits of
    the selected keys 0-31 / 32-63 of the entry's key block. Entries are sorted by (batch, kv head, key
    block, token); ``offsets`` int64 ``[B * Hkv * NKB + 1]``: CSR offsets per key block ("segment").
    ``items`` int64 ``[n_items_cap, 4]``: (segment, first entry, end entry, slot) work items of at most
    ``chunk`` entries each, every segment at least one (empty ones write zeros); ``slot`` is -1 for a
    segment's only item, else its partial-buffer slot; padding items have segment -1 (the kernel skips
    them). ``multi`` int64 ``[n_multi_cap, 3]``: (segment, first slot, slot count) for the segments split
    over several items, padding rows segment -1. ``n_slots``: partial slots to allocate (a bound).
    """

    block_n: int
    num_key_blocks: int
    ent_t: torch.Tensor
    ent_lo: torch.Tensor
    ent_hi: torch.Tensor
    offsets: torch.Tensor
    items: torch.Tensor
    multi: torch.Tensor
    n_slots: int
    chunk: int

    @property
    def num_entries(self) -> int:
        """Distinct (key block, token) pairs (reads the device: a diagnostic, not for hot paths)."""
        return int(self.offsets[-1])

    def nbytes(self) -> int:
        """Device memory of the index (without the partial buffers)."""
        return sum(x.numel() * x.element_size()
                   for x in (self.ent_t, self.ent_lo, self.ent_hi, self.offsets, self.items, self.multi))


def _to_int32_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same bit pattern."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


def _key_major_caps(B: int, T: int, S: int, Hkv: int, K: int, causal: bool, block_n: int, chunk: int):
    """Upper bounds ``(entries, items, slots, split segments)`` of :func:`build_key_major_index` from the
    shapes alone. Entries: a row lists at most ``min(K, NKB)`` key blocks. Per segment ``n_e`` entries
    (``n_e <=`` the tokens that can see the block: ``T``, or with ``causal`` those with ``t + S - T >=
    kb * block_n``) give ``max(1, ceil(n_e / chunk)) <= 1 + n_e // chunk`` items, and a split segment
    (``n_e > chunk``) ``ceil(n_e / chunk) <= 2 * (n_e // chunk)`` slots; both bounds are summed over the
    per-segment limits and over the entry total, and the smaller is taken."""
    nkb = max(1, cdiv(S, block_n))
    bh = B * Hkv
    n_seg = bh * nkb
    e_cap = bh * T * min(K, nkb)
    items_seg = slots_seg = multi_seg = 0
    for kb in range(nkb):
        vis = T - max(0, kb * block_n - (S - T)) if causal else T
        vis = max(0, min(T, vis))
        per = max(1, cdiv(vis, chunk))
        items_seg += per
        if per > 1:
            slots_seg += per
            multi_seg += 1
    q = e_cap // chunk
    items = min(n_seg + q, bh * items_seg)
    slots = min(2 * q, bh * slots_seg, items)
    multi = min(e_cap // (chunk + 1), bh * multi_seg, n_seg)
    return e_cap, items, slots, multi


def build_key_major_index(topk_indices: torch.Tensor, S: int, causal: bool, block_n: int,
                          group: int = 1, rows_per_item: int = 4096, max_slots: int | None = None) -> KeyMajorIndex:
    """Transpose ``topk_indices`` (int32 ``[B, T, Hkv, K]``) into the key-major lists of the
    deterministic dK/dV kernel, on the indices' device, without a host sync.

    Lanes that select nothing (``-1``, ``< 0``, ``>= S``, causally hidden with ``causal``) are dropped;
    a key listed twice in one row counts once. Per (batch, kv head, key block of ``block_n`` keys):
    the tokens that selected at least one of its keys, ascending, each with a bit mask of those keys.
    Built with one sort of int64 keys ``((bh * NKB + kb) * T + t) * block_n + j % block_n`` (dropped
    lanes sort last); entries, counts and work items come from scans and scatters into buffers sized by
    :func:`_key_major_caps` (integer sums: the result does not depend on the sort's stability or on
    scatter order, so it is deterministic). Work items hold at most ``chunk = max(1, rows_per_item //
    group)`` entries (``group`` heads each); when ``max_slots`` is given, ``chunk`` is doubled until the
    bound on partial slots fits in it (longer items instead of more fp32 partial memory).

    Memory: during the build about 6 int64 temporaries per lane (``B * T * Hkv * K`` lanes: ~48 bytes
    each, e.g. 3.2 GB for T = 32k, K = 2048); afterwards 12 bytes per entry bound and 32 per work item
    bound. Raises ``ValueError`` for ``block_n`` outside ``[1, 64]``.
    """
    if not 1 <= block_n <= MAX_DET_BLOCK_N:
        raise ValueError(f"build_key_major_index: block_n must be in [1, {MAX_DET_BLOCK_N}], got {block_n}")
    B, T, Hkv, K = topk_indices.shape
    dev = topk_indices.device
    nkb = max(1, cdiv(S, block_n))
    n_seg = B * Hkv * nkb
    chunk = max(1, rows_per_item // max(1, group))
    e_cap, i_cap, s_cap, m_cap = _key_major_caps(B, T, S, Hkv, K, causal, block_n, chunk)
    while max_slots is not None and s_cap > max(1, max_slots) and chunk < T:
        chunk *= 2
        e_cap, i_cap, s_cap, m_cap = _key_major_caps(B, T, S, Hkv, K, causal, block_n, chunk)
    i64 = dict(dtype=torch.int64, device=dev)
    j = topk_indices.long()
    t = torch.arange(T, device=dev).view(1, T, 1, 1)
    valid = (j >= 0) & (j < S)
    if causal:
        valid &= j <= t + (S - T)
    bh = (torch.arange(B, device=dev).view(B, 1, 1, 1) * Hkv + torch.arange(Hkv, device=dev).view(1, 1, Hkv, 1))
    jc = j.clamp(min=0)
    end = n_seg * T * block_n  # past every real key: dropped lanes sort last
    comp = torch.where(valid, ((bh * nkb + jc // block_n) * T + t) * block_n + jc % block_n, end)
    comp = torch.sort(comp.flatten()).values
    real = comp < end
    prev = torch.cat([comp.new_full((1,), -1), comp[:-1]])
    fresh = real & (comp != prev)  # first copy of a (row, key) pair
    grp = comp // block_n  # entry key: segment * T + token
    start = real & (grp != prev.div(block_n, rounding_mode="floor"))  # first lane of a new entry
    ent = torch.cumsum(start.long(), 0) - 1
    # Lanes that are not the first of an entry (or are dropped) scatter into a spare slot past the end.
    e_dst = torch.where(start, ent, e_cap)
    ent_t = torch.zeros(e_cap + 1, **i64).scatter_(0, e_dst, grp % T)[:e_cap].to(torch.int32)
    bit = comp % block_n
    one = torch.ones((), **i64)
    b_dst = torch.where(fresh, ent, e_cap)
    lo = torch.zeros(e_cap + 1, **i64).scatter_add_(0, b_dst, torch.where(bit < 32, one << bit.clamp(max=31), 0))
    hi = torch.zeros(e_cap + 1, **i64).scatter_add_(0, b_dst, torch.where(bit >= 32, one << (bit - 32).clamp(min=0), 0))
    seg_of = torch.where(start, grp // T, n_seg)
    n_e = torch.zeros(n_seg + 1, **i64).scatter_add_(0, seg_of, start.long())[:n_seg]
    offsets = torch.cat([torch.zeros(1, **i64), n_e.cumsum(0)])
    per = torch.clamp((n_e + chunk - 1) // chunk, min=1)
    cum = per.cumsum(0)
    first_item = cum - per
    pos = torch.arange(i_cap, device=dev)
    item_seg = torch.searchsorted(cum, pos, right=True)  # == n_seg for padding items
    pad = item_seg >= n_seg
    sg = item_seg.clamp(max=n_seg - 1)
    rank = pos - first_item[sg]
    e_lo = torch.where(pad, 0, offsets[sg] + rank * chunk)
    e_hi = torch.where(pad, 0, torch.minimum(e_lo + chunk, offsets[sg + 1]))
    split_item = (per[sg] > 1) & ~pad
    slot = torch.where(split_item, split_item.long().cumsum(0) - 1, -1)
    items = torch.stack([torch.where(pad, -1, item_seg), e_lo, e_hi, slot], dim=1).contiguous()
    # Split segments in segment order: the k-th one goes to row k (rows past the count stay padding).
    split_seg = per > 1
    m_dst = torch.where(split_seg, split_seg.long().cumsum(0) - 1, m_cap)
    first_slot = slot[first_item.clamp(max=i_cap - 1)]
    multi = torch.full((m_cap + 1, 3), -1, **i64)
    rows = torch.stack([torch.arange(n_seg, device=dev), first_slot, per], dim=1)
    multi = multi.index_copy(0, m_dst.clamp(max=m_cap), rows)[:m_cap]
    return KeyMajorIndex(
        block_n=block_n, num_key_blocks=nkb, ent_t=ent_t, ent_lo=_to_int32_bits(lo[:e_cap]),
        ent_hi=_to_int32_bits(hi[:e_cap]), offsets=offsets, items=items, multi=multi.contiguous(), n_slots=s_cap,
        chunk=chunk,
    )
