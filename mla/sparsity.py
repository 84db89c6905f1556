"""Block masks and top-k key lists: the two sparse layouts of ``latent_attention`` (DESIGN §4).

* ``BlockMask`` uses the field names of PyTorch FlexAttention's BlockMask (``kv_num_blocks``,
  ``kv_indices``, transposed ``q_num_blocks``/``q_indices``, ``BLOCK_SIZE``): for each query block the
  sorted list of key blocks it visits. Inside a listed block every key is kept unless ``causal``
  removes it.
* Top-k indices are ``int32[B, T, Hkv, K]`` key positions per query token and kv head, ``-1`` lanes
  ignored: the layout of DeepSeek Sparse Attention (DeepSeek-V3.2) and FlashMLA's sparse kernels.

Builders here make both from dense grids, causal/sliding-window patterns and scores (top-k blocks
with forced sink and local blocks as in Native Sparse Attention, Yuan et al. 2025, arXiv 2502.11089).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "BlockMask",
    "block_mask_from_dense",
    "causal_block_mask",
    "sliding_window_block_mask",
    "topk_block_mask",
    "select_topk_blocks",
    "topk_indices_from_scores",
    "causal_clip_topk",
    "check_topk_indices",
    "check_block_mask",
    "as_block_mask",
    "topk_to_dense_mask",
]


def _pair(block_size) -> tuple[int, int]:
    bs = (block_size, block_size) if not isinstance(block_size, (tuple, list)) else tuple(block_size)
    if len(bs) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) for b in bs) or min(bs) < 1:
        raise ValueError(f"BLOCK_SIZE: expected an int or a pair of positive ints, got {block_size!r}")
    return bs


def _grid_from_lists(num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Bool grid ``[..., R, n_cols]`` from row lists (``num [..., R]`` valid lanes of ``idx [..., R, W]``)."""
    lanes = torch.arange(idx.shape[-1], device=idx.device)
    valid = lanes < num[..., None]
    cols = torch.where(valid, idx.long(), torch.full_like(idx, n_cols, dtype=torch.long)).clamp(0, n_cols)
    grid = torch.zeros(*num.shape, n_cols + 1, dtype=torch.bool, device=idx.device)
    grid.scatter_(-1, cols, True)
    return grid[..., :n_cols].contiguous()


