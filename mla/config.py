"""``MLAConfig``: model sizes with Hugging Face DeepseekV3 field names, plus presets and a registry.

Presets (attention sizes as published):

* ``tiny``: a byte-level model for the quickstart and tests (runs on a laptop CPU).
* ``deepseek-v2-lite``: DeepSeek-V2-Lite (arXiv 2405.04434, HF ``deepseek-ai/DeepSeek-V2-Lite``):
  hidden 2048, 16 heads, no query compression, ``kv_lora_rank`` 512, 128 + 64 qk dims, YaRN x40.
* ``deepseek-v3``: DeepSeek-V3 (arXiv 2412.19437, HF ``deepseek-ai/DeepSeek-V3``): hidden 7168, 128
  heads, ``q_lora_rank`` 1536, ``kv_lora_rank`` 512, 128 + 64 qk dims, ``v_head_dim`` 128, YaRN x40.
* ``deepseek-v3.2``: DeepSeek-V3.2 (HF ``deepseek-ai/DeepSeek-V3.2``, transformers ``deepseek_v32``): DeepSeek-V3's
  attention plus the DSA lightning indexer, 64 heads x 128, ``index_topk`` 2048, half-split indexer RoPE.
* ``glm-5``: GLM-5 (HF ``zai-org/GLM-5``, transformers ``glm_moe_dsa``): hidden 6144, 78 layers, 64 heads,
  ``q_lora_rank`` 2048, ``kv_lora_rank`` 512, 192 + 64 qk dims, ``v_head_dim`` 256, RoPE theta 1e6 (no YaRN),
  indexer 32 heads x 128, ``index_topk`` 2048, interleaved indexer RoPE.

Our ``TransformerBlock`` uses a dense SwiGLU MLP of ``intermediate_size``; the DeepSeek presets carry
their dense-layer ``intermediate_size`` (their MoE layers are out of this package's scope).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MLAConfig", "PRESETS"]


@dataclass
class MLAConfig:
    """Sizes of an MLA model (field names as in transformers' ``DeepseekV3Config``).

    Attention: ``num_attention_heads``; ``q_lora_rank`` (None = a full ``q_proj``); ``kv_lora_rank`` (dc,
    the compressed latent); ``qk_nope_head_dim`` (dn) and ``qk_rope_head_dim`` (dr, decoupled RoPE);
    ``v_head_dim`` (dv). The KV cache holds ``kv_lora_rank + qk_rope_head_dim`` values per token.
    ``rope_parameters``: transformers-style dict (``rope_type`` ``"default"``/``"yarn"``, ``rope_theta``,
    YaRN keys). ``rope_interleave``: DeepSeek's interleaved rotary layout.

    ``sliding_window`` (transformers' name, gpt-oss / DeepSeek-V4): None, or each token attends to itself
    and the ``sliding_window - 1`` tokens before it (``window_size = (sliding_window - 1, 0)``).
    ``attention_sinks``: one learnable fp32 sink logit per head (the module's ``sinks`` parameter, as
    gpt-oss / DeepSeek-V4 name it) joins every softmax with no value.

    Sparse attention (``LatentSparseAttention``): ``sparse_block_size`` tokens per block,
    ``num_sink_blocks``, ``num_local_blocks``, ``topk_blocks``; lightning indexer ``index_n_heads``,
    ``index_head_dim``, ``index_topk`` (DeepSeek-V3.2 names); ``index_rope_interleave``: the indexer's RoPE on
    interleaved pairs (GLM-5) instead of DeepSeek-V3.2's half-split layout.

    Raises:
        ValueError: from ``validate()`` on inconsistent sizes.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    intermediate_size: int = 640
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    max_position_embeddings: int = 2048
    rope_parameters: dict[str, Any] | None = field(
        default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0}
    )
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    attention_sinks: bool = False
    # sparse attention
    sparse_block_size: int = 64
    num_sink_blocks: int = 1
    num_local_blocks: int = 2
    topk_blocks: int = 4
    index_n_heads: int = 4
    index_head_dim: int = 32
    index_topk: int = 256
    index_rope_interleave: bool = False

    @property
    def qk_head_dim(self) -> int:
        """``qk_nope_head_dim + qk_rope_head_dim``."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def rope_theta(self) -> float:
        return float((self.rope_parameters or {}).get("rope_theta", 10000.0))

    @property
    def cache_values_per_token(self) -> int:
        """Values one layer's latent cache stores per token: ``kv_lora_rank + qk_rope_head_dim``."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def expanded_cache_values_per_token(self) -> int:
        """Values a standard multi-head K/V cache stores per token and layer: ``H·(dn+dr) + H·dv``."""
        return self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)

    def validate(self) -> MLAConfig:
        """Check sizes; returns self.

        Raises:
            ValueError: a non-positive size, an odd ``qk_rope_head_dim``, or a bad ``rope_parameters``.
        """
        for name in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "sparse_block_size", "index_n_heads", "index_head_dim",
        ):
            val = getattr(self, name)
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"MLAConfig.{name}: expected a positive int, got {val!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            raise ValueError(f"MLAConfig.q_lora_rank: expected None or a positive int, got {self.q_lora_rank!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim: must be even for RoPE, got {self.qk_rope_head_dim}")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(
                f"MLAConfig.index_head_dim ({self.index_head_dim}) must be >= "
                f"qk_rope_head_dim ({self.qk_rope_head_dim})"
            )
        kind = (self.rope_parameters or {}).get("rope_type", "default")
        if kind not in ("default", "yarn"):
            raise ValueError(f"MLAConfig.rope_parameters: rope_type {kind!r} not supported ('default' or 'yarn')")
        if kind == "yarn" and "factor" not in self.rope_parameters:
            raise ValueError("MLAConfig.rope_parameters: YaRN needs 'factor'")
        if self.sliding_window is not None and (
            isinstance(self.sliding_window, bool) or not isinstance(self.sliding_window, int) or self.sliding_window < 1
        ):
            raise ValueError(f"MLAConfig.sliding_window: expected None or a positive int, got {self.sliding_window!r}")
        if not isinstance(self.index_rope_interleave, bool):
            raise ValueError(f"MLAConfig.index_rope_interleave: expected a bool, got {self.index_rope_interleave!r}")
        if not isinstance(self.attention_sinks, bool):
            raise ValueError(f"MLAConfig.attention_sinks: expected a bool, got {self.attention_sinks!r}")
        for name in ("num_sink_blocks", "num_local_blocks", "topk_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"MLAConfig.{name}: expected >= 0, got {getattr(self, name)}")
        return self

    def replace(self, **overrides) -> MLAConfig:
        """Copy with fields replaced (unknown names raise ``TypeError``), validated."""
        return dataclasses.replace(self, **overrides).validate()

    def to_dict(self) -> dict[str, Any]:
        """Every field as a plain dict (JSON-serialisable; the inverse of ``from_dict``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MLAConfig:
        """Build from a dict, ignoring keys that are not fields (e.g. a transformers config's extras)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names}).validate()

    @classmethod
    def from_transformers(cls, hf_config) -> MLAConfig:
        """Build from a transformers ``DeepseekV3Config``/``DeepseekV2Config``-like object (read by attribute).

        Older configs with ``rope_scaling`` + ``rope_theta`` (transformers 4.x) are converted to
        ``rope_parameters``.
        """
        names = [f.name for f in dataclasses.fields(cls)]
        d = {n: getattr(hf_config, n) for n in names if hasattr(hf_config, n) and getattr(hf_config, n) is not None}
        rp = getattr(hf_config, "rope_parameters", None)
        if not rp:
            rs = dict(getattr(hf_config, "rope_scaling", None) or {})
            rs.setdefault("rope_type", rs.pop("type", "default"))
            rs["rope_theta"] = float(getattr(hf_config, "rope_theta", 10000.0))
            rp = rs
        d["rope_parameters"] = dict(rp)
        if "rope_interleave" not in d:
            d["rope_interleave"] = True
        if getattr(hf_config, "model_type", None) == "glm_moe_dsa":  # GLM-5's indexer interleaves its RoPE pairs
            d.setdefault("index_rope_interleave", True)
        return cls(**d).validate()


def _tiny() -> MLAConfig:
    return MLAConfig()


def _v2_lite() -> MLAConfig:
    return MLAConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_hidden_layers=27,
        num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
        },
        rope_interleave=True, rms_norm_eps=1e-6, index_n_heads=64, index_head_dim=128, index_topk=2048,
    )


