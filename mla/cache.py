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
