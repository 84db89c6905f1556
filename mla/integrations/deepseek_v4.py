"""DeepSeek-V4 attention (transformers' ``DeepseekV4Attention``, checked against 5.24) on the top-k sparse kernels.

Every V4 layer attends with ``H`` query heads to one shared key = value head of ``head_dim`` values (partial
interleaved RoPE on its trailing ``qk_rope_head_dim`` channels), plus one learnable sink logit per head (``sinks``,
transformers' ``s_aux``). The keys of a layer are the concatenation ``[window | compressed]``:

* window: the last ``sliding_window`` tokens (transformers' ``DynamicSlidingWindowLayer`` keeps
  ``sliding_window - 1`` past tokens and appends the new ones); query ``i`` sees its own token and the
  ``sliding_window - 1`` before it, minus left padding, exactly as the 4-D mask the model builds says;
* ``heavily_compressed_attention`` (HCA): one entry per closed window of ``m'`` tokens (gated pooling,
  ``compress_rates["heavily_compressed_attention"]``); query at position ``p`` sees entries ``w < (p + 1) // m'``
  (every entry for a single-token step, as transformers pads that mask with zeros);
* ``compressed_sparse_attention`` (CSA): overlapping windows of ``2m`` tokens at stride ``m``; the model's lightning
  indexer picks ``index_topk`` entries per query (``-1`` where fewer are causally visible);
* ``sliding_attention``: the window only.

Sliding layers without padding run the dense window kernels (``latent_attention(causal=True,
window_size=(sliding_window - 1, 0), sinks=...)``: key blocks outside the band are skipped). Everything else —
CSA/HCA layers, and sliding layers of left-padded batches — is expressed as **top-k index lists** over the
concatenated keys — per query
``[W window slots | K compressed slots]`` (``W = sliding_window``; ``K = index_topk`` for CSA, the number of
compressed entries for HCA), ``-1`` for slots a query may not see — run by
``mla.functional.latent_attention(..., topk_indices=..., sinks=...)`` (the top-k kernels with sinks on CUDA, the
reference on CPU). Why not block lists: the CSA selection is per query and arbitrary (block lists would need
one block per selected entry and a per-query partial mask), and the window is a diagonal band that is not
block-aligned after the compressed entries are appended; one index list per query carries both exactly, costs
``W + K`` int32 per query (``128 + 512`` for V4-Flash CSA), and is what the kernels already gather. The window
slots share the list (rather than a window-kernel call merged with a compressed-part call through ``lse``) because
one softmax with one sink spans both: one launch, no merge and no ``lse`` backward. The HCA list
is a prefix of the compressed entries, so its width grows as ``S / m'`` (``S = 1M``: 8,192 slots per query at
``m' = 128``); decode pays that per step, prefill pays ``T·S/m'`` int32 (chunk very long prefills).

What stays the model's code: the projections and norms, RoPE on ``q``/``kv`` and the conjugate RoPE on the output,
the grouped low-rank output projection (``o_a_proj``/``o_b_proj``), the lightning indexer (CSA top-k) and the
cache objects. The compressors' pooling is recomputed here with the same modules, state and operations (the
model's compressor forward also builds a dense ``[T, entries]`` bias we do not want).
"""

from __future__ import annotations

import threading
import weakref

import torch
from torch import nn
from transformers.models.deepseek_v4 import modeling_deepseek_v4 as _hf
from transformers.utils.deprecation import deprecate_kwarg

from mla.functional import BACKENDS, latent_attention
from mla.integrations.transformers import _share_module

__all__ = ["LatentDeepseekV4Attention", "v4_topk_indices"]

_memo = threading.local()


def _window_keep(mask: torch.Tensor | None, B: int, T: int, S: int) -> torch.Tensor:
    """Bool keep ``[B, T, S]`` from the model's 4-D mask (float additive or bool); all-True for ``None``.

    Raises:
        TypeError / ValueError: a mask that is not a tensor, has the wrong shape or carries a genuine bias.
    """
    if mask is None:
        return torch.ones(1, T, S, dtype=torch.bool).expand(B, T, S)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected None or a 4-D torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 4 or mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (T, S):
        raise ValueError(
            f"attention_mask: expected the model's 4-D mask [B|1, 1, T, S] = [{B}|1, 1, {T}, {S}] over the window "
            f"keys, got {list(mask.shape)}"
        )
    m = mask[:, 0]
    if m.dtype == torch.bool:
        return m.expand(B, T, S)
    if not m.is_floating_point():
        raise TypeError(f"attention_mask: expected a bool or float mask, got dtype {m.dtype}")
    keep = m == 0
    if torch.compiler.is_compiling():  # the bias check reads values: eager only
        return keep.expand(B, T, S)
    if not bool((keep | (m <= torch.finfo(m.dtype).min / 2)).all()):
        raise ValueError("attention_mask: additive biases other than 0 / -inf are not supported by DeepSeek-V4 "
                         "on the latent attention")
    return keep.expand(B, T, S)