def _stable_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim with ties broken towards the lower index, whatever the tensor's shape
    (``torch.topk``'s tie order may change with the batch layout, e.g. prefill vs incremental decode)."""
    vals, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return vals[..., :k], idx[..., :k]


def _indices_from_grid(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise sorted True positions of a bool grid [..., R, C] -> (num [..., R] int32, idx [..., R, C] int32)."""
    num = grid.sum(dim=-1, dtype=torch.int32)
    # A stable descending sort of the 0/1 grid lists True columns first, in ascending order.
    idx = torch.sort(grid.to(torch.int8), dim=-1, descending=True, stable=True).indices.to(torch.int32)
    return num.contiguous(), idx.contiguous()


class BlockMask:
    """Block-sparse pattern of a ``[T, S]`` attention for ``B|1`` batches and ``Hq|1`` heads.

    Attributes (FlexAttention names):
        kv_num_blocks: ``int32[Bm, Hm, nQ]``, key blocks visited by each query block.
        kv_indices: ``int32[Bm, Hm, nQ, max_kv]``, their indices, ascending; lanes at or past
            ``kv_num_blocks`` are padding and never read.
        q_num_blocks / q_indices: the transpose (``[Bm, Hm, nK]`` / ``[Bm, Hm, nK, max_q]``), for the
            backward dK/dV pass; built on first access and cached.
        BLOCK_SIZE: ``(BLOCK_M, BLOCK_N)`` in tokens.
        seq_lengths: ``(T, S)`` the mask was built for.

    ``nQ = ceil(T / BLOCK_M)``, ``nK = ceil(S / BLOCK_N)``; ``Bm`` is 1 or B and ``Hm`` is 1 or the
    number of query heads (size-1 dims broadcast).

    Raises:
        TypeError / ValueError: on tensors of the wrong dtype or shape.
    """

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        BLOCK_SIZE: int | Sequence[int],
        seq_lengths: Sequence[int],
        q_num_blocks: torch.Tensor | None = None,
        q_indices: torch.Tensor | None = None,
    ):
        if (q_num_blocks is None) != (q_indices is None):
            raise ValueError("BlockMask: pass both q_num_blocks and q_indices (the transpose) or neither")
        pairs = [("kv_num_blocks", kv_num_blocks), ("kv_indices", kv_indices)]
        if q_num_blocks is not None:
            pairs += [("q_num_blocks", q_num_blocks), ("q_indices", q_indices)]
        for name, t in pairs:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"BlockMask.{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"BlockMask.{name}: expected an int32 tensor, got dtype {t.dtype}")
        if kv_num_blocks.dim() != 3 or kv_indices.dim() != 4:
            raise ValueError(
                "BlockMask: expected kv_num_blocks [B, H, nQ] and kv_indices [B, H, nQ, max_kv], got "
                f"{tuple(kv_num_blocks.shape)} and {tuple(kv_indices.shape)}"
            )
        if kv_indices.shape[:3] != kv_num_blocks.shape:
            raise ValueError(
                f"BlockMask: kv_indices {tuple(kv_indices.shape)} does not extend kv_num_blocks "
                f"{tuple(kv_num_blocks.shape)}"
            )
        self.BLOCK_SIZE = _pair(BLOCK_SIZE)
        if len(seq_lengths) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                                             for n in seq_lengths):
            raise ValueError(f"BlockMask.seq_lengths: expected (T, S) non-negative ints, got {seq_lengths!r}")
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        T, S = self.seq_lengths
        nq = math.ceil(T / self.BLOCK_SIZE[0])
        if kv_num_blocks.shape[-1] != nq:
            raise ValueError(
                f"BlockMask: T={T} with BLOCK_M={self.BLOCK_SIZE[0]} needs {nq} query blocks, "
                f"kv_num_blocks has {kv_num_blocks.shape[-1]}"
            )
        self.kv_num_blocks = kv_num_blocks.to(torch.int32).contiguous()
        self.kv_indices = kv_indices.to(torch.int32).contiguous()
        self._q_num_blocks = q_num_blocks.to(torch.int32).contiguous() if q_num_blocks is not None else None
        self._q_indices = q_indices.to(torch.int32).contiguous() if q_indices is not None else None
        self._dense: torch.Tensor | None = None
        # Partial blocks (from a FlexAttention mask): per (b, h, qb, kb) the index of the block's token
        # bitmask in partial_bits, -1 for a full or unlisted block.
        self._partial_grid: torch.Tensor | None = None
        self.partial_bits: torch.Tensor | None = None
        self._kv_partial: torch.Tensor | None = None
        self._q_partial: torch.Tensor | None = None

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dense(
        cls, block_grid: torch.Tensor, BLOCK_SIZE: int | Sequence[int], seq_lengths: Sequence[int]
    ) -> BlockMask:
        """Build from a bool grid ``[Bm, Hm, nQ, nK]`` (True = visit the block); 2-D grids get Bm = Hm = 1."""
        if not isinstance(block_grid, torch.Tensor):
            raise TypeError(f"block_grid: expected a bool torch.Tensor, got {type(block_grid).__name__}")
        g = block_grid
        while g.dim() < 4:
            g = g.unsqueeze(0)
        if g.dim() != 4:
            raise ValueError(f"block_grid: expected [B, H, nQ, nK], got shape {tuple(block_grid.shape)}")
        g = g.bool()
        bm, bn = _pair(BLOCK_SIZE)
        T, S = int(seq_lengths[0]), int(seq_lengths[1])
        if g.shape[-2:] != (math.ceil(T / bm), math.ceil(S / bn)):
            raise ValueError(
                f"block_grid: for seq_lengths {(T, S)} and BLOCK_SIZE {(bm, bn)} expected "
                f"[..., {math.ceil(T / bm)}, {math.ceil(S / bn)}], got {tuple(g.shape)}"
            )
        num, idx = _indices_from_grid(g)
        mask = cls(num, idx, (bm, bn), (T, S))
        mask._dense = g.contiguous()
        return mask

    @classmethod
    def from_flex(cls, flex_mask) -> BlockMask:
        """Convert a ``torch.nn.attention.flex_attention.BlockMask`` (e.g. from ``create_block_mask``).

        FlexAttention lists a query block's whole key blocks in ``full_kv_num_blocks``/``full_kv_indices``
        and its partial ones in ``kv_num_blocks``/``kv_indices``; the result lists the union (ascending).
        Full blocks run unmasked; each partial block gets a token bitmask evaluated once from the mask's
        ``mask_mod(b, h, q_idx, kv_idx)`` on its ``BLOCK_M x BLOCK_N`` grid (positions past ``seq_lengths``
        are dropped), stored in ``partial_bits`` (bool ``[P, BLOCK_M, BLOCK_N]``), so windows, document
        and prefix-LM masks are exact, not rounded out to whole blocks. Batch/head dims of 1 broadcast as
        in FlexAttention. Memory: ``P * BLOCK_M * BLOCK_N`` bytes plus an int32 ``[B, H, nQ, nK]`` grid.

        Raises:
            TypeError: not a FlexAttention ``BlockMask``.
            ValueError: fields that disagree with each other or with ``seq_lengths``/``BLOCK_SIZE``
                (row counts, index width, counts or indices out of range).
        """
        for attr in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths", "mask_mod"):
            if not hasattr(flex_mask, attr):
                raise TypeError("block_mask: expected a torch.nn.attention.flex_attention.BlockMask, got "
                                f"{type(flex_mask).__name__}")
        bm, bn = _pair(tuple(int(b) for b in flex_mask.BLOCK_SIZE))
        T, S = (int(n) for n in flex_mask.seq_lengths)
        nq, nk = math.ceil(T / bm), math.ceil(S / bn)
        grids = []
        for name, num, idx in (("kv", flex_mask.kv_num_blocks, flex_mask.kv_indices),
                               ("full_kv", flex_mask.full_kv_num_blocks, flex_mask.full_kv_indices)):
            if num is None:
                continue
            _check_flex_lists(name, num, idx, nq, nk)
            grids.append(_grid_from_lists(num, idx, nk))
        if len(grids) == 2 and grids[0].shape[:2] != grids[1].shape[:2]:
            raise ValueError(f"block_mask: kv_num_blocks batch/head dims {tuple(grids[0].shape[:2])} differ from "
                             f"full_kv_num_blocks' {tuple(grids[1].shape[:2])}")
        partial = grids[0]
        full = grids[1] if len(grids) == 2 else torch.zeros_like(partial)
        partial = partial & ~full
        mask = cls.from_dense(partial | full, (bm, bn), (T, S))
        pos = partial.nonzero()  # [P, 4] (b, h, qb, kb), row-major
        if pos.shape[0] > 0:
            pgrid = torch.full(partial.shape, -1, dtype=torch.int32, device=partial.device)
            pgrid[pos.unbind(1)] = torch.arange(pos.shape[0], dtype=torch.int32, device=partial.device)
            mask._set_partial(pgrid, _eval_mask_mod(flex_mask.mask_mod, pos, bm, bn, T, S))
        return mask

    def _set_partial(self, partial_grid: torch.Tensor, bits: torch.Tensor) -> None:
        self._partial_grid = partial_grid.contiguous()
        self.partial_bits = bits.contiguous()
        self._kv_partial = self._q_partial = None

    @property
    def has_partial(self) -> bool:
        """True when some listed block is partial (masked per token by ``partial_bits``)."""
        return self.partial_bits is not None and self.partial_bits.shape[0] > 0

    @property
    def kv_partial(self) -> torch.Tensor | None:
        """int32 with ``kv_indices``' shape: per listed block the index of its bitmask in
        ``partial_bits``, ``-1`` for a full block (None without partial blocks)."""
        if self.has_partial and self._kv_partial is None:
            self._kv_partial = _gather_lanes(self._partial_grid, self.kv_indices)
        return self._kv_partial

    @property
    def q_partial(self) -> torch.Tensor | None:
        """Like ``kv_partial``, aligned with the transposed ``q_indices`` (for the dK/dV pass)."""
        if self.has_partial and self._q_partial is None:
            self._q_partial = _gather_lanes(self._partial_grid.transpose(-1, -2), self.q_indices)
        return self._q_partial

    # -- derived views ------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, Hm, T, S)``."""
        return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

    @property
    def num_query_blocks(self) -> int:
        return self.kv_num_blocks.shape[-1]

    @property
    def num_kv_blocks(self) -> int:
        return math.ceil(self.seq_lengths[1] / self.BLOCK_SIZE[1])

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def to_dense(self) -> torch.Tensor:
        """Bool block grid ``[Bm, Hm, nQ, nK]`` (True where the query block visits the key block)."""
        if self._dense is None:
            self._dense = _grid_from_lists(self.kv_num_blocks, self.kv_indices, self.num_kv_blocks)
        return self._dense

    def _transpose(self):
        if self._q_num_blocks is None or self._q_indices is None:
            self._q_num_blocks, self._q_indices = _indices_from_grid(self.to_dense().transpose(-1, -2))
        return self._q_num_blocks, self._q_indices

    @property
    def q_num_blocks(self) -> torch.Tensor:
        """``int32[Bm, Hm, nK]``: query blocks that visit each key block (built once, cached)."""
        return self._transpose()[0]

    @property
    def q_indices(self) -> torch.Tensor:
        """``int32[Bm, Hm, nK, max_q]``: those query blocks, ascending (built once, cached)."""
        return self._transpose()[1]

    def to_element_mask(self, causal: bool = False) -> torch.Tensor:
        """Bool keep-mask ``[Bm, Hm, T, S]`` at token level (with bottom-right causal if asked)."""
        T, S = self.seq_lengths
        bm, bn = self.BLOCK_SIZE
        grid = self.to_dense()
        qb = torch.arange(T, device=self.device) // bm
        kb = torch.arange(S, device=self.device) // bn
        m = grid[:, :, qb][:, :, :, kb]
        if self.has_partial:
            pid = self._partial_grid[:, :, qb][:, :, :, kb].long()  # [Bm, Hm, T, S]
            r = (torch.arange(T, device=self.device) % bm)[:, None]
            c = (torch.arange(S, device=self.device) % bn)[None, :]
            bits = self.partial_bits.bool()[pid.clamp(min=0), r, c]
            m = m & (bits | (pid < 0))
        if causal:
            rows = torch.arange(T, device=self.device)[:, None]
            cols = torch.arange(S, device=self.device)[None, :]
            m = m & (cols <= rows + (S - T))
        return m

    def density(self, causal: bool = False) -> float:
        """Fraction of the ``T × S`` (query, key) pairs kept, averaged over batch and heads."""
        T, S = self.seq_lengths
        if T == 0 or S == 0:
            return 0.0
        return float(self.to_element_mask(causal).float().mean())

    def to(self, device) -> BlockMask:
        """Copy of the mask on ``device`` (the cached transpose moves along)."""
        out = BlockMask(
            self.kv_num_blocks.to(device), self.kv_indices.to(device), self.BLOCK_SIZE, self.seq_lengths
        )
        if self._q_num_blocks is not None:
            out._q_num_blocks = self._q_num_blocks.to(device)
            out._q_indices = self._q_indices.to(device)
        if self._dense is not None:
            out._dense = self._dense.to(device)
        if self.has_partial:
            out._set_partial(self._partial_grid.to(device), self.partial_bits.to(device))
        return out

    def __repr__(self) -> str:
        Bm, Hm, T, S = self.shape
        return (
            f"BlockMask(shape=({Bm}, {Hm}, {T}, {S}), BLOCK_SIZE={self.BLOCK_SIZE}, "
            f"blocks={int(self.kv_num_blocks.sum())}/{Bm * Hm * self.num_query_blocks * self.num_kv_blocks})"
        )


def _check_flex_lists(name: str, num, idx, nq: int, nk: int) -> None:
    """A FlexAttention (count, index) pair fits ``nq`` query blocks and ``nk`` key blocks (ValueError)."""
    if not isinstance(num, torch.Tensor) or not isinstance(idx, torch.Tensor) or num.dim() != 3 or idx.dim() != 4:
        raise ValueError(f"block_mask: {name}_num_blocks / {name}_indices must be [B, H, nQ] / [B, H, nQ, w] "
                         f"tensors, got {getattr(num, 'shape', num)} / {getattr(idx, 'shape', idx)}")
    if tuple(idx.shape[:3]) != tuple(num.shape) or num.shape[-1] != nq:
        raise ValueError(f"block_mask: {name}_num_blocks {tuple(num.shape)} / {name}_indices {tuple(idx.shape)} "
                         f"disagree with seq_lengths and BLOCK_SIZE ({nq} query blocks expected)")
    if num.numel() == 0:
        return
    lo, hi = int(num.min()), int(num.max())
    if lo < 0 or hi > min(idx.shape[-1], nk):
        raise ValueError(f"block_mask: {name}_num_blocks must be in [0, {min(idx.shape[-1], nk)}], got [{lo}, {hi}]")
    valid = torch.arange(idx.shape[-1], device=num.device) < num[..., None]
    if bool(((idx < 0) | (idx >= nk))[valid].any()):
        raise ValueError(f"block_mask: {name}_indices has entries outside [0, {nk}) (nK from seq_lengths/BLOCK_SIZE)")
    if bool((_grid_from_lists(num, idx, nk).sum(-1) != num).any()):
        raise ValueError(f"block_mask: {name}_indices lists a block twice in a row")


def _eval_mask_mod(mask_mod, pos: torch.Tensor, bm: int, bn: int, T: int, S: int) -> torch.Tensor:
    """Bool ``[P, bm, bn]``: ``mask_mod(b, h, q_idx, kv_idx)`` on each block ``pos[p] = (b, h, qb, kb)``
    (vmapped per element, as FlexAttention evaluates it); positions past ``(T, S)`` are False."""
    dev = pos.device
    q_idx = pos[:, 2:3] * bm + torch.arange(bm, device=dev)  # [P, bm]
    kv_idx = pos[:, 3:4] * bn + torch.arange(bn, device=dev)  # [P, bn]
    inside = (q_idx < T)[:, :, None] & (kv_idx < S)[:, None, :]
    fn = torch.vmap(mask_mod, in_dims=(None, None, None, 0))
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))
    fn = torch.vmap(fn, in_dims=(0, 0, 0, 0))
    # Clamped positions keep index-based mask_mods (document ids, ...) in range; dropped by `inside`.
    bits = fn(pos[:, 0], pos[:, 1], q_idx.clamp(max=max(T - 1, 0)), kv_idx.clamp(max=max(S - 1, 0)))
    return bits.to(torch.bool).expand(pos.shape[0], bm, bn) & inside


