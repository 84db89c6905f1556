"""Drop-in latent attention for Hugging Face ``transformers`` MLA models (DESIGN §1, §5; tested with 5.24).

transformers (>= 5) caches the compressed latents of DeepSeek-style attention (``c_kv`` and the rotated shared
key ``k_rope``) but expands them to per-head K/V with ``kv_b_proj`` over the *whole* cache at every decode
step. ``patch_model`` swaps each MLA attention module of a loaded model for ``LatentAttentionForHF``, which
keeps the same weights (the very same ``nn.Linear``/RMSNorm objects: no copy), the model's config and its
cache objects, but

* prefill (more than ``MultiHeadLatentAttention.absorb_max_q`` new tokens, or no cache): the *naive* form
  — per-head K/V expanded from the latent, attention by ``mla.functional.attention_with_stats``;
* decode (a cache and at most ``absorb_max_q`` new tokens): the *absorbed* form — ``W_UK`` folded into the
  query, attention in latent space over the compressed cache (``k = [c_kv | k_rope]``, one kv head,
  ``v = c_kv``), ``W_UV`` folded into the output. Nothing is expanded per head.

The cache holds exactly what transformers' own module would store, so a patched model can continue a cache
an unpatched one started and vice versa.

FP8 cache: pass ``cache=FP8LatentCache()`` to ``generate`` or to the forward of a patched model to
keep the latent rows in DeepSeek-V3.2's ``fp8_ds_mla`` bytes (``mla.quant``; 656 instead of 1,152 bytes per
token and layer for DeepSeek-V3) instead of transformers' bf16 tensors. Decode steps read the bytes with
``mla_decode(..., kv_format="fp8_ds_mla")`` (dequantized in the kernel's registers); the prefill attends over
its own unquantized rows. Only patched modules understand it (an unpatched one would find no rows).

``register_attention_implementation`` (run at import under the name ``"mla_latent"``) also adds our
attention function to transformers' ``AttentionInterface`` (naive form: it receives per-head
``query/key/value`` like every other implementation), so ``attn_implementation="mla_latent"`` works without
patching.

The sparse models' replacements live in their own modules, imported when a model has such a class (the
``_BASES`` table): ``mla.integrations.dsa`` (DeepSeek-V3.2, GLM-5: the model's DSA indexer picks the keys of
our top-k attention) and ``mla.integrations.deepseek_v4`` (DeepSeek-V4: top-k index lists over window and
compressed keys). ``patch_model`` / ``unpatch_model`` / ``is_patched`` treat all of them alike.

Masks: the 4-D mask transformers builds (additive float for ``eager``, bool keep-mask for ``sdpa``/ours,
``None`` when purely causal) or the 2-D padding mask of the flash implementations is reduced, once per
forward pass and shared by all layers, to (a) trailing never-attended cache slots dropped (static caches),
(b) ``causal=True`` with no element mask when it is exactly bottom-right causal — kernel-eligible — or
(c) a bool keep-mask otherwise (left padding; reference path).
"""

from __future__ import annotations

import copy
import importlib
import inspect
import threading
import weakref
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn

from mla.attention import FORMS, MultiHeadLatentAttention
from mla.functional import BACKENDS, attention_with_stats, mla_decode, resolve_backend
from mla.quant import FP8_DS_MLA, dequantize_fp8_ds_mla, quantize_fp8_ds_mla
from mla.rope import apply_rotary

try:
    import transformers as _tf
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "mla.integrations.transformers needs Hugging Face transformers >= 5.0: pip install 'transformers>=5'"
    ) from e

__all__ = [
    "ATTN_IMPLEMENTATION",
    "FP8LatentCache",
    "SUPPORTED_ATTENTION_CLASSES",
    "LatentAttentionForHF",
    "patch_model",
    "unpatch_model",
    "is_patched",
    "latent_attention_forward",
    "register_attention_implementation",
]

#: Name under which ``latent_attention_forward`` is registered in transformers' ``AttentionInterface``.
ATTN_IMPLEMENTATION = "mla_latent"