def _window_indices(mask: torch.Tensor | None, B: int, T: int, S: int, window: int) -> tuple[torch.Tensor, bool]:
    """Window slots ``[B, T, window]`` int32 (key positions in ``[0, S)`` the mask keeps, or ``-1``) and whether the
    mask keeps the whole band (no padding: then it is exactly ``causal`` with ``window_size=(window - 1, 0)``).

    Query ``i`` sits at key position ``S - T + i`` (transformers' sliding cache returns the kept past then the new
    tokens), so its keys lie in ``[S - T + i - window + 1, S - T + i]``. Computed once per mask and reused by
    every layer of the forward pass.

    Under ``torch.compile`` nothing is read on the host: the mask is not checked and ``band`` is False.

    Raises:
        ValueError: the mask keeps a key outside that band (not a sliding-window mask of this size).
    """
    compiling = torch.compiler.is_compiling()
    key = (None if mask is None else mask._version, B, T, S, window)
    ref = getattr(_memo, "ref", None)
    if not compiling and mask is not None and ref is not None and ref() is mask and _memo.key == key:
        return _memo.value
    device = mask.device if mask is not None else torch.device("cpu")
    keep = _window_keep(mask, B, T, S).to(device)
    cand = torch.arange(T, device=device)[:, None] + (S - T - window + 1) + torch.arange(window, device=device)
    inside = cand >= 0
    got = keep.gather(-1, cand.clamp(min=0).expand(B, T, window)) & inside
    if compiling:  # no host reads under torch.compile: no mask check, and the index-list path for every layer
        return torch.where(got, cand, -1).to(torch.int32), False
    if not bool((got.sum(-1) == keep.sum(-1)).all()):
        raise ValueError(
            f"attention_mask: keeps keys outside the sliding window of config.sliding_window={window} tokens; "
            "DeepSeek-V4 on the latent attention needs the mask the model builds (a sliding-window causal mask)"
        )
    value = torch.where(got, cand, -1).to(torch.int32), bool((got == inside).all())
    if mask is not None:
        _memo.ref, _memo.key, _memo.value = weakref.ref(mask), key, value
    return value


def v4_topk_indices(
    window_idx: torch.Tensor, S: int, compressed_idx: torch.Tensor | None
) -> torch.Tensor:
    """Concatenate window slots and compressed slots into ``topk_indices [B, T, 1, W + K]`` int32.

    Args:
        window_idx: ``[B, T, W]`` positions in the window keys ``[0, S)`` or ``-1``.
        S: number of window keys (compressed entry ``c`` is key ``S + c``).
        compressed_idx: ``[B, T, K]`` compressed-entry numbers or ``-1``; None for sliding-only layers.

    Raises:
        TypeError: a non-integer index tensor or ``S``. ValueError: an index tensor that is not 3-D, or ``[B, T]``
            of ``compressed_idx`` other than ``window_idx``'s.
    """
    for name, t in (("window_idx", window_idx), ("compressed_idx", compressed_idx)):
        if t is None and name == "compressed_idx":
            continue
        if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name}: expected an integer torch.Tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected [B, T, K] (3-D), got shape {tuple(t.shape)}")
    if isinstance(S, bool) or not isinstance(S, int) or S < 0:
        raise TypeError(f"S: expected an int >= 0, got {S!r}")
    if compressed_idx is not None and compressed_idx.shape[:2] != window_idx.shape[:2]:
        raise ValueError(f"compressed_idx: expected [B, T] = {list(window_idx.shape[:2])} (window_idx's), got "
                         f"shape {tuple(compressed_idx.shape)}")
    if compressed_idx is None or compressed_idx.shape[-1] == 0:
        return window_idx.to(torch.int32)[:, :, None]
    comp = torch.where(compressed_idx >= 0, compressed_idx + S, -1).to(torch.int32)
    return torch.cat([window_idx.to(torch.int32), comp], dim=-1)[:, :, None]


