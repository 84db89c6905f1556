"""Transformer pieces around MLA: RMSNorm, SwiGLU MLP, ``TransformerBlock`` and a small ``MLACausalLM``.

Parameter names follow transformers' DeepseekV3 decoder layer (``input_layernorm``, ``self_attn``,
``post_attention_layernorm``, ``mlp.gate_proj/up_proj/down_proj``; ``embed_tokens``, ``norm``,
``lm_head``). The MLP is dense SwiGLU (Shazeer 2020, arXiv 2002.05202); MoE is out of scope.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mla.attention import AttentionStats, LatentSparseAttention, MultiHeadLatentAttention, RMSNorm
from mla.cache import LatentCache, PagedLatentCache
from mla.config import MLAConfig, require_config

__all__ = ["RMSNorm", "SwiGLU", "TransformerBlock", "MLACausalLM", "CausalLMOutput"]


class SwiGLU(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))``: ``[..., hidden] -> [..., hidden]``."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``.

    Args:
        config: ``MLAConfig``; layer_idx: this block's slot in a ``LatentCache``.
        attention: ``"mla"`` (``MultiHeadLatentAttention``) or ``"sparse"`` (``LatentSparseAttention``).
        sparse_mode: ``"block"`` or ``"topk"`` for ``attention="sparse"``.
        form, backend: passed to the attention module. indexer_loss: see ``LatentSparseAttention``.

    ``forward(x [B,T,E], *, position_ids=None, cache=None, attention_mask=None)`` returns
    ``(x [B,T,E], AttentionStats)``.
    """

    def __init__(
        self,
        config: MLAConfig,
        layer_idx: int = 0,
        *,
        attention: str = "mla",
        sparse_mode: str = "block",
        form: str = "auto",
        backend: str = "auto",
        indexer_loss: bool = False,
    ):
        super().__init__()
        if attention == "mla":
            self.self_attn = MultiHeadLatentAttention(config, layer_idx, form=form, backend=backend)
        elif attention == "sparse":
            self.self_attn = LatentSparseAttention(
                config, layer_idx, mode=sparse_mode, form=form, backend=backend, indexer_loss=indexer_loss
            )
        else:
            raise ValueError(f"attention: expected 'mla' or 'sparse', got {attention!r}")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, *, position_ids=None, cache=None, attention_mask=None, **packed):
        # packed: cu_seqlens / max_seqlen of packed documents (MultiHeadLatentAttention only).
        h, stats = self.self_attn(
            self.input_layernorm(x), position_ids=position_ids, cache=cache, attention_mask=attention_mask, **packed
        )
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, stats