# class name -> (transformers module, how the module applies RoPE). The forward of each of these classes was
# checked (transformers 5.24) to be DeepseekV3Attention's up to the RoPE convention:
#   "config":  cos/sin, interleaved pairs iff ``config.rope_interleave`` (output de-interleaved), else half-split
#   "half":    cos/sin, half-split pairs always
#   "interleave": cos/sin, interleaved pairs always (output de-interleaved)
#   "complex": DeepSeek-V2's complex ``freqs_cis`` on interleaved pairs (output stays interleaved)
#   "own":     not MLA math; the replacement class (``_BASES``) handles RoPE itself
# DeepseekV32Attention / GlmMoeDsaAttention: DeepseekV3's MLA with interleaved RoPE whatever ``rope_interleave``
# says (``apply_rotary_pos_emb_interleave``), plus the DSA indexer's top-k folded into the mask.
_SUPPORTED: dict[str, tuple[str, str]] = {
    "DeepseekV3Attention": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "config"),
    "DeepseekV2Attention": ("transformers.models.deepseek_v2.modeling_deepseek_v2", "complex"),
    "Glm4MoeLiteAttention": ("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite", "config"),
    "YoutuAttention": ("transformers.models.youtu.modeling_youtu", "config"),
    "AXK1Attention": ("transformers.models.axk1.modeling_axk1", "config"),
    "MiniCPM3Attention": ("transformers.models.minicpm3.modeling_minicpm3", "half"),
    "DeepseekV32Attention": ("transformers.models.deepseek_v32.modeling_deepseek_v32", "interleave"),
    "GlmMoeDsaAttention": ("transformers.models.glm_moe_dsa.modeling_glm_moe_dsa", "interleave"),
    "DeepseekV4Attention": ("transformers.models.deepseek_v4.modeling_deepseek_v4", "own"),
}

# Classes whose replacement is built on a class of another module of this package (imported on first use):
# class name -> (our module, our class). A class that already subclasses the transformers class is the
# replacement itself (DeepSeek-V4); otherwise ``Latent<C>`` derives from it and ``C`` (DSA). Default:
# ``LatentAttentionForHF``.
_BASES: dict[str, tuple[str, str]] = {
    "DeepseekV32Attention": ("mla.integrations.dsa", "LatentDSAAttentionForHF"),
    "GlmMoeDsaAttention": ("mla.integrations.dsa", "LatentDSAAttentionForHF"),
    "DeepseekV4Attention": ("mla.integrations.deepseek_v4", "LatentDeepseekV4Attention"),
}

#: transformers attention classes ``patch_model`` replaces.
SUPPORTED_ATTENTION_CLASSES: tuple[str, ...] = tuple(_SUPPORTED)

# MLA-weighted classes whose forward does something else: refused with the reason.
_UNSUPPORTED_REASONS = {
    "Mistral4Attention": "scales queries by a position-dependent Llama-4 factor",
    "MistralLarge4TextAttention": "scales queries by a position-dependent Llama-4 factor and may skip key RoPE",
    "LongcatFlashMLA": "rescales the q/kv latents (LoRA scaling)",
    "BailingHybridAttention": "multiplies the output by a head-wise sigmoid gate",
    "KimiLinearAttention": "uses no RoPE (NoPE) on its keys",
    "HYV4Attention": "is sparse (indexer)",
    "AXK2Attention": "is sparse (indexer)",
    "Dots3NoteTextAttention": "is sparse (indexer)",
    "Glm5NextTextAttention": "is sparse (indexer)",
}


def _is_mla_like(module: nn.Module) -> bool:
    return isinstance(getattr(module, "kv_a_proj_with_mqa", None), nn.Module) and isinstance(
        getattr(module, "kv_b_proj", None), nn.Module
    )


def _supported_key(cls: type) -> str | None:
    """The ``_SUPPORTED`` key of exactly ``cls`` (subclasses are not trusted: they may change forward)."""
    entry = _SUPPORTED.get(cls.__name__)
    if entry is not None and cls.__module__ == entry[0]:
        return cls.__name__
    return None


def _is_replacement(module: nn.Module) -> bool:
    """Whether ``module`` was installed by ``patch_model`` (``_share_module`` keeps the original in it)."""
    return "_mla_original" in module.__dict__


