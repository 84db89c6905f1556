"""Compressed (latent) KV caches for MLA.

MLA caches, per token and layer, only the normalised latent ``c_kv`` (``kv_lora_rank`` values) and the
shared rotary key ``k_rope`` (``qk_rope_head_dim`` values) — 576 values for DeepSeek-V3 instead of
``128 · (192 + 128)`` for its expanded multi-head form (DeepSeek-V2, arXiv 2405.04434, §2.1).

``LatentCache`` keeps one contiguous ``[B, capacity, dc + dr]`` buffer per layer holding rows
``[c_kv | k_rope]``; the attention reads ``k = rows`` and ``v = rows[..., :dc]`` (a prefix view, which the
kernels load once).
"""

from __future__ import annotations

import torch

from mla.quant import FP8_DS_MLA, KV_FORMATS, dequantize_fp8_ds_mla, fp8_ds_mla_row_bytes, quantize_fp8_ds_mla

__all__ = ["LatentCache"]


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
        kv_format: ``None`` (rows stored in ``dtype``) or ``"fp8_ds_mla"``.
        kv_lora_rank: latent width ``dc`` (FP8 only, required there: a multiple of 128, ``<= head_dim``).

    Raises:
        ValueError: bad sizes or ``kv_format``; ``RuntimeError`` when the pool runs out of pages.
    """

    def __init__(self, num_layers: int, head_dim: int, *, num_pages: int, page_size: int = 64,
                 dtype: torch.dtype = torch.float32, device=None, kv_format: str | None = None,
                 kv_lora_rank: int | None = None):
        for name, val in (("num_layers", num_layers), ("head_dim", head_dim), ("num_pages", num_pages),
                          ("page_size", page_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if kv_format not in KV_FORMATS:
            raise ValueError(f"kv_format: expected one of {KV_FORMATS}, got {kv_format!r}")
        self.num_layers, self.head_dim, self.num_pages, self.page_size = num_layers, head_dim, num_pages, page_size
        self.dtype, self.device = dtype, torch.device(device) if device is not None else torch.device("cpu")
        self.kv_format, self.kv_lora_rank = kv_format, kv_lora_rank
        if kv_format == FP8_DS_MLA:
            if not isinstance(kv_lora_rank, int) or not 0 < kv_lora_rank <= head_dim:
                raise ValueError(f"kv_lora_rank: kv_format={FP8_DS_MLA!r} needs the latent width in "
                                 f"[1, head_dim={head_dim}], got {kv_lora_rank!r}")
            #: Bytes of one stored row (one token, one layer).
            self.row_bytes = fp8_ds_mla_row_bytes(kv_lora_rank, head_dim - kv_lora_rank)
            shape, store = (num_pages, page_size, 1, self.row_bytes), torch.uint8
        else:
            self.row_bytes = head_dim * torch.empty((), dtype=dtype).element_size()
            shape, store = (num_pages, page_size, 1, head_dim), dtype
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
        self._step_starts: list[int] = []
        self._step_lens: list[int] = []
        self._extra: list[dict[str, torch.Tensor]] = [{} for _ in range(num_layers)]

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

    def seq_len(self, seq_id: int) -> int:
        """Tokens cached for ``seq_id``."""
        return self._lens[seq_id]

    def begin_step(self, seq_ids, num_new) -> None:
        """Reserve room for ``num_new`` tokens (an int or one per sequence) appended to each of ``seq_ids``.

        Sets ``seq_ids``, ``step_start`` (int32 [B], position of the first new token),
        ``step_len`` (int32 [B]), ``cache_seqlens`` (int32 [B], lengths after the step) and
        ``block_table`` (int32 [B, max_pages]) on the cache's device.

        Raises:
            KeyError: unknown sequence id. RuntimeError: not enough free pages.
        """
        seq_ids = list(seq_ids)
        if isinstance(num_new, int):
            num_new = [num_new] * len(seq_ids)
        num_new = [int(n) for n in num_new]
        if len(num_new) != len(seq_ids) or min(num_new, default=0) < 0:
            raise ValueError(f"num_new: expected {len(seq_ids)} non-negative counts, got {num_new}")
        need = 0
        for i, n in zip(seq_ids, num_new):
            if i not in self._lens:
                raise KeyError(f"seq_ids: unknown sequence {i}")
            need += -(-(self._lens[i] + n) // self.page_size) - len(self._pages[i])
        if need > len(self._free):
            raise RuntimeError(
                f"PagedLatentCache: {need} more pages needed, {len(self._free)} free of {self.num_pages}"
            )
        starts = []
        for i, n in zip(seq_ids, num_new):
            starts.append(self._lens[i])
            self._lens[i] += n
            while len(self._pages[i]) * self.page_size < self._lens[i]:
                self._pages[i].append(self._free.pop())
        width = max([len(self._pages[i]) for i in seq_ids] + [1])
        table = [self._pages[i] + [-1] * (width - len(self._pages[i])) for i in seq_ids]
        dev = self.device
        self.seq_ids = seq_ids
        self.block_table = torch.tensor(table, dtype=torch.int32, device=dev).view(len(seq_ids), width)
        self.step_start = torch.tensor(starts, dtype=torch.int32, device=dev)
        self.step_len = torch.tensor(num_new, dtype=torch.int32, device=dev)
        self.cache_seqlens = torch.tensor([self._lens[i] for i in seq_ids], dtype=torch.int32, device=dev)
        self._step_starts, self._step_lens = starts, num_new

    @property
    def step_is_prefill(self) -> bool:
        """True when every sequence of the current step starts empty."""
        return all(s == 0 for s in self._step_starts)

    @property
    def step_uniform_len(self) -> int | None:
        """The common number of new tokens of the step, or None when it differs between sequences."""
        lens = set(self._step_lens)
        return lens.pop() if len(lens) == 1 else None

    def max_seqlen(self) -> int:
        """Longest sequence of the current step (after it)."""
        return max((self._lens[i] for i in self.seq_ids), default=0)

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
        return self._pools[layer_idx]

    def write(self, layer_idx: int, rows: torch.Tensor) -> None:
        """Store the current step's new rows: ``rows [B, T, head_dim]``; row ``t`` of sequence ``b`` goes to
        position ``step_start[b] + t`` for ``t < step_len[b]`` (later rows are padding, ignored).

        An FP8 cache quantizes the rows (``mla.quant.quantize_fp8_ds_mla``; any floating dtype).

        Raises:
            ValueError: ``layer_idx`` out of range, or a shape that does not match the step (fewer than
                ``max(step_len)`` rows would leave reserved positions holding stale data).
            TypeError: non-floating rows for an FP8 cache.
        """
        self._check_layer(layer_idx)
        B = len(self.seq_ids)
        if B == 0:
            raise ValueError("write: no step is open; call begin_step(seq_ids, num_new) first")
        if rows.dim() != 3 or rows.shape[0] != B or rows.shape[2] != self.head_dim:
            raise ValueError(f"rows: expected [B={B}, T, {self.head_dim}], got {tuple(rows.shape)}")
        T = rows.shape[1]
        need = max(self._step_lens, default=0)
        if T < need:
            raise ValueError(f"rows: the step reserved {need} new positions for a sequence, got only {T} rows")
        t = torch.arange(T, device=self.device)[None, :]
        valid = t < self.step_len.long()[:, None]
        pos = self.step_start.long()[:, None] + t
        page_col = torch.clamp(pos // self.page_size, max=self.block_table.shape[1] - 1)
        pages = torch.gather(self.block_table.long(), 1, page_col)
        slots = pos % self.page_size
        pool = self._pools[layer_idx]
        new = rows.detach()[valid]
        if self.kv_format == FP8_DS_MLA:
            if not new.is_floating_point():
                raise TypeError(f"rows: an {FP8_DS_MLA} cache quantizes floating-point rows, got {rows.dtype}")
            new = quantize_fp8_ds_mla(new, self.kv_lora_rank)
        pool[pages[valid], slots[valid], 0] = new.to(pool.dtype)

    def dequantize(self, layer_idx: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Page pool of ``layer_idx`` as rows ``[num_pages, page_size, 1, head_dim]`` in ``dtype`` (default
        the cache's): decoded FP8 rows (a new tensor), or the pool itself cast for an unquantized cache.

        Raises:
            ValueError: ``layer_idx`` out of range.
        """
        self._check_layer(layer_idx)
        dtype = dtype or self.dtype
        if self.kv_format == FP8_DS_MLA:
            return dequantize_fp8_ds_mla(self._pools[layer_idx], self.kv_lora_rank,
                                         self.head_dim - self.kv_lora_rank, dtype)
        return self._pools[layer_idx].to(dtype)

    def gather(self, layer_idx: int) -> torch.Tensor:
        """Contiguous rows ``[B, max_seqlen, head_dim]`` of the current step's sequences (zeros past each length;
        an FP8 cache's rows are dequantized to ``dtype``)."""
        from mla.functional import _gather_pages

        rows = _gather_pages(self._pools[layer_idx], self.block_table, self.cache_seqlens, self.max_seqlen())
        if self.kv_format == FP8_DS_MLA:
            rows = dequantize_fp8_ds_mla(rows, self.kv_lora_rank, self.head_dim - self.kv_lora_rank, self.dtype)
        return rows

    def update_extra(self, layer_idx: int, name: str, value: torch.Tensor) -> torch.Tensor:
        """Per-layer side tensors ``[B, max_seqlen, ...]`` for the current batch (e.g. indexer keys).

        ``value [B, T, ...]`` holds the step's new rows (placed at ``step_start[b] + t``); returns the
        whole tensor (zeros past each sequence's length). Tied to the batch order of ``seq_ids``.
        """
        B, T = value.shape[:2]
        S = self.max_seqlen()
        old = self._extra[layer_idx].get(name)
        buf = value.new_zeros(B, S, *value.shape[2:])
        if old is not None and old.shape[0] == B:
            n = min(old.shape[1], S)
            buf[:, :n] = old[:, :n]
        t = torch.arange(T, device=value.device)[None, :]
        valid = t < self.step_len.long().to(value.device)[:, None]
        pos = (self.step_start.long().to(value.device)[:, None] + t).clamp(max=max(S - 1, 0))
        bidx = torch.arange(B, device=value.device)[:, None].expand(B, T)
        buf[bidx[valid], pos[valid]] = value.detach()[valid]
        self._extra[layer_idx][name] = buf
        return buf

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token, summed over layers: ``num_layers · row_bytes`` (``row_bytes``:
        ``head_dim · element size``, or 656 for a DeepSeek-V3 row in ``fp8_ds_mla`` vs 1,152 in bf16)."""
        return self.num_layers * self.row_bytes
