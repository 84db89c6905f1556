"""``MultiHeadLatentAttention``: DeepSeek-V2/V3 MLA (arXiv 2405.04434 §2.1, 2412.19437 §2.1)."""

from __future__ import annotations

import torch
from torch import nn

from mla.attention.common import (
    FORMS,
    AttentionStats,
    RMSNorm,
    _causal_density_t,
    _check_input_dtype,
    _head_max,
    causal_density,
)
from mla.cache import LatentCache, PagedLatentCache
from mla.config import MLAConfig, require_config
from mla.functional import (
    attention_probs,
    attention_with_stats,
    latent_attention_varlen,
    mla_decode,
    resolve_backend,
)
from mla.rope import RotaryEmbedding, apply_rotary, yarn_softmax_scale


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 Multi-Head Latent Attention with transformers' ``DeepseekV3Attention`` weights.

    Parameters (names as in transformers): ``q_proj`` ``[H·(dn+dr), E]`` when ``q_lora_rank`` is None,
    else ``q_a_proj`` ``[q_lora_rank, E]``, ``q_a_layernorm``, ``q_b_proj`` ``[H·(dn+dr), q_lora_rank]``;
    ``kv_a_proj_with_mqa`` ``[dc+dr, E]``; ``kv_a_layernorm`` (dc); ``kv_b_proj`` ``[H·(dn+dv), dc]``;
    ``o_proj`` ``[E, H·dv]``. Softmax scale ``(dn+dr)^-0.5`` times YaRN ``mscale²``.

    Args:
        config: ``MLAConfig``.
        layer_idx: index of this layer in a ``LatentCache`` (default 0).
        form: ``"naive"``, ``"absorbed"`` or ``"auto"`` (absorbed when a cache is used and the new
            chunk has at most ``absorb_max_q`` tokens — decode — naive otherwise).
        backend: as in ``mla.functional.latent_attention``.

    ``forward(hidden_states [B,T,E], *, position_ids=None, cache=None, attention_mask=None,
    causal=True, form=None, need_weights=False)`` returns ``(out [B,T,E], stats)`` (and the
    ``[B,H,T,S]`` probabilities as a third element when ``need_weights``). Packed documents:
    ``cu_seqlens`` int32 ``[D+1]`` (and ``max_seqlen``, default: the longest) splits the tokens of a
    ``[1, total, E]`` batch into ``D`` documents (``mla.functional.latent_attention_varlen``: no attention
    across documents; positions restart at 0 in each document unless ``position_ids`` are given; no cache,
    ``attention_mask`` or ``need_weights``). With a ``LatentCache``, the
    new ``[c_kv | k_rope]`` rows are appended and attention runs over all cached tokens (causal is
    bottom-right, so a chunk continuing a cache attends correctly). ``position_ids`` default to
    ``cached_length + arange(T)``. ``attention_mask`` ``[B, S]`` (1/True = real token) masks padded
    keys (reference path).

    Raises:
        ValueError: ``hidden_states`` of the wrong shape, unknown form.
    """

    absorb_max_q = 64
    # Head (tensor) parallelism, set by ``mla.parallel.parallelize_mla``: identity in the forward pass, sums
    # the gradient over the tensor-parallel ranks in backward. Applied to the latent rows that this rank's
    # heads consume directly (shared by all heads, so each rank's gradient is a partial sum).
    _shared_latent_grad_hook = None

    def __init__(self, config: MLAConfig, layer_idx: int | None = None, *, form: str = "auto", backend: str = "auto"):
        super().__init__()
        require_config(config)
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        self.config = config
        self.layer_idx = 0 if layer_idx is None else layer_idx
        self.form, self.backend = form, backend
        E, H = config.hidden_size, config.num_attention_heads
        self.num_heads = H
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.qk_head_dim = config.qk_head_dim
        bias = config.attention_bias
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(E, H * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(E, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(E, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_head_dim, E, bias=bias)
        self.rotary_emb = RotaryEmbedding(
            self.qk_rope_head_dim, config.rope_parameters, config.max_position_embeddings
        )
        self.softmax_scale = yarn_softmax_scale(self.qk_head_dim, config.rope_parameters)
        # Sliding window (HF semantics: the token and the sliding_window - 1 before it) and per-head sinks.
        w = config.sliding_window
        self.window_size = (-1, -1) if w is None else (w - 1, 0)
        self.sinks = nn.Parameter(torch.zeros(H, dtype=torch.float32)) if config.attention_sinks else None

    # -- pieces shared with LatentSparseAttention and the transformers integration -------------
    def project_q(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Queries ``[B, T, H, dn + dr]`` (before RoPE) and the normed query latent (None without q_lora).

        ``H`` is this rank's head count (``num_heads / tp`` when sharded by ``mla.parallel``)."""
        B, T, _ = hidden_states.shape
        if self.q_lora_rank is None:
            return self.q_proj(hidden_states).view(B, T, -1, self.qk_head_dim), None
        q_lat = self.q_a_layernorm(self.q_a_proj(hidden_states))
        return self.q_b_proj(q_lat).view(B, T, -1, self.qk_head_dim), q_lat

    def project_kv_latent(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_kv [B, T, dc] normed, k_rope [B, T, dr] before RoPE)``."""
        ckv = self.kv_a_proj_with_mqa(hidden_states)
        c_kv, k_rope = torch.split(ckv, [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        return self.kv_a_layernorm(c_kv), k_rope

    def _weights_uk_uv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of ``kv_b_proj.weight``: ``W_UK [H, dn, dc]`` and ``W_UV [H, dv, dc]`` (this rank's heads
        when the weight is a tensor-parallel ``DTensor`` shard)."""
        w = self.kv_b_proj.weight
        if hasattr(w, "to_local"):  # DTensor (head-parallel): the local rows are this rank's heads
            w = w.to_local()
        w = w.view(-1, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _shared_latent(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (latent rows used by every head); under head parallelism its gradient is summed over ranks."""
        hook = self._shared_latent_grad_hook
        return t if hook is None else hook(t)

    def rope(self, q_rope: torch.Tensor, k_rope: torch.Tensor, position_ids: torch.Tensor):
        """Rotate ``q_rope [B,T,H,dr]`` and ``k_rope [B,T,dr]`` at ``position_ids [B|1, T]``."""
        cos, sin = self.rotary_emb(position_ids, dtype=q_rope.dtype)
        il = self.config.rope_interleave
        q_rope = apply_rotary(q_rope, cos, sin, il)
        k_rope = apply_rotary(k_rope[:, :, None], cos, sin, il)[:, :, 0]
        return q_rope, k_rope

    def resolve_form(self, form: str | None, T: int, cached: bool) -> str:
        """The form one call runs: ``form`` (None: the module's), ``"auto"`` resolved to ``"absorbed"`` for a
        cached step of at most ``absorb_max_q`` query tokens ``T``, else ``"naive"``.

        Raises:
            ValueError: ``form`` not one of ``FORMS``.
        """
        form = form or self.form
        if form not in FORMS:
            raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
        if form == "auto":
            return "absorbed" if cached and T <= self.absorb_max_q else "naive"
        return form

    def build_qkv(self, q_nope, q_rope, latent, form: str):
        """Attention inputs for ``form``: ``(q, k, v)`` with ``latent [B, S, dc+dr]`` rows ``[c_kv | k_rope]``."""
        B, S, _ = latent.shape
        dn, dr, dc = self.qk_nope_head_dim, self.qk_rope_head_dim, self.kv_lora_rank
        if form == "absorbed":
            q = self.absorb_q(q_nope, q_rope)
            k = self._shared_latent(latent)[:, :, None, :]
            v = k[..., :dc]  # a prefix view of k: the kernels load the latent tile once
            return q, k, v
        kv = self.kv_b_proj(latent[..., :dc]).view(B, S, -1, dn + self.v_head_dim)
        H = kv.shape[2]
        k_nope, v = torch.split(kv, [dn, self.v_head_dim], dim=-1)
        k_rope = self._shared_latent(latent[..., dc:])
        k = torch.cat([k_nope, k_rope[:, :, None, :].expand(B, S, H, dr)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        return q, k, v

    def finish(self, out: torch.Tensor, form: str) -> torch.Tensor:
        """``o_proj`` of the attention output (after ``W_UV`` in the absorbed form). out ``[B,T,H,·]``."""
        B, T = out.shape[:2]
        if form == "absorbed":
            _, w_uv = self._weights_uk_uv()
            out = torch.einsum("bthc,hvc->bthv", out, w_uv.to(out.dtype))
        return self.o_proj(out.reshape(B, T, -1))

    def absorb_q(self, q_nope: torch.Tensor, q_rope: torch.Tensor) -> torch.Tensor:
        """Absorbed query ``[B, T, H, dc + dr]``: ``cat(q_nope · W_UK, q_rope)``."""
        w_uk, _ = self._weights_uk_uv()
        return torch.cat([torch.einsum("bthn,hnc->bthc", q_nope, w_uk.to(q_nope.dtype)), q_rope], dim=-1)

    def _prepare(self, hidden_states, position_ids, cache):
        """Project and rotate; store the new latent rows in ``cache``.

        Returns ``(q_nope, q_rope, q_latent, latent, position_ids)`` where ``latent [B, S, dc+dr]`` are
        all rows to attend over (for a ``PagedLatentCache``: only the new rows; the pages hold the rest).
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states: expected [B, T, {self.config.hidden_size}], got {tuple(hidden_states.shape)}"
            )
        _check_input_dtype("hidden_states", hidden_states, self.kv_a_proj_with_mqa.weight.dtype)
        B, T, _ = hidden_states.shape
        device = hidden_states.device
        paged = isinstance(cache, PagedLatentCache)
        if paged and len(cache.seq_ids) != B:
            raise ValueError(f"cache: the current step has {len(cache.seq_ids)} sequences, hidden_states has {B}")
        if position_ids is None:
            if paged:
                position_ids = cache.step_start.to(device).long()[:, None] + torch.arange(T, device=device)
            else:
                past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_ids = torch.arange(past, past + T, device=device)[None]
        q, q_latent = self.project_q(hidden_states)
        q_nope, q_rope = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.project_kv_latent(hidden_states)
        q_rope, k_rope = self.rope(q_rope, k_rope, position_ids)
        # Under autocast RMSNorm's fp32 weight promotes c_kv to fp32: attend in the queries' dtype.
        latent = torch.cat([c_kv, k_rope], dim=-1).to(q.dtype)
        if paged:
            cache.write(self.layer_idx, latent.to(cache.dtype))  # e.g. bf16 autocast rows into an fp32 cache
        elif cache is not None:
            latent = cache.update(self.layer_idx, latent)
        return q_nope, q_rope, q_latent, latent, position_ids

    @staticmethod
    def _key_mask(attention_mask, B, S, device):
        if attention_mask is None:
            return None
        if attention_mask.shape != (B, S):
            raise ValueError(f"attention_mask: expected [B, S] = {[B, S]}, got {list(attention_mask.shape)}")
        return attention_mask.to(device=device).bool()[:, None, None, :]

    @staticmethod
    def _paged_decode_step(cache, T: int, need_weights: bool, attention_mask) -> bool:
        """Whether this call attends over the pages (not a fresh prefill); checks what that path needs."""
        if not isinstance(cache, PagedLatentCache) or cache.step_is_prefill:
            return False
        if cache.step_uniform_len != T:
            raise ValueError(
                f"cache: a step continuing cached sequences must append the same number of tokens to each "
                f"(T={T}), got {cache._step_lens}"
            )
        if need_weights or attention_mask is not None:
            raise ValueError("need_weights / attention_mask are not supported when decoding over a PagedLatentCache")
        return True

    def _sinks(self):
        """The fp32 ``[H]`` sink logits (the parameter stays fp32 even in a half-precision module) or None."""
        sinks = getattr(self, "sinks", None)
        return None if sinks is None else sinks.float()

    def _window(self):
        return getattr(self, "window_size", (-1, -1))

    def _decode(self, q_abs, cache, topk_indices=None):
        """``mla_decode`` of absorbed queries over the pages of ``cache`` (causal per sequence)."""
        out, lse = mla_decode(
            q_abs, cache.kv_cache(self.layer_idx), cache.block_table, cache.cache_seqlens,
            softmax_scale=self.softmax_scale, head_dim_v=self.kv_lora_rank, causal=True,
            topk_indices=topk_indices, backend=self.backend, check_inputs=False, kv_format=cache.kv_format,
            window_size=self._window(), sinks=self._sinks(),
        )
        return out, resolve_backend(self.backend, q_abs.device, q_abs.dtype)

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
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ):
        if cu_seqlens is not None:
            return self._forward_packed(hidden_states, cu_seqlens, max_seqlen, position_ids, cache, attention_mask,
                                        causal, form, need_weights)
        q_nope, q_rope, _, latent, _ = self._prepare(hidden_states, position_ids, cache)
        B, T = q_nope.shape[:2]
        if self._paged_decode_step(cache, T, need_weights, attention_mask):
            if not causal:
                raise ValueError("causal=False is not supported when decoding over a PagedLatentCache")
            out, backend = self._decode(self.absorb_q(q_nope, q_rope), cache)
            density = _causal_density_t(T, cache.cache_seqlens.max())  # over the longest sequence, lazily
            return self.finish(out, "absorbed"), AttentionStats(
                backend, self.kv_lora_rank + self.qk_rope_head_dim, density, None, "absorbed"
            )
        S = latent.shape[1]
        form = self.resolve_form(form, T, cache is not None)
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        keep = self._key_mask(attention_mask, B, S, q.device)
        res = attention_with_stats(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, attn_mask=keep, backend=self.backend,
            window_size=self._window(), sinks=self._sinks(),
        )
        out = self.finish(res.out, form)
        density = causal_density(T, S) if causal else 1.0
        stats = AttentionStats(res.backend, q.shape[-1], density, _head_max(res.max_logit), form)
        if need_weights:
            probs = attention_probs(
                q.detach(), k.detach(), res.lse.detach(), softmax_scale=self.softmax_scale, causal=causal,
                attn_mask=keep, window_size=self._window(),
            )
            return out, stats, probs
        return out, stats


    def _forward_packed(self, hidden_states, cu_seqlens, max_seqlen, position_ids, cache, attention_mask, causal,
                        form, need_weights):
        """``forward`` over packed documents (see the class docstring)."""
        if cache is not None or attention_mask is not None or need_weights:
            raise ValueError("cu_seqlens: packed documents take no cache, attention_mask or need_weights")
        if hidden_states.dim() != 3 or hidden_states.shape[0] != 1:
            raise ValueError(f"cu_seqlens: hidden_states must be one packed row [1, total, E], got "
                             f"{tuple(hidden_states.shape)}")
        if position_ids is None:
            position_ids = packed_position_ids(cu_seqlens, hidden_states.shape[1])[None]
        if max_seqlen is None:
            max_seqlen = int(cu_seqlens.diff().max()) if cu_seqlens.numel() > 1 else 0
        q_nope, q_rope, _, latent, _ = self._prepare(hidden_states, position_ids, None)
        form = self.resolve_form(form, q_nope.shape[1], False)
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        out = latent_attention_varlen(q[0], k[0], v[0], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                      softmax_scale=self.softmax_scale, causal=causal, backend=self.backend)
        backend = resolve_backend(self.backend, q.device, q.dtype)
        # Pairs attended over the packed total x total grid (per document: causal triangle or square).
        lens = cu_seqlens.diff().double()
        pairs = (lens * (lens + 1) / 2).sum() if causal else (lens * lens).sum()
        density = pairs / max(q.shape[1], 1) ** 2
        return self.finish(out[None], form), AttentionStats(backend, q.shape[-1], density, None, form)


def packed_position_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 ``[total]`` positions that restart at 0 at each ``cu_seqlens`` boundary (packed documents)."""
    cu = cu_seqlens.long()
    starts = torch.repeat_interleave(cu[:-1], cu.diff(), output_size=total)
    return torch.arange(total, device=cu.device) - starts