def _v3() -> MLAConfig:
    return MLAConfig(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
        num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        },
        rope_interleave=True, rms_norm_eps=1e-6, index_n_heads=64, index_head_dim=128, index_topk=2048,
        sparse_block_size=64,
    )


def _v4_flash() -> MLAConfig:
    """DeepSeek-V4-Flash's attention sizes in MLAConfig's fields (transformers' ``DeepseekV4Config`` defaults, which
    are V4-Flash's: hidden 4096, 43 layers, 64 heads of ``head_dim`` 512 with 64 RoPE channels, ``q_lora_rank`` 1024,
    window 128, sinks, indexer 64 heads x 128 keeping 512). V4's one shared key = value head of 512 values is
    ``kv_lora_rank`` 448 + ``qk_rope_head_dim`` 64 (so ``cache_values_per_token`` is V4's 512), each head's query
    ``qk_nope_head_dim`` 448 + 64 and its output ``v_head_dim`` 512. An ``MLACausalLM`` built from it is an MLA model
    of V4's attention shape, window and sinks, not V4 (no compressors, grouped output projection or
    hyper-connections): run V4 itself through transformers and ``mla.integrations.transformers.patch_model``."""
    return MLAConfig(
        vocab_size=129280, hidden_size=4096, intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
        q_lora_rank=1024, kv_lora_rank=448, qk_nope_head_dim=448, qk_rope_head_dim=64, v_head_dim=512,
        max_position_embeddings=1048576, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rope_interleave=True, rms_norm_eps=1e-6, sliding_window=128, attention_sinks=True, index_n_heads=64,
        index_head_dim=128, index_topk=512,
    )