def _share_module(cls: type, original: nn.Module, form: str, backend: str) -> nn.Module:
    """A ``cls`` instance (``cls.__init__`` not run) sharing ``original``'s submodules, parameters, attributes and
    hooks, with ``form`` / ``backend`` set; ``original`` is kept for ``unpatch_model``. The replacement classes'
    ``_from_hf`` build on it."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for name, value in original.__dict__.items():
        # nn.Module's registries (parameters, buffers, submodules, hooks) are copied shallowly, so the two
        # modules share every submodule and parameter but can be re-pointed independently.
        new.__dict__[name] = copy.copy(value) if isinstance(value, (dict, set, list)) else value
    new.__dict__["_mla_original"] = original  # not registered as a submodule: no state-dict keys
    new.form, new.backend = form, backend
    return new


# ---------------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------------
_memo = threading.local()


def _plan_mask(
    mask: torch.Tensor | None, B: int, T: int, S: int, device: torch.device, causal: bool = True,
    kernels: bool = False,
) -> tuple[int, bool, torch.Tensor | None]:
    """Reduce a transformers attention mask to what ``attention_with_stats`` needs.

    Args:
        mask: None, a 2-D padding mask ``[B, S]`` (1/True = token; flash implementations), or a 4-D mask
            ``[B|1, 1|H, T, S']`` (``S' >= S``, extra columns ignored): bool keep-mask (sdpa-style) or additive
            float (eager-style: 0 = attend, ``finfo.min``/-inf = masked; other values are kept as a bias).
        B, T, S: batch, query length and key length of the attention call.
        causal: the module's causality, used when ``mask`` is None or 2-D.
        kernels: the caller's attention may run the Triton kernels. Under ``torch.compile`` the mask is reduced
            without reading values on the host (one graph, ``fullgraph=True`` works; the mask then runs on the
            reference path) unless ``kernels``: then it is still reduced on the host (a graph break) so that a
            causal / padding-free mask keeps the kernel path.

    Returns:
        ``(S_eff, causal, attn_mask)``: attend over keys ``[:S_eff]`` (trailing columns no query may see are
        dropped, e.g. unfilled static-cache slots) with ``causal`` (bottom-right) and ``attn_mask`` (None when the
        mask is exactly causal / all-keep: the kernel-eligible fast path; else a bool keep-mask or float bias).
        Computed once per mask tensor and reused by every layer of the same forward pass.

    Raises:
        TypeError: a mask that is not a tensor (e.g. flex attention's BlockMask).
        ValueError: a mask whose shape does not fit ``(B, T, S)``.
    """
    if mask is None:
        return S, causal, None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"attention_mask: expected None or a torch.Tensor, got {type(mask).__name__}; the latent attention "
            "accepts the masks of attn_implementation 'eager', 'sdpa', 'flash_attention_*' or "
            f"'{ATTN_IMPLEMENTATION}' (not flex_attention's BlockMask)"
        )
    if torch.compiler.is_compiling() and not kernels:
        return _plan_mask_traced(mask, B, T, S, device, causal)
    key = (mask._version, B, T, S, causal, str(device))
    ref = getattr(_memo, "ref", None)
    if ref is not None and ref() is mask and _memo.key == key:
        return _memo.value
    value = _plan_mask_uncached(mask, B, T, S, device, causal)
    _memo.ref, _memo.key, _memo.value = weakref.ref(mask), key, value
    return value


def _check_mask_shape(mask: torch.Tensor, B: int, T: int, S: int) -> None:
    """A 2-D ``[B, S]`` padding mask or a 4-D ``[B|1, 1|H, T, >=S]`` bool / float mask; ValueError/TypeError."""
    if mask.dim() == 2:
        if mask.shape != (B, S):
            raise ValueError(f"attention_mask: a 2-D padding mask must be [B, S] = {[B, S]}, got {list(mask.shape)}")
        return
    if mask.dim() != 4 or mask.shape[-2] != T or mask.shape[-1] < S or mask.shape[0] not in (1, B):
        raise ValueError(
            f"attention_mask: expected [B|1, 1|H, T, >=S] with B={B}, T={T}, S={S}, got {list(mask.shape)}"
        )
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"attention_mask: expected a bool or float mask, got dtype {mask.dtype}")


def _plan_mask_traced(mask, B, T, S, device, causal):
    """``_plan_mask`` under ``torch.compile``: no value is read on the host (no data-dependent branch, so the
    model traces as one graph), so no fast path is found: a 4-D mask is handed on as it is (bool keep-mask or
    additive float bias, exact either way) and runs on the reference path; a 2-D one as a padding keep-mask."""
    mask = mask.to(device)
    _check_mask_shape(mask, B, T, S)
    if mask.dim() == 2:
        return S, causal, mask.bool()[:, None, None, :]
    return S, False, mask[..., :S]


def _plan_mask_uncached(mask, B, T, S, device, causal):
    mask = mask.to(device)
    _check_mask_shape(mask, B, T, S)
    if mask.dim() == 2:
        pad = mask.bool()
        if bool(pad.all()):
            return S, causal, None
        return S, causal, pad[:, None, None, :]
    mask = mask[..., :S]
    if mask.dtype == torch.bool:
        keep = mask
    else:
        keep = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool((keep | blocked).all()):
            return S, False, mask  # a genuine additive bias: reference path, no reduction
    cols = keep.reshape(-1, S).any(dim=0)
    seen = torch.nonzero(cols)
    S_eff = int(seen[-1]) + 1 if seen.numel() else S
    keep = keep[..., :S_eff]
    rows = torch.arange(T, device=device)[:, None]
    pattern = torch.arange(S_eff, device=device)[None, :] <= rows + (S_eff - T)
    if bool((keep == pattern).all()):
        return S_eff, True, None
    if bool(keep.all()):
        return S_eff, False, None
    return S_eff, False, keep


# ---------------------------------------------------------------------------------------------------
# The replacement module
# ---------------------------------------------------------------------------------------------------
def _rotate_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's complex RoPE on ``x [B, T, H, dr]`` with ``freqs_cis [B, T, dr/2]`` (complex), computed
    in float32 and left interleaved, as transformers' ``deepseek_v2.apply_rotary_emb``."""
    if freqs_cis.dim() == 2:
        freqs_cis = freqs_cis[None]
    c = freqs_cis.real.float()[:, :, None]
    s = freqs_cis.imag.float()[:, :, None]
    xf = x.float()
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    return torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1).flatten(-2).to(x.dtype)


