"""Functional latent attention: input validation and backend dispatch (DESIGN §4, §8).

``latent_attention`` is the one entry point the modules use. It checks every argument on the host
(clear ``TypeError``/``ValueError`` naming the argument, before any kernel launch) and dispatches to

* ``"reference"``: ``mla.reference.attention_reference`` (pure PyTorch, autograd through torch ops);
* ``"triton"``: the fused kernels behind ``mla.autograd`` (CUDA tensors, or CPU tensors under the
  Triton interpreter ``TRITON_INTERPRET=1``);
* ``"auto"``: Triton when the tensors are on CUDA and the kernels are usable, the reference otherwise.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from mla import reference as _ref
from mla.quant import FP8_DS_MLA, KV_FORMATS, fp8_ds_mla_row_bytes
from mla.sparsity import (
    BlockMask,
    as_block_mask,
    check_block_mask,
    check_topk_indices,
    topk_as_int32,
    topk_to_dense_mask,
)

__all__ = [
    "latent_attention",
    "latent_attention_varlen",
    "attention_with_stats",
    "attention_probs",
    "resolve_backend",
    "AttentionResult",
    "BACKENDS",
    "mla_decode",
]

BACKENDS = ("auto", "reference", "triton")
#: Why ``window_size`` with a ``block_mask`` / ``topk_indices`` does not run on the kernels.
WINDOW_WITH_SPARSE = "window_size with block_mask / topk_indices runs on backend='reference' only"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AttentionResult(NamedTuple):
    """What ``attention_with_stats`` returns.

    out: ``[B, T, Hq, Dv]`` in the input dtype. lse: ``[B, Hq, T]`` float32 (natural log, ``+inf`` for
    rows with no key). max_logit: ``[B, Hq]`` float32 maximum scaled score (``-inf`` if none) or None.
    backend: ``"reference"`` or ``"triton"``, the path that ran.
    """

    out: torch.Tensor
    lse: torch.Tensor
    max_logit: torch.Tensor | None
    backend: str


def _triton_usable(device: torch.device) -> tuple[bool, str]:
    """Whether the fused kernels can run on ``device`` (and why not)."""
    try:
        from kernels._config import HAS_TRITON, INTERPRET
        from mla import autograd as _ag  # noqa: F401  (imports kernels and triton)
    except ImportError as e:  # pragma: no cover - depends on the install
        return False, f"the Triton kernels could not be imported ({e})"
    if not HAS_TRITON:
        return False, "triton is not installed"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and INTERPRET:
        return True, ""
    if device.type == "cpu":
        return False, (
            "CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 in the environment before "
            "importing mla/kernels"
        )
    return False, f"device type {device.type!r} is not supported by the Triton kernels"


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Map ``"auto" | "reference" | "triton"`` to the path that will run on ``device``.

    ``"auto"`` picks ``"triton"`` for CUDA tensors (not float64) when the kernels import, else
    ``"reference"``.

    Raises:
        ValueError: unknown backend, or ``"triton"`` where the kernels cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if device.type != "cuda" or dtype == torch.float64:
            return "reference"
        ok, _ = _triton_usable(device)
        return "triton" if ok else "reference"
    ok, why = _triton_usable(device)
    if not ok:
        raise ValueError(f"backend='triton' is unavailable: {why}")
    if dtype == torch.float64:
        raise TypeError("backend='triton': float64 inputs are only supported by backend='reference'")
    return "triton"


def _check_tensor(name: str, t, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor {layout}, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_qkv(q, k, v, layouts: tuple[str, str, str]) -> None:
    """q, k, v: float tensors of the rank of their ``layouts``, with q's dtype and device."""
    for name, t, layout in zip("qkv", (q, k, v), layouts):
        _check_tensor(name, t, layout.count(",") + 1, layout)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} does not match q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, but q is on {q.device}")


def _check_scale(softmax_scale, Dk: int) -> float:
    if softmax_scale is None:
        return Dk**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale: expected a positive float or None, got {type(softmax_scale).__name__}")
    s = float(softmax_scale)
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) s may be symbolic. NaN fails both.
    if not (0 < s < math.inf):
        raise ValueError(f"softmax_scale: expected a finite positive float, got {softmax_scale}")
    return s


def _check_attn_mask(attn_mask, B: int, Hq: int, T: int, S: int, device) -> None:
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask: expected a bool or float torch.Tensor, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        raise TypeError(f"attn_mask: expected dtype bool (True = attend) or a float bias, got {attn_mask.dtype}")
    if attn_mask.device != device:
        raise ValueError(f"attn_mask: on device {attn_mask.device}, but q is on {device}")
    full = (B, Hq, T, S)
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or len(shape) < 2 or any(
        d not in (1, f) for d, f in zip(shape, full[4 - len(shape) :])
    ):
        raise ValueError(
            f"attn_mask: expected a shape broadcastable to [B, Hq, T, S] = {list(full)}, got {list(shape)}"
        )