def _gather_lanes(grid: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``grid [B, H, R, C]`` read at each row's index lanes ``idx [B, H, R, W]`` (int32; padding lanes
    are clamped into range and never read by the kernels)."""
    lanes = idx.long().clamp(0, max(grid.shape[-1] - 1, 0))
    if grid.shape[-1] == 0:
        return torch.full(idx.shape, -1, dtype=torch.int32, device=idx.device)
    return torch.gather(grid, -1, lanes).to(torch.int32).contiguous()


def block_mask_from_dense(block_grid: torch.Tensor, BLOCK_SIZE, seq_lengths) -> BlockMask:
    """Alias of ``BlockMask.from_dense``: bool grid ``[B|1, H|1, nQ, nK]`` -> ``BlockMask``."""
    return BlockMask.from_dense(block_grid, BLOCK_SIZE, seq_lengths)


def _block_causal_grid(T: int, S: int, bm: int, bn: int, device) -> torch.Tensor:
    """``[nQ, nK]`` True where some query of the block may see some key of the block (bottom-right)."""
    nq, nk = math.ceil(T / bm), math.ceil(S / bn)
    last_q = torch.clamp((torch.arange(nq, device=device) + 1) * bm, max=T) - 1
    first_k = torch.arange(nk, device=device) * bn
    return first_k[None, :] <= (last_q[:, None] + (S - T))


def causal_block_mask(T: int, S: int, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Blocks a bottom-right causal attention touches. Use with ``causal=True`` for exact causality.

    Returns a ``BlockMask`` of shape ``(1, 1, T, S)``; query blocks that see no key get 0 blocks.
    """
    bm, bn = _pair(BLOCK_SIZE)
    return BlockMask.from_dense(_block_causal_grid(T, S, bm, bn, device), (bm, bn), (T, S))


