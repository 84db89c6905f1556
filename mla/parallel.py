"""Tensor (head) parallelism for Multi-Head Latent Attention with ``torch.distributed.tensor.parallel``.

MLA splits naturally by heads (Megatron-style, DeepSeek-V3 style):

* **replicated** on every tensor-parallel rank: the latent down-projections ``q_a_proj`` and
  ``kv_a_proj_with_mqa`` and their RMSNorms ``q_a_layernorm`` / ``kv_a_layernorm`` (they are small, and
  their outputs, the query latent and the compressed KV latent ``[c_kv | k_rope]``, are shared by all
  heads; the KV cache therefore stays whole on every rank);
* **column-wise** (output features split, i.e. whole heads per rank): ``q_proj`` or ``q_b_proj``
  ``[H·(dn+dr), ·]`` and ``kv_b_proj`` ``[H·(dn+dv), dc]``;
* **row-wise** (input features split): ``o_proj`` ``[E, H·dv]``, whose partial outputs are all-reduced.

Each rank computes ``num_heads / tp`` heads, in the naive form (``kv_b_proj`` expands K/V for the local
heads) and in the absorbed form (``W_UK`` / ``W_UV`` are the local rows of ``kv_b_proj.weight``,
``DTensor.to_local()``), and ``o_proj`` sums the heads across ranks: the output equals the single-process
output up to float summation order.

Gradients: the column-wise layers all-reduce the gradient of their (replicated) input in backward, as
``ColwiseParallel`` does. The latent rows that the local heads use directly (``k_rope`` in the naive form,
the whole ``[c_kv | k_rope]`` in the absorbed form) get the same treatment through a hook that
``parallelize_mla`` installs (``DTensor.from_local(..., Replicate()).to_local(grad_placements=[Partial()])``:
identity forward, all-reduce backward). So the replicated parameters receive the full gradient on every
rank (identical on all ranks: any optimizer keeps them in sync), and everything upstream (norms,
embeddings) too. Sharded parameters become ``DTensor`` s (``Shard(0)`` for the column-wise weights,
``Shard(1)`` for ``o_proj.weight``; its bias is replicated).

Usage (every rank of the mesh runs the same code on the same input)::

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from mla.parallel import parallelize_mla_model

    dist.init_process_group("nccl")            # torchrun --nproc_per_node 2 ...
    tp_mesh = init_device_mesh("cuda", (dist.get_world_size(),))
    model = MLACausalLM(cfg).cuda()             # same seed (or same checkpoint) on every rank
    parallelize_mla_model(model, tp_mesh, mlp=True)
    logits = model(input_ids).logits            # same input_ids on every rank -> same logits

Limitations: ``LatentSparseAttention`` (its block scores pool over all heads) is not supported; the
``[B, H, T, S]`` probabilities of ``need_weights=True`` cover only the local heads.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from mla.attention import LatentSparseAttention, MultiHeadLatentAttention

__all__ = ["mla_tp_plan", "parallelize_mla", "parallelize_mla_model"]


def _dtensor_api():
    try:  # torch >= 2.5
        from torch.distributed.tensor import DTensor, Partial, Replicate
    except ImportError:  # pragma: no cover - torch 2.4
        from torch.distributed._tensor import DTensor, Partial, Replicate
    return DTensor, Partial, Replicate


def _sum_grad_over_mesh(mesh, t: torch.Tensor) -> torch.Tensor:
    """Identity on ``t``; in backward, its gradient is summed over ``mesh`` (all-reduce).

    ``t`` is declared ``Replicate`` and its gradient ``Partial``; ``DTensor.from_local``'s backward then
    redistributes ``Partial -> Replicate``, which is an all-reduce of the per-rank partial gradients.
    """
    DTensor, Partial, Replicate = _dtensor_api()
    return DTensor.from_local(t, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _check_mesh(tp_mesh) -> int:
    if tp_mesh is None or not hasattr(tp_mesh, "ndim") or not hasattr(tp_mesh, "size"):
        raise TypeError(f"tp_mesh: expected a torch.distributed DeviceMesh, got {type(tp_mesh).__name__}")
    if tp_mesh.ndim != 1:
        raise ValueError(
            f"tp_mesh: expected a 1-D DeviceMesh (slice a 2-D one, e.g. mesh['tp']), got ndim={tp_mesh.ndim}"
        )
    return int(tp_mesh.size())


def mla_tp_plan(module: MultiHeadLatentAttention) -> dict[str, Any]:
    """The ``parallelize_module`` plan of one ``MultiHeadLatentAttention``: submodule name -> style.

    ``q_proj`` (or ``q_b_proj``) and ``kv_b_proj``: ``ColwiseParallel()`` (replicated input, local
    output of this rank's heads); ``o_proj``: ``RowwiseParallel()`` (input sharded on the last dim,
    output all-reduced, returned as a plain tensor). Modules not in the plan stay replicated.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    q_name = "q_proj" if module.q_lora_rank is None else "q_b_proj"
    return {q_name: ColwiseParallel(), "kv_b_proj": ColwiseParallel(), "o_proj": RowwiseParallel()}