def check_window_size(window_size) -> tuple[int, int]:
    """``window_size`` as a pair of ints ``>= -1`` (``-1`` = unbounded); raises ValueError naming it."""
    ok = isinstance(window_size, (tuple, list)) and len(window_size) == 2 and all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w >= -1 for w in window_size
    )
    if not ok:
        raise ValueError(
            f"window_size: expected a pair (left, right) of ints >= -1 (-1 = unbounded), got {window_size!r}"
        )
    return int(window_size[0]), int(window_size[1])


def check_sinks(sinks, H: int, device) -> None:
    """``sinks``: float32 ``[H]`` on ``device`` (one logit per query head).

    Raises TypeError (not a tensor, dtype other than float32) or ValueError (shape, device) naming ``sinks``.
    """
    if sinks is None:
        return
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks: expected a float32 torch.Tensor [Hq={H}], got {type(sinks).__name__}")
    if sinks.dtype != torch.float32:
        raise TypeError(f"sinks: expected dtype float32 (one logit per query head), got {sinks.dtype}")
    if tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks: expected shape [Hq] = [{H}], got {list(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks: on device {sinks.device}, but q is on {device}")


def _validate(
    q, k, v, causal, softmax_scale, block_mask, topk_indices, attn_mask, backend, check_indices,
    window_size=(-1, -1), sinks=None,
) -> tuple[float, str, torch.Tensor | None, BlockMask | None]:
    _check_qkv(q, k, v, ("[B, T, Hq, Dk]", "[B, S, Hkv, Dk]", "[B, S, Hkv, Dv]"))
    B, T, Hq, Dk = q.shape
    _, S, Hkv, _ = k.shape
    if k.shape[0] != B:
        raise ValueError(f"k: batch size {k.shape[0]} does not match q's batch size {B}")
    if v.shape[0] != B:
        raise ValueError(f"v: batch size {v.shape[0]} does not match q's batch size {B}")
    if v.shape[1] != S:
        raise ValueError(f"v: sequence length {v.shape[1]} does not match k's sequence length {S}")
    if v.shape[2] != Hkv:
        raise ValueError(f"v: {v.shape[2]} heads do not match k's {Hkv} heads")
    if k.shape[3] != Dk:
        raise ValueError(f"k: head dim {k.shape[3]} does not match q's head dim {Dk}")
    if min(Hq, Hkv, Dk, v.shape[3]) < 1:
        raise ValueError(f"q/k/v: heads and head dims must be >= 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(
            f"q/k: the number of query heads Hq={Hq} must be a multiple of the number of kv heads Hkv={Hkv}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    scale = _check_scale(softmax_scale, Dk)
    if block_mask is not None and topk_indices is not None:
        raise ValueError("block_mask and topk_indices are exclusive: pass at most one of them")
    if block_mask is not None:
        block_mask = check_block_mask(block_mask, B, Hq, T, S, q.device, check_values=check_indices)
    if topk_indices is not None:
        topk_indices = check_topk_indices(topk_indices, B, T, Hkv, S, q.device, check_values=check_indices)
    if attn_mask is not None:
        _check_attn_mask(attn_mask, B, Hq, T, S, q.device)
    window_size = check_window_size(window_size)
    check_sinks(sinks, Hq, q.device)
    path = resolve_backend(backend, q.device, q.dtype)
    if path == "triton" and window_size != (-1, -1) and (block_mask is not None or topk_indices is not None):
        # The sparse kernels take no window (the dense ones do): combined masks run on the reference.
        if backend == "triton":
            raise ValueError(f"backend='triton': {WINDOW_WITH_SPARSE}")
        path = "reference"
    if attn_mask is not None:
        if backend == "triton":
            raise ValueError(
                "attn_mask: arbitrary element masks run on backend='reference' only; express the pattern "
                "as causal, a BlockMask or topk_indices to use the kernels"
            )
        path = "reference"
    return scale, path, topk_indices, block_mask


def attention_with_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: BlockMask | None = None,
    topk_indices: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    return_max_logit: bool = True,
    backend: str = "auto",
    check_indices: bool = True,
    deterministic: bool = True,
    lse_grad: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
) -> AttentionResult:
    """``latent_attention`` that also returns ``lse``, the per-head max logit and the backend used.

    Arguments as for ``latent_attention``; ``lse_grad=False`` says gradients will not flow through ``lse``
    (then the CPU reference path may use torch's fused kernel, whose ``lse`` has no gradient).
    Returns an ``AttentionResult`` (out, lse, max_logit, backend);
    ``max_logit`` is ``[B, Hq]`` float32 (detached) when ``return_max_logit``.
    """
    for name, flag in (("return_max_logit", return_max_logit), ("deterministic", deterministic)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name}: expected a bool, got {type(flag).__name__}")
    scale, path, topk_indices, block_mask = _validate(
        q, k, v, causal, softmax_scale, block_mask, topk_indices, attn_mask, backend, check_indices,
        window_size, sinks,
    )
    window_size = tuple(int(w) for w in window_size)
    if path == "triton":
        from mla.autograd import triton_attention

        out, lse, max_logit = triton_attention(
            q, k, v, causal=causal, softmax_scale=scale, block_mask=block_mask,
            topk_indices=topk_indices, return_max_logit=return_max_logit, deterministic=deterministic,
            window_size=window_size, sinks=sinks,
        )
    else:
        out, lse, max_logit = _ref.attention_reference(
            q, k, v, causal=causal, softmax_scale=scale, block_mask=block_mask,
            topk_indices=topk_indices, attn_mask=attn_mask, return_max_logit=return_max_logit,
            lse_grad=lse_grad, window_size=window_size, sinks=sinks,
        )
    return AttentionResult(out, lse, max_logit, path)


def latent_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    softmax_scale: float | None = None,
    block_mask: BlockMask | None = None,
    topk_indices: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    attn_mask: torch.Tensor | None = None,
    check_indices: bool = True,
    deterministic: bool = True,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
):
    """Fused latent attention ``softmax(q·kᵀ·softmax_scale) · v`` (DESIGN §3–4).

    Args:
        q: ``[B, T, Hq, Dk]`` float16 / bfloat16 / float32 (float64 on ``backend="reference"``).
        k: ``[B, S, Hkv, Dk]``, same dtype and device; ``Hq % Hkv == 0`` (GQA/MQA).
        v: ``[B, S, Hkv, Dv]``; ``Dv`` may differ from ``Dk``. In absorbed MLA ``v = k[..., :kv_lora_rank]``
            (a prefix view of ``k``), which the kernels detect and load once.
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff ``j <= i + S - T``),
            as in FlashAttention >= 2.1 and FlashMLA; differs from SDPA's ``is_causal`` when ``T != S``.
        softmax_scale: multiplier of the scores; default ``Dk ** -0.5``. MLA passes
            ``(qk_nope_head_dim + qk_rope_head_dim) ** -0.5`` (times YaRN ``mscale²``).
        block_mask: ``mla.sparsity.BlockMask`` built for ``(T, S)`` with batch/head dims 1 or B/Hq, or a
            FlexAttention ``torch.nn.attention.flex_attention.BlockMask`` (e.g. from ``create_block_mask``),
            taken as it is: its full blocks run unmasked, its partial blocks are masked per token by
            bitmasks evaluated once from its ``mask_mod`` (``mla.sparsity.BlockMask.from_flex``; the
            conversion is cached on the flex mask). ``causal`` is applied on top of the mask.
        topk_indices: int32 ``[B, T, Hkv, K]`` key positions in ``[0, S)`` or ``-1`` (ignored).
            Exclusive with ``block_mask``.
        return_lse: also return ``lse [B, Hq, T]`` float32 (natural log; ``+inf`` where a row sees no key).
        backend: ``"auto"`` (kernels on CUDA, reference elsewhere), ``"reference"`` or ``"triton"``.
        attn_mask: optional bool keep-mask (True = attend) or float additive bias broadcastable to
            ``[B, Hq, T, S]``; arbitrary masks run on the reference path.
        check_indices: validate index values (one device sync): ``topk_indices`` in ``[-1, S)`` without
            duplicates per row, ``block_mask`` indices in range and ascending (and a caller-given transpose
            consistent). Eager only: under ``torch.compile`` the value checks are skipped.
        deterministic: top-k backward on the kernels: True (default) builds a key-major index with a sort
            and accumulates dK/dV without atomics (bitwise reproducible); False uses fp32 atomics (faster).
        window_size: ``(left, right)`` sliding window, ``-1`` = unbounded on that side (FlashAttention
            semantics, bottom-right aligned like ``causal``): query ``i`` sees key ``j`` iff
            ``i + S - T - left <= j <= i + S - T + right``; ``causal=True`` is ``right = 0``. Combined with
            the other masks. Key blocks wholly outside the window are skipped by the dense kernels.
        sinks: float32 ``[Hq]`` attention-sink logits (gpt-oss, DeepSeek-V4; transformers' ``s_aux``):
            each row's softmax includes ``exp(sinks[h])`` in its denominator with no value, so
            ``out = Σ_j exp(s_j − lse) v_j`` with ``lse = log(exp(sinks[h]) + Σ_j exp(s_j))`` — the
            returned ``lse`` includes the sink term. Differentiable:
            ``d sinks[h] = −Σ_rows P_sink · rowsum(dO · O)`` (plus the ``lse`` gradient's share).

    Returns:
        ``out [B, T, Hq, Dv]`` in the input dtype, or ``(out, lse)`` with ``return_lse``. A row that
        sees no key gives ``out = 0``, ``lse = +inf`` (``lse = sinks[h]`` with sinks) and zero gradients.

    Raises:
        TypeError: non-tensor inputs, non-float or mismatched dtypes, wrong index dtype, ``sinks`` not a
            float32 tensor.
        ValueError: wrong ranks or shapes, mismatched batch / heads / head dims / devices,
            ``Hq % Hkv != 0``, bad ``softmax_scale``, both ``block_mask`` and ``topk_indices``, index
            values out of range, ``window_size`` not a pair of ints >= -1, ``sinks`` not ``[Hq]`` on q's device,
            or an unavailable backend.
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    res = attention_with_stats(
        q, k, v, causal=causal, softmax_scale=softmax_scale, block_mask=block_mask,
        topk_indices=topk_indices, attn_mask=attn_mask, return_max_logit=False, backend=backend,
        check_indices=check_indices, deterministic=deterministic, lse_grad=return_lse,
        window_size=window_size, sinks=sinks,
    )
    return (res.out, res.lse) if return_lse else res.out


def _check_cu_seqlens(name: str, cu, total: int, max_name: str, max_seqlen, device, check_values: bool):
    """``cu_seqlens_*``: int32 1-D ``[B+1]`` on ``device``; in eager mode also 0 first, non-decreasing,
    ``total`` last, and no sequence longer than ``max_seqlen_*``."""
    if not isinstance(cu, torch.Tensor):
        raise TypeError(f"{name}: expected an int32 torch.Tensor [B+1], got {type(cu).__name__}")
    if cu.dtype != torch.int32:
        raise ValueError(f"{name}: expected dtype torch.int32 (FlashAttention's varlen layout), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name}: expected a 1-D tensor [B+1] with B >= 0, got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name}: on device {cu.device}, but q is on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(f"{max_name}: expected a non-negative int, got {max_seqlen!r}")
    if not check_values or torch.compiler.is_compiling():  # the value checks read the data: eager only
        return
    vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals, vals[1:])]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name}: must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}: last entry {vals[-1]} must equal the packed length {total}")
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name}={max_seqlen} is smaller than the longest sequence ({max(lens)}) in {name}")


def latent_attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    softmax_scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
    check_indices: bool = True,
):
    """Latent attention over packed variable-length sequences (FlashAttention's ``flash_attn_varlen_func``).

    Sequences are concatenated along the token axis; sequence ``b`` is rows ``[cu_seqlens_q[b],
    cu_seqlens_q[b+1])`` of ``q`` and ``[cu_seqlens_k[b], cu_seqlens_k[b+1])`` of ``k``/``v``. No token
    attends across a sequence boundary; ``causal`` is bottom-right aligned per sequence (query ``i`` of a
    sequence of lengths ``(T_b, S_b)`` sees key ``j`` iff ``j <= i + S_b - T_b``). Empty sequences are
    allowed. The kernels read each sequence's offsets from ``cu_seqlens`` (nothing is materialised per
    token): grid over (sequence, query block up to ``max_seqlen_q``), programs past a sequence's end exit.

    Args:
        q: ``[total_q, Hq, Dk]``; k: ``[total_k, Hkv, Dk]``; v: ``[total_k, Hkv, Dv]`` (``Hq % Hkv == 0``;
            ``v`` may be a prefix view of ``k``, absorbed MLA). float16/bfloat16/float32 (float64 on the
            reference backend).
        cu_seqlens_q, cu_seqlens_k: int32 ``[B+1]`` cumulative lengths: 0 first, non-decreasing, the
            packed lengths last (both of length ``B+1``).
        max_seqlen_q, max_seqlen_k: ints >= every sequence's query / key length (they size the grid).
        softmax_scale: default ``Dk ** -0.5``. causal: per sequence, as above.
        return_lse: also return ``lse`` fp32 ``[Hq, total_q]`` (FlashAttention's varlen layout; natural
            log, ``+inf`` for rows without keys).
        backend: ``"auto"`` / ``"reference"`` (per-sequence loop) / ``"triton"``.
        check_indices: validate the offsets' values (one host read) in eager mode; skipped under
            ``torch.compile``.

    Returns:
        ``out [total_q, Hq, Dv]`` in the input dtype, or ``(out, lse)``. Rows without keys: 0 / ``+inf``.

    Block masks and top-k lists are not combined with varlen (pack the documents' mask into a
    ``BlockMask`` over the packed axis instead, e.g. FlexAttention's document mask).

    Raises:
        TypeError: non-tensor inputs or non-float / mismatched dtypes.
        ValueError: wrong ranks or shapes, mismatched heads / head dims / devices, ``cu_seqlens_*`` not
            int32, not 1-D, of different lengths, not starting at 0, decreasing or not ending at the
            packed length, ``max_seqlen_*`` smaller than a sequence, or an unavailable backend.
    """
    _check_qkv(q, k, v, ("[total_q, Hq, Dk]", "[total_k, Hkv, Dk]", "[total_k, Hkv, Dv]"))
    Hq, Dk = q.shape[1], q.shape[2]
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError(f"v: shape {tuple(v.shape)} does not match k's [total_k, Hkv] = {list(k.shape[:2])}")
    if k.shape[2] != Dk:
        raise ValueError(f"k: head dim {k.shape[2]} does not match q's head dim {Dk}")
    if min(Hq, k.shape[1], Dk, v.shape[2]) < 1 or Hq % k.shape[1] != 0:
        raise ValueError(f"q/k: Hq={Hq} must be a positive multiple of Hkv={k.shape[1]} (head dims >= 1)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    scale = _check_scale(softmax_scale, Dk)
    _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, q.device, False)
    _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, q.device, False)
    if cu_seqlens_q.shape != cu_seqlens_k.shape:
        raise ValueError(f"cu_seqlens_k: {cu_seqlens_k.numel()} entries, cu_seqlens_q has {cu_seqlens_q.numel()} "
                         "(both are [B+1])")
    if check_indices:
        _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q, q.device, True)
        _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k, q.device, True)
    if resolve_backend(backend, q.device, q.dtype) == "triton":
        from mla.autograd import triton_attention_varlen

        out, lse = triton_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale=scale, causal=causal)
    else:
        out, lse = _ref.attention_reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                                   softmax_scale=scale)
    return (out, lse) if return_lse else out


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = False,
    block_mask: BlockMask | None = None,
    topk_indices: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """Exact attention probabilities ``exp(S - lse)`` recomputed from a kernel's ``lse``.

    Args:
        q ``[B, T, Hq, Dk]``, k ``[B, S, Hkv, Dk]``, lse ``[B, Hq, T]``; masks (and ``window_size``) as in
        ``latent_attention``.

    Returns:
        ``[B, Hq, T, S]`` float32 (float64 for float64 inputs); rows sum to 1, or are all 0 where the
        row sees no key (with sinks, an ``lse`` that includes them, rows sum to ``1 − P_sink``).
        Materialises ``T × S`` per head: meant for ``need_weights`` and tests.
    """
    B, T, Hq, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    cdt = _ref.compute_dtype(q.dtype)
    kk = k.to(cdt).repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q.to(cdt), kk) * softmax_scale
    keep = torch.ones(1, 1, T, S, dtype=torch.bool, device=q.device)
    if causal:
        rows = torch.arange(T, device=q.device)[:, None]
        keep = keep & (torch.arange(S, device=q.device)[None, :] <= rows + (S - T))
    if tuple(window_size) != (-1, -1):
        keep = keep & _ref.window_keep(0, T, T, S, tuple(window_size), q.device)
    if block_mask is not None:
        keep = keep & as_block_mask(block_mask).to_element_mask()
    if topk_indices is not None:
        keep = keep & topk_to_dense_mask(topk_indices, S).repeat_interleave(Hq // Hkv, dim=1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            keep = keep & attn_mask
        else:
            s = s + attn_mask.to(cdt)
    lse_c = lse.to(cdt)[..., None]
    p = torch.exp(s.masked_fill(~keep, float("-inf")) - torch.where(torch.isinf(lse_c), 0, lse_c))
    return torch.where(torch.isinf(lse_c), torch.zeros_like(p), p)


# ---------------------------------------------------------------------------------------------------
# Decode over a paged latent cache
# ---------------------------------------------------------------------------------------------------
#: Largest ``num_splits`` of ``mla_decode`` (``kernels.decode.MAX_SPLITS``; checked for every backend).
MAX_DECODE_SPLITS = 256


def _check_decode(q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal, topk_indices,
                  num_splits, check_inputs, kv_format, window_size, sinks):
    """Every check of ``mla_decode``'s arguments (see its Raises); also those of the kernel launcher
    ``kernels.decode.mla_decode_fwd`` except the layout ones of ``_check_decode_kernel_layout``.

    Returns ``(softmax_scale, head_dim_v, window_size, topk_indices as int32 or None)``.
    """
    _check_tensor("q", q, 4, "[B, Tq, H, Dk]")
    if kv_format not in KV_FORMATS:
        raise ValueError(f"kv_format: expected one of {KV_FORMATS}, got {kv_format!r}")
    fp8 = kv_format == FP8_DS_MLA
    if fp8:
        if not isinstance(kv_cache, torch.Tensor) or kv_cache.dtype != torch.uint8:
            got = getattr(kv_cache, "dtype", type(kv_cache).__name__)
            raise TypeError(f"kv_cache: kv_format={FP8_DS_MLA!r} expects the uint8 byte pool, got {got}")
        if kv_cache.dim() != 4:
            raise ValueError(f"kv_cache: expected [num_pages, page_size, 1, row_bytes], got {tuple(kv_cache.shape)}")
    else:
        if isinstance(kv_cache, torch.Tensor) and kv_cache.dtype == torch.uint8:
            raise TypeError(f"kv_cache: a uint8 cache needs kv_format={FP8_DS_MLA!r} (the byte layout of mla.quant)")
        _check_tensor("kv_cache", kv_cache, 4, "[num_pages, page_size, 1, Dk]")
        if kv_cache.dtype != q.dtype:
            raise TypeError(f"kv_cache: dtype {kv_cache.dtype} does not match q's dtype {q.dtype}")
    B, Tq, H, Dk = q.shape
    if H < 1 or Dk < 1:
        raise ValueError(f"q: heads and head dim must be >= 1, got shape {tuple(q.shape)}")
    num_pages, page_size = kv_cache.shape[0], kv_cache.shape[1]
    if page_size < 1:
        raise ValueError(f"kv_cache: page_size (dim 1) must be >= 1, got shape {tuple(kv_cache.shape)}")
    if kv_cache.shape[2] != 1:
        raise ValueError(
            f"kv_cache: expected one latent head [num_pages, page_size, 1, Dk], got {tuple(kv_cache.shape)}"
        )
    if fp8:
        if head_dim_v is None or isinstance(head_dim_v, bool) or int(head_dim_v) % 128 or not 0 < int(head_dim_v) <= Dk:
            raise ValueError(f"head_dim_v: kv_format={FP8_DS_MLA!r} needs the latent width, a multiple of 128 "
                             f"in [128, Dk={Dk}], got {head_dim_v!r}")
        row_bytes = fp8_ds_mla_row_bytes(int(head_dim_v), Dk - int(head_dim_v))
        if kv_cache.shape[3] != row_bytes:
            raise ValueError(f"kv_cache: {FP8_DS_MLA} rows for Dk={Dk}, head_dim_v={head_dim_v} are {row_bytes} "
                             f"bytes, got {kv_cache.shape[3]}")
    elif kv_cache.shape[3] != Dk:
        raise ValueError(f"kv_cache: row width {kv_cache.shape[3]} does not match q's head dim Dk={Dk}")
    for name, t, rank in (("block_table", block_table, 2), ("cache_seqlens", cache_seqlens, 1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected an int32 torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name}: expected dtype int32, got {t.dtype}")
        if t.dim() != rank:
            raise ValueError(f"{name}: expected a {rank}-D tensor with the batch first, got {tuple(t.shape)}")
    if block_table.shape[0] != cache_seqlens.shape[0]:
        raise ValueError(f"cache_seqlens: {cache_seqlens.shape[0]} sequences, but block_table has "
                         f"{block_table.shape[0]} rows")
    if block_table.shape[0] != B:
        raise ValueError(f"q: batch {B} (shape {tuple(q.shape)}), but the cache holds {block_table.shape[0]} "
                         f"sequences (block_table / cache_seqlens); pass one query row per sequence")
    for name, t in (("kv_cache", kv_cache), ("block_table", block_table), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name}: on device {t.device}, but q is on {q.device}")
    Dv = Dk if head_dim_v is None else int(head_dim_v)
    if not 1 <= Dv <= Dk:
        raise ValueError(f"head_dim_v: expected 1 <= head_dim_v <= Dk={Dk}, got {head_dim_v}")
    scale = _check_scale(softmax_scale, Dk)
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__}")
    window_size = check_window_size(window_size)
    check_sinks(sinks, H, q.device)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_DECODE_SPLITS):
        raise ValueError(f"num_splits: expected None or an int in [1, {MAX_DECODE_SPLITS}], got {num_splits!r}")
    if topk_indices is not None:
        if not isinstance(topk_indices, torch.Tensor) or topk_indices.dtype not in (torch.int32, torch.int64):
            got = getattr(topk_indices, "dtype", type(topk_indices).__name__)
            raise TypeError(f"topk_indices: expected an int32 tensor, got {got}")
        if topk_indices.dim() != 3 or tuple(topk_indices.shape[:2]) != (B, Tq):
            raise ValueError(f"topk_indices: expected [B={B}, Tq={Tq}, K], got {tuple(topk_indices.shape)}")
        if topk_indices.device != q.device:
            raise ValueError(f"topk_indices: on device {topk_indices.device}, but q is on {q.device}")
        topk_indices = topk_as_int32(topk_indices)
    capacity = block_table.shape[1] * page_size
    if check_inputs and B > 0:
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 0:
            raise ValueError(f"cache_seqlens: expected values >= 0, got min {lo}")
        if hi > capacity:
            raise ValueError(
                f"block_table: {block_table.shape[1]} pages of {page_size} tokens hold {capacity} tokens, "
                f"but cache_seqlens has {hi}"
            )
        used = torch.arange(block_table.shape[1], device=q.device)[None, :] < (
            (cache_seqlens.long()[:, None] + page_size - 1) // page_size
        )
        ids = block_table[used]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_pages):
            raise ValueError(f"block_table: page ids of used pages must be in [0, {num_pages}), got "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        if topk_indices is not None and topk_indices.numel():
            if int(topk_indices.min()) < -1:
                raise ValueError(f"topk_indices: entries must be >= -1, got {int(topk_indices.min())}")
            # The kernel would count a repeated key twice, the reference once: reject, as latent_attention does.
            srt = topk_indices.sort(dim=-1).values
            live = (srt[..., 1:] >= 0) & (srt[..., 1:] < cache_seqlens[:, None, None])
            dup = (srt[..., 1:] == srt[..., :-1]) & live
            if bool(dup.any()):
                where = tuple(int(x) for x in dup.nonzero()[0][:2])
                raise ValueError(f"topk_indices: duplicate key position in row (b, t) = {where}; each row "
                                 f"must list a cached position once")
    return scale, Dv, window_size, topk_indices


def _check_decode_kernel_layout(kv_cache, kv_fp8: bool) -> None:
    """Memory layout the decode kernel reads (the reference takes any strides): unit last stride and, for the
    FP8 pool, 16-byte aligned rows (its fp32 scales are loaded as words)."""
    if kv_cache.stride(-1) != 1:
        raise ValueError(f"kv_cache: backend='triton' needs last stride 1, got strides {kv_cache.stride()}")
    if kv_fp8 and (kv_cache.stride(0) % 16 or kv_cache.stride(1) % 16 or kv_cache.data_ptr() % 16):
        raise ValueError(f"kv_cache: backend='triton' with kv_format={FP8_DS_MLA!r} needs a 16-byte aligned pool "
                         f"with page and slot strides multiples of 16 bytes, got strides {kv_cache.stride()}")


def mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float | None = None,
    head_dim_v: int | None = None,
    causal: bool = False,
    topk_indices: torch.Tensor | None = None,
    num_splits: int | None = None,
    return_lse: bool = True,
    backend: str = "auto",
    check_inputs: bool = True,
    kv_format: str | None = None,
    window_size: tuple[int, int] = (-1, -1),
    sinks: torch.Tensor | None = None,
):
    """MLA decode: a few query tokens per sequence attend over a paged latent cache (DESIGN §4 "Decode").

    All heads share one cache row per token (absorbed MLA: ``[c_kv | k_rope]``); the value is the first
    ``head_dim_v`` columns of the same row. On CUDA the split-KV Triton kernel runs (FlashMLA-style head
    packing, Flash-Decoding split + log-sum-exp combine); elsewhere the reference gathers the pages.

    Args:
        q: ``[B, Tq, H, Dk]`` fp16 / bf16 / fp32 (fp64 on the reference), ``Tq`` small (1, or 2–8 for
            multi-token prediction / speculative decoding). In MLA ``Dk = kv_lora_rank + qk_rope_head_dim``.
        kv_cache: ``[num_pages, page_size, 1, Dk]``, same dtype and device; with ``kv_format="fp8_ds_mla"``
            the uint8 pool ``[num_pages, page_size, 1, row_bytes]`` of ``mla.quant`` (656 bytes per row for
            Dk = 576, Dv = 512), read by the kernel and dequantized in registers.
        block_table: int32 ``[B, max_pages]`` page ids; entries past a sequence's length are never read.
        cache_seqlens: int32 ``[B]`` tokens cached per sequence (0 allowed: output 0, ``lse = +inf``).
        softmax_scale: default ``Dk ** -0.5``; MLA passes ``(qk_nope + qk_rope) ** -0.5`` (· YaRN mscale²).
        head_dim_v: ``Dv``, a prefix of each row (``kv_lora_rank`` for MLA); default ``Dk``.
        causal: bottom-right per sequence: query ``j`` sees keys ``0 … L − Tq + j`` (``L = cache_seqlens[b]``).
        topk_indices: int32 ``[B, Tq, K]`` token positions (``-1`` and positions ``>= L`` are skipped),
            shared by all heads, as in DeepSeek Sparse Attention; a position in ``[0, L)`` at most once
            per row (checked with ``check_inputs``).
        num_splits: key splits per sequence for the kernel, ``<= 256`` (None: chosen from B, H and the SM
            count; the reference ignores it).
        return_lse: also return ``lse [B, H, Tq]`` fp32.
        backend: ``"auto"``, ``"reference"`` or ``"triton"``.
        check_inputs: validate ``cache_seqlens`` against the block table and page ids (one device sync).
        kv_format: ``None`` (rows in ``q``'s dtype) or ``"fp8_ds_mla"`` (needs ``head_dim_v``, a multiple
            of 128; ``PagedLatentCache(kv_format="fp8_ds_mla")`` writes it). The reference dequantizes the
            gathered rows to ``q``'s dtype (exact ``code · scale`` in fp32, as the kernel computes it).
        window_size: ``(left, right)`` sliding window per sequence (``-1`` unbounded), bottom-right aligned:
            query ``j`` sits at position ``L − Tq + j`` and sees keys ``L − Tq + j − left … L − Tq + j + right``
            (a DeepSeek-V4 step with ``(127, 0)`` reads the last 128 positions only).
        sinks: float32 ``[H]`` attention-sink logits (see ``latent_attention``); ``lse`` includes them.

    Returns:
        ``(out [B, Tq, H, Dv] in q.dtype, lse [B, H, Tq] fp32)``, or ``out`` if not ``return_lse``.
        Differentiable on ``backend="reference"`` only: a backward through the kernel raises RuntimeError.

    Raises:
        TypeError: non-float ``q``/cache, mismatched dtypes, non-int32 tables, a uint8 cache without
            ``kv_format="fp8_ds_mla"`` or a non-uint8 one with it, ``sinks`` not a float32 tensor.
        ValueError: wrong shapes (``q`` head dim ≠ cache row), devices, a block table too short for
            ``cache_seqlens``, page ids out of range, ``head_dim_v`` outside ``[1, Dk]``, bad ``num_splits``,
            a ``page_size`` of 0, on ``backend="triton"`` a cache without unit last stride (or an FP8 pool
            not 16-byte aligned),
            ``topk_indices`` below -1 or repeating a cached position in a row (``check_inputs``).
    """
    scale, Dv, window_size, topk_indices = _check_decode(
        q, kv_cache, block_table, cache_seqlens, softmax_scale, head_dim_v, causal, topk_indices, num_splits,
        check_inputs, kv_format, window_size, sinks,
    )
    fp8 = kv_format == FP8_DS_MLA
    path = resolve_backend(backend, q.device, q.dtype)
    win_left, win_right = window_size
    if causal:  # FlashAttention: causal is right = 0
        win_right = 0 if win_right < 0 else min(win_right, 0)
    if path == "triton" and window_size != (-1, -1) and (topk_indices is not None or win_right > 0):
        if backend == "triton":
            raise ValueError("backend='triton': window_size in decode runs on the kernel without topk_indices "
                             "and with right in {-1, 0} (or causal); use backend='reference'")
        path = "reference"
    if path == "triton":
        from mla.autograd import triton_decode

        _check_decode_kernel_layout(kv_cache, fp8)
        out, lse = triton_decode(
            q, kv_cache, block_table, cache_seqlens, scale, Dv, causal=causal or win_right == 0,
            topk_indices=topk_indices, num_splits=num_splits, kv_fp8=fp8, sinks=sinks, window_left=win_left,
        )
    else:
        out, lse = _ref.decode_reference(
            q, kv_cache, block_table, cache_seqlens, softmax_scale=scale, head_dim_v=Dv, causal=causal,
            topk_indices=topk_indices, window_size=window_size, sinks=sinks, kv_fp8=fp8,
        )
    return (out, lse) if return_lse else out

