"""Training loop for ``MLACausalLM`` on byte-level text: AdamW with linear warmup and cosine decay,
gradient clipping, periodic validation (loss in nats and bits per byte), throughput, and checkpoints in
safetensors that resume bit-for-bit.

Units used throughout: losses are mean cross entropy in **nats per byte** (one token = one byte);
``bits per byte = loss / ln 2``; throughput in **tokens (bytes) per second** of training time (evaluation
and checkpointing excluded); times in **seconds** of wall clock.

Checkpoint layout (a directory, written atomically: files go to a temporary directory that is renamed):

* ``model.safetensors``: the model's full (unsharded) weights, tied weights stored once;
* ``optimizer.safetensors``: every AdamW state tensor, unsharded, as ``state.<param index>.<name>``;
* ``state.json``: everything else: step, elapsed seconds, the ``TrainConfig``, the model's ``MLAConfig``
  and attention kind, the data's name and sha256, the optimizer's param groups, the RNG states (batch
  generator, torch CPU and CUDA, base64), the data-parallel mode and world size, and the metrics so far.

A run resumed from a checkpoint continues exactly as the uninterrupted run would have: same batches, same
losses and weights, bit for bit on CPU (same torch build and thread count; on CUDA as deterministic as the
kernels are). Evaluation uses its own generator, so evaluating or not never changes the trajectory.

Data parallelism (``TrainConfig.distributed`` / ``--distributed``, launched with ``torchrun``; see
``mla.train.distributed``): ``"ddp"`` (``DistributedDataParallel``) or ``"fsdp"`` (FSDP2 ``fully_shard`` per
block), gloo on CPU and nccl on CUDA. ``batch_size`` is **per rank**: each step draws one global batch of
``batch_size × world_size`` windows from the shared generator and every rank trains on its own rows, so a
run on N ranks sees the same data, in the same order, as one process with ``batch_size × N`` (and matches
its losses up to float rounding). Losses are averaged over ranks; only rank 0 logs, shows progress, writes
metrics and checkpoints. Checkpoints hold full tensors gathered with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True, cpu_offload=True``) and are loaded with
``set_model_state_dict`` / ``set_optimizer_state_dict``, so a checkpoint written on any number of ranks
resumes on any other (keep ``batch_size × world_size`` to continue the same trajectory).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from mla import registry
from mla.block import MLACausalLM
from mla.config import MLAConfig
from mla.train.data import ByteDataset, pack_documents
from mla.train.distributed import MODES, DistContext, full_state_dicts, init_distributed, load_full_state_dicts

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "evaluate",
    "bits_per_byte",
    "lr_at",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "METRIC_KEYS",
]

#: Keys of every metrics record (one per evaluation; one JSON line each in ``metrics_out``).
METRIC_KEYS = (
    "step", "train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens", "elapsed_s", "max_logit",
)

CHECKPOINT_FORMAT = "mla.train.checkpoint/1"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fields of TrainConfig that change the trajectory of a run (a resume with other values warns).
# (batch_size is compared as the global batch, batch_size x world_size.)
_TRAJECTORY_FIELDS = (
    "steps", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "beta1", "beta2", "eps",
    "grad_clip", "seed", "val_fraction", "dtype",
)


def bits_per_byte(loss_nats: float) -> float:
    """Convert a byte-level cross entropy in nats per byte to bits per byte: ``loss / ln 2``."""
    return float(loss_nats) / math.log(2.0)


@dataclass
class TrainConfig:
    """Everything a training run needs (the CLI ``python -m mla.train`` fills one from its flags).

    Model: ``preset`` (a ``mla.registry`` name) with ``overrides`` (``MLAConfig`` fields, e.g.
    ``{"num_hidden_layers": 2}``); ``attention`` ``"mla"`` or ``"sparse"`` and ``sparse_mode``
    ``"block"``/``"topk"`` (see ``MLACausalLM``).

    Optimisation: ``steps`` optimizer updates of ``batch_size`` windows (per rank: the global batch is
    ``batch_size × world_size``) of ``seq_len`` bytes; AdamW
    (``beta1``, ``beta2``, ``eps``, decoupled ``weight_decay`` on matrices and embeddings only); the
    learning rate rises linearly over ``warmup`` steps to ``lr`` then follows a cosine down to ``min_lr``
    at ``steps`` (``lr_at``); gradients are clipped to global norm ``grad_clip`` (0 = off).

    Evaluation: every ``eval_interval`` steps (and at step 0 when ``eval_at_start``, and at the end) the
    mean loss over ``eval_batches`` fixed random validation batches (the same windows every time).

    Data: ``data`` a file path (raw bytes) or ``None`` for CPython's ``pydoc_data.topics``; the last
    ``val_fraction`` of the bytes is validation. ``pack_documents``: each training batch is packed into
    one row of documents (cut after every newline byte and at window ends) and attended with varlen
    (``latent_attention_varlen``: no attention across documents, positions restart per document;
    ``attention="mla"`` only); evaluation stays on plain windows.

    Checkpoints: into ``out_dir`` (None = none) every ``save_interval`` steps (None = at each evaluation,
    0 = only at the end) and at the end, keeping the newest ``keep_checkpoints`` (0 = all). ``resume``: a
    checkpoint directory, or an ``out_dir`` (its newest checkpoint), or ``"latest"`` (newest in
    ``out_dir``).

    Run: ``metrics_out`` JSON-lines path; ``max_time`` wall-clock budget in seconds for this call of
    ``fit`` (None = unlimited); ``threads`` sets ``torch.set_num_threads``; ``device`` (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, or ``"auto"``); ``dtype`` ``"float32"`` or ``"bfloat16"`` (autocast of the
    forward; weights and optimizer stay float32); ``progress`` shows a tqdm bar; ``verbose`` prints one
    line per evaluation (progress, lines, metrics and checkpoints come from rank 0 only).

    Data parallelism: ``distributed`` ``"auto"`` (``"ddp"`` under a launcher with ``WORLD_SIZE > 1``, else
    ``"none"``), ``"none"``, ``"ddp"`` or ``"fsdp"`` (see the module docstring and
    ``mla.train.distributed``). Under ``torchrun`` a CUDA device means ``cuda:LOCAL_RANK``.
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    attention: str = "mla"
    pack_documents: bool = False
    sparse_mode: str = "block"
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int = 8
    eval_at_start: bool = True
    seed: int = 0
    data: str | None = None
    val_fraction: float = 0.1
    out_dir: str | None = None
    save_interval: int | None = None
    keep_checkpoints: int = 2
    resume: str | None = None
    metrics_out: str | None = None
    max_time: float | None = None
    threads: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    progress: bool = True
    verbose: bool = True
    distributed: str = "auto"

    def validate(self) -> TrainConfig:
        """Check values; returns self.

        Raises:
            ValueError: a non-positive count or size, a negative rate, ``min_lr > lr``, an unknown
                ``attention`` / ``sparse_mode`` / ``dtype`` / ``distributed``, ``resume="latest"`` without
                ``out_dir``.
            KeyError: ``preset`` is not registered.
        """
        for name in ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {val!r}")
        for name in ("warmup", "keep_checkpoints", "seed"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"{name}: expected an integer >= 0, got {val!r}")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "eps"):
            val = getattr(self, name)
            low = 0 if name != "lr" else math.nextafter(0.0, 1.0)
            if not isinstance(val, (int, float)) or not math.isfinite(val) or val < low:
                raise ValueError(f"{name}: expected a finite number {'> 0' if low else '>= 0'}, got {val!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: expected <= lr ({self.lr}), got {self.min_lr!r}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1), got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {self.val_fraction!r}")
        bad_save = not isinstance(self.save_interval, int) or self.save_interval < 0
        if self.save_interval is not None and bad_save:
            raise ValueError(f"save_interval: expected None or an integer >= 0, got {self.save_interval!r}")
        if self.max_time is not None and not (self.max_time > 0):
            raise ValueError(f"max_time: expected a number of seconds > 0, got {self.max_time!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads: expected an integer >= 1, got {self.threads!r}")
        if self.attention not in ("mla", "sparse"):
            raise ValueError(f"attention: expected 'mla' or 'sparse', got {self.attention!r}")
        if self.sparse_mode not in ("block", "topk"):
            raise ValueError(f"sparse_mode: expected 'block' or 'topk', got {self.sparse_mode!r}")
        if self.pack_documents and self.attention != "mla":
            raise ValueError(f"pack_documents: needs attention='mla' (varlen), got attention={self.attention!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.distributed not in MODES:
            raise ValueError(f"distributed: expected one of {MODES}, got {self.distributed!r}")
        if self.resume == "latest" and not self.out_dir:
            raise ValueError("resume: 'latest' (--resume without a path: the newest checkpoint in --out) needs "
                             "out_dir; pass --out DIR, or --resume PATH to a checkpoint directory")
        if self.preset not in registry.names():
            known = ", ".join(registry.names())
            raise KeyError(f"preset: unknown config {self.preset!r}; registered: {known}")
        return self

    def model_config(self) -> MLAConfig:
        """``registry.get(preset, **overrides)``, with ``max_position_embeddings`` raised to ``seq_len`` if
        smaller."""
        cfg = registry.get(self.preset, **self.overrides)
        if cfg.max_position_embeddings < self.seq_len:
            cfg = cfg.replace(max_position_embeddings=self.seq_len)
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return dataclasses.asdict(self)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update number ``step`` (0-based).

    Linear warmup ``lr · (step + 1) / warmup`` for ``step < warmup``, then cosine decay from ``lr`` to
    ``min_lr`` reached at ``step = steps`` (constant ``min_lr`` afterwards).
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    t = min(max(step - cfg.warmup, 0) / span, 1.0)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[dtype])


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: ByteDataset,
    *,
    split: str = "val",
    batch_size: int = 16,
    seq_len: int = 128,
    num_batches: int = 8,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: str = "float32",
    rank: int = 0,
    world_size: int = 1,
) -> float:
    """Mean next-byte cross entropy (nats per byte) of ``model`` on ``num_batches`` random windows.

    The windows come from a fresh ``torch.Generator`` seeded with ``seed``, so repeated calls score the
    same bytes (comparable across a run). Pure cross entropy of the logits: auxiliary losses (sparse
    indexers) are not included. The model is put in eval mode and restored afterwards; the global RNG is
    untouched.

    Distributed: with ``world_size > 1`` each batch is a global batch of ``batch_size × world_size``
    windows of which this rank scores its ``batch_size`` rows (``ByteDataset.get_batch``), and the result
    is averaged over the default process group, so every rank returns the loss a single process gets
    with ``batch_size × world_size``. All ranks must call it together (it is a collective; FSDP-sharded
    models need every rank in the forward pass anyway).

    Args:
        model: an ``MLACausalLM`` (anything returning ``.logits [B, T, 256]`` from ``model(x)``; a DDP or
            FSDP2-wrapped one too).
        dataset: the ``ByteDataset``; split: ``"val"`` or ``"train"``.
        batch_size: windows per batch and rank. seq_len: bytes per window.
        device: where to run (default: the model's device). dtype: ``"float32"`` or ``"bfloat16"`` autocast.
        rank, world_size: this process's shard of each batch (default: the whole batch).

    Returns:
        The loss in nats per byte (``bits_per_byte(loss)`` for bits).

    Raises:
        ValueError: bad split, sizes, rank, or a ``seq_len`` the split cannot hold.
    """
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"num_batches: expected an integer >= 1, got {num_batches!r}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for _ in range(num_batches):
            x, y = dataset.get_batch(split, batch_size, seq_len, gen, device, rank=rank, world_size=world_size)
            with _autocast(device, dtype):
                logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total += float(loss)
    finally:
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        t = torch.tensor([total], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total = float(t) / world_size
    return total / num_batches


# --------------------------------------------------------------------------------------------------
# checkpoints


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return value.item()
        raise TypeError(f"cannot store a tensor of shape {tuple(value.shape)} in the JSON sidecar")
    return value


def _process_rank() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank of the default group (a barrier too)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper (others unchanged)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups (of two or more) of parameter names that share one parameter, each sorted; the first name
    is the one stored."""
    groups: dict[int, list[str]] = {}
    for name, p in _unwrap(model).named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [sorted(g) for g in groups.values() if len(g) > 1]


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of every parameter of ``optimizer``, in ``param_groups`` order (= the index used on disk).

    Raises:
        ValueError: the optimizer holds a parameter that is not in ``model``.
    """
    names = {id(p): n for n, p in _unwrap(model).named_parameters()}
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError("optimizer: holds a parameter that is not in the model")
            out.append(names[id(p)])
    return out


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory ``path`` atomically (a temporary sibling directory, then a rename;
    an existing ``path`` is replaced).

    Files: ``model.safetensors`` (the full weights, tied weights stored once under their first name in
    sorted order), ``optimizer.safetensors`` (each state tensor as ``state.<param index>.<name>``, the index
    counting parameters through ``param_groups``; only when ``optimizer`` is given) and ``state.json``
    (``state``, which must be JSON-serialisable, plus the optimizer's param groups and non-tensor state,
    and the format tag).

    Distributed: the tensors are gathered in full to rank 0 (``full_state_dicts``: FSDP2 shards are
    all-gathered) and rank 0 writes; **every rank must call this** with the same ``path``; it returns
    after rank 0 has finished writing (if rank 0 fails, every rank raises). The files do not depend on the
    world size.

    Args:
        model: the model (plain, FSDP2-sharded, or a DDP wrapper / its ``.module``).
        optimizer: its optimizer (built over ``model``'s parameters), or None.

    Returns:
        The checkpoint directory as a ``Path``.

    Raises:
        TypeError: ``state`` is not JSON-serialisable (raised on every rank, before any collective).
        OSError (or whatever writing raised) on rank 0; ``RuntimeError`` on the other ranks then.
    """
    path = Path(path)
    sidecar: dict[str, Any] = {"format": CHECKPOINT_FORMAT, **(state or {})}
    try:
        json.dumps(sidecar)
    except TypeError as exc:
        raise TypeError(f"state: not JSON-serialisable ({exc})") from exc
    msd, osd = full_state_dicts(_unwrap(model), optimizer)
    rank, _ = _process_rank()
    error: BaseException | None = None
    if rank == 0:
        try:
            _write_checkpoint(path, model, msd, osd, sidecar, type(optimizer).__name__)
        except BaseException as exc:  # re-raised below, after telling the other ranks
            error = exc
    failed = _any_rank(error is not None)
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f"checkpoint: rank 0 failed to write {str(path)!r}")
    return path


def _write_checkpoint(
    path: Path,
    model: nn.Module,
    msd: dict[str, torch.Tensor],
    osd: dict[str, Any] | None,
    sidecar: dict[str, Any],
    optimizer_class: str,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        aliases = {name for group in _tied_names(model) for name in group[1:]}
        weights = {k: v.detach().cpu().contiguous() for k, v in msd.items() if k not in aliases}
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        if osd is not None:
            order = [name for g in osd["param_groups"] for name in g["params"]]
            index = {name: i for i, name in enumerate(order)}
            tensors: dict[str, torch.Tensor] = {}
            other: dict[str, dict[str, Any]] = {}
            for name, pstate in osd["state"].items():
                for key, val in pstate.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"state.{index[name]}.{key}"] = val.detach().cpu().contiguous()
                    else:
                        other.setdefault(str(index[name]), {})[key] = _jsonable(val)
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "params": [index[n] for n in g["params"]]}
                for g in osd["param_groups"]
            ]
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
            sidecar["optimizer"] = {
                "class": optimizer_class,
                "param_groups": _jsonable(groups),
                "non_tensor_state": other,
            }
        (tmp / "state.json").write_text(json.dumps(sidecar, indent=1))
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (on any number of ranks).

    Loads the weights into ``model`` (strict: every key must match; tied weights are restored from the
    stored name) and the state into ``optimizer`` when given, and returns the ``state.json`` dict
    (whatever ``state`` was saved, plus ``"format"`` and ``"optimizer"``).

    Distributed: the full tensors are read by every rank (the directory must be visible to all) and set
    with ``set_model_state_dict`` / ``set_optimizer_state_dict`` (``full_state_dict=True``), so an FSDP2
    model keeps only its shards: a checkpoint written on N ranks loads on M. **Every rank must call
    this** when ``model`` is sharded. ``device``: where the tensors are read to before being copied in.

    Raises:
        FileNotFoundError: ``path`` is not a checkpoint directory (no ``state.json``), or the optimizer
            file is missing while an optimizer is given.
        ValueError: an unknown format, or a checkpoint whose tensors do not fit ``model`` / ``optimizer``.
    """
    path = Path(path)
    meta_path = path / "state.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"checkpoint: no state.json in {str(path)!r} (not a checkpoint directory)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"checkpoint: unknown format {meta.get('format')!r} in {str(meta_path)!r}")
    dev = str(torch.device(device))
    msd = None
    if model is not None:
        msd = load_file(str(path / "model.safetensors"), device=dev)
        for group in _tied_names(model):
            stored = [n for n in group if n in msd]
            for name in group:
                if name not in msd and stored:
                    msd[name] = msd[stored[0]]
    osd = None
    if optimizer is not None:
        opt_file = path / "optimizer.safetensors"
        if not opt_file.is_file() or "optimizer" not in meta:
            raise FileNotFoundError(f"checkpoint: no optimizer state in {str(path)!r}")
        tensors = load_file(str(opt_file), device=dev)
        state: dict[int, dict[str, Any]] = {}
        for name, t in tensors.items():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
        for idx, extra in meta["optimizer"].get("non_tensor_state", {}).items():
            state.setdefault(int(idx), {}).update(extra)
        groups = []
        for g in meta["optimizer"]["param_groups"]:
            g = dict(g)
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
            groups.append(g)
        osd = {"state": state, "param_groups": groups}
        if model is not None:
            sizes = [len(g["params"]) for g in optimizer.param_groups]
            osd = _index_to_names(osd, _param_names(model, optimizer), sizes, path)
        else:  # no model to name the parameters: plain (unsharded) optimizer load by index
            try:
                optimizer.load_state_dict(osd)
            except (ValueError, KeyError) as exc:
                raise ValueError(f"checkpoint: optimizer state in {str(path)!r} does not fit: {exc}") from exc
            osd = None
    if model is not None:
        try:
            load_full_state_dicts(_unwrap(model), msd)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise ValueError(f"checkpoint: weights in {str(path)!r} do not fit the model: {exc}") from exc
        if osd is not None:
            try:
                load_full_state_dicts(_unwrap(model), None, optimizer, osd)
            except (RuntimeError, KeyError, ValueError) as exc:
                raise ValueError(f"checkpoint: optimizer state in {str(path)!r} does not fit: {exc}") from exc
            for g in optimizer.param_groups:  # set_optimizer_state_dict hands tuples back as lists
                if isinstance(g.get("betas"), list):
                    g["betas"] = tuple(g["betas"])
    return meta


def _index_to_names(osd: dict[str, Any], names: list[str], sizes: list[int], path: Path) -> dict[str, Any]:
    """Re-key an index-keyed optimizer state dict by parameter name (the form ``set_optimizer_state_dict``
    takes with ``full_state_dict=True``); ``sizes``: parameters per group of the target optimizer.

    Raises:
        ValueError: the saved groups do not have the target's sizes.
    """
    saved = [len(g["params"]) for g in osd["param_groups"]]
    if saved != sizes or any(not 0 <= i < len(names) for i in osd["state"]):
        raise ValueError(
            f"checkpoint: optimizer state in {str(path)!r} does not fit: its param groups hold {saved} "
            f"parameters, the optimizer's {sizes}"
        )
    return {
        "state": {names[i]: s for i, s in osd["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]],
    }


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint (``step_*`` directory with a ``state.json``) in ``out_dir``, or
    None when there is none."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    found = [p for p in out.glob("step_*") if (p / "state.json").is_file() and p.name[5:].isdigit()]
    return max(found, key=lambda p: int(p.name[5:]), default=None)


# --------------------------------------------------------------------------------------------------
# trainer


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer:
    """Holds the model, optimizer, data and run state of one training run; ``fit()`` trains.

    Args:
        cfg: a ``TrainConfig`` (validated here).
        model: an ``MLACausalLM`` to train in place (default: built from ``cfg.preset`` / ``overrides``
            after ``torch.manual_seed(cfg.seed)``; with ``cfg.resume`` the checkpoint's model config and
            attention kind are used).
        dataset: a ``ByteDataset`` (default: ``ByteDataset(cfg.data, val_fraction=cfg.val_fraction)``).
        log: called with one human-readable line per evaluation (default: ``tqdm.write`` when
            ``cfg.verbose``); on rank 0 only.

    Attributes:
        model (the ``MLACausalLM``; FSDP2-sharded in place under ``fsdp``), wrapped (the module the forward
        pass goes through: the ``DistributedDataParallel`` wrapper under ``ddp``, else ``model``), optimizer,
        dataset, generator (the CPU ``torch.Generator`` that draws the global training batches; in step on
        all ranks), step (updates done), metrics (list of dicts, ``METRIC_KEYS``; identical on all ranks),
        step_losses (``(step, loss)`` of every update made by this object, the loss averaged over ranks),
        last_checkpoint (``Path`` or None), device, dist (the ``DistContext``: rank, world size, mode).

    Distributed runs (``cfg.distributed``): construct the trainer and call ``fit``/``save``/``evaluate`` on
    every rank; ``close()`` (or ``train``) destroys the process group the trainer created.

    Raises:
        ValueError / KeyError: see ``TrainConfig.validate``; ``FileNotFoundError``: missing data file or
        checkpoint; ``ValueError``: a checkpoint that does not fit, a bad device or distributed set-up.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        model: MLACausalLM | None = None,
        dataset: ByteDataset | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg.validate()
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.dist: DistContext = init_distributed(cfg.distributed, cfg.device)
        try:
            self._setup(cfg, model, dataset, log)
        except BaseException:
            self.dist.close()
            raise

    def _setup(self, cfg: TrainConfig, model, dataset, log) -> None:
        self.device = self.dist.device
        if not self.dist.is_main:
            self._log = lambda s: None
        else:
            self._log = log if log is not None else (tqdm.write if cfg.verbose else (lambda s: None))
        if dataset is None:
            dataset = ByteDataset(cfg.data, val_fraction=cfg.val_fraction)
        self.dataset = dataset
        self.dataset.check_seq_len(cfg.seq_len)

        resume_dir = self._resolve_resume()
        meta = None
        if resume_dir is not None:
            meta = json.loads((resume_dir / "state.json").read_text())
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(
                    f"resume: unknown checkpoint format {meta.get('format')!r} in {str(resume_dir)!r}"
                )
        if model is None:
            torch.manual_seed(cfg.seed)
            if meta is not None:
                mcfg = MLAConfig.from_dict(meta["model"]["config"])
                attention, sparse_mode = meta["model"]["attention"], meta["model"]["sparse_mode"]
            else:
                mcfg, attention, sparse_mode = cfg.model_config(), cfg.attention, cfg.sparse_mode
            model = MLACausalLM(mcfg, attention=attention, sparse_mode=sparse_mode)
            self.attention, self.sparse_mode = attention, sparse_mode
        else:
            self.attention, self.sparse_mode = cfg.attention, cfg.sparse_mode
        if model.config.max_position_embeddings < cfg.seq_len:
            raise ValueError(
                f"seq_len: {cfg.seq_len} exceeds the model's max_position_embeddings "
                f"({model.config.max_position_embeddings})"
            )
        self.model = model.to(self.device)
        self.model.train()
        if cfg.dtype != "float32":
            self._check_autocast()
        # Every rank built the same weights (same seed); DDP also broadcasts rank 0's, FSDP2 shards them.
        # (Top-k sparse attention's lightning indexer only selects keys: no gradient reaches it.)
        unused = self.attention == "sparse" and self.sparse_mode == "topk"
        self.wrapped = self.dist.wrap(self.model, find_unused_parameters=unused)
        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
        )
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.tokens = 0
        self.elapsed = 0.0
        self.metrics: list[dict[str, Any]] = []
        self.step_losses: list[tuple[int, float]] = []
        self.last_checkpoint: Path | None = None
        self.stopped = False  # fit() ended early on request_stop()
        self._stop_requested = False
        self._acc_loss, self._acc_steps, self._acc_tokens, self._acc_time = 0.0, 0, 0, 0.0
        self._last_max_logit: float | None = None
        if resume_dir is not None:
            self._load(resume_dir)

    def request_stop(self) -> None:
        """Ask a running ``fit`` to stop after the current step (safe from a signal handler). ``fit`` then
        skips its final evaluation, saves a checkpoint when ``out_dir`` is set (a resume continues exactly
        as the uninterrupted run would), sets ``self.stopped`` and returns. Distributed: ranks stop together
        at the same step when any rank asked."""
        self._stop_requested = True

    def close(self) -> None:
        """Destroy the process group if this trainer created it (no-op otherwise; idempotent). The model
        stays usable on this rank, but sharded (FSDP) models need the group for their forward pass."""
        self.dist.close()

    def _check_autocast(self) -> None:
        """Raise ``ValueError`` when the model cannot run a forward pass under ``cfg.dtype`` autocast."""
        x = torch.zeros(1, min(self.cfg.seq_len, 8), dtype=torch.long, device=self.device)
        try:
            with torch.no_grad(), _autocast(self.device, self.cfg.dtype):
                self.model(x)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"dtype: {self.cfg.dtype!r} autocast is not supported by this model on {self.device} "
                f"({type(exc).__name__}: {exc}); use 'float32'"
            ) from exc

    # ---- checkpoint plumbing -----------------------------------------------------------------------

    def _resolve_resume(self) -> Path | None:
        cfg = self.cfg
        if not cfg.resume:
            return None
        if cfg.resume == "latest":
            found = latest_checkpoint(cfg.out_dir)
            if found is None:
                raise FileNotFoundError(
                    f"resume: no checkpoint (step_*/state.json) in out_dir {cfg.out_dir!r}"
                )
            return found
        path = Path(cfg.resume)
        if (path / "state.json").is_file():
            return path
        if path.is_dir():
            found = latest_checkpoint(path)
            if found is not None:
                return found
        raise FileNotFoundError(f"resume: {cfg.resume!r} is neither a checkpoint directory nor holds one")

    def state(self) -> dict[str, Any]:
        """The JSON-serialisable run state saved next to the tensors (see the module docstring)."""
        rng: dict[str, Any] = {
            "generator": _b64(self.generator.get_state()),
            "torch": _b64(torch.get_rng_state()),
        }
        if self.device.type == "cuda":
            rng["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
        return {
            "step": self.step,
            "tokens": self.tokens,
            "elapsed_s": self.elapsed,
            "train_config": self.cfg.to_dict(),
            "model": {
                "config": self.model.config.to_dict(),
                "attention": self.attention,
                "sparse_mode": self.sparse_mode,
                "num_parameters": self.model.num_parameters(),
            },
            "data": {
                "name": self.dataset.name,
                "sha256": self.dataset.sha256,
                "bytes": len(self.dataset),
                "val_fraction": self.dataset.val_fraction,
            },
            "rng": rng,
            "distributed": {
                "mode": self.dist.mode, "world_size": self.dist.world_size,
                "global_batch_size": self.cfg.batch_size * self.dist.world_size,
            },
            "accumulator": {
                "loss_sum": self._acc_loss, "steps": self._acc_steps, "tokens": self._acc_tokens,
                "time_s": self._acc_time, "last_max_logit": self._last_max_logit,
            },
            "metrics": self.metrics,
            "torch_version": torch.__version__,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Save a checkpoint (default: ``out_dir/step_<step>``), prune old ones; returns its path.

        Distributed: call on every rank (the full tensors are gathered to rank 0, which writes and prunes).

        Raises:
            ValueError: no ``path`` and no ``cfg.out_dir``.
        """
        if path is None:
            if not self.cfg.out_dir:
                raise ValueError("save: no path given and TrainConfig.out_dir is not set")
            path = Path(self.cfg.out_dir) / f"step_{self.step:07d}"
        self.last_checkpoint = save_checkpoint(path, self.model, self.optimizer, self.state())
        if self.dist.is_main and self.cfg.out_dir and self.cfg.keep_checkpoints > 0:
            done = sorted(
                (p for p in Path(self.cfg.out_dir).glob("step_*") if p.name[5:].isdigit()),
                key=lambda p: int(p.name[5:]),
            )
            for old in done[: -self.cfg.keep_checkpoints]:
                if old != self.last_checkpoint:
                    shutil.rmtree(old, ignore_errors=True)
        return self.last_checkpoint

    def _load(self, path: Path) -> None:
        meta = load_checkpoint(path, self.model, self.optimizer, device=self.device)
        if meta["data"]["sha256"] != self.dataset.sha256:
            warnings.warn(
                f"resume: the data differs from the checkpoint's ({meta['data']['name']!r}); "
                "the run will not match an uninterrupted one",
                stacklevel=4,  # the caller of Trainer(...)
            )
        saved = meta["train_config"]
        changed = [f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in _TRAJECTORY_FIELDS
                   if saved.get(k) != getattr(self.cfg, k)]
        saved_world = int(meta.get("distributed", {}).get("world_size", 1))
        saved_batch = saved.get("batch_size", 0) * saved_world
        if saved_batch != self.cfg.batch_size * self.dist.world_size:
            changed.append(
                f"global batch {saved_batch} ({saved.get('batch_size')} x {saved_world} ranks) -> "
                f"{self.cfg.batch_size * self.dist.world_size} ({self.cfg.batch_size} x {self.dist.world_size})"
            )
        if changed:
            warnings.warn(
                "resume: these settings differ from the checkpoint's, so the run will not match an "
                "uninterrupted one: " + ", ".join(changed),
                stacklevel=4,  # the caller of Trainer(...)
            )
        self.step = int(meta["step"])
        self.tokens = int(meta["tokens"])
        self.elapsed = float(meta["elapsed_s"])
        self.metrics = list(meta["metrics"])
        self.generator.set_state(_unb64(meta["rng"]["generator"]))
        torch.set_rng_state(_unb64(meta["rng"]["torch"]))
        if self.device.type == "cuda" and meta["rng"].get("cuda"):
            states = [_unb64(s) for s in meta["rng"]["cuda"]]
            if len(states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states)
        acc = meta["accumulator"]
        self._acc_loss, self._acc_steps = float(acc["loss_sum"]), int(acc["steps"])
        self._acc_tokens, self._acc_time = int(acc["tokens"]), float(acc["time_s"])
        self._last_max_logit = acc.get("last_max_logit")
        self.last_checkpoint = path
        where = f" on {self.dist.world_size} ranks" if self.dist.world_size > 1 else ""
        self._log(f"resumed from {path} at step {self.step}{where}")

    # ---- training ----------------------------------------------------------------------------------

    def evaluate(self, split: str = "val") -> float:
        """Mean loss (nats/byte) on ``cfg.eval_batches`` fixed batches of ``split`` (see ``evaluate``)."""
        return evaluate(
            self.wrapped, self.dataset, split=split, batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len,
            num_batches=self.cfg.eval_batches, seed=self.cfg.seed + 1_000_003, device=self.device,
            dtype=self.cfg.dtype, rank=self.dist.rank, world_size=self.dist.world_size,
        )

    def _record(self) -> dict[str, Any]:
        cfg = self.cfg
        val = self.evaluate("val")
        if self._acc_steps:
            train_loss = self._acc_loss / self._acc_steps
        else:  # no update since the last record (step 0): score the training split the same way
            train_loss = self.evaluate("train")
        rec = {
            "step": self.step,
            "train_loss": train_loss,
            "val_loss": val,
            "val_bpb": bits_per_byte(val),
            "lr": lr_at(max(self.step - 1, 0), cfg),
            "tokens_per_s": (self._acc_tokens / self._acc_time) if self._acc_time > 0 else None,
            "tokens": self.tokens,
            "elapsed_s": None,  # filled by fit
            "max_logit": self._last_max_logit,
        }
        self._acc_loss, self._acc_steps, self._acc_tokens, self._acc_time = 0.0, 0, 0, 0.0
        return rec

    def _emit(self, rec: dict[str, Any], metrics_file) -> None:
        self.metrics.append(rec)
        if not self.dist.is_main:
            return
        if metrics_file is not None:
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        tps = "-" if rec["tokens_per_s"] is None else f"{rec['tokens_per_s']:.0f}"
        self._log(
            f"step {rec['step']:>6}/{self.cfg.steps} | train {rec['train_loss']:.4f} "
            f"| val {rec['val_loss']:.4f} nats = {rec['val_bpb']:.3f} bits/byte | lr {rec['lr']:.2e} "
            f"| {tps} tok/s | {rec['elapsed_s']:.1f} s"
        )

    def train_step(self) -> float:
        """One AdamW update on a fresh training batch; returns its loss (nats/byte, float).

        Distributed: this rank's rows of the global batch; the returned loss is the mean over ranks (the
        global-batch loss), and gradients are averaged by DDP / FSDP2. Call on every rank.

        Raises:
            RuntimeError: the loss is not finite (the run diverged; lower ``lr``), on every rank alike.
        """
        cfg, d = self.cfg, self.dist
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = self.dataset.get_batch(
            "train", cfg.batch_size, cfg.seq_len, self.generator, self.device, rank=d.rank, world_size=d.world_size
        )
        packed = {}
        if cfg.pack_documents:  # one row of documents, no attention across them (varlen)
            x, cu, _, max_len = pack_documents(x)
            y = y.reshape(1, -1)
            packed = dict(cu_seqlens=cu, max_seqlen=max_len)
        with _autocast(self.device, cfg.dtype):
            out = self.wrapped(x, targets=y, **packed)
        loss = out.loss
        maxes = [s.max_logit for s in out.stats if s.max_logit is not None]
        local_max = float(torch.stack([m.max() for m in maxes]).max()) if maxes else None
        value, self._last_max_logit = d.mean_and_max(loss.detach().item(), local_max)
        if not math.isfinite(value):
            raise RuntimeError(f"the loss became {value} at step {self.step} (lr {lr:.3g}); lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.step_losses.append((self.step, value))
        self.step += 1
        self.tokens += x.numel() * d.world_size
        return value

    def fit(self) -> list[dict[str, Any]]:
        """Train from ``self.step`` up to ``cfg.steps`` (or until ``cfg.max_time`` seconds have passed in
        this call), evaluating, logging and checkpointing on the way.

        Distributed: call on every rank. Ranks stop together (the ``max_time`` decision is shared);
        ``tokens`` and ``tokens_per_s`` count the global batch; only rank 0 writes ``metrics_out``, logs and
        shows the progress bar.

        Returns:
            All metrics records of the run (``METRIC_KEYS``; those restored from a checkpoint included).
            At step 0 ``train_loss`` is scored on training windows like the validation loss and
            ``tokens_per_s`` is None.

        Raises:
            RuntimeError: the loss diverged (see ``train_step``).
        """
        cfg, d = self.cfg, self.dist
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        global_tokens = cfg.batch_size * cfg.seq_len * d.world_size
        metrics_file = None
        if cfg.metrics_out and d.is_main:
            Path(cfg.metrics_out).parent.mkdir(parents=True, exist_ok=True)
            metrics_file = open(cfg.metrics_out, "w")  # noqa: SIM115 - closed in finally
            for rec in self.metrics:  # a resumed run rewrites the history it continues from
                metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
        save_every = cfg.eval_interval if cfg.save_interval is None else cfg.save_interval

        def now() -> float:
            return elapsed0 + time.perf_counter() - t_start

        def record() -> None:
            rec = self._record()
            self.elapsed = now()
            rec["elapsed_s"] = self.elapsed
            self._emit(rec, metrics_file)

        bar = tqdm(
            total=cfg.steps, initial=self.step, disable=not (cfg.progress and d.is_main), dynamic_ncols=True,
            leave=False,
            unit="step", desc="train",
        )
        try:
            if self.step == 0 and cfg.eval_at_start and not self.metrics:
                record()
            last_recorded = self.metrics[-1]["step"] if self.metrics else -1
            last_saved = self.step
            while self.step < cfg.steps:
                if d.any(self._stop_requested):
                    self.stopped = True
                    self._log(f"stopping at step {self.step} on request")
                    break
                if cfg.max_time is not None and d.any(time.perf_counter() - t_start >= cfg.max_time):
                    self._log(f"time budget of {cfg.max_time:.0f} s reached at step {self.step}")
                    break
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                self._acc_loss += loss
                self._acc_steps += 1
                self._acc_tokens += global_tokens
                self._acc_time += dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(self.step - 1, cfg):.1e}",
                                tok_s=f"{global_tokens / dt:.0f}", refresh=False)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                    record()
                    last_recorded = self.step
                if cfg.out_dir and save_every > 0 and self.step % save_every == 0:
                    self.elapsed = now()
                    self.save()
                    last_saved = self.step
            if last_recorded != self.step and not self.stopped:
                record()
            self.elapsed = now()
            if cfg.out_dir and (last_saved != self.step or self.last_checkpoint is None):
                self.save()
        finally:
            bar.close()
            if metrics_file is not None:
                metrics_file.close()
        return self.metrics


def train(
    cfg: TrainConfig,
    *,
    model: MLACausalLM | None = None,
    dataset: ByteDataset | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Run ``Trainer(cfg, model=model, dataset=dataset, log=log).fit()`` and return its metrics
    (one dict per evaluation with ``METRIC_KEYS``: ``step``, ``train_loss`` and ``val_loss`` in nats per
    byte, ``val_bpb`` in bits per byte, ``lr``, ``tokens_per_s``, ``tokens`` trained, ``elapsed_s``,
    ``max_logit``). Pass ``model`` to keep a handle on the trained model. Under ``cfg.distributed`` call it
    on every rank; the process group it created is destroyed on return.

    Raises:
        See ``Trainer`` and ``Trainer.fit``.
    """
    trainer = Trainer(cfg, model=model, dataset=dataset, log=log)
    try:
        return trainer.fit()
    finally:
        trainer.close()