class LatentAttentionForHF(MultiHeadLatentAttention):
    """``MultiHeadLatentAttention`` math behind a transformers MLA attention module's interface.

    Not built directly: ``patch_model`` creates, for each supported transformers class ``C``
    (``SUPPORTED_ATTENTION_CLASSES``), the subclass ``Latent<C>`` of both this class and ``C`` (so
    ``isinstance(m, C)`` still holds and transformers' output-recording hooks find it), and instances that share
    the original module's submodules (``q_proj``/``q_a_proj``/``q_a_layernorm``/``q_b_proj``,
    ``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``), attributes (``config``,
    ``layer_idx``, ``scaling``, ...) and hooks. The original module is kept for ``unpatch_model``.

    ``forward(hidden_states [B, T, E], position_embeddings, attention_mask, cache, **kwargs)`` takes the
    arguments of the replaced class (positional order included) and returns ``(attn_output [B, T, E], None)``
    — attention weights are not materialised (like transformers' sdpa/flash implementations).
    ``position_embeddings`` are transformers' ``(cos, sin)`` (or DeepSeek-V2's complex ``freqs_cis``) for the
    new tokens; ``cache`` a transformers ``Cache`` updated with ``(c_kv [B,1,T,dc], k_rope [B,1,T,dr])`` exactly as
    the original module does. Forms: see ``MultiHeadLatentAttention`` (``form="auto"``: naive without a cache or
    for chunks longer than ``absorb_max_q`` tokens, absorbed otherwise). Softmax scale: the original's
    ``scaling`` (YaRN ``mscale²`` included).

    Raises:
        ValueError: ``position_embeddings`` missing; attention dropout requested in training mode (the fused
            kernels do not drop probabilities); masks that do not fit (see ``_plan_mask``).
    """

    _hf_rope = "config"
    _hf_params: tuple[str, ...] = ("position_embeddings", "attention_mask", "cache")

    def __init__(self, *args, **kwargs):
        raise TypeError("LatentAttentionForHF is created by mla.integrations.transformers.patch_model(model)")

    @classmethod
    def _unsupported(cls, original: nn.Module) -> str | None:
        """Why ``original`` cannot be replaced, naming the config field (``patch_model`` refuses it), or None."""
        return None

    @classmethod
    def _from_hf(cls, original: nn.Module, form: str, backend: str) -> LatentAttentionForHF:
        new = _share_module(cls, original, form, backend)
        new.softmax_scale = float(original.scaling)
        return new

    def _bind(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self._hf_params):
            raise TypeError(
                f"{type(self).__name__}.forward: takes at most {len(self._hf_params) + 1} positional arguments "
                f"(hidden_states, {', '.join(self._hf_params)}), got {len(args) + 1}"
            )
        for name, value in zip(self._hf_params, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}.forward: got multiple values for argument {name!r}")
            kwargs[name] = value
        return kwargs

    def _rotate(self, q_rope: torch.Tensor, k_rope: torch.Tensor, position_embeddings):
        """RoPE as the replaced class applies it: ``q_rope [B,T,H,dr]``, ``k_rope [B,T,dr]``."""
        if position_embeddings is None:
            raise ValueError(
                f"{type(self).__name__}: position_embeddings is required (transformers' decoder layers pass the "
                "rotary (cos, sin) of the new tokens)"
            )
        if self._hf_rope == "complex":
            return _rotate_complex(q_rope, position_embeddings), _rotate_complex(
                k_rope[:, :, None], position_embeddings
            )[:, :, 0]
        cos, sin = position_embeddings
        interleaved = self._hf_rope == "interleave" or (self._hf_rope == "config" and bool(self.config.rope_interleave))
        q_rope = apply_rotary(q_rope, cos, sin, interleaved)
        k_rope = apply_rotary(k_rope[:, :, None], cos, sin, interleaved)[:, :, 0]
        return q_rope, k_rope

    def _call_args(self, hidden_states: torch.Tensor, args: tuple, kwargs: dict):
        """``(kwargs left, position_embeddings, attention_mask, cache)`` of a forward call, checked."""
        kwargs = self._bind(args, kwargs)
        position_embeddings = kwargs.pop("position_embeddings", None)
        attention_mask = kwargs.pop("attention_mask", None)
        cache = kwargs.pop("cache", None)
        legacy = kwargs.pop("past_key_values", None)
        cache = legacy if cache is None else cache
        if self.training and getattr(self, "attention_dropout", 0.0):
            raise ValueError(
                f"{type(self).__name__}: attention_dropout={self.attention_dropout} in training mode is not "
                "supported by the latent attention (no dropout on probabilities); set config.attention_dropout=0"
            )
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states: expected [B, T, E], got shape {tuple(hidden_states.shape)}")
        return kwargs, position_embeddings, attention_mask, cache

    def _project(self, hidden_states: torch.Tensor, position_embeddings):
        """``(q_nope, q_rope, q_latent, c_kv, k_rope)`` of the new tokens, RoPE applied (``q_latent``: the normed
        query latent, None without q LoRA)."""
        q, q_latent = self.project_q(hidden_states)
        q_nope, q_rope = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_rope = self.project_kv_latent(hidden_states)
        q_rope, k_rope = self._rotate(q_rope, k_rope, position_embeddings)
        return q_nope, q_rope, q_latent, c_kv, k_rope

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        kwargs, position_embeddings, attention_mask, cache = self._call_args(hidden_states, args, kwargs)
        B, T, _ = hidden_states.shape
        dr, dc = self.qk_rope_head_dim, self.kv_lora_rank
        q_nope, q_rope, _, c_kv, k_rope = self._project(hidden_states, position_embeddings)
        if isinstance(cache, FP8LatentCache):
            return self._forward_fp8(cache, q_nope, q_rope, c_kv, k_rope, attention_mask, kwargs)
        if cache is not None:
            c_all, kr_all = cache.update(
                c_kv.reshape(B, 1, T, dc), k_rope.reshape(B, 1, T, dr), self.layer_idx, kwargs=kwargs
            )
            latent = torch.cat([c_all[:, 0], kr_all[:, 0]], dim=-1)
        else:
            latent = torch.cat([c_kv, k_rope], dim=-1)
        S = latent.shape[1]
        S_eff, causal, keep = _plan_mask(attention_mask, B, T, S, hidden_states.device, causal=True,
                                         kernels=self._kernels(hidden_states))
        if S_eff != S:
            latent = latent[:, :S_eff]
        form = self.resolve_form(None, T, cache is not None)
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        res = attention_with_stats(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, attn_mask=keep, return_max_logit=False,
            backend=self.backend,
        )
        return self.finish(res.out, form), None

    def _kernels(self, x: torch.Tensor) -> bool:
        """Whether this module's attention on ``x``'s device and dtype may run the Triton kernels."""
        return resolve_backend(self.backend, x.device, x.dtype) == "triton"

    def _forward_fp8(self, cache, q_nope, q_rope, c_kv, k_rope, attention_mask, kwargs):
        """Attention with an ``FP8LatentCache``: store the new rows as bytes; a decode step (causal, no padding)
        runs ``mla_decode`` over them, a prefill attends over its own rows, anything else (a padding mask in a
        decode step) over the dequantized rows."""
        B, T = c_kv.shape[:2]
        new = torch.cat([c_kv, k_rope], dim=-1)
        past = cache.get_seq_length(self.layer_idx)
        pool = cache.append_latent(self.layer_idx, new, self.kv_lora_rank, kwargs)
        S = past + T
        S_eff, causal, keep = _plan_mask(attention_mask, B, T, S, new.device, causal=True,
                                         kernels=self._kernels(new))
        form = self.resolve_form(None, T, past > 0)
        if past > 0 and form == "absorbed" and keep is None and causal and S_eff == S:
            q = self.absorb_q(q_nope, q_rope)
            table = torch.arange(B, dtype=torch.int32, device=q.device)[:, None]
            lens = torch.full((B,), S, dtype=torch.int32, device=q.device)
            out = mla_decode(q, pool, table, lens, softmax_scale=self.softmax_scale, head_dim_v=self.kv_lora_rank,
                             causal=True, return_lse=False, backend=self.backend, check_inputs=False,
                             kv_format=FP8_DS_MLA)
            return self.finish(out, "absorbed"), None
        if past > 0:  # as the kernel path: every row, the new ones too, as stored
            latent = dequantize_fp8_ds_mla(pool[:, :S_eff, 0], self.kv_lora_rank, new.shape[-1] - self.kv_lora_rank,
                                           new.dtype)
        else:
            latent = new[:, :S_eff]
        q, k, v = self.build_qkv(q_nope, q_rope, latent, form)
        res = attention_with_stats(
            q, k, v, causal=causal, softmax_scale=self.softmax_scale, attn_mask=keep, return_max_logit=False,
            backend=self.backend,
        )
        return self.finish(res.out, form), None

    def extra_repr(self) -> str:
        return f"form={self.form!r}, backend={self.backend!r}, layer_idx={self.layer_idx}, rope={self._hf_rope!r}"