def sliding_window_block_mask(T: int, S: int, window: int, BLOCK_SIZE=128, device=None) -> BlockMask:
    """Causal sliding window of ``window`` tokens, rounded out to whole blocks.

    Query ``i`` (key-aligned position ``p = i + S - T``) needs keys ``p - window < j <= p``; every block
    intersecting the band of some query of the block is listed, so with ``causal=True`` the kept set is a
    superset of the token window by less than ``BLOCK_M + BLOCK_N`` keys on the left. Shape ``(1, 1, T, S)``.

    Raises:
        ValueError: if ``window < 1``.
    """
    if window < 1:
        raise ValueError(f"window: expected a positive number of tokens, got {window}")
    bm, bn = _pair(BLOCK_SIZE)
    nq, nk = math.ceil(T / bm), math.ceil(S / bn)
    first_q = torch.arange(nq, device=device) * bm + (S - T)
    last_k = torch.clamp((torch.arange(nk, device=device) + 1) * bn, max=S) - 1
    left_ok = last_k[None, :] > first_q[:, None] - window
    grid = _block_causal_grid(T, S, bm, bn, device) & left_ok
    return BlockMask.from_dense(grid, (bm, bn), (T, S))


def topk_block_mask(
    block_scores: torch.Tensor,
    topk: int,
    BLOCK_SIZE,
    seq_lengths,
    *,
    num_sink_blocks: int = 1,
    num_local_blocks: int = 1,
    causal: bool = True,
) -> BlockMask:
    """Keep sink and local blocks, then the ``topk`` best-scoring other blocks per query block.

    Args:
        block_scores: float ``[B, H, nQ, nK]`` (H may be 1), larger = more relevant; e.g. pooled
            latent queries against mean-pooled compressed keys (``mla.attention.LatentSparseAttention``).
        topk: extra blocks chosen by score per query block; ``min(topk, available)`` are taken.
        BLOCK_SIZE, seq_lengths: as for ``BlockMask``.
        num_sink_blocks: leading key blocks always kept (attention sinks).
        num_local_blocks: key blocks ending at the query block's diagonal, always kept.
        causal: only blocks with some causally visible key are candidates (bottom-right).

    Returns:
        ``BlockMask`` with the batch/head dims of ``block_scores``.

    Raises:
        ValueError: on a negative count or a score grid of the wrong shape.
    """
    if min(topk, num_sink_blocks, num_local_blocks) < 0:
        raise ValueError(
            f"topk_block_mask: counts must be >= 0, got topk={topk}, num_sink_blocks={num_sink_blocks}, "
            f"num_local_blocks={num_local_blocks}"
        )
    bm, bn = _pair(BLOCK_SIZE)
    T, S = int(seq_lengths[0]), int(seq_lengths[1])
    nq, nk = math.ceil(T / bm), math.ceil(S / bn)
    if block_scores.dim() != 4 or block_scores.shape[-2:] != (nq, nk):
        raise ValueError(
            f"block_scores: expected [B, H, {nq}, {nk}] for seq_lengths {(T, S)} and BLOCK_SIZE {(bm, bn)}, "
            f"got {tuple(block_scores.shape)}"
        )
    device = block_scores.device
    if causal:
        allowed = _block_causal_grid(T, S, bm, bn, device)
    else:
        allowed = torch.ones(nq, nk, dtype=torch.bool, device=device)
    grid = select_topk_blocks(
        block_scores, topk, allowed, num_sink_blocks=num_sink_blocks, num_local_blocks=num_local_blocks
    )
    return BlockMask.from_dense(grid, (bm, bn), (T, S))