def _v32() -> MLAConfig:
    # DeepSeek-V3.2's config.json: V3's sizes; its indexer fields were already V3.2's in the v3 preset.
    return _v3()


def _glm5() -> MLAConfig:
    return MLAConfig(
        vocab_size=154880, hidden_size=6144, intermediate_size=12288, num_hidden_layers=78,
        num_attention_heads=64, q_lora_rank=2048, kv_lora_rank=512, qk_nope_head_dim=192,
        qk_rope_head_dim=64, v_head_dim=256, max_position_embeddings=202752,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        rope_interleave=True, rms_norm_eps=1e-5, index_n_heads=32, index_head_dim=128, index_topk=2048,
        index_rope_interleave=True, sparse_block_size=64,
    )


#: Built-in presets; ``mla.registry`` starts with these.
PRESETS: dict[str, Callable[[], MLAConfig]] = {
    "tiny": _tiny,
    "deepseek-v2-lite": _v2_lite,
    "deepseek-v3": _v3,
    "deepseek-v3.2": _v32,
    "glm-5": _glm5,
    "deepseek-v4-flash": _v4_flash,
}


def require_config(config) -> MLAConfig:
    """``config`` validated, for module constructors.

    Raises:
        TypeError: not an ``MLAConfig`` (e.g. a preset name: use ``mla.registry.get(name)``).
        ValueError: as ``MLAConfig.validate``.
    """
    if not isinstance(config, MLAConfig):
        raise TypeError(
            f"config: expected an mla.MLAConfig (e.g. mla.registry.get('tiny')), got {type(config).__name__}"
        )
    return config.validate()