class FP8LatentCache(_tf.DynamicCache):
    """A transformers cache for models patched by ``patch_model`` that stores the latent rows in FP8.

    Per layer one uint8 buffer ``[B, capacity, 1, row_bytes]`` in the ``fp8_ds_mla`` layout of ``mla.quant``
    (e4m3 latent with one power-of-two fp32 scale per 128 values, bf16 RoPE part; ``kv_lora_rank`` must be a
    multiple of 128), growing by doubling. transformers' own bookkeeping (sequence length, mask sizes) runs on
    one-byte placeholder keys / values kept by the parent ``DynamicCache`` (2 bytes per token and layer), so
    ``generate`` treats it as any dynamic cache. Beam reordering and batch selection apply to the bytes too
    (after ``crop`` the rows past the new length are overwritten by the next writes).

    Use: ``model.generate(ids, cache=FP8LatentCache(), ...)`` on a patched model.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._fp8: dict[int, torch.Tensor] = {}

    def append_latent(self, layer_idx: int, rows: torch.Tensor, kv_lora_rank: int, kwargs: dict) -> torch.Tensor:
        """Quantize and append ``rows [B, T, dc + dr]``; returns the layer's byte buffer (first ``S`` rows valid).

        Raises:
            ValueError: a batch size that does not continue the cached one, or ``dc`` not a multiple of 128.
        """
        B, T, width = rows.shape
        past = self.get_seq_length(layer_idx)
        # transformers' length / mask bookkeeping: one byte per token (an empty tensor would count as no tokens)
        stub = torch.zeros(B, 1, T, 1, dtype=torch.uint8, device=rows.device)
        self.update(stub, stub, layer_idx, kwargs=kwargs)
        data = quantize_fp8_ds_mla(rows.detach(), kv_lora_rank)[:, :, None]
        buf = self._fp8.get(layer_idx)
        if buf is not None and buf.shape[0] != B:
            raise ValueError(f"rows: batch {B} does not continue the cached batch {buf.shape[0]} of layer {layer_idx}")
        if buf is None or buf.shape[1] < past + T:
            cap = max(past + T, 16 if buf is None else 2 * buf.shape[1])
            new = data.new_zeros(B, cap, 1, data.shape[-1])
            if buf is not None:
                new[:, :past] = buf[:, :past]
            self._fp8[layer_idx] = buf = new
        buf[:, past:past + T] = data
        return buf

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token, summed over layers (the FP8 rows; plus 2 placeholder bytes per layer)."""
        return sum(buf.shape[-1] + 2 for buf in self._fp8.values())

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        for i, buf in self._fp8.items():
            self._fp8[i] = buf.index_select(0, beam_idx.to(buf.device))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        for i, buf in self._fp8.items():
            self._fp8[i] = buf.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        for i, buf in self._fp8.items():
            self._fp8[i] = buf[indices]

    def reset(self):
        super().reset()
        self._fp8.clear()