def select_topk_blocks(
    block_scores: torch.Tensor,
    topk: int,
    allowed: torch.Tensor,
    *,
    num_sink_blocks: int = 1,
    num_local_blocks: int = 1,
) -> torch.Tensor:
    """The block choice behind ``topk_block_mask``, for any query layout.

    Args:
        block_scores: float ``[..., R, nK]`` scores of each query row (or query block) for each key block.
        topk: blocks chosen by score per row beyond the forced ones (``min(topk, available)``).
        allowed: bool, broadcastable to ``block_scores``: candidate key blocks (e.g. causally visible).
        num_sink_blocks: leading blocks kept (if allowed). num_local_blocks: blocks ending at the last
            allowed block of the row (its diagonal), kept.

    Returns:
        bool ``[..., R, nK]`` grid (ties in score go to the lower block index).
    """
    nk = block_scores.shape[-1]
    allowed = allowed.expand_as(block_scores)
    kcol = torch.arange(nk, device=block_scores.device)
    forced = allowed & (kcol < num_sink_blocks)
    if num_local_blocks > 0:
        last = torch.where(allowed.any(-1), (allowed * (kcol + 1)).amax(-1) - 1, -1)[..., None]
        forced = forced | (allowed & (kcol <= last) & (kcol > last - num_local_blocks))
    scores = block_scores.float().masked_fill(~allowed | forced, float("-inf"))
    grid = forced.clone()
    k_eff = min(int(topk), nk)
    if k_eff > 0:
        vals, idx = _stable_topk(scores, k_eff)
        grid.scatter_(-1, idx, torch.isfinite(vals) | torch.gather(grid, -1, idx))
    return grid


