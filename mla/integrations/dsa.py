"""DeepSeek Sparse Attention (DSA) models of transformers on our kernels: DeepSeek-V3.2 and GLM-5.

transformers (5.24) ships ``DeepseekV32Attention`` (``deepseek_v32``) and ``GlmMoeDsaAttention``
(``glm_moe_dsa``): DeepSeek-V3 MLA plus a *lightning indexer* that picks ``index_topk`` keys per query token.
Their eager/sdpa paths fold the choice into a dense ``[B, 1, T, S]`` mask over per-head expanded K/V.
``patch_model`` (``mla.integrations.transformers``) replaces them by ``LatentDSAAttentionForHF``, which keeps
the same weights, cache and indexer module but

* lets the model's own indexer choose the keys, called exactly as transformers calls it (under ``no_grad``,
  its RoPE layout: half-split for V3.2, interleaved for GLM-5; its key cache ``cache.update_indexer``);
  GLM-5's ``"shared"`` layers (``config.indexer_types``) reuse the previous layer's choice, returned as the
  third output like the original;
* turns the choice into ``topk_indices`` (``-1`` for lanes naming a key the query may not see — when fewer
  than ``index_topk`` keys are visible, transformers' top-k still returns masked positions — and sorted
  ascending), shared by all heads;
* prefill: the absorbed form (one latent kv head ``[c_kv | k_rope]``, as DeepSeek runs DSA) through the top-k
  attention of ``mla.functional.attention_with_stats`` (a top-k Triton kernel with a backward on CUDA);
* decode (a cache and at most ``DECODE_MAX_Q`` new tokens): ``mla.functional.mla_decode`` with the top-k
  index lists over the cached latent rows (handed over as ``PAGE_SIZE``-row pages of one block table).

With ``attn_implementation="mla_latent"`` (no patching) transformers passes the indexer's choice as the
``indices`` keyword: ``latent_attention_forward`` hands it to ``sparse_attention_forward`` here, which runs the
same top-k attention on the per-head tensors the model built.

Not supported (refused by ``patch_model`` with the field named): GLM-5 ``indexer_types`` entries other than
``"full"``/``"shared"`` or a first layer that is ``"shared"``; ``index_topk < 1``; the ``FP8LatentCache``
(the indexer keys live in transformers' indexed cache layers).
"""

from __future__ import annotations

import torch
from torch import nn

from mla.functional import attention_with_stats, mla_decode
from mla.integrations import transformers as _mt

__all__ = ["DSA_ATTENTION_CLASSES", "DECODE_MAX_Q", "PAGE_SIZE", "LatentDSAAttentionForHF",
           "sparse_attention_forward", "topk_from_hf"]

# Both forwards were checked (transformers 5.24) to be DeepseekV3's MLA with interleaved RoPE on q_rope / k_rope
# (``apply_rotary_pos_emb_interleave``, whatever ``rope_interleave`` says), q_lora, the indexer's top-k folded into
# the mask; GLM-5 adds ``prev_topk_indices`` and a third output. Registered in ``_mt._SUPPORTED`` / ``_mt._BASES``.
#: transformers DSA attention classes ``patch_model`` replaces (by ``LatentDSAAttentionForHF`` subclasses).
DSA_ATTENTION_CLASSES: tuple[str, ...] = ("DeepseekV32Attention", "GlmMoeDsaAttention")

#: Decode steps of at most this many new tokens run ``mla_decode`` over the cached rows.
DECODE_MAX_Q = 8
#: Rows per page when the cached rows are handed to ``mla_decode`` (FlashMLA's page size).
PAGE_SIZE = 64


def _keep_mask(attention_mask, B: int, T: int, S: int, device) -> torch.Tensor:
    """Bool ``[B, T, S]``: which keys each query may see (True = attend), from any mask transformers builds
    (see ``_plan_mask``); causal bottom-right when the mask is None or 2-D.

    Under ``torch.compile`` the mask is read without host syncs (so the forward traces as one graph) and the
    additive-bias check, which reads values, is skipped: a float mask counts as "0 = attend".

    Raises:
        ValueError: a float mask carrying a genuine additive bias (DSA selects keys; it has no bias).
    """
    S_eff, causal, keep = _mt._plan_mask(attention_mask, B, T, S, device, causal=True)
    if keep is not None and keep.dtype != torch.bool and torch.compiler.is_compiling():
        keep = keep == 0
    elif keep is not None and keep.dtype != torch.bool:
        raise ValueError("attention_mask: a float mask with an additive bias (values other than 0 and the dtype's "
                         "minimum) cannot be combined with DSA's top-k selection")
    cols = torch.arange(S, device=device)
    out = (cols < S_eff)[None, None, :].expand(B, T, S)
    if causal:
        out = out & (cols[None, :] <= torch.arange(T, device=device)[:, None] + (S_eff - T))[None]
    if keep is not None:
        out = out.clone()
        out[..., :S_eff] &= keep[:, 0].expand(B, T, S_eff)
    return out


