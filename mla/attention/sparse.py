"""Sparse MLA: ``LightningIndexer`` (DeepSeek-V3.2 DSA), ``indexer_kl_loss`` and ``LatentSparseAttention``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mla.attention.common import AttentionStats, _head_max
from mla.attention.mla import MultiHeadLatentAttention
from mla.cache import LatentCache, PagedLatentCache
from mla.config import MLAConfig
from mla.functional import attention_probs, attention_with_stats
from mla.rope import apply_rotary
from mla.sparsity import BlockMask, select_topk_blocks, topk_indices_from_scores


class LightningIndexer(nn.Module):
    """DeepSeek Sparse Attention's lightning indexer (DeepSeek-V3.2 report): cheap scores that pick keys.

    ``I[t, s] = Σ_j w[t, j] · ReLU(q_idx[t, j] · k_idx[s])`` with ``n_heads`` small indexer heads of
    ``head_dim`` channels; the first ``rope_dim`` channels of ``q_idx``/``k_idx`` carry RoPE, half-split as
    DeepSeek-V3.2 applies it (``rope_interleave=False``; GLM-5 interleaves its pairs: ``True``).
    ``w = weights_proj(x) · n_heads^-0.5 · head_dim^-0.5``; ``k_idx = LayerNorm(wk(x))`` with eps 1e-6.

    Parameter names are DeepSeek-V3.2's (transformers ``DeepseekV32Indexer``): ``wq_b`` (``[n_heads·head_dim,
    q_in_dim]``), ``wk``, ``k_norm`` (weight and bias), ``weights_proj``; a state dict of ours from before the
    rename (``wq.weight``) still loads.

    Args:
        hidden_size: E; q_in_dim: width of the query input (the q latent, or E); n_heads, head_dim,
        rope_dim: indexer sizes; rope_interleave: RoPE on interleaved pairs (default half-split).

    ``forward(hidden_states [B,T,E], q_input [B,T,q_in_dim], cos, sin, keys=None)`` returns
    ``scores [B, T, S]`` float32 over ``keys [B, S, head_dim]`` (all cached + new keys) when given, else
    over the new tokens' own keys (``S = T``).
    """

    def __init__(
        self, hidden_size: int, q_in_dim: int, n_heads: int, head_dim: int, rope_dim: int, *,
        rope_interleave: bool = False,
    ):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = n_heads, head_dim, rope_dim
        self.rope_interleave = rope_interleave
        self.wq_b = nn.Linear(q_in_dim, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(hidden_size, head_dim, bias=False)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)  # DeepSeek-V3.2's reference and transformers: 1e-6
        self.weights_proj = nn.Linear(hidden_size, n_heads, bias=False)

    @property
    def wq(self) -> nn.Linear:
        """The query projection under its old name (now ``wq_b``, as DeepSeek-V3.2 names it)."""
        return self.wq_b

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        old = prefix + "wq.weight"
        if old in state_dict and prefix + "wq_b.weight" not in state_dict:  # checkpoints from before the rename
            state_dict[prefix + "wq_b.weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _rope(self, x, cos, sin):
        r = apply_rotary(x[..., : self.rope_dim], cos, sin, interleaved=self.rope_interleave)
        return torch.cat([r, x[..., self.rope_dim :]], dim=-1)

    def keys(self, hidden_states, cos, sin):
        """Indexer keys ``[B, T, head_dim]`` for new tokens (RoPE applied)."""
        k = self.k_norm(self.wk(hidden_states))
        return self._rope(k[:, :, None], cos, sin)[:, :, 0]

    def forward(self, hidden_states, q_input, cos, sin, keys=None):
        B, T, _ = hidden_states.shape
        q = self.wq_b(q_input).view(B, T, self.n_heads, self.head_dim)
        q = self._rope(q, cos, sin)
        k = self.keys(hidden_states, cos, sin) if keys is None else keys
        w = self.weights_proj(hidden_states).float() * (self.n_heads**-0.5 * self.head_dim**-0.5)
        logits = F.relu(torch.einsum("btjd,bsd->btjs", q.float(), k.float()))
        return torch.einsum("btj,btjs->bts", w, logits)


def indexer_kl_loss(index_scores: torch.Tensor, attn_probs: torch.Tensor) -> torch.Tensor:
    """KL(p_attn ‖ softmax(I)) averaged over query rows: the DeepSeek-V3.2 indexer warm-up loss.

    Args:
        index_scores: ``[B, T, S]`` indexer scores, ``-inf`` where a key may not be chosen.
        attn_probs: ``[B, H, T, S]`` dense attention probabilities; the target sums them over heads and
            L1-normalises each row.

    Returns:
        Scalar float32; 0 when ``softmax(index_scores)`` equals the target. Rows with no key are skipped.
    """
    target = attn_probs.detach().float().sum(dim=1)
    norm = target.sum(dim=-1, keepdim=True)
    valid = norm.squeeze(-1) > 0
    target = target / norm.clamp_min(1e-30)
    logp = torch.log_softmax(index_scores.float().masked_fill(~torch.isfinite(index_scores), -1e30), dim=-1)
    kl = torch.where(target > 0, target * (torch.log(target.clamp_min(1e-30)) - logp), torch.zeros_like(target))
    kl = kl.sum(dim=-1)
    return kl[valid].mean() if bool(valid.any()) else kl.sum() * 0


def _check_sparse_form(form: str | None) -> None:
    """``LatentSparseAttention`` runs the absorbed form only: ``None``/``"auto"``/``"absorbed"`` pass."""
    if form not in (None, "auto", "absorbed"):
        raise ValueError(
            f"form: LatentSparseAttention always runs the absorbed form (one latent kv head, as DeepSeek-V3.2's "
            f"sparse attention); expected 'absorbed' or 'auto', got {form!r}"
        )


class LatentSparseAttention(MultiHeadLatentAttention):
    """MLA with a sparse key set per query token: the hybrid of DESIGN §5.

    Always runs the absorbed form (one latent kv head shared by all heads, heads packed in the kernel
    tile), as DeepSeek-V3.2 does for its sparse attention. Per query token (bottom-right causal):

    * ``mode="block"``: key blocks of ``sparse_block_size`` tokens; the token keeps the first
      ``num_sink_blocks`` blocks, the ``num_local_blocks`` blocks ending at its own block (>= 1), and the
      ``topk_blocks`` best other visible blocks, scored in latent space as its absorbed query latent
      (``q_nope · W_UK`` averaged over heads) against the mean-pooled compressed keys ``c_kv`` of each
      block (MoBA, arXiv 2502.13189 / NSA, arXiv 2502.11089 style). The choice is a ``BlockMask`` with
      query blocks of one token, run by the block-sparse kernel; inside kept blocks causality is per token.
    * ``mode="topk"``: a ``LightningIndexer`` scores the keys and the token keeps its ``index_topk`` best
      (DeepSeek Sparse Attention); run by the top-k kernel. With ``indexer_loss=True`` the forward also
      returns ``indexer_kl_loss`` against the dense attention distribution in ``stats.indexer_loss``.

    Selection only looks at complete past blocks / past keys, so incremental decoding (``LatentCache`` or
    ``PagedLatentCache``; decode steps use ``mla_decode`` with top-k token indices) equals the full forward.
    Over a ``PagedLatentCache`` the layer keeps its pooled block keys (running ``c_kv`` sums per block,
    ``add_block_sums``) and its indexer keys (``write_tokens``) in the cache as tokens are written, so a
    decode step selects without re-reading the cached rows, with fixed shapes and no host sync.
    Weights as ``MultiHeadLatentAttention`` (+ ``indexer.*`` in topk mode). Selection is not
    differentiable; gradients flow through the attention over the kept keys (and the indexer's KL loss).
    Returns ``(out, stats)`` like its parent, with ``density`` and ``visited_blocks``/``visited_tokens``.

    ``form`` (constructor and ``forward``) is accepted for signature compatibility with
    ``MultiHeadLatentAttention`` only: the sparse paths always run the absorbed form, so ``"absorbed"``,
    ``"auto"`` (and ``None`` in ``forward``) select it and ``"naive"`` raises.

    Raises:
        ValueError: unknown mode, ``num_local_blocks < 1`` in block mode, ``causal=False``, ``form="naive"``
            or an unknown form.
    """

    MODES = ("block", "topk")

    def __init__(
        self,
        config: MLAConfig,
        layer_idx: int | None = None,
        *,
        mode: str = "block",
        form: str = "absorbed",
        backend: str = "auto",
        indexer_loss: bool = False,
    ):
        _check_sparse_form(form)
        super().__init__(config, layer_idx, form="absorbed", backend=backend)
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {self.MODES}, got {mode!r}")
        if mode == "block" and config.num_local_blocks < 1:
            raise ValueError("num_local_blocks: block mode needs >= 1 (a token must keep its own block)")
        self.mode = mode
        self.indexer_loss = indexer_loss
        if mode == "topk":
            self.indexer = LightningIndexer(
                config.hidden_size, config.q_lora_rank or config.hidden_size, config.index_n_heads,
                config.index_head_dim, config.qk_rope_head_dim, rope_interleave=config.index_rope_interleave,
            )

    def _block_grid(self, q_abs, block_sums, key_len, pos):
        """bool ``[B, T, nK]`` key blocks kept per query token.

        q_abs ``[B, T, H, dc+dr]``; block_sums ``[B, nK, dc]`` sums of the compressed keys ``c_kv`` per
        block (0 past ``key_len``); key_len ``[B]``; pos ``[B|1, T]`` key-aligned position of each query.
        """
        cfg, dc = self.config, self.kv_lora_rank
        bs = cfg.sparse_block_size
        nk = block_sums.shape[1]
        dev = block_sums.device
        with torch.no_grad():
            qm = q_abs[..., :dc].float().mean(dim=2)
            start = torch.arange(nk, device=dev) * bs
            cnt = (key_len.to(dev).long()[:, None] - start[None, :]).clamp(1, bs)
            scores = torch.einsum("btc,bkc->btk", qm, (block_sums / cnt[..., None].to(block_sums.dtype)).float())
            allowed = start[None, None, :] <= pos[..., None]
            return select_topk_blocks(
                scores, cfg.topk_blocks, allowed, num_sink_blocks=cfg.num_sink_blocks,
                num_local_blocks=cfg.num_local_blocks,
            )

    def _block_sums(self, rows):
        """``[B, ceil(S / block), dc]`` fp32 sums of ``c_kv`` per key block of ``rows [B, S, dc+dr]``."""
        bs, dc = self.config.sparse_block_size, self.kv_lora_rank
        B, S = rows.shape[:2]
        nk = math.ceil(S / bs)
        return F.pad(rows[..., :dc].detach().float(), (0, 0, 0, nk * bs - S)).view(B, nk, bs, dc).sum(2)

    def _block_tokens(self, grid, pos):
        """int32 ``[B, T, n·bs]`` token positions of the kept blocks (``n = min(nK, sinks + local + topk)``,
        a bound on the kept blocks: fixed shapes), ``-1`` for positions past ``pos`` and unused lanes."""
        cfg, bs = self.config, self.config.sparse_block_size
        nk = grid.shape[-1]
        n = min(nk, cfg.num_sink_blocks + cfg.num_local_blocks + cfg.topk_blocks)
        kcol = torch.arange(nk, device=grid.device)
        # Kept blocks in ascending order: the largest keys nk - k of the kept columns.
        key = torch.where(grid, nk - kcol, torch.zeros((), dtype=kcol.dtype, device=grid.device))
        blk = nk - torch.topk(key, n, dim=-1).values
        tok = blk[..., None] * bs + torch.arange(bs, device=grid.device)
        ok = (blk[..., None] < nk) & (tok <= pos[..., None, None])
        return torch.where(ok, tok, -1).flatten(-2).to(torch.int32)

    @staticmethod
    def _kept_tokens(grid, pos, bs: int, S: int) -> torch.Tensor:
        """bool ``[B, T, S]``: tokens of the kept blocks that the query may see (``s <= pos``)."""
        s = torch.arange(S, device=grid.device)
        # Index by block rather than repeat-and-slice: no guard on S being a multiple of bs under compile.
        return grid[..., s // bs] & (s <= pos[..., None])

    def _indexer_scores(self, hidden_states, q_latent, position_ids, cache):
        """Indexer scores ``[B, T, S]`` over the keys: the new tokens' own (no cache, paged prefill), all
        cached ones (``LatentCache``), or a paged decode step's ``[B, capacity]`` pages."""
        cos, sin = self.rotary_emb(position_ids, dtype=hidden_states.dtype)
        # The indexer trains on its own loss: its inputs are detached from the main model (DeepSeek-V3.2).
        x_idx = hidden_states.detach()
        q_in = x_idx if q_latent is None else q_latent.detach()
        keys = None
        if isinstance(cache, PagedLatentCache):
            keys = self.indexer.keys(x_idx, cos, sin)
            cache.write_tokens(self.layer_idx, "index_keys", keys)
            if not cache.step_is_prefill:
                keys = cache.gather_tokens(self.layer_idx, "index_keys")
        elif cache is not None:
            keys = cache.update_extra(self.layer_idx, "index_keys", self.indexer.keys(x_idx, cos, sin))
        return self.indexer(x_idx, q_in, cos, sin, keys)

    def forward(
        self,
        hidden_states: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: LatentCache | PagedLatentCache | None = None,
        attention_mask: torch.Tensor | None = None,
        causal: bool = True,
        form: str | None = None,
        need_weights: bool = False,
    ):
        _check_sparse_form(form)
        if not causal:
            raise ValueError("LatentSparseAttention is causal: sinks, local blocks and the indexer assume causal order")
        q_nope, q_rope, q_latent, latent, position_ids = self._prepare(hidden_states, position_ids, cache)
        B, T = q_nope.shape[:2]
        device = q_nope.device
        bs = self.config.sparse_block_size
        q_abs = self.absorb_q(q_nope, q_rope)
        paged = isinstance(cache, PagedLatentCache)
        if paged and self.mode == "block":  # pooled block keys, kept up to date as tokens are written
            cache.add_block_sums(self.layer_idx, "block_keys", latent[..., : self.kv_lora_rank], bs)
        decoding = self._paged_decode_step(cache, T, need_weights, attention_mask)
        if decoding:
            # Only device tensors and the table's fixed capacity: no read of the cached rows, no host sync.
            key_len = cache.cache_seqlens.to(device)
            pos = cache.step_start.to(device).long()[:, None] + torch.arange(T, device=device)
            S = cache.capacity
            s_max = key_len.max()
        else:
            key_len = torch.full((B,), latent.shape[1], dtype=torch.long, device=device)
            pos = (latent.shape[1] - T + torch.arange(T, device=device))[None]
            S = s_max = latent.shape[1]
        keep = None if decoding else self._key_mask(attention_mask, B, S, device)
        block_mask = topk = kl = None
        if self.mode == "block":
            sums = cache.block_sums(self.layer_idx, "block_keys") if decoding else self._block_sums(latent)
            grid = self._block_grid(q_abs, sums, key_len, pos)
            visited_blocks = grid.sum()
            if decoding:
                topk = self._block_tokens(grid, pos)[:, :, None]
                visited_tokens = (topk >= 0).sum()
            else:
                visited_tokens = self._kept_tokens(grid, pos, bs, S).sum()
                block_mask = BlockMask.from_dense(grid[:, None], (1, bs), (T, S))
        else:
            visited_blocks = None
            scores = self._indexer_scores(hidden_states, q_latent, position_ids, cache)[:, :, :S]
            allowed = (torch.arange(S, device=device) <= pos[..., None]) & (
                torch.arange(S, device=device) < key_len.to(device)[:, None, None]
            )
            if keep is not None:
                allowed = allowed & keep[:, 0]
            scores = scores.masked_fill(~allowed, float("-inf"))
            topk = topk_indices_from_scores(scores.detach()[:, :, None], self.config.index_topk)
            visited_tokens = (topk >= 0).sum()  # the lanes are distinct keys
            if self.indexer_loss and not decoding:
                q, k, v = q_abs, latent[:, :, None], latent[:, :, None, : self.kv_lora_rank]
                with torch.no_grad():
                    ref = attention_with_stats(
                        q, k, v, causal=True, softmax_scale=self.softmax_scale, attn_mask=keep,
                        return_max_logit=False, backend=self.backend,
                    )
                    dense = attention_probs(
                        q, k, ref.lse, softmax_scale=self.softmax_scale, causal=True, attn_mask=keep
                    )
                kl = indexer_kl_loss(scores, dense)
        # Kept on the device (read lazily through AttentionStats): over the longest sequence's keys.
        density = visited_tokens / (B * T * s_max if decoding else max(1, B * T * S))
        if decoding:
            out, backend = self._decode(q_abs, cache, topk[:, :, 0])
            stats = AttentionStats(
                backend, q_abs.shape[-1], density, None, "absorbed", visited_blocks, visited_tokens
            )
            return self.finish(out, "absorbed"), stats
        k = latent[:, :, None, :]
        v = k[..., : self.kv_lora_rank]
        res = attention_with_stats(
            q_abs, k, v, causal=True, softmax_scale=self.softmax_scale, block_mask=block_mask, topk_indices=topk,
            attn_mask=keep, backend=self.backend, check_indices=False,
        )
        out = self.finish(res.out, "absorbed")
        stats = AttentionStats(
            res.backend, q_abs.shape[-1], density, _head_max(res.max_logit), "absorbed", visited_blocks,
            visited_tokens, kl,
        )
        if need_weights:
            probs = attention_probs(
                q_abs.detach(), k.detach(), res.lse.detach(), softmax_scale=self.softmax_scale, causal=True,
                block_mask=block_mask, topk_indices=topk, attn_mask=keep,
            )
            return out, stats, probs
        return out, stats