def topk_indices_from_scores(
    scores: torch.Tensor, topk: int, *, causal: bool = False, sort_indices: bool = True
) -> torch.Tensor:
    """Top-k key positions per query from a score tensor.

    Args:
        scores: float ``[B, T, H, S]`` (``-inf`` = not selectable).
        topk: keys per query; when fewer selectable keys exist, the extra lanes are ``-1``.
        causal: bottom-right causal: query ``i`` may select key ``j`` only if ``j <= i + S - T``.
        sort_indices: return positions ascending (``-1`` lanes last) rather than by score.

    Returns:
        ``int32[B, T, H, topk]``.
    """
    if scores.dim() != 4:
        raise ValueError(f"scores: expected [B, T, H, S], got shape {tuple(scores.shape)}")
    if topk < 1:
        raise ValueError(f"topk: expected >= 1, got {topk}")
    B, T, H, S = scores.shape
    s = scores.float()
    if causal:
        rows = torch.arange(T, device=s.device)[:, None]
        cols = torch.arange(S, device=s.device)[None, :]
        s = s.masked_fill(~(cols <= rows + (S - T))[None, :, None, :], float("-inf"))
    k_eff = min(topk, S)
    vals, idx = _stable_topk(s, k_eff)
    idx = torch.where(torch.isfinite(vals), idx, torch.full_like(idx, -1))
    if sort_indices:
        srt = torch.where(idx < 0, torch.full_like(idx, S), idx).sort(dim=-1).values
        idx = torch.where(srt >= S, -1, srt)
    if k_eff < topk:
        pad = torch.full((B, T, H, topk - k_eff), -1, dtype=idx.dtype, device=idx.device)
        idx = torch.cat([idx, pad], dim=-1)
    return idx.to(torch.int32).contiguous()