def topk_from_hf(indices: torch.Tensor, keep: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """transformers' indexer output as ``topk_indices``: int32 ``[B, T, K]``, ascending, ``-1`` padded.

    Args:
        indices: int ``[B, T, K]`` key positions from ``DeepseekV32Indexer`` / ``GlmMoeDsaIndexer`` (``topk`` of
            the masked scores: when fewer than ``K`` keys are visible it also lists masked ones).
        keep: bool ``[B, T, S]`` visibility (``_keep_mask``); lanes naming an invisible key become ``-1``.
        check: validate the positions (one device sync; eager only); the module skips it for its own indexer's
            output.

    Raises:
        TypeError: ``indices`` not an integer tensor, ``keep`` not a bool tensor.
        ValueError: shapes that do not fit, or positions outside ``[0, S)``.
    """
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype.is_complex \
            or indices.dtype == torch.bool:
        raise TypeError(f"indices: expected an integer torch.Tensor, got "
                        f"{indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__}")
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool:
        raise TypeError(f"keep: expected a bool torch.Tensor, got "
                        f"{keep.dtype if isinstance(keep, torch.Tensor) else type(keep).__name__}")
    if keep.dim() != 3:
        raise ValueError(f"keep: expected [B, T, S] (3-D), got shape {tuple(keep.shape)}")
    if indices.dim() != 3 or tuple(indices.shape[:2]) != tuple(keep.shape[:2]):
        raise ValueError(f"indices: expected [B, T, K] with [B, T] = {list(keep.shape[:2])}, got "
                         f"{tuple(indices.shape)}")
    S = keep.shape[-1]
    idx = indices.long()
    if check and idx.numel() and not torch.compiler.is_compiling() and (int(idx.min()) < 0 or int(idx.max()) >= S):
        raise ValueError(f"indices: key positions must be in [0, S={S}), got [{int(idx.min())}, {int(idx.max())}]")
    visible = keep.gather(-1, idx)
    # Ascending order (invisible lanes last): the kernels walk keys in memory order.
    idx = torch.where(visible, idx, S).sort(dim=-1).values
    return torch.where(idx >= S, -1, idx).to(torch.int32)


def _as_pages(parts: tuple[torch.Tensor, ...], page_size: int = PAGE_SIZE):
    """Rows ``cat(parts, -1)`` (each ``[B, S, ·]``, e.g. ``c_kv`` and ``k_rope``) as ``mla_decode``'s paged cache:
    ``(pages [B·n, page_size, 1, D], block_table int32 [B, n], cache_seqlens int32 [B] = S)`` with
    ``n = ceil(S / page_size)``; rows past ``S`` are zero (never read). Written in one pass (no concatenated
    copy first). A fixed page size: the decode kernel is specialised on it, so it is not recompiled as the
    cache grows."""
    B, S = parts[0].shape[:2]
    D = sum(p.shape[-1] for p in parts)
    n = -(-S // page_size)
    pages = parts[0].new_empty(B, n * page_size, D)
    pages[:, S:] = 0
    col = 0
    for p in parts:
        pages[:, :S, col:col + p.shape[-1]] = p
        col += p.shape[-1]
    table = torch.arange(B * n, dtype=torch.int32, device=pages.device).view(B, n)
    lens = torch.full((B,), S, dtype=torch.int32, device=pages.device)
    return pages.view(B * n, page_size, 1, D), table, lens


class LatentDSAAttentionForHF(_mt.LatentAttentionForHF):
    """``LatentAttentionForHF`` for transformers' DSA attention (``DeepseekV32Attention``, ``GlmMoeDsaAttention``).

    Created by ``patch_model`` (as ``Latent<Class>``, a subclass of this and of the transformers class); shares
    the original's weights, its ``indexer`` module (``None`` on GLM-5 ``"shared"`` layers) and its cache.

    ``forward(hidden_states [B, T, E], position_embeddings, attention_mask, cache, position_ids[,
    prev_topk_indices], **kwargs)`` as the replaced class; returns ``(attn_output [B, T, E], None)``, and on GLM-5
    the indexer's raw ``[B, T, min(index_topk, S)]`` int32 choice as a third output (what the next ``"shared"``
    layer reuses). Softmax scale: the original's ``scaling`` (YaRN ``mscale²`` included).

    Forms: ``"auto"``/``"absorbed"``: absorbed (prefill through the top-k attention, decode steps of at most
    ``DECODE_MAX_Q`` tokens through ``mla_decode``); ``"naive"``: per-head K/V expanded from the latent, the same
    index list repeated over heads (prefill only; decode steps stay absorbed).

    Raises:
        ValueError: ``position_embeddings`` missing; a ``"shared"`` layer without ``prev_topk_indices``; attention
            dropout in training; an ``FP8LatentCache``; a float mask with an additive bias.
    """

    # Both models rotate q_rope / k_rope with ``apply_rotary_pos_emb_interleave`` whatever ``rope_interleave`` says.
    _hf_rope = "interleave"

    @property
    def _returns_topk(self) -> bool:
        # GLM-5's forward takes the previous layer's choice and returns its own (the third output).
        return "prev_topk_indices" in self._hf_params

    @classmethod
    def _unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` (a DSA attention of a supported class) cannot be patched, naming the config field."""
        cfg = module.config
        topk = getattr(cfg, "index_topk", None)
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            return f"config.index_topk={topk!r} (expected a positive int)"
        if type(module).__name__ == "GlmMoeDsaAttention":
            types = getattr(cfg, "indexer_types", None)
            kind = types[module.layer_idx] if types is not None and module.layer_idx < len(types) else None
            if kind not in ("full", "shared"):
                return f"config.indexer_types[{module.layer_idx}]={kind!r} (expected 'full' or 'shared')"
            if kind == "shared" and module.layer_idx == 0:
                return "config.indexer_types[0]='shared' (the first layer has no previous indexer to share)"
        return None

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        kwargs, position_embeddings, attention_mask, cache = self._call_args(hidden_states, args, kwargs)
        position_ids = kwargs.pop("position_ids", None)
        prev_topk = kwargs.pop("prev_topk_indices", None)
        if isinstance(cache, _mt.FP8LatentCache):
            raise ValueError(f"{type(self).__name__}: FP8LatentCache is not supported for DSA models (their indexer "
                             "keys live in transformers' indexed cache layers); use the model's default cache")
        B, T, _ = hidden_states.shape
        dr, dc = self.qk_rope_head_dim, self.kv_lora_rank
        q_nope, q_rope, q_resid, c_kv, k_rope = self._project(hidden_states, position_embeddings)
        if cache is not None:  # before the indexer's own update, as the original
            c_all, kr_all = cache.update(
                c_kv.reshape(B, 1, T, dc), k_rope.reshape(B, 1, T, dr), self.layer_idx, kwargs=kwargs
            )
            c_all, kr_all = c_all[:, 0], kr_all[:, 0]
        else:
            c_all, kr_all = c_kv, k_rope
        S = c_all.shape[1]
        keep = _keep_mask(attention_mask, B, T, S, hidden_states.device)
        indexer = getattr(self, "indexer", None)
        if indexer is not None:
            raw = indexer(hidden_states, q_resid, position_embeddings, keep, position_ids, cache=cache)
        elif prev_topk is None:
            raise ValueError(f"{type(self).__name__} (layer {self.layer_idx}): a 'shared' DSA layer needs "
                             "prev_topk_indices from the previous 'full' indexer layer")
        else:
            raw = prev_topk
        # The indexer's own top-k lies in [0, S): no value check (a device sync per layer) for it.
        topk = topk_from_hf(raw, keep, check=indexer is None)

        if cache is not None and T <= DECODE_MAX_Q and S > T:
            q_abs = self.absorb_q(q_nope, q_rope)
            pages, table, lens = _as_pages((c_all, kr_all))
            out = mla_decode(
                q_abs, pages, table, lens, softmax_scale=self.softmax_scale, head_dim_v=dc, causal=True,
                topk_indices=topk, return_lse=False, backend=self.backend, check_inputs=False,
            )
            out = self.finish(out, "absorbed")
        else:
            form = "naive" if self.form == "naive" else "absorbed"
            q, k, v = self.build_qkv(q_nope, q_rope, torch.cat([c_all, kr_all], dim=-1), form)
            idx = topk[:, :, None].expand(B, T, k.shape[2], topk.shape[-1])
            res = attention_with_stats(
                q, k, v, softmax_scale=self.softmax_scale, topk_indices=idx, return_max_logit=False,
                backend=self.backend, check_indices=False,
            )
            out = self.finish(res.out, form)
        return (out, None, raw) if self._returns_topk else (out, None)


def sparse_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    indices: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, None]:
    """The ``mla_latent`` attention function's DSA path: per-head top-k attention over transformers' tensors.

    Args:
        module: the calling DSA attention module.
        query: ``[B, Hq, T, Dk]`` (transformers layout); key ``[B, Hkv, S, Dk]``; value ``[B, Hkv, S, Dv]``;
            float16/bfloat16/float32, one dtype.
        attention_mask: the causal / padding mask (not folded with the selection), see ``_plan_mask``.
        scaling: softmax scale (default ``Dk ** -0.5``).
        indices: int ``[B, T, K]`` the indexer's choice (``topk`` of the masked scores), shared by all heads.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(attn_output [B, T, Hq, Dv], None)``.

    Raises:
        TypeError: non-integer ``indices`` (``topk_from_hf``); dtype errors of ``latent_attention``.
        ValueError: bad shapes or positions (``topk_from_hf``), a float mask with an additive bias.
    """
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B, T = q.shape[:2]
    S, Hkv = k.shape[1], k.shape[2]
    topk = topk_from_hf(indices, _keep_mask(attention_mask, B, T, S, q.device))
    idx = topk[:, :, None].expand(B, T, Hkv, topk.shape[-1])
    res = attention_with_stats(
        q, k, v, softmax_scale=scaling, topk_indices=idx, return_max_logit=False, backend=backend,
        check_indices=False,
    )
    return res.out, None