class CausalLMOutput(NamedTuple):
    """``logits [B, T, vocab]``; ``loss`` scalar (cross entropy over ``targets``, plus indexer losses) or
    None; ``stats`` one ``AttentionStats`` per layer."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    stats: list[AttentionStats]


class MLACausalLM(nn.Module):
    """Decoder-only language model with MLA blocks (embedding, blocks, final RMSNorm, LM head).

    Args:
        config: ``MLAConfig``; attention / sparse_mode / form / backend / indexer_loss: see
            ``TransformerBlock``. indexer_loss_weight: weight of the indexers' KL losses in ``loss``.

    ``forward(input_ids [B,T] int64, *, targets=None, cache=None, position_ids=None, attention_mask=None,
    cu_seqlens=None, max_seqlen=None)`` returns ``CausalLMOutput``; ``targets [B, T]`` are the next tokens
    (``-100`` ignored). Packed documents: ``input_ids [1, total]`` with int32 ``cu_seqlens [D+1]``: no
    attention across documents, positions restart per document (``attention="mla"`` only).

    Raises:
        ValueError / TypeError: ``input_ids`` not a 2-D integer tensor or with ids outside the vocabulary
            (checked on CPU inputs; on CUDA, embedding's device-side assert).
    """

    def __init__(
        self,
        config: MLAConfig,
        *,
        attention: str = "mla",
        sparse_mode: str = "block",
        form: str = "auto",
        backend: str = "auto",
        indexer_loss: bool = False,
        indexer_loss_weight: float = 1.0,
    ):
        super().__init__()
        require_config(config)
        self.config = config
        self.indexer_loss_weight = indexer_loss_weight
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            TransformerBlock(
                config, i, attention=attention, sparse_mode=sparse_mode, form=form, backend=backend,
                indexer_loss=indexer_loss,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)

    def num_parameters(self) -> int:
        """Number of parameters (shared weights counted once)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self) -> LatentCache:
        """An empty ``LatentCache`` with one slot per layer."""
        return LatentCache(self.config.num_hidden_layers)

    def forward(self, input_ids, *, targets=None, cache=None, position_ids=None, attention_mask=None,
                cu_seqlens=None, max_seqlen=None):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            got = getattr(input_ids, "shape", input_ids)
            raise ValueError(f"input_ids: expected a [B, T] integer tensor, got {got!r}")
        if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer dtype, got {input_ids.dtype}")
        if input_ids.numel() and input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            # CPU only: on CUDA the check would be a host sync per step (and break CUDA-graph capture of
            # decode), so there nn.Embedding's device-side assert stands; on CPU it names the argument.
            lo, hi = torch.aminmax(input_ids)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids: ids must be in [0, vocab_size={self.config.vocab_size}), got "
                                 f"[{lo}, {hi}]")
        x = self.embed_tokens(input_ids)
        stats = []
        packed = {} if cu_seqlens is None else dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        for layer in self.layers:
            x, st = layer(x, position_ids=position_ids, cache=cache, attention_mask=attention_mask, **packed)
            stats.append(st)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
            extra = [s.indexer_loss for s in stats if s.indexer_loss is not None]
            if extra:
                loss = loss + self.indexer_loss_weight * torch.stack(extra).sum()
        return CausalLMOutput(logits, loss, stats)

    def new_paged_cache(self, batch_size: int, max_tokens: int, *, page_size: int = 64, dtype=None, device=None,
                        kv_format: str | None = None):
        """A ``PagedLatentCache`` with room for ``batch_size`` sequences of ``max_tokens`` tokens
        (``kv_format="fp8_ds_mla"``: the FP8 cache of ``mla.quant``, ``kv_lora_rank`` a multiple of 128).

        Its block table has the fixed width ``ceil(max_tokens / page_size)``, so every decode step of a
        batch has the same shapes (one compiled graph / CUDA graph serves all steps)."""
        per_seq = max(1, -(-max_tokens // page_size))
        p = self.embed_tokens.weight
        return PagedLatentCache(
            self.config.num_hidden_layers, self.config.cache_values_per_token,
            num_pages=max(1, batch_size * per_seq), page_size=page_size, dtype=dtype or p.dtype,
            device=device or p.device, max_pages_per_seq=per_seq, kv_format=kv_format,
            kv_lora_rank=self.config.kv_lora_rank,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        attention_mask: torch.Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        page_size: int = 64,
        kv_format: str | None = None,
    ) -> torch.Tensor:
        """Autoregressive decoding through a paged latent cache (``PagedLatentCache`` + ``mla_decode``).

        The prompts are prefilled once; each new token then attends over the pages in the absorbed form
        (the split-KV decode kernel on CUDA, the reference on CPU).

        Args:
            input_ids: ``[B, T]`` int64 prompts. Prompts of different lengths: pass ``attention_mask``
                ``[B, T]`` (1 = real token; padding on either side, real tokens contiguous).
            max_new_tokens: tokens to add per sequence.
            temperature: 0 = greedy; otherwise sample ``softmax(logits / temperature)`` restricted to the
                ``top_k`` most likely tokens when given.
            eos_token_id: a sequence that produced it keeps producing it; generation stops once all have.
            generator: ``torch.Generator`` for sampling. page_size: tokens per cache page.
            kv_format: ``None`` (cache in the model's dtype) or ``"fp8_ds_mla"``: the FP8 latent cache of
                DeepSeek-V3.2 (``mla.quant``; ``kv_lora_rank`` a multiple of 128). The prompt attends over its
                own unquantized rows; every generated token attends over the quantized cache.

        Returns:
            ``[B, T + n]`` int64: ``input_ids`` followed by the ``n <= max_new_tokens`` new tokens.

        Raises:
            ValueError: empty prompt, negative ``max_new_tokens``/``temperature``, a bad ``attention_mask``
                or ``kv_format``.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected a non-empty [B, T] prompt, got {tuple(input_ids.shape)}")
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError(f"max_new_tokens and temperature must be >= 0, got {max_new_tokens}, {temperature}")
        B, T = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            prompt, lengths = input_ids, [T] * B
        else:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask: expected [B, T] = {[B, T]}, got {list(attention_mask.shape)}")
            real = attention_mask.to(device).bool()
            lengths = real.sum(1).tolist()
            if min(lengths) < 1:
                raise ValueError("attention_mask: every prompt needs at least one real token")
            # Move each prompt's real tokens to the front (right padding): positions then start at 0.
            order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
            prompt = torch.gather(input_ids, 1, order)
        was_training = self.training
        self.eval()
        cache = self.new_paged_cache(B, max(lengths) + max_new_tokens, page_size=page_size, device=device,
                                     kv_format=kv_format)
        seqs = cache.add_sequences(B)
        try:
            cache.begin_step(seqs, lengths)
            logits = self(prompt, cache=cache).logits
            logits = logits[torch.arange(B, device=device), torch.tensor(lengths, device=device) - 1]
            done = torch.zeros(B, dtype=torch.bool, device=device)
            new = []
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, generator)
                if eos_token_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                    done |= nxt == eos_token_id
                new.append(nxt)
                if step == max_new_tokens - 1 or (eos_token_id is not None and bool(done.all())):
                    break
                cache.begin_step(seqs, 1)
                logits = self(nxt[:, None], cache=cache).logits[:, -1]
            return torch.cat([input_ids] + [t[:, None] for t in new], dim=1)
        finally:
            cache.release(seqs)
            self.train(was_training)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, generator=None) -> torch.Tensor:
    """Next token ids ``[B]`` from ``logits [B, V]``: argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
