"""Data-parallel plumbing of ``mla.train``: process group set-up, DDP / FSDP2 wrapping, rank-aware
reductions and full (world-size independent) checkpoint state dicts.

Everything here uses PyTorch's own engine: ``torch.distributed`` process groups (``gloo`` on CPU,
``nccl`` on CUDA), ``DistributedDataParallel``, FSDP2 ``fully_shard`` (one unit per ``TransformerBlock``
plus the root) and ``torch.distributed.checkpoint.state_dict`` (``get_/set_model_state_dict``,
``get_/set_optimizer_state_dict`` with ``full_state_dict=True``).

Launch with ``torchrun`` (``python -m torch.distributed.run --nproc_per_node N -m mla.train
--distributed ddp|fsdp ...``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` come from the launcher. Without a launcher, ``ddp`` / ``fsdp`` run as a group of one
process (useful to test the wrapped code path).

Data-parallel contract (what makes a run on N ranks follow the same trajectory as one process):

* every rank seeds the same weights and the same batch generator; each step the generator draws the
  **global** batch (``batch_size × world_size`` window starts, exactly the draw a 1-process run with
  that batch size makes) and rank ``r`` keeps rows ``[r·batch_size, (r+1)·batch_size)``;
* each rank's loss is the mean over its (equally many) tokens; gradients are averaged over ranks by
  DDP's all-reduce or FSDP2's reduce-scatter, so they equal the gradient of the global-batch mean;
  reported losses are all-reduced means;
* checkpoints hold full (unsharded) tensors gathered to rank 0, so any world size can load them.
"""

from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["DistContext", "init_distributed", "MODES", "full_state_dicts", "load_full_state_dicts"]

#: Values of ``TrainConfig.distributed`` / ``--distributed``.
MODES = ("auto", "none", "ddp", "fsdp")


def _env_int(name: str, default: int) -> int:
    val = os.environ.get(name)
    return default if val in (None, "") else int(val)


def launcher_world_size() -> int:
    """``WORLD_SIZE`` set by a launcher such as ``torchrun`` (1 without one)."""
    return _env_int("WORLD_SIZE", 1)


