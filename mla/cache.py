"""Compressed (latent) KV caches for MLA.

MLA caches, per token and layer, only the normalised latent ``c_kv`` (``kv_lora_rank`` values) and the
shared rotary key ``k_rope`` (``qk_rope_head_dim`` values) — 576 values for DeepSeek-V3 instead of
``128 · (192 + 128)`` for its expanded multi-head form (DeepSeek-V2, arXiv 2405.04434, §2.1).

``LatentCache`` keeps one contiguous ``[B, capacity, dc + dr]`` buffer per layer holding rows
``[c_kv | k_rope]``; the attention reads ``k = rows`` and ``v = rows[..., :dc]`` (a prefix view, which the
kernels load once).
"""

from __future__ import annotations

import math
import operator

import torch

from mla.quant import FP8_DS_MLA, KV_FORMATS, dequantize_fp8_ds_mla, fp8_ds_mla_row_bytes, quantize_fp8_ds_mla
from mla.reference import gather_pages

__all__ = ["LatentCache", "PagedLatentCache", "PagedTokenStore", "PooledKeyStore"]


class LatentCache:
    """Contiguous latent cache for ``num_layers`` layers, all sequences of a batch at the same length.

    Rows are ``[c_kv | k_rope]`` (``kv_lora_rank + qk_rope_head_dim`` values). Storage grows by doubling,
    so appending one token is amortised O(1). Extra per-layer tensors (e.g. the lightning indexer's keys)
    can be cached alongside with ``update_extra``.

    Args:
        num_layers: number of attention layers that will call ``update``.
    """

    def __init__(self, num_layers: int):
        if num_layers < 1:
            raise ValueError(f"num_layers: expected >= 1, got {num_layers}")
        self.num_layers = num_layers
        self._buf: list[torch.Tensor | None] = [None] * num_layers
        self._len = [0] * num_layers
        self._extra: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached for layer ``layer_idx``."""
        return self._len[layer_idx]

    def _grow(self, layer_idx: int, rows: torch.Tensor, need: int) -> torch.Tensor:
        buf = self._buf[layer_idx]
        if buf is None or buf.shape[1] < need or buf.shape[0] != rows.shape[0] or buf.dtype != rows.dtype:
            cap = max(need, 16 if buf is None else 2 * buf.shape[1])
            new = rows.new_empty(rows.shape[0], cap, rows.shape[2])
            if buf is not None and self._len[layer_idx]:
                if buf.shape[0] != rows.shape[0] or buf.shape[2] != rows.shape[2]:
                    raise ValueError(
                        f"rows: shape {tuple(rows.shape)} does not continue the cached [B={buf.shape[0]}, "
                        f"*, {buf.shape[2]}] rows of layer {layer_idx}"
                    )
                new[:, : self._len[layer_idx]] = buf[:, : self._len[layer_idx]]
            self._buf[layer_idx] = buf = new
        return buf

    def update(self, layer_idx: int, rows: torch.Tensor) -> torch.Tensor:
        """Append ``rows [B, T, dc + dr]`` to layer ``layer_idx``; return all rows ``[B, S, dc + dr]`` (a view).

        Raises:
            ValueError: ``rows`` does not continue the cached batch/width, or a bad layer index.
        """
        if not 0 <= layer_idx < self.num_layers:
            raise ValueError(f"layer_idx: expected 0 <= layer_idx < {self.num_layers}, got {layer_idx}")
        if rows.dim() != 3:
            raise ValueError(f"rows: expected [B, T, kv_lora_rank + qk_rope_head_dim], got {tuple(rows.shape)}")
        start = self._len[layer_idx]
        end = start + rows.shape[1]
        buf = self._grow(layer_idx, rows, end)
        # Detached storage: the cache is for inference; gradients flow through the returned rows below.
        buf[:, start:end] = rows.detach()
        self._len[layer_idx] = end
        if rows.requires_grad:
            return torch.cat([buf[:, :start], rows], dim=1)
        return buf[:, :end]

    def update_extra(self, layer_idx: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """Append ``value [B, T, ...]`` along dim 1 to the extra tensor ``name``; return all of it."""
        old = self._extra[layer_idx].get(name)
        new = value if old is None else torch.cat([old, value.detach()], dim=1)
        self._extra[layer_idx][name] = new.detach()
        return new

    def bytes_per_token(self) -> int:
        """Bytes the cache stores per token, summed over layers (0 before the first update)."""
        total = 0
        for buf in self._buf:
            if buf is not None:
                total += buf.shape[2] * buf.element_size()
        for extra in self._extra:
            for t in extra.values():
                total += t[0, 0].numel() * t.element_size()
        return total

    def reset(self) -> None:
        """Forget every cached token (storage is kept for reuse)."""
        self._len = [0] * self.num_layers
        self._extra = [{} for _ in range(self.num_layers)]


class PagedTokenStore:
    """Per-token side rows kept in the pages of a ``PagedLatentCache`` (e.g. the lightning indexer's keys).

    Storage ``[num_pages + 1, page_size, width]``: the same page ids as the latent rows, plus one scratch
    page that absorbs the padding rows of a step (so writes are fixed-shape index writes, no boolean
    indexing). Written at the step's slots (``PagedLatentCache.step_slots``) and read back per sequence.
    """

    def __init__(self, num_pages: int, page_size: int, width: int, dtype: torch.dtype, device):
        self.width = width
        self.pool = torch.zeros(num_pages + 1, page_size, width, dtype=dtype, device=device)

    def write(self, slots: torch.Tensor, values: torch.Tensor) -> None:
        """``values [B, T, width]`` to flat ``slots [B, T]`` (padding rows point into the scratch page)."""
        self.pool.view(-1, self.width)[slots.reshape(-1)] = values.detach().reshape(-1, self.width).to(self.pool.dtype)

    def gather(self, block_table: torch.Tensor) -> torch.Tensor:
        """``[B, max_pages * page_size, width]`` rows of each sequence; slots past its length hold stale
        data (callers mask by length). Unused table entries (-1) read the scratch page."""
        pages = torch.where(block_table < 0, self.pool.shape[0] - 1, block_table).long()
        B = block_table.shape[0]
        return self.pool[pages].reshape(B, -1, self.width)


class PooledKeyStore:
    """Running sums of rows per key block of ``block_size`` tokens, kept per page: the mean-pooled block
    keys of ``LatentSparseAttention`` without re-reading the cache.

    A page of ``page_size`` tokens starting at position ``c · page_size`` meets at most ``num_segments``
    blocks; ``sums [num_pages + 1, num_segments, width]`` (fp32, or fp64 for fp64 caches; last page:
    scratch for padding rows) holds, per page, the sum of the page's rows in each of those blocks. A new
    token adds its row to one entry (``index_put_`` with ``accumulate``); a block's sum is the sum of its
    pages' segments (at most ``ceil(block_size / page_size) + 1``, a fixed gather: no atomics on read).
    Pages are zeroed when handed to a sequence. Works for any ``page_size`` / ``block_size``.
    """

    def __init__(self, num_pages: int, page_size: int, block_size: int, width: int, dtype: torch.dtype, device):
        self.page_size, self.block_size, self.width = page_size, block_size, width
        # A page starts at c * page_size; its offset in the first block it meets is at most
        # block_size - gcd(page_size, block_size).
        r_max = block_size - math.gcd(page_size, block_size)
        self.num_segments = (r_max + page_size - 1) // block_size + 1
        sum_dtype = torch.promote_types(dtype, torch.float32)
        self.sums = torch.zeros(num_pages + 1, self.num_segments, width, dtype=sum_dtype, device=device)
        self._row_dtype = dtype

    def zero_pages(self, pages: list[int]) -> None:
        """Clear the pooled sums of physical pages ``pages`` (page ids), e.g. before a page is reused."""
        if pages:
            self.sums[torch.tensor(pages, dtype=torch.long, device=self.sums.device)] = 0

    def add(self, pages: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``values [B, T, width]`` of tokens at positions ``pos [B, T]`` on pages ``pages [B, T]``
        (padding rows: the scratch page)."""
        ps, bs = self.page_size, self.block_size
        seg = pos // bs - (pos // ps * ps) // bs
        flat = (pages * self.num_segments + seg).reshape(-1)
        # Rows as stored in the latent cache (its dtype), summed in the sums' dtype.
        vals = values.detach().to(self._row_dtype).to(self.sums.dtype).reshape(-1, self.width)
        self.sums.view(-1, self.width).index_put_((flat,), vals, accumulate=True)

    def block_sums(self, block_table: torch.Tensor) -> torch.Tensor:
        """``[B, NKB, width]`` sums per key block, ``NKB = ceil(max_pages · page_size / block_size)``;
        blocks past a sequence's length hold 0 (fresh pages are zero)."""
        ps, bs, ns = self.page_size, self.block_size, self.num_segments
        B, n_pages = block_table.shape
        dev = block_table.device
        pages = torch.where(block_table < 0, self.sums.shape[0] - 1, block_table).long()
        segs = self.sums[pages]  # [B, n_pages, ns, width]
        segs = torch.where((block_table >= 0)[:, :, None, None], segs, torch.zeros((), dtype=segs.dtype, device=dev))
        nkb = -(-n_pages * ps // bs)
        # Block j meets pages c = (j*bs)//ps + m (m < ceil(bs/ps) + 1) as their segment j - (c*ps)//bs.
        j = torch.arange(nkb, device=dev)[:, None]
        c = (j * bs) // ps + torch.arange(-(-bs // ps) + 1, device=dev)[None, :]
        i = j - (c * ps) // bs
        ok = (c < n_pages) & (c * ps < (j + 1) * bs) & (i >= 0) & (i < ns)
        flat = torch.where(ok, c * ns + i, 0)
        picked = segs.reshape(B, n_pages * ns, self.width)[:, flat.reshape(-1)].view(B, nkb, -1, self.width)
        return (picked * ok[None, :, :, None].to(picked.dtype)).sum(2)


class PagedLatentCache:
    """Paged latent cache for serving: fixed-size pages of ``[c_kv | k_rope]`` rows, shared by all heads.

    Storage per layer is ``kv_cache(layer) : [num_pages, page_size, 1, head_dim]`` (``head_dim =
    kv_lora_rank + qk_rope_head_dim``); every sequence owns a list of pages (the same page ids in every
    layer) taken from a free list, so sequences of any length share one pool without fragmentation
    (vLLM's PagedAttention idea, Kwon et al. 2023, arXiv 2309.06180; FlashMLA's paged layout).

    A forward step over a batch of sequences is bracketed by ``begin_step(seq_ids, num_new)``, which
    reserves pages and fixes, per sequence, the position of the first new token (``step_start``) and
    the length after the step (``cache_seqlens``); each layer then calls ``write(layer_idx, rows)`` and
    attends with ``kv_cache(layer_idx)``, ``block_table`` and ``cache_seqlens`` (``mla.functional.mla_decode``).
    A contiguous cache is the special case ``contiguous(...)``: one page per sequence.

    ``begin_step`` is the host-side bookkeeping (page allocation); everything a layer does inside the
    step (``write``, the side stores, attention) reads only device tensors and shapes, never their
    values, so a decode step has no host sync. With ``max_pages_per_seq`` the block table has a fixed
    width and ``begin_step`` updates ``block_table`` / ``cache_seqlens`` / ``step_start`` / ``step_len``
    in place while the batch keeps its size: the step's shapes and tensors stay the same from one step
    to the next, as CUDA-graph capture and replay need.

    Side stores per layer for ``LatentSparseAttention``: per-token rows (``write_tokens`` /
    ``gather_tokens``, e.g. indexer keys) and per-block running sums (``add_block_sums`` /
    ``block_sums``, the pooled block keys), updated as tokens are written.

    FP8 cache (``kv_format="fp8_ds_mla"``, DeepSeek-V3.2's layout, ``mla.quant``): each row is stored as
    ``row_bytes`` uint8 (656 instead of 1,152 bf16 bytes for DeepSeek-V3): the ``kv_lora_rank`` latent values
    as e4m3 with one power-of-two fp32 scale per 128, the RoPE values as bf16. ``write`` quantizes
    (rows of any float dtype), ``kv_cache`` returns the byte pool ``[num_pages, page_size, 1, row_bytes]``
    that ``mla_decode(..., kv_format="fp8_ds_mla")`` dequantizes in registers, and ``dequantize(layer)``
    / ``gather`` return rows in ``dtype`` (for the reference path and tests).

    Args:
        num_layers: attention layers sharing the block table.
        head_dim: values per cached row (``kv_lora_rank + qk_rope_head_dim``).
        num_pages: pages in the pool (per layer). page_size: tokens per page (default 64).
        dtype, device: of the storage (FP8: ``dtype`` is that of ``dequantize`` / ``gather``).
        max_pages_per_seq: fixed block-table width (None: the widest sequence of the step).
        kv_format: ``None`` (rows stored in ``dtype``) or ``"fp8_ds_mla"``.
        kv_lora_rank: latent width ``dc`` (FP8 only, required there: a multiple of 128, ``<= head_dim``).

    Raises:
        ValueError: bad sizes or ``kv_format``; ``RuntimeError`` when the pool runs out of pages (or a
        sequence would outgrow ``max_pages_per_seq``).
    """

    def __init__(self, num_layers: int, head_dim: int, *, num_pages: int, page_size: int = 64,
                 dtype: torch.dtype = torch.float32, device=None, max_pages_per_seq: int | None = None,
                 kv_format: str | None = None, kv_lora_rank: int | None = None):
        for name, val in (("num_layers", num_layers), ("head_dim", head_dim), ("num_pages", num_pages),
                          ("page_size", page_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if max_pages_per_seq is not None and (not isinstance(max_pages_per_seq, int) or max_pages_per_seq < 1):
            raise ValueError(f"max_pages_per_seq: expected None or a positive int, got {max_pages_per_seq!r}")
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format: expected one of {KV_FORMATS}, got {kv_format!r}")
        self.num_layers, self.head_dim, self.num_pages, self.page_size = num_layers, head_dim, num_pages, page_size
        self.max_pages_per_seq = max_pages_per_seq
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.kv_format, self.kv_lora_rank = kv_format, kv_lora_rank
        if kv_format == FP8_DS_MLA:
            if not isinstance(kv_lora_rank, int) or not 0 < kv_lora_rank <= head_dim:
                raise ValueError(f"kv_lora_rank: kv_format={FP8_DS_MLA!r} needs the latent width in "
                                 f"[1, head_dim={head_dim}], got {kv_lora_rank!r}")
            #: Bytes of one stored row (one token, one layer).
            self.row_bytes = fp8_ds_mla_row_bytes(kv_lora_rank, head_dim - kv_lora_rank)
            shape, store = (num_pages + 1, page_size, 1, self.row_bytes), torch.uint8
        else:
            self.row_bytes = head_dim * torch.empty((), dtype=dtype).element_size()
            shape, store = (num_pages + 1, page_size, 1, head_dim), dtype
        # One extra scratch page at the end receives the padding rows of a step (fixed-shape writes).
        self._pools = [torch.empty(shape, dtype=store, device=self.device) for _ in range(num_layers)]
        self._free = list(range(num_pages - 1, -1, -1))  # pop() hands out low page ids first
        self._pages: dict[int, list[int]] = {}
        self._lens: dict[int, int] = {}
        self._next_id = 0
        self.seq_ids: list[int] = []
        self.block_table = torch.zeros(0, 1, dtype=torch.int32, device=self.device)
        self.cache_seqlens = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.step_start = torch.zeros(0, dtype=torch.int32, device=self.device)
        self.step_len = torch.zeros(0, dtype=torch.int32, device=self.device)
        self._step_lens: list[int] = []
        self._step_prefill = True
        self._step_uniform: int | None = None
        self._step_max_len = 0
        self._tokens: list[dict[str, PagedTokenStore]] = [{} for _ in range(num_layers)]
        self._blocks: list[dict[str, PooledKeyStore]] = [{} for _ in range(num_layers)]

    @classmethod
    def contiguous(cls, num_layers: int, head_dim: int, batch_size: int, max_seqlen: int, **kw) -> PagedLatentCache:
        """One page of ``max_seqlen`` tokens per sequence: a contiguous ``[B, max_seqlen]`` cache."""
        return cls(num_layers, head_dim, num_pages=batch_size, page_size=max_seqlen, **kw)

    # -- sequences ------------------------------------------------------------------------------
    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def add_sequences(self, n: int) -> list[int]:
        """Register ``n`` empty sequences; returns their ids."""
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        for i in ids:
            self._pages[i] = []
            self._lens[i] = 0
        return ids

    def release(self, seq_ids) -> None:
        """Return the pages of finished sequences to the free list and forget them.

        A step (``begin_step``) that holds a released sequence is closed: ``write`` then raises until the
        next ``begin_step``.

        Raises:
            KeyError: an unknown, already released or repeated sequence id; nothing is released then.
        """
        seq_ids = list(seq_ids)
        unknown = [i for i in seq_ids if i not in self._pages]
        if unknown or len(set(seq_ids)) != len(seq_ids):
            raise KeyError(f"seq_ids: unknown, already released or repeated sequences in {seq_ids}")
        for i in seq_ids:
            self._free.extend(reversed(self._pages.pop(i)))
            self._lens.pop(i)
        if not set(seq_ids).isdisjoint(self.seq_ids):
            # The open step lost sequences: close it, or its writes would land in the freed pages.
            self.seq_ids = []

    def seq_len(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        return self._lens[seq_id]

    def _set_step_tensor(self, name: str, values: list, shape: tuple) -> None:
        """Store int32 ``values`` as ``self.<name>``: in place when the shape is unchanged (a captured
        graph keeps reading the same tensor), else a new tensor."""
        new = torch.tensor(values, dtype=torch.int32).view(shape)
        old = getattr(self, name)
        if old.shape == new.shape:
            old.copy_(new)
        else:
            setattr(self, name, new.to(self.device))

    def begin_step(self, seq_ids, num_new) -> None:
        """Reserve room for ``num_new`` tokens (an int or one per sequence) appended to each of ``seq_ids``.

        Sets ``seq_ids``, ``step_start`` (int32 [B], position of the first new token),
        ``step_len`` (int32 [B]), ``cache_seqlens`` (int32 [B], lengths after the step) and
        ``block_table`` (int32 [B, max_pages]) on the cache's device (in place when their shapes are
        unchanged). Host-side bookkeeping: call it outside a captured / compiled decode step.

        Raises:
            KeyError: unknown sequence id. ValueError: a repeated sequence id, negative or miscounted
            ``num_new``. TypeError: ``num_new`` not an int or ints. RuntimeError: not enough free pages, or a
            sequence would need more than ``max_pages_per_seq`` pages.
        """
        seq_ids = list(seq_ids)
        if len(set(seq_ids)) != len(seq_ids):  # one would be counted for pages once but grow twice
            raise ValueError(f"seq_ids: each sequence at most once per step, got {seq_ids}")
        if isinstance(num_new, torch.Tensor):
            num_new = num_new.tolist()
        try:
            num_new = [operator.index(num_new)] * len(seq_ids) if not isinstance(num_new, (list, tuple)) else [
                operator.index(n) for n in num_new]
        except TypeError:
            raise TypeError(f"num_new: expected an int or one int per sequence, got {num_new!r}") from None
        if len(num_new) != len(seq_ids) or min(num_new, default=0) < 0:
            raise ValueError(f"num_new: expected {len(seq_ids)} non-negative counts, got {num_new}")
        need = 0
        for i, n in zip(seq_ids, num_new):
            if i not in self._lens:
                raise KeyError(f"seq_ids: unknown sequence {i}")
            pages = -(-(self._lens[i] + n) // self.page_size)
            if self.max_pages_per_seq is not None and pages > self.max_pages_per_seq:
                raise RuntimeError(
                    f"PagedLatentCache: sequence {i} would need {pages} pages, max_pages_per_seq is "
                    f"{self.max_pages_per_seq}"
                )
            need += pages - len(self._pages[i])
        if need > len(self._free):
            raise RuntimeError(
                f"PagedLatentCache: {need} more pages needed, {len(self._free)} free of {self.num_pages}"
            )
        starts, fresh = [], []
        for i, n in zip(seq_ids, num_new):
            starts.append(self._lens[i])
            self._lens[i] += n
            while len(self._pages[i]) * self.page_size < self._lens[i]:
                fresh.append(self._free.pop())
                self._pages[i].append(fresh[-1])
        for stores in self._blocks:  # running sums start from zero on a page a sequence just took
            for store in stores.values():
                store.zero_pages(fresh)
        width = self.max_pages_per_seq or max([len(self._pages[i]) for i in seq_ids] + [1])
        table = [self._pages[i] + [-1] * (width - len(self._pages[i])) for i in seq_ids]
        self.seq_ids = seq_ids
        B = len(seq_ids)
        self._set_step_tensor("block_table", table, (B, width))
        self._set_step_tensor("step_start", starts, (B,))
        self._set_step_tensor("step_len", num_new, (B,))
        self._set_step_tensor("cache_seqlens", [self._lens[i] for i in seq_ids], (B,))
        self._step_lens = num_new
        # Plain Python facts about the step, fixed before any layer runs (compiled code guards on them).
        self._step_prefill = all(s == 0 for s in starts)
        self._step_uniform = num_new[0] if num_new and len(set(num_new)) == 1 else None
        self._step_max_len = max(num_new, default=0)

    @property
    def step_is_prefill(self) -> bool:
        """True when every sequence of the current step starts empty."""
        return self._step_prefill

    @property
    def step_uniform_len(self) -> int | None:
        """The common number of new tokens of the step, or None when it differs between sequences."""
        return self._step_uniform

    def max_seqlen(self) -> int:
        """Longest sequence of the current step (after it)."""
        return max((self._lens[i] for i in self.seq_ids), default=0)

    @property
    def capacity(self) -> int:
        """Positions the block table addresses per sequence: ``block_table.shape[1] * page_size``."""
        return self.block_table.shape[1] * self.page_size

    # -- data -------------------------------------------------------------------------------------
    def _check_layer(self, layer_idx: int) -> None:
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self._pools):
            raise ValueError(f"layer_idx: expected an int in [0, {len(self._pools)}), got {layer_idx!r}")

    def kv_cache(self, layer_idx: int) -> torch.Tensor:
        """Page pool of ``layer_idx``: ``[num_pages, page_size, 1, head_dim]`` (FP8: uint8 ``row_bytes``).

        Raises:
            ValueError: ``layer_idx`` out of range.
        """
        self._check_layer(layer_idx)
        return self._pools[layer_idx][: self.num_pages]

    def _check_rows(self, name: str, rows: torch.Tensor, width: int | None) -> int:
        B = len(self.seq_ids)
        if B == 0:
            raise ValueError("write: no step is open; call begin_step(seq_ids, num_new) first")
        if rows.dim() != 3 or rows.shape[0] != B or (width is not None and rows.shape[2] != width):
            raise ValueError(f"{name}: expected [B={B}, T, {width if width is not None else 'width'}], "
                             f"got {tuple(rows.shape)}")
        T = rows.shape[1]
        if T < self._step_max_len:
            raise ValueError(
                f"{name}: the step reserved {self._step_max_len} new positions for a sequence, got only {T} rows"
            )
        return T

    def step_slots(self, T: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where row ``t`` of sequence ``b`` of the current step goes: ``(pages, pos, slots)``, int64 ``[B, T]``.

        ``pos = step_start[b] + t``; ``pages`` its page id and ``slots = pages * page_size + pos % page_size``
        its flat slot. Padding rows (``t >= step_len[b]``) go to the scratch page ``num_pages``. Computed on
        the device from ``step_start`` / ``step_len`` / ``block_table``: no host sync, fixed shapes.
        """
        dev = self.block_table.device if device is None else device
        t = torch.arange(T, device=dev)[None, :]
        valid = t < self.step_len.to(dev).long()[:, None]
        pos = self.step_start.to(dev).long()[:, None] + t
        col = torch.clamp(pos // self.page_size, max=self.block_table.shape[1] - 1)
        pages = torch.gather(self.block_table.to(dev).long(), 1, col)
        pages = torch.where(valid & (pages >= 0), pages, self.num_pages)
        return pages, pos, pages * self.page_size + pos % self.page_size

    def write(self, layer_idx: int, rows: torch.Tensor) -> None:
        """Store the current step's new rows: ``rows [B, T, head_dim]``; row ``t`` of sequence ``b`` goes to
        position ``step_start[b] + t`` for ``t < step_len[b]`` (later rows are padding, ignored).

        One fixed-shape index write (padding rows land in a scratch page): no host sync.
        An FP8 cache quantizes the rows (``mla.quant.quantize_fp8_ds_mla``; any floating dtype).

        Raises:
            ValueError: ``layer_idx`` out of range, or a shape that does not match the step (fewer than
                ``max(step_len)`` rows would leave reserved positions holding stale data).
            TypeError: ``rows.dtype`` is not the cache's ``dtype`` (no silent rounding: cast explicitly);
                non-floating rows for an FP8 cache.
        """
        self._check_layer(layer_idx)
        if self.kv_format == FP8_DS_MLA:
            if not rows.is_floating_point():
                raise TypeError(f"rows: an {FP8_DS_MLA} cache quantizes floating-point rows, got {rows.dtype}")
        elif rows.dtype != self.dtype:
            raise TypeError(f"rows: expected the cache's dtype {self.dtype}, got {rows.dtype} "
                            f"(cast explicitly, e.g. rows.to({self.dtype}), if the rounding is intended)")
        T = self._check_rows("rows", rows, self.head_dim)
        pool = self._pools[layer_idx]
        _, _, slots = self.step_slots(T, pool.device)
        new = rows.detach().reshape(-1, self.head_dim)
        if self.kv_format == FP8_DS_MLA:
            new = quantize_fp8_ds_mla(new, self.kv_lora_rank)
        pool.view(-1, pool.shape[-1])[slots.reshape(-1)] = new

    def dequantize(self, layer_idx: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Page pool of ``layer_idx`` as rows ``[num_pages, page_size, 1, head_dim]`` in ``dtype`` (default
        the cache's): decoded FP8 rows (a new tensor), or the pool itself cast for an unquantized cache.

        Raises:
            ValueError: ``layer_idx`` out of range.
        """
        dtype = dtype or self.dtype
        pool = self.kv_cache(layer_idx)
        if self.kv_format == FP8_DS_MLA:
            return dequantize_fp8_ds_mla(pool, self.kv_lora_rank, self.head_dim - self.kv_lora_rank, dtype)
        return pool.to(dtype)

    def gather(self, layer_idx: int) -> torch.Tensor:
        """Contiguous rows ``[B, max_seqlen, head_dim]`` of the current step's sequences (zeros past each length;
        an FP8 cache's rows are dequantized to ``dtype``).

        Reads every cached row and syncs (``max_seqlen``): for inspection and tests, not for decode."""
        rows = gather_pages(self.kv_cache(layer_idx), self.block_table, self.cache_seqlens, self.max_seqlen())
        if self.kv_format == FP8_DS_MLA:
            rows = dequantize_fp8_ds_mla(rows, self.kv_lora_rank, self.head_dim - self.kv_lora_rank, self.dtype)
        return rows

    # -- side stores (LatentSparseAttention) ------------------------------------------------------
    def _new_store(self, layer_idx: int, name: str, kind: str):
        stepping = set(self.seq_ids)
        others = any(self._lens[i] for i in self._pages if i not in stepping)
        if not self._step_prefill or others:
            raise RuntimeError(
                f"PagedLatentCache: side store {name!r} of layer {layer_idx} must be created by the first "
                f"({kind}) write of a prefill step, before any sequence has cached tokens"
            )

    def write_tokens(self, layer_idx: int, name: str, values: torch.Tensor) -> None:
        """Store the step's per-token side rows ``values [B, T, width]`` (same slots as ``write``) in the
        store ``name`` of ``layer_idx``, created (in ``values``' dtype) at the first write of a prefill step.

        Raises:
            ValueError: a shape that does not match the step or the store. RuntimeError: a store created
            while sequences already hold tokens.
        """
        self._check_layer(layer_idx)
        store = self._tokens[layer_idx].get(name)
        T = self._check_rows("values", values, None if store is None else store.width)
        if store is None:
            self._new_store(layer_idx, name, "write_tokens")
            store = PagedTokenStore(self.num_pages, self.page_size, values.shape[-1], values.dtype, self.device)
            self._tokens[layer_idx][name] = store
        store.write(self.step_slots(T, store.pool.device)[2], values)

    def gather_tokens(self, layer_idx: int, name: str) -> torch.Tensor:
        """``[B, capacity, width]`` side rows of the step's sequences (stale past each length: mask by
        ``cache_seqlens``). Raises ``KeyError`` for an unknown store."""
        return self._tokens[layer_idx][name].gather(self.block_table)

    def add_block_sums(self, layer_idx: int, name: str, values: torch.Tensor, block_size: int) -> None:
        """Add the step's rows ``values [B, T, width]`` to the running per-block sums ``name`` of
        ``layer_idx`` (blocks of ``block_size`` positions), created at the first call of a prefill step.

        Raises:
            ValueError: a shape or ``block_size`` that does not match the step or the store. RuntimeError:
            a store created while sequences already hold tokens.
        """
        self._check_layer(layer_idx)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
        store = self._blocks[layer_idx].get(name)
        T = self._check_rows("values", values, None if store is None else store.width)
        if store is None:
            self._new_store(layer_idx, name, "add_block_sums")
            store = PooledKeyStore(self.num_pages, self.page_size, block_size, values.shape[-1], self.dtype,
                                   self.device)
            self._blocks[layer_idx][name] = store
        if store.block_size != block_size:
            raise ValueError(f"block_size: store {name!r} sums blocks of {store.block_size}, got {block_size}")
        pages, pos, _ = self.step_slots(T, store.sums.device)
        store.add(pages, pos, values)

    def block_sums(self, layer_idx: int, name: str) -> torch.Tensor:
        """``[B, ceil(capacity / block_size), width]`` per-block sums of the step's sequences (0 past each
        length). Raises ``KeyError`` for an unknown store."""
        return self._blocks[layer_idx][name].block_sums(self.block_table)

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token, summed over layers: ``num_layers · row_bytes`` (``row_bytes``:
        ``head_dim · element size``, or 656 for a DeepSeek-V3 row in ``fp8_ds_mla`` vs 1,152 in bf16), plus
        the per-token side stores."""
        side = sum(s.width * s.pool.element_size() for stores in self._tokens for s in stores.values())
        return self.num_layers * self.row_bytes + side