_PATCHED_CLASSES: dict[type, type] = {}


def _patched_class(hf_cls: type) -> type:
    """The replacement class of ``hf_cls`` (a ``_SUPPORTED`` class): ``Latent<hf_cls>``, its base (``_BASES``,
    default ``LatentAttentionForHF``) first in the MRO, then ``hf_cls`` (cached, picklable); or the base itself when
    it already subclasses ``hf_cls``."""
    cls = _PATCHED_CLASSES.get(hf_cls)
    if cls is not None:
        return cls
    mod, attr = _BASES.get(hf_cls.__name__, (__name__, "LatentAttentionForHF"))
    base = getattr(importlib.import_module(mod), attr)
    if issubclass(base, hf_cls):
        cls = base
    else:
        name = "Latent" + hf_cls.__name__
        params = [
            p.name for p in list(inspect.signature(hf_cls.forward).parameters.values())[2:]
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        cls = type(
            name,
            (base, hf_cls),
            {
                "__module__": __name__, "__qualname__": name, "_hf_rope": _SUPPORTED[hf_cls.__name__][1],
                "_hf_params": tuple(params), "__doc__": f"``{hf_cls.__name__}`` running the latent attention "
                f"(created by ``patch_model``; see ``{base.__name__}``).",
            },
        )
    _PATCHED_CLASSES[hf_cls] = cls
    return cls


def __getattr__(name: str):
    # Lets pickle find the dynamically created ``Latent<Class>`` classes.
    if name.startswith("Latent") and name[6:] in _SUPPORTED:
        mod, _ = _SUPPORTED[name[6:]]
        return _patched_class(getattr(importlib.import_module(mod), name[6:]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------------------------------
# patch / unpatch
# ---------------------------------------------------------------------------------------------------
def _attention_summary(model: nn.Module) -> str:
    names = Counter(
        type(m).__name__ for m in model.modules()
        if any(s in type(m).__name__.lower() for s in ("attention", "attn", "mla"))
    )
    if not names:
        return "no module whose class name mentions attention"
    return ", ".join(f"{n} (x{c})" for n, c in sorted(names.items()))


def patch_model(model: nn.Module, *, form: str = "auto", backend: str = "auto") -> nn.Module:
    """Replace every MLA attention module of a transformers model by the latent attention, in place.

    Supported (transformers >= 5.0, checked against 5.24): ``DeepseekV3Attention`` (DeepSeek-V3/R1),
    ``DeepseekV2Attention`` (DeepSeek-V2/-Lite, complex RoPE), ``Glm4MoeLiteAttention``, ``YoutuAttention``,
    ``AXK1Attention``, ``MiniCPM3Attention``, the DSA-sparse ``DeepseekV32Attention`` / ``GlmMoeDsaAttention``
    (DeepSeek-V3.2, GLM-5; ``mla.integrations.dsa``) and ``DeepseekV4Attention`` (all layer types, on top-k index
    lists: ``mla.integrations.deepseek_v4``) — exactly these classes, not subclasses — wherever they sit (e.g.
    Kimi-K2.5's ``Kimi_K25ForConditionalGeneration`` wraps a ``DeepseekV3Model``). The weights (same
    parameter objects), ``model.config`` (``q_lora_rank`` or none, ``rope_interleave``, any ``rope_parameters``
    transformers supports since its cos/sin are used, ``attention_bias``) and transformers' cache objects are
    kept, so ``model(...)`` and ``model.generate(...)`` (greedy, sampling, batched with left padding) work
    unchanged. Patching a patched model only updates ``form``/``backend``.

    Args:
        model: a loaded ``torch.nn.Module`` (typically a ``PreTrainedModel``) containing MLA attention modules.
        form: ``"auto"`` (naive for prefill / no cache, absorbed for decode steps of at most
            ``MultiHeadLatentAttention.absorb_max_q`` tokens), ``"naive"`` or ``"absorbed"`` (always).
        backend: ``"auto"`` (Triton kernels on CUDA, reference on CPU), ``"reference"`` or ``"triton"``
            (see ``mla.functional.latent_attention``).

    Returns:
        ``model`` itself (modified in place).

    Raises:
        ValueError: bad ``form``/``backend``; no MLA attention module (the message lists the attention modules
            found); MLA-like modules of a class whose forward is not the supported MLA (e.g. ``Mistral4Attention``,
            ``LongcatFlashMLA``) or a subclass of a supported one, or a config field the class's integration does
            not support (the field is named); modules
            dispatched with accelerate hooks (patch before ``dispatch_model``/``device_map`` offloading).
    """
    if form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    targets, refused = [], []
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if _is_replacement(child):
                targets.append((parent, child_name, child))
            elif _supported_key(type(child)) is not None:
                why = _patched_class(type(child))._unsupported(child)
                if hasattr(child, "_hf_hook") or "forward" in child.__dict__:
                    refused.append(f"{type(child).__name__} (its forward is wrapped, e.g. by accelerate hooks)")
                elif why is not None:
                    refused.append(f"{type(child).__name__} (unsupported {why})")
                else:
                    targets.append((parent, child_name, child))
            elif _is_mla_like(child):
                cls = type(child)
                why = _UNSUPPORTED_REASONS.get(cls.__name__)
                if why is None:
                    why = (
                        f"is a subclass of {next(b.__name__ for b in cls.__mro__ if _supported_key(b))}, which may "
                        "change its forward" if any(_supported_key(b) for b in cls.__mro__)
                        else "has MLA weights but a forward this integration has not been checked against"
                    )
                refused.append(f"{cls.__module__}.{cls.__name__} ({why})")
    if refused:
        raise ValueError(
            f"patch_model: {type(model).__name__} has MLA attention modules that cannot be replaced: "
            f"{'; '.join(sorted(set(refused)))}. Supported classes: {', '.join(SUPPORTED_ATTENTION_CLASSES)}"
        )
    if not targets:
        raise ValueError(
            f"patch_model: {type(model).__name__} has no MLA attention module to replace; attention modules "
            f"found: {_attention_summary(model)}. Supported classes: {', '.join(SUPPORTED_ATTENTION_CLASSES)}"
        )
    done: dict[int, nn.Module] = {}
    for parent, child_name, child in targets:
        if _is_replacement(child):
            child.form, child.backend = form, backend
            continue
        new = done.get(id(child))
        if new is None:
            new = _patched_class(type(child))._from_hf(child, form, backend)
            done[id(child)] = new
        setattr(parent, child_name, new)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original transformers attention modules back (inverse of ``patch_model``), in place.

    The originals get the patched modules' current submodules (so weights loaded or modules re-wrapped after
    patching are kept) and training flag. A model that is not patched is returned unchanged.

    Args:
        model: a model previously given to ``patch_model``.

    Returns:
        ``model`` itself.
    """
    restored: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not _is_replacement(child):
                continue
            orig = restored.get(id(child))
            if orig is None:
                orig = child.__dict__["_mla_original"]
                for name in list(orig._modules):
                    if name in child._modules:
                        orig._modules[name] = child._modules[name]
                orig.training = child.training
                restored[id(child)] = orig
            setattr(parent, child_name, orig)
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether ``model`` contains modules installed by ``patch_model``."""
    return any(_is_replacement(m) for m in model.modules())


# ---------------------------------------------------------------------------------------------------
# transformers AttentionInterface
# ---------------------------------------------------------------------------------------------------
def latent_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (``AttentionInterface``) running ``mla.functional.attention_with_stats``.

    This is the naive form: whatever per-head tensors the model built. Registered as ``"mla_latent"``.

    Args:
        module: the calling attention module (``is_causal`` read from it, default True).
        query: ``[B, Hq, T, Dk]`` (transformers layout); key ``[B, Hkv, S, Dk]``; value ``[B, Hkv, S, Dv]``;
            ``Hq % Hkv == 0``; float16/bfloat16/float32.
        attention_mask: None, a 4-D bool keep-mask / additive float mask ``[B|1, 1, T, >=S]`` or a 2-D padding
            mask (see ``_plan_mask``).
        scaling: softmax scale (default ``Dk ** -0.5``); dropout: must be 0 while training.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.

    Returns:
        ``(attn_output [B, T, Hq, Dv] in the input dtype, None)`` (no attention weights).

    Raises:
        ValueError: dropout > 0 in training, attention sinks (``s_aux``) or logit soft-capping requested, bad masks.
    """
    if dropout and module.training:
        raise ValueError(f"{ATTN_IMPLEMENTATION}: attention dropout ({dropout}) is not supported")
    if kwargs.get("s_aux") is not None or kwargs.get("softcap"):
        raise ValueError(
            f"{ATTN_IMPLEMENTATION}: attention sinks (s_aux) and soft-capping are not supported by the attention "
            f"function; for DeepSeek-V4 (sinks) use mla.integrations.transformers.patch_model(model) instead of "
            f"attn_implementation={ATTN_IMPLEMENTATION!r}"
        )
    if kwargs.get("indices") is not None:  # DSA (DeepSeek-V3.2, GLM-5): the indexer's top-k choice
        from mla.integrations.dsa import sparse_attention_forward

        return sparse_attention_forward(
            module, query, key, value, attention_mask, scaling, kwargs["indices"], backend=backend
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B, T = q.shape[:2]
    S = k.shape[1]
    kernels = resolve_backend(backend, q.device, q.dtype) == "triton"
    S_eff, causal, mask = _plan_mask(attention_mask, B, T, S, q.device, causal=causal, kernels=kernels)
    if S_eff != S:
        k, v = k[:, :S_eff], v[:, :S_eff]
    res = attention_with_stats(
        q, k, v, causal=causal, softmax_scale=scaling, attn_mask=mask, return_max_logit=False, backend=backend
    )
    return res.out, None


def register_attention_implementation(name: str = ATTN_IMPLEMENTATION, *, backend: str = "auto") -> str:
    """Register ``latent_attention_forward`` in transformers' ``AttentionInterface`` (and the sdpa-style bool mask
    builder in ``AttentionMaskInterface``) under ``name``, so ``from_pretrained(..., attn_implementation=name)``
    / ``model.set_attn_implementation(name)`` use it (naive form, any model using the attention interface).

    Done at import for ``"mla_latent"`` with ``backend="auto"``; call again to register another backend under
    another name. Source: ``transformers.AttentionInterface`` / ``transformers.masking_utils`` (transformers >= 5).

    Args:
        name: the implementation name; backend: passed to every call.

    Returns:
        ``name``.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    fn: Callable = latent_attention_forward
    if backend != "auto":

        def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
            return latent_attention_forward(
                module, query, key, value, attention_mask, scaling, dropout, backend=backend, **kwargs
            )

    _tf.AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


register_attention_implementation()