@dataclass
class DistContext:
    """Where this process stands in a data-parallel run.

    Attributes:
        mode: ``"none"``, ``"ddp"`` or ``"fsdp"`` (``"auto"`` is resolved by ``init_distributed``).
        rank, world_size, local_rank: this process's global rank, the number of processes, and its rank
            on this node (selects ``cuda:<local_rank>``).
        device: the ``torch.device`` this rank computes on.
        backend: the process group backend (``"gloo"``/``"nccl"``) or None for ``mode="none"``.
        owns_group: True when ``init_distributed`` created the default process group (then ``close``
            destroys it).
    """

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """True when a process group is in use (``ddp`` or ``fsdp``, any world size)."""
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        """True on rank 0: the only rank that logs, shows progress, writes metrics and checkpoints."""
        return self.rank == 0

    # ---- reductions (identity without a process group) -----------------------------------------

    def _all_reduce(self, values: list[float], op) -> list[float]:
        if not self.enabled or self.world_size == 1:
            return values
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all ranks (every rank gets the same float; summed in float64)."""
        if not self.enabled or self.world_size == 1:
            return float(value)
        import torch.distributed as dist

        return self._all_reduce([float(value)], dist.ReduceOp.SUM)[0] / self.world_size

    def max(self, value: float | None) -> float | None:
        """The maximum of ``value`` over all ranks (None when it is None everywhere)."""
        if not self.enabled or self.world_size == 1:
            return value
        import torch.distributed as dist

        v = float("-inf") if value is None else float(value)
        out = self._all_reduce([v], dist.ReduceOp.MAX)[0]
        return None if out == float("-inf") else out

    def mean_and_max(self, value: float, peak: float | None) -> tuple[float, float | None]:
        """``(mean of value, max of peak)`` over all ranks with one collective (an all-gather of both).

        The sum runs in rank order in float64, so every rank gets bit-identical results. ``peak`` may be
        None (ignored; None when None everywhere).
        """
        if not self.enabled or self.world_size == 1:
            return float(value), peak
        import torch.distributed as dist

        mine = torch.tensor([float(value), float("-inf") if peak is None else float(peak)], dtype=torch.float64,
                            device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine)
        rows = torch.stack(parts).tolist()
        total = 0.0
        for row in rows:
            total += row[0]
        top = max(row[1] for row in rows)
        return total / self.world_size, (None if top == float("-inf") else top)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one (keeps ranks stopping together)."""
        return self.max(1.0 if flag else 0.0) == 1.0

    def barrier(self) -> None:
        """Wait for all ranks (no-op without a process group)."""
        if self.enabled and self.world_size > 1:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index or 0])
            else:
                dist.barrier()

    # ---- model wrapping ---------------------------------------------------------------------------

    def wrap(self, model: nn.Module, *, find_unused_parameters: bool = False) -> nn.Module:
        """Wrap ``model`` (already on ``device``) for data parallelism; returns the module to call.

        * ``none``: ``model`` itself.
        * ``ddp``: ``DistributedDataParallel(model)`` (gradients all-reduced and averaged in backward;
          buffers are not re-broadcast: the model's buffers are constants).
        * ``fsdp``: FSDP2 ``fully_shard`` on every block of ``model.layers`` and then on ``model`` (root:
          embeddings, final norm, head; tied weights stay in the root unit), over a 1-D mesh of all
          ranks. ``model`` is sharded in place (its parameters become ``DTensor`` shards) and returned.

        Raises:
            TypeError: ``fsdp`` on a model without a ``layers`` ``ModuleList``.
        """
        if self.mode == "none":
            return model
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            kw: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters:
                kw["forward_sync_buffers"] = False  # torch >= 2.13 spelling
            else:
                kw["broadcast_buffers"] = False
            return DistributedDataParallel(model, device_ids=ids, **kw)
        fully_shard = _fully_shard()
        from torch.distributed.device_mesh import init_device_mesh

        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(f"fsdp: expected a model with a `layers` ModuleList, got {type(model).__name__}")
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for block in layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model

    def close(self) -> None:
        """Destroy the process group if this context created it (idempotent)."""
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()  # no rank tears gloo down while another still has work in flight
                dist.destroy_process_group()
            self.owns_group = False


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # pragma: no cover - torch 2.4 / 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def _device_for(name: str, local_rank: int, world_size: int) -> torch.device:
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = "cuda" if cuda else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {name!r} is not a device ({exc})") from exc
    if device.type == "cuda":
        if not cuda:
            raise ValueError(f"device: {name!r} requested but CUDA is not available here (use --device cpu)")
        if device.index is not None and world_size > 1:
            raise ValueError(
                f"device: {name!r} names one GPU, but each of the {world_size} ranks uses cuda:LOCAL_RANK; "
                "pass --device cuda (or auto)"
            )
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def init_distributed(mode: str, device: str = "cpu") -> DistContext:
    """Resolve ``mode`` and ``device`` and join (or create) the default process group.

    Args:
        mode: ``"auto"`` (``ddp`` when a launcher set ``WORLD_SIZE > 1`` or a process group with more than
            one rank is already initialised, else ``none``), ``"none"``, ``"ddp"`` or ``"fsdp"``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (one process only) or ``"auto"``. Under a launcher
            CUDA ranks use ``cuda:LOCAL_RANK``.

    A process group that already exists is reused (and left alone by ``close``). Otherwise one is created:
    from the launcher's environment (``env://``) when ``WORLD_SIZE``/``MASTER_ADDR`` are set, else as a
    group of one process over an in-memory store. Backend: ``nccl`` for CUDA, ``gloo`` for CPU.

    Returns:
        A ``DistContext``.

    Raises:
        ValueError: an unknown mode; ``none`` under a launcher with ``WORLD_SIZE > 1`` (every rank would
            train its own copy); a bad device; ``ddp``/``fsdp`` where ``torch.distributed`` (or the
            backend) is unavailable.
    """
    if mode not in MODES:
        raise ValueError(f"distributed: expected one of {MODES}, got {mode!r}")
    import torch.distributed as dist

    available = dist.is_available()
    initialized = available and dist.is_initialized()
    env_world = launcher_world_size()
    group_world = dist.get_world_size() if initialized else 1
    if mode == "auto":
        mode = "ddp" if max(env_world, group_world) > 1 else "none"
    if mode == "none":
        if max(env_world, group_world) > 1:
            raise ValueError(
                f"distributed: 'none' in a job of {max(env_world, group_world)} processes would train that many "
                "independent copies; pass --distributed ddp or fsdp"
            )
        return DistContext(mode="none", device=_device_for(device, 0, 1))
    if not available:
        raise ValueError(f"distributed: {mode!r} needs torch.distributed, which this torch build lacks")
    local_rank = _env_int("LOCAL_RANK", 0)
    world = group_world if initialized else env_world
    dev = _device_for(device, local_rank, world)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not initialized:
        if backend == "gloo" and not dist.is_gloo_available():
            raise ValueError("distributed: the gloo backend (needed on CPU) is not available in this torch build")
        if backend == "nccl" and not dist.is_nccl_available():
            raise ValueError("distributed: the nccl backend (needed on CUDA) is not available in this torch build")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = datetime.timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ and "RANK" in os.environ:
            dist.init_process_group(backend, timeout=timeout)
        elif env_world > 1:
            raise ValueError(
                f"distributed: WORLD_SIZE={env_world} but no RANK/MASTER_ADDR in the environment; launch with "
                "torchrun (python -m torch.distributed.run --nproc_per_node N -m mla.train ...)"
            )
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        owns = True
    else:
        backend = dist.get_backend()
    return DistContext(
        mode=mode, rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev,
        backend=backend, owns_group=owns,
    )


# --------------------------------------------------------------------------------------------------
# full state dicts (world-size independent checkpoints)


def _full_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state_dicts(
    model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Full (unsharded) CPU state dicts of ``model`` and ``optimizer``, keyed by parameter name.

    Uses ``get_model_state_dict`` / ``get_optimizer_state_dict`` with ``full_state_dict=True,
    cpu_offload=True``: FSDP2 shards are all-gathered, so **every rank must call this** when a process
    group is in use; only rank 0 receives the tensors (other ranks get empty dicts). ``model`` is the
    unwrapped module (a DDP wrapper also works). Optimizer state is keyed by the parameter's name
    (``state[name][key]``) and ``param_groups[i]["params"]`` lists names.

    Returns:
        ``(model_state, optimizer_state or None)``.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    opts = _full_options(cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_full_state_dicts(
    model: nn.Module,
    model_state: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full state dicts (as returned by ``full_state_dicts``, every rank passing the same tensors)
    into a possibly sharded ``model`` / ``optimizer`` with ``set_model_state_dict`` /
    ``set_optimizer_state_dict`` (FSDP2 parameters take their local shard). Collective under a process
    group: every rank must call it.

    Raises:
        RuntimeError / KeyError / ValueError: tensors that do not fit (from torch).
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    opts = _full_options()
    if model_state is not None:
        set_model_state_dict(model, model_state, options=opts)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=opts)