def causal_clip_topk(topk_indices: torch.Tensor, seq_len_k: int) -> torch.Tensor:
    """Set lanes that select a causally invisible key (``j > i + S - T``, bottom-right) to ``-1``.

    ``topk_indices``: int ``[B, T, H, K]``; ``seq_len_k``: S. Returns a new int32 tensor.
    """
    T = topk_indices.shape[1]
    limit = torch.arange(T, device=topk_indices.device)[None, :, None, None] + (seq_len_k - T)
    return torch.where(topk_indices > limit, -1, topk_indices).to(torch.int32)


def topk_to_dense_mask(topk_indices: torch.Tensor, seq_len_k: int) -> torch.Tensor:
    """Bool keep-mask ``[B, H, T, S]`` equivalent to top-k indices ``[B, T, H, K]`` (``-1`` ignored)."""
    B, T, H, _ = topk_indices.shape
    idx = topk_indices.long()
    idx = torch.where(idx < 0, seq_len_k, idx).clamp(max=seq_len_k)
    m = torch.zeros(B, T, H, seq_len_k + 1, dtype=torch.bool, device=idx.device)
    m.scatter_(-1, idx, True)
    return m[..., :seq_len_k].permute(0, 2, 1, 3).contiguous()


def topk_as_int32(topk_indices: torch.Tensor) -> torch.Tensor:
    """``topk_indices`` as int32, entries outside the int32 range clamped to it first (a plain cast wraps:
    ``2**32 + 3`` would become key 3; clamped it stays out of range, so it is rejected or skipped)."""
    if topk_indices.dtype == torch.int64:
        info = torch.iinfo(torch.int32)
        topk_indices = topk_indices.clamp(info.min, info.max)
    return topk_indices.to(torch.int32)


def check_topk_indices(
    topk_indices, B: int, T: int, Hkv: int, S: int, device=None, *, check_values: bool = True
) -> torch.Tensor:
    """Validate top-k indices for a ``[B,T,Hkv,·]`` query set over ``S`` keys and return them as int32.

    Checked mode (``check_values``) also reads the values (one device sync): every entry must lie in
    ``[-1, S)`` and no key may appear twice in one row. Under ``torch.compile`` the value checks are
    skipped (they would read data the graph does not have).

    Raises:
        TypeError: not a tensor, or not an integer dtype.
        ValueError: wrong shape or device, entries out of range, duplicates within a row.
    """
    if not isinstance(topk_indices, torch.Tensor):
        raise TypeError(f"topk_indices: expected an int32 torch.Tensor, got {type(topk_indices).__name__}")
    if topk_indices.dtype not in (torch.int32, torch.int64, torch.int16):
        raise TypeError(f"topk_indices: expected dtype int32, got {topk_indices.dtype}")
    if topk_indices.dim() != 4 or tuple(topk_indices.shape[:3]) != (B, T, Hkv) or topk_indices.shape[3] < 1:
        raise ValueError(
            f"topk_indices: expected shape [B={B}, T={T}, Hkv={Hkv}, K>=1], got {tuple(topk_indices.shape)}"
        )
    if device is not None and topk_indices.device != torch.device(device):
        raise ValueError(f"topk_indices: expected device {device}, got {topk_indices.device}")
    idx = topk_as_int32(topk_indices)
    if check_values and idx.numel() > 0 and not torch.compiler.is_compiling():  # reads values: eager only
        lo, hi = int(idx.min()), int(idx.max())
        if lo < -1 or hi >= S:
            raise ValueError(f"topk_indices: entries must be in [-1, S={S}), got min {lo}, max {hi}")
        srt = idx.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
        if bool(dup.any()):
            where = tuple(int(x) for x in dup.nonzero()[0][:3])
            raise ValueError(
                f"topk_indices: duplicate key index in row (b, t, h) = {where}; each row must list a key once"
            )
    return idx


