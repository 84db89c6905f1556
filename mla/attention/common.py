"""Shared pieces of the attention modules: ``AttentionStats``, ``RMSNorm``, density helpers, ``FORMS``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

FORMS = ("auto", "naive", "absorbed")


@dataclass
class AttentionStats:
    """What an attention call did.

    backend: ``"triton"`` or ``"reference"``. latent_dim: per-head contraction dim of the scores.
    density: fraction of the ``T × S`` (query, key) pairs attended (1.0 dense non-causal).
    max_logit: float32 ``[H]`` maximum scaled score per head over the batch (detached), the quantity
    QK-clip style stability tools watch; None when not computed. form: MLA execution form or None.
    visited_blocks / visited_tokens: sparse modules only (key blocks listed / keys selected, summed).
    indexer_loss: ``LatentSparseAttention(mode="topk")`` KL loss of the indexer when requested.

    ``density``, ``visited_blocks`` and ``visited_tokens`` are computed on the device and kept as
    tensors (a forward or decode step never waits for the GPU to report them); they become Python
    numbers when read, which syncs once. The raw values are ``density_raw``, ``visited_blocks_raw``,
    ``visited_tokens_raw`` (float / int or 0-dim tensors).
    """

    backend: str
    latent_dim: int
    density_raw: float | torch.Tensor
    max_logit: torch.Tensor | None = None
    form: str | None = None
    visited_blocks_raw: int | torch.Tensor | None = None
    visited_tokens_raw: int | torch.Tensor | None = None
    indexer_loss: torch.Tensor | None = None

    @property
    def density(self) -> float:
        d = self.density_raw
        return float(d) if isinstance(d, torch.Tensor) else d

    @property
    def visited_blocks(self) -> int | None:
        v = self.visited_blocks_raw
        return int(v) if isinstance(v, torch.Tensor) else v

    @property
    def visited_tokens(self) -> int | None:
        v = self.visited_tokens_raw
        return int(v) if isinstance(v, torch.Tensor) else v


def causal_density(T: int, S: int) -> float:
    """Fraction of ``T × S`` pairs a bottom-right causal mask keeps: ``Σ_i clamp(i + S - T + 1, 0, S) / (T·S)``."""
    if T == 0 or S == 0:
        return 0.0
    # Row i sees max(0, i + S - T + 1) keys (never more than S): closed form, no loop over T.
    total = T * (S - T + 1) + T * (T - 1) // 2 if S >= T else S * (S + 1) // 2
    return total / (T * S)


def _causal_density_t(T: int, S: torch.Tensor) -> torch.Tensor:
    """``causal_density(T, S)`` for a 0-dim integer tensor ``S`` (float64 0-dim tensor, no host sync)."""
    S = S.double()
    total = torch.where(S >= T, T * (S - T + 1) + T * (T - 1) // 2, S * (S + 1) / 2)
    return torch.where(S > 0, total / (T * S).clamp(min=1), torch.zeros_like(S))


def _head_max(max_logit: torch.Tensor | None) -> torch.Tensor | None:
    return None if max_logit is None else max_logit.detach().float().amax(dim=0)


def _check_input_dtype(name: str, t: torch.Tensor, param_dtype: torch.dtype) -> None:
    """TypeError when input ``t`` and the module's parameters differ in dtype outside autocast (which casts
    both); otherwise the first projection fails with a matmul error that names neither. A non-float input
    (e.g. token ids passed where hidden states belong) is refused as such."""
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor (the module's parameters are {param_dtype}), "
                        f"got {t.dtype}")
    if t.dtype != param_dtype and not torch.is_autocast_enabled(t.device.type):
        raise TypeError(
            f"{name}: dtype {t.dtype} does not match the module's parameters ({param_dtype}); convert one of "
            f"them ({name}.to({param_dtype}) or module.to({t.dtype}))"
        )


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32 like transformers'
    ``DeepseekV3RMSNorm``: ``weight * x / sqrt(mean(x²) + eps)``. Input ``[..., dim]``, output same dtype."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dt)