def _pool(module: nn.Module, name: str, hidden: torch.Tensor, cache_layer, overlap: bool) -> torch.Tensor:
    """The compressed entries ``[B, N, head_dim]`` (all emitted so far when cached) of a V4 compressor / indexer.

    Same operations, parameters and cache state as transformers' ``DeepseekV4HCACompressor`` (``overlap=False``:
    gated softmax pooling of each closed window of ``compress_rate`` tokens) and ``DeepseekV4CSACompressor`` /
    ``DeepseekV4Indexer`` (``overlap=True``: entry ``w`` pools window ``w-1``'s first half-channels ``Ca`` with
    window ``w``'s second half ``Cb``), then ``kv_norm`` and RoPE at position ``w * compress_rate``.
    Source: transformers 5.24 ``modeling_deepseek_v4`` (paper §2.3.1-2.3.2).
    """
    B = hidden.shape[0]
    m, d = module.compress_rate, module.head_dim
    kv, gate = module.kv_proj(hidden), module.gate_proj(hidden)
    if cache_layer is None:
        usable = (kv.shape[1] // m) * m
        chunk_kv, chunk_gate, first = kv[:, :usable], gate[:, :usable], 0
    else:
        chunk_kv, chunk_gate, first = cache_layer.store_compression_weights(name, kv, gate)
    if chunk_kv.shape[1] > 0:
        n = chunk_kv.shape[1] // m
        chunk_kv = chunk_kv.view(B, n, m, -1)
        chunk_gate = chunk_gate.view(B, n, m, -1) + module.position_bias
        if overlap:
            new_kv = chunk_kv.new_zeros((B, n, 2 * m, d))
            new_gate = chunk_gate.new_full((B, n, 2 * m, d), float("-inf"))
            new_kv[:, :, m:] = chunk_kv[..., d:]
            new_gate[:, :, m:] = chunk_gate[..., d:]
            if n > 1:
                new_kv[:, 1:, :m] = chunk_kv[:, :-1, :, :d]
                new_gate[:, 1:, :m] = chunk_gate[:, :-1, :, :d]
            if cache_layer is not None:
                prior_kv, prior_gate = cache_layer.update_overlap_state(name, chunk_kv, chunk_gate, d)
                if prior_kv is not None:
                    new_kv[:, 0, :m] = prior_kv.to(new_kv.dtype)
                    new_gate[:, 0, :m] = prior_gate.to(new_gate.dtype)
        else:
            new_kv, new_gate = chunk_kv, chunk_gate
        pooled = (new_kv * new_gate.softmax(dim=2, dtype=torch.float32).to(new_kv.dtype)).sum(dim=2)
        compressed = module.kv_norm(pooled)
        positions = (torch.arange(n, device=compressed.device) * m + first).unsqueeze(0).expand(B, -1)
        cos, sin = module.rotary_emb(compressed, position_ids=positions, layer_type=module.rope_layer_type)
        compressed = _hf.apply_rotary_pos_emb(compressed.unsqueeze(1), cos, sin).squeeze(1)
    else:
        compressed = chunk_kv.new_zeros((B, 0, d))
    if cache_layer is not None:
        compressed = cache_layer.update_compressor_states(name, compressed)
    return compressed


class LatentDeepseekV4Attention(_hf.DeepseekV4Attention):
    """``DeepseekV4Attention`` whose attention core runs ``mla.functional.latent_attention`` on top-k index lists.

    Not built directly: ``mla.integrations.transformers.patch_model`` creates it from a loaded
    ``DeepseekV4Attention`` (``_from_hf``), sharing every submodule and parameter (``q_a_proj``, ``q_a_norm``,
    ``q_b_proj``, ``kv_proj``, ``kv_norm``, ``o_a_proj``, ``o_b_proj``, ``sinks``, ``compressor``: no copy) and
    attributes; the original is kept for ``unpatch_model``. All three layer types (``sliding_attention``,
    ``compressed_sparse_attention``, ``heavily_compressed_attention``) are handled; which keys each query sees and
    why index lists: see the module docstring.

    ``forward(hidden_states [B, T, E], position_embeddings {"main"|"compress": (cos, sin)}, position_ids [B|1, T],
    attention_mask [B|1, 1, T, S] (the model's sliding-window mask; None only for single-token steps), cache)``
    returns ``(output [B, T, E], None)`` and updates ``cache`` exactly as transformers' module does, so patched and
    unpatched modules can share a cache. ``form`` is accepted for ``patch_model``'s interface and has no effect
    (V4's single shared key = value head is already the compact form). Gradients reach every parameter eager's
    do (``sinks`` and the compressors included; the indexer's only output is integer indices, in eager too).

    Raises:
        ValueError: ``config.attention_dropout > 0`` while training (the kernels do not drop probabilities); a
            mask that is not the sliding-window mask of ``config.sliding_window``; ``attention_mask=None`` for more
            than one new token (transformers would then attend without any mask).
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("LatentDeepseekV4Attention is created by mla.integrations.transformers.patch_model(model)")

    @classmethod
    def _unsupported(cls, module: nn.Module) -> str | None:
        """Why ``module`` cannot be patched, naming the config field (``patch_model`` refuses it), or None."""
        window = module.sliding_window
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            return f"config.sliding_window={window!r} (expected a positive int)"
        return None

    @classmethod
    def _from_hf(cls, original: nn.Module, form: str, backend: str) -> LatentDeepseekV4Attention:
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
        return _share_module(cls, original, form, backend)

    def extra_repr(self) -> str:
        return f"layer_type={self.layer_type!r}, backend={self.backend!r}, layer_idx={self.layer_idx}"

    def _compressed_indices(self, hidden, q_residual, position_ids, cache, T: int, mask_is_none: bool):
        """``(compressed [B, 1, N, D] | None, compressed slots [B, T, K] | None)`` for this layer."""
        if self.compressor is None:
            return None, None
        cache_layer = cache.layers[self.layer_idx] if cache is not None else None
        comp = self.compressor
        csa = isinstance(comp, _hf.DeepseekV4CSACompressor)
        compressed = _pool(comp, "compressor", hidden, cache_layer, overlap=csa)
        N = compressed.shape[1]
        if csa:
            idx = comp.indexer(hidden, q_residual, position_ids, cache, self.layer_idx)  # [B, T, k], -1 padded
            if N and T == 1 and mask_is_none:
                # transformers ignores the indexer's choice when no mask is passed (single-token step)
                idx = torch.arange(N, device=hidden.device).expand(hidden.shape[0], 1, N)
        else:
            entries = torch.arange(N, device=hidden.device)
            if T == 1:  # transformers pads a single-token step's mask with zeros: every entry emitted so far
                idx = entries.expand(hidden.shape[0], 1, N)
            else:
                threshold = (position_ids + 1) // comp.compress_rate  # [B|1, T]
                idx = torch.where(entries < threshold[..., None], entries, -1).expand(hidden.shape[0], T, N)
        return compressed.unsqueeze(1), idx

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings,
        position_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        if self.training and self.attention_dropout:
            raise ValueError(
                f"config.attention_dropout={self.attention_dropout}: attention dropout is not supported by the "
                "latent attention kernels (they do not drop probabilities); set it to 0 for training"
            )
        B, T = hidden_states.shape[:2]
        if attention_mask is None and T > 1:
            raise ValueError(
                f"attention_mask: DeepSeek-V4 needs the model's sliding-window mask for {T} new tokens, got None"
            )
        cos, sin = position_embeddings[self.rope_layer_type]
        q_residual = self.q_a_norm(self.q_a_proj(hidden_states))
        q = self.q_b_proj(q_residual).view(B, T, -1, self.head_dim).transpose(1, 2)
        q = _hf.apply_rotary_pos_emb(self.q_b_norm(q), cos, sin)  # [B, H, T, D]
        kv = self.kv_norm(self.kv_proj(hidden_states)).view(B, T, 1, self.head_dim).transpose(1, 2)
        kv = _hf.apply_rotary_pos_emb(kv, cos, sin)
        if cache is not None:  # sliding window, K == V
            kv = cache.update(kv, kv, self.layer_idx, kwargs=kwargs)[0]
        S = kv.shape[2]
        window_idx, band = _window_indices(attention_mask, B, T, S, self.sliding_window)
        sinks = self.sinks.float()  # exact; a model cast with .to(bf16) holds bf16 sinks
        if self.compressor is None and band:  # sliding layer, no padding: the dense window kernels
            keys = kv.transpose(1, 2)
            out = latent_attention(
                q.transpose(1, 2), keys, keys, causal=True, window_size=(self.sliding_window - 1, 0),
                softmax_scale=self.scaling, sinks=sinks, backend=self.backend,
            )
            return self._output(out, cos, sin)
        compressed, comp_idx = self._compressed_indices(
            hidden_states, q_residual, position_ids, cache, T, attention_mask is None
        )
        if compressed is not None and compressed.shape[2]:
            kv = torch.cat([kv, compressed], dim=2)
        idx = v4_topk_indices(window_idx.to(kv.device), S, comp_idx)
        keys = kv.transpose(1, 2)  # [B, S + N, 1, D]
        out = latent_attention(
            q.transpose(1, 2), keys, keys, topk_indices=idx, softmax_scale=self.scaling, sinks=sinks,
            backend=self.backend, check_indices=False,
        )  # [B, T, H, D]
        return self._output(out, cos, sin)

    def _output(self, out: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The model's own tail on ``out [B, T, H, D]``: conjugate RoPE on the rope slice, grouped output proj."""
        B, T = out.shape[:2]
        out = _hf.apply_rotary_pos_emb(out.transpose(1, 2), cos, -sin).transpose(1, 2)
        grouped = self.o_a_proj(out.reshape(B, T, self.config.o_groups, -1)).flatten(2)
        return self.o_b_proj(grouped), None