def _check_lists(name: str, num: torch.Tensor, idx: torch.Tensor, n_cols: int) -> None:
    """Counts in ``[0, min(width, n_cols)]``; valid lanes in ``[0, n_cols)`` and strictly ascending."""
    if num.numel() == 0:
        return
    width = idx.shape[-1]
    lo, hi = int(num.min()), int(num.max())
    if lo < 0 or hi > min(width, n_cols):
        raise ValueError(f"block_mask: {name}_num_blocks must be in [0, {min(width, n_cols)}], got [{lo}, {hi}]")
    valid = torch.arange(width, device=num.device) < num[..., None]
    if bool(((idx < 0) | (idx >= n_cols))[valid].any()):
        raise ValueError(f"block_mask: {name}_indices has entries outside [0, {n_cols})")
    inc = idx[..., 1:] > idx[..., :-1]
    if bool((~inc & valid[..., 1:]).any()):
        raise ValueError(f"block_mask: {name}_indices must be strictly ascending within each block row")


def as_block_mask(block_mask) -> BlockMask:
    """``block_mask`` as an ``mla.sparsity.BlockMask``: ours as is, a FlexAttention
    ``torch.nn.attention.flex_attention.BlockMask`` converted with :meth:`BlockMask.from_flex` (cached on
    the flex object, so a mask reused across layers and steps is converted once).

    Raises:
        TypeError: neither kind of ``BlockMask``. ValueError: see :meth:`BlockMask.from_flex`.
    """
    if isinstance(block_mask, BlockMask):
        return block_mask
    if _is_flex_block_mask(block_mask):
        cached = getattr(block_mask, "_mla_block_mask", None)
        if cached is None:
            cached = BlockMask.from_flex(block_mask)
            try:
                block_mask._mla_block_mask = cached
            except AttributeError:  # slotted or frozen: convert each time
                pass
        return cached
    raise TypeError(
        "block_mask: expected mla.sparsity.BlockMask or torch.nn.attention.flex_attention.BlockMask, got "
        f"{type(block_mask).__module__}.{type(block_mask).__name__}"
    )


def _is_flex_block_mask(obj) -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return isinstance(obj, FlexBlockMask)


def check_block_mask(block_mask, B: int, Hq: int, T: int, S: int, device=None, *, check_values: bool = True):
    """Validate that ``block_mask`` fits an attention of batch ``B``, ``Hq`` heads, ``T`` queries, ``S`` keys.

    Raises:
        TypeError: not a ``BlockMask``.
        ValueError: wrong sequence lengths, batch/head dims, device, or (checked mode) block indices
            outside ``[0, nK)``, counts above the index width, unsorted/duplicate lanes, or a caller-given
            transpose (``q_num_blocks``/``q_indices``) that does not match the kv lists.

    The value checks read the tensors, so they run in eager mode only; under ``torch.compile`` they are
    skipped (as if ``check_values=False``: validate the mask once outside the compiled region).
    """
    block_mask = as_block_mask(block_mask)
    if tuple(block_mask.seq_lengths) != (T, S):
        raise ValueError(f"block_mask: built for (T, S) = {block_mask.seq_lengths}, but the inputs have {(T, S)}")
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    if Bm not in (1, B) or Hm not in (1, Hq):
        raise ValueError(
            f"block_mask: batch/head dims must be 1 or match (B={B}, Hq={Hq}), got ({Bm}, {Hm})"
        )
    if device is not None and block_mask.device != torch.device(device):
        raise ValueError(f"block_mask: expected device {device}, got {block_mask.device}")
    if check_values and not torch.compiler.is_compiling():  # value checks read the data: eager only
        nq, nk = block_mask.kv_num_blocks.shape[-1], block_mask.num_kv_blocks
        _check_lists("kv", block_mask.kv_num_blocks, block_mask.kv_indices, nk)
        if block_mask._q_num_blocks is not None and block_mask._q_indices is not None:
            # A transpose given by the caller drives the dK/dV pass: it must list the same blocks.
            qn, qi = block_mask._q_num_blocks, block_mask._q_indices
            if qn.dim() != 3 or qi.dim() != 4 or tuple(qn.shape) != (Bm, Hm, nk) or tuple(qi.shape[:3]) != (Bm, Hm, nk):
                raise ValueError(
                    f"block_mask: q_num_blocks {tuple(qn.shape)} / q_indices {tuple(qi.shape)} must be "
                    f"[{Bm}, {Hm}, nK={nk}] / [{Bm}, {Hm}, nK={nk}, max_q]"
                )
            _check_lists("q", qn, qi, nq)
            if not torch.equal(_grid_from_lists(qn, qi, nq), block_mask.to_dense().transpose(-1, -2)):
                raise ValueError("block_mask: q_num_blocks/q_indices are not the transpose of kv_num_blocks/kv_indices")
    return block_mask