def parallelize_mla(module: MultiHeadLatentAttention, tp_mesh) -> MultiHeadLatentAttention:
    """Shard a ``MultiHeadLatentAttention`` by heads over ``tp_mesh``, in place.

    Applies ``mla_tp_plan`` with ``torch.distributed.tensor.parallel.parallelize_module`` and installs the
    gradient all-reduce of the shared latent (see the module docstring). The module's interface is
    unchanged: ``forward(hidden_states [B, T, E], ...)`` takes the same (replicated) input on every rank
    and returns the full ``[B, T, E]`` output on every rank, for both forms (``naive``, ``absorbed``,
    with or without a ``LatentCache`` / ``PagedLatentCache``). ``module.num_heads`` stays the global count;
    each rank computes ``num_heads / tp_mesh.size()`` heads.

    Args:
        module: the attention layer, with the same weights on every rank (same seed or checkpoint), on
            the mesh's device type.
        tp_mesh: a 1-D ``DeviceMesh`` of the tensor-parallel ranks (e.g. ``init_device_mesh("cuda",
            (tp,))`` or ``mesh_2d["tp"]``).

    Returns:
        ``module`` (sharded: ``q_proj``/``q_b_proj``/``kv_b_proj``/``o_proj`` weights are ``DTensor`` s).

    Raises:
        TypeError: ``module`` is not a ``MultiHeadLatentAttention``, or ``tp_mesh`` is not a mesh.
        NotImplementedError: ``module`` is a ``LatentSparseAttention``.
        ValueError: a mesh that is not 1-D, ``num_attention_heads`` not divisible by its size, or a module
            that is already sharded.
    """
    if isinstance(module, LatentSparseAttention):
        raise NotImplementedError(
            "parallelize_mla: LatentSparseAttention is not supported (its block scores pool over all heads)"
        )
    if not isinstance(module, MultiHeadLatentAttention):
        raise TypeError(f"module: expected a MultiHeadLatentAttention, got {type(module).__name__}")
    tp = _check_mesh(tp_mesh)
    if module.num_heads % tp:
        raise ValueError(
            f"tp_mesh: num_attention_heads ({module.num_heads}) must be divisible by the mesh size ({tp})"
        )
    if module._shared_latent_grad_hook is not None or hasattr(module.kv_b_proj.weight, "to_local"):
        raise ValueError("module: this MultiHeadLatentAttention is already sharded")
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(module, tp_mesh, mla_tp_plan(module))
    module._shared_latent_grad_hook = functools.partial(_sum_grad_over_mesh, tp_mesh)
    return module


def parallelize_mla_model(model: nn.Module, tp_mesh, *, mlp: bool = False) -> nn.Module:
    """Shard every attention layer of an ``MLACausalLM`` (``model.layers[i].self_attn``) by heads with
    ``parallelize_mla``, in place; with ``mlp=True`` also each SwiGLU MLP (``gate_proj``/``up_proj``
    column-wise, ``down_proj`` row-wise: the intermediate width is split).

    Embeddings, norms and the LM head stay replicated; their gradients are complete and identical on every
    rank. Call it with the same weights and feed the same ``input_ids`` on every rank of ``tp_mesh``;
    logits, loss and ``generate`` match a single process. For 2-D parallelism, apply it with the ``tp``
    sub-mesh first and then ``fully_shard`` over the data-parallel sub-mesh.

    Args:
        model: an ``MLACausalLM`` (any module with ``layers[i].self_attn`` and ``layers[i].mlp``).
        tp_mesh: a 1-D ``DeviceMesh``. mlp: also shard the MLPs.

    Returns:
        ``model``.

    Raises:
        TypeError / NotImplementedError / ValueError: see ``parallelize_mla``; ``ValueError`` also when
            ``intermediate_size`` is not divisible by the mesh size with ``mlp=True``.
    """
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"model: expected a model with a `layers` ModuleList, got {type(model).__name__}")
    tp = _check_mesh(tp_mesh)
    for i, layer in enumerate(layers):  # check everything before sharding anything
        attn = layer.self_attn
        if isinstance(attn, LatentSparseAttention):
            raise NotImplementedError(
                f"parallelize_mla: layers[{i}] is a LatentSparseAttention, which is not supported"
            )
        if not isinstance(attn, MultiHeadLatentAttention):
            raise TypeError(f"model: layers[{i}].self_attn is a {type(attn).__name__}, not a MultiHeadLatentAttention")
        if attn.num_heads % tp:
            raise ValueError(
                f"tp_mesh: num_attention_heads ({attn.num_heads}) must be divisible by the mesh size ({tp})"
            )
        width = layer.mlp.gate_proj.out_features if mlp else 0
        if width % tp:
            raise ValueError(f"tp_mesh: layers[{i}].mlp width ({width}) must be divisible by the mesh size ({tp})")
    if mlp:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    for layer in layers:
        parallelize_mla(layer.self_attn, tp_mesh)
        if mlp:
            parallelize_module(
                layer.mlp, tp_mesh,
                {"gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(), "down_proj": RowwiseParallel()},
            )
    return model
