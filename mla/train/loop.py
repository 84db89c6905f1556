"""Training loop for ``MLACausalLM`` on byte-level text: AdamW with linear warmup and cosine decay,
gradient clipping, periodic validation (loss in nats and bits per byte), throughput, and checkpoints in
safetensors that resume bit-for-bit.

Units used throughout: losses are mean cross entropy in **nats per byte** (one token = one byte);
``bits per byte = loss / ln 2``; throughput in **tokens (bytes) per second** of training time (evaluation
and checkpointing excluded); times in **seconds** of wall clock.

Checkpoint layout (a directory, written atomically: files go to a temporary directory that is renamed):

* ``model.safetensors``: the model's weights (``safetensors.torch.save_model``, tied weights stored once);
* ``optimizer.safetensors``: every AdamW state tensor as ``state.<param index>.<name>``;
* ``state.json``: everything else: step, elapsed seconds, the ``TrainConfig``, the model's ``MLAConfig``
  and attention kind, the data's name and sha256, the optimizer's param groups, the RNG states (batch
  generator, torch CPU and CUDA, base64) and the metrics so far.

A run resumed from a checkpoint continues exactly as the uninterrupted run would have: same batches, same
losses and weights, bit for bit on CPU (same torch build and thread count; on CUDA as deterministic as the
kernels are). Evaluation uses its own generator, so evaluating or not never changes the trajectory.
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
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn
from tqdm.auto import tqdm

from mla import registry
from mla.block import MLACausalLM
from mla.config import MLAConfig
from mla.train.data import ByteDataset

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
_TRAJECTORY_FIELDS = (
    "steps", "batch_size", "seq_len", "lr", "min_lr", "warmup", "weight_decay", "beta1", "beta2", "eps",
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

    Optimisation: ``steps`` optimizer updates of ``batch_size`` windows of ``seq_len`` bytes; AdamW
    (``beta1``, ``beta2``, ``eps``, decoupled ``weight_decay`` on matrices and embeddings only); the
    learning rate rises linearly over ``warmup`` steps to ``lr`` then follows a cosine down to ``min_lr``
    at ``steps`` (``lr_at``); gradients are clipped to global norm ``grad_clip`` (0 = off).

    Evaluation: every ``eval_interval`` steps (and at step 0 when ``eval_at_start``, and at the end) the
    mean loss over ``eval_batches`` fixed random validation batches (the same windows every time).

    Data: ``data`` a file path (raw bytes) or ``None`` for CPython's ``pydoc_data.topics``; the last
    ``val_fraction`` of the bytes is validation.

    Checkpoints: into ``out_dir`` (None = none) every ``save_interval`` steps (None = at each evaluation,
    0 = only at the end) and at the end, keeping the newest ``keep_checkpoints`` (0 = all). ``resume``: a
    checkpoint directory, or an ``out_dir`` (its newest checkpoint), or ``"latest"`` (newest in
    ``out_dir``).

    Run: ``metrics_out`` JSON-lines path; ``max_time`` wall-clock budget in seconds for this call of
    ``fit`` (None = unlimited); ``threads`` sets ``torch.set_num_threads``; ``device`` (``"cpu"``,
    ``"cuda"``, ``"cuda:1"``, or ``"auto"``); ``dtype`` ``"float32"`` or ``"bfloat16"`` (autocast of the
    forward; weights and optimizer stay float32); ``progress`` shows a tqdm bar; ``verbose`` prints one
    line per evaluation.
    """

    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)
    attention: str = "mla"
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

    def validate(self) -> TrainConfig:
        """Check values; returns self.

        Raises:
            ValueError: a non-positive count or size, a negative rate, ``min_lr > lr``, an unknown
                ``attention`` / ``sparse_mode`` / ``dtype``, ``resume="latest"`` without ``out_dir``.
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
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.resume == "latest" and not self.out_dir:
            raise ValueError("resume: 'latest' (the newest checkpoint in out_dir) needs out_dir (--out)")
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
) -> float:
    """Mean next-byte cross entropy (nats per byte) of ``model`` on ``num_batches`` random windows.

    The windows come from a fresh ``torch.Generator`` seeded with ``seed``, so repeated calls score the
    same bytes (comparable across a run). Pure cross entropy of the logits: auxiliary losses (sparse
    indexers) are not included. The model is put in eval mode and restored afterwards; the global RNG is
    untouched.

    Args:
        model: an ``MLACausalLM`` (anything returning ``.logits [B, T, 256]`` from ``model(x)``).
        dataset: the ``ByteDataset``; split: ``"val"`` or ``"train"``.
        device: where to run (default: the model's device). dtype: ``"float32"`` or ``"bfloat16"`` autocast.

    Returns:
        The loss in nats per byte (``bits_per_byte(loss)`` for bits).

    Raises:
        ValueError: bad split, sizes or a ``seq_len`` the split cannot hold.
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
            x, y = dataset.get_batch(split, batch_size, seq_len, gen, device)
            with _autocast(device, dtype):
                logits = model(x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            total += float(loss)
    finally:
        model.train(was_training)
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


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint directory ``path`` atomically (a temporary sibling directory, then a rename;
    an existing ``path`` is replaced).

    Files: ``model.safetensors`` (weights, via ``safetensors.torch.save_model``, so tied weights are
    stored once), ``optimizer.safetensors`` (each state tensor as ``state.<param index>.<name>``; only
    when ``optimizer`` is given) and ``state.json`` (``state``, which must be JSON-serialisable, plus the
    optimizer's param groups and non-tensor state, and the format tag).

    Returns:
        The checkpoint directory as a ``Path``.

    Raises:
        TypeError: ``state`` is not JSON-serialisable.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
        sidecar: dict[str, Any] = {"format": CHECKPOINT_FORMAT, **(state or {})}
        if optimizer is not None:
            osd = optimizer.state_dict()
            tensors: dict[str, torch.Tensor] = {}
            other: dict[str, dict[str, Any]] = {}
            for idx, pstate in osd["state"].items():
                for key, val in pstate.items():
                    if isinstance(val, torch.Tensor):
                        tensors[f"state.{idx}.{key}"] = val.detach().cpu().contiguous()
                    else:
                        other.setdefault(str(idx), {})[key] = _jsonable(val)
            save_file(tensors, str(tmp / "optimizer.safetensors"), metadata={"format": CHECKPOINT_FORMAT})
            sidecar["optimizer"] = {
                "class": type(optimizer).__name__,
                "param_groups": _jsonable(osd["param_groups"]),
                "non_tensor_state": other,
            }
        try:
            text = json.dumps(sidecar, indent=1)
        except TypeError as exc:
            raise TypeError(f"state: not JSON-serialisable ({exc})") from exc
        (tmp / "state.json").write_text(text)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint``.

    Loads the weights into ``model`` (strict: every key must match) and the state into ``optimizer`` when
    given, and returns the ``state.json`` dict (whatever ``state`` was saved, plus ``"format"`` and
    ``"optimizer"``).

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
    if model is not None:
        try:
            load_model(model, str(path / "model.safetensors"), strict=True, device=str(device))
        except RuntimeError as exc:
            raise ValueError(f"checkpoint: weights in {str(path)!r} do not fit the model: {exc}") from exc
    if optimizer is not None:
        opt_file = path / "optimizer.safetensors"
        if not opt_file.is_file() or "optimizer" not in meta:
            raise FileNotFoundError(f"checkpoint: no optimizer state in {str(path)!r}")
        tensors = load_file(str(opt_file), device="cpu")
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
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError) as exc:
            raise ValueError(f"checkpoint: optimizer state in {str(path)!r} does not fit: {exc}") from exc
    return meta


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


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"device: {name!r} is not a device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available here (use --device cpu)")
    return device


class Trainer:
    """Holds the model, optimizer, data and run state of one training run; ``fit()`` trains.

    Args:
        cfg: a ``TrainConfig`` (validated here).
        model: an ``MLACausalLM`` to train in place (default: built from ``cfg.preset`` / ``overrides``
            after ``torch.manual_seed(cfg.seed)``; with ``cfg.resume`` the checkpoint's model config and
            attention kind are used).
        dataset: a ``ByteDataset`` (default: ``ByteDataset(cfg.data, val_fraction=cfg.val_fraction)``).
        log: called with one human-readable line per evaluation (default: ``tqdm.write`` when
            ``cfg.verbose``).

    Attributes:
        model, optimizer, dataset, generator (the CPU ``torch.Generator`` that draws training windows),
        step (updates done), metrics (list of dicts, ``METRIC_KEYS``), step_losses (``(step, loss)`` of
        every update made by this object), last_checkpoint (``Path`` or None), device.

    Raises:
        ValueError / KeyError: see ``TrainConfig.validate``; ``FileNotFoundError``: missing data file or
        checkpoint; ``ValueError``: a checkpoint that does not fit.
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
        self.device = _resolve_device(cfg.device)
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
        self._acc_loss, self._acc_steps, self._acc_tokens, self._acc_time = 0.0, 0, 0, 0.0
        self._last_max_logit: float | None = None
        if resume_dir is not None:
            self._load(resume_dir)

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
            "accumulator": {
                "loss_sum": self._acc_loss, "steps": self._acc_steps, "tokens": self._acc_tokens,
                "time_s": self._acc_time, "last_max_logit": self._last_max_logit,
            },
            "metrics": self.metrics,
            "torch_version": torch.__version__,
        }

    def save(self, path: str | os.PathLike | None = None) -> Path:
        """Save a checkpoint (default: ``out_dir/step_<step>``), prune old ones; returns its path.

        Raises:
            ValueError: no ``path`` and no ``cfg.out_dir``.
        """
        if path is None:
            if not self.cfg.out_dir:
                raise ValueError("save: no path given and TrainConfig.out_dir is not set")
            path = Path(self.cfg.out_dir) / f"step_{self.step:07d}"
        self.last_checkpoint = save_checkpoint(path, self.model, self.optimizer, self.state())
        if self.cfg.out_dir and self.cfg.keep_checkpoints > 0:
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
                stacklevel=3,
            )
        saved = meta["train_config"]
        changed = [k for k in _TRAJECTORY_FIELDS if saved.get(k) != getattr(self.cfg, k)]
        if changed:
            warnings.warn(
                "resume: these settings differ from the checkpoint's, so the run will not match an "
                "uninterrupted one: "
                + ", ".join(f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in changed),
                stacklevel=3,
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
        self._log(f"resumed from {path} at step {self.step}")

    # ---- training ----------------------------------------------------------------------------------

    def evaluate(self, split: str = "val") -> float:
        """Mean loss (nats/byte) on ``cfg.eval_batches`` fixed batches of ``split`` (see ``evaluate``)."""
        return evaluate(
            self.model, self.dataset, split=split, batch_size=self.cfg.batch_size, seq_len=self.cfg.seq_len,
            num_batches=self.cfg.eval_batches, seed=self.cfg.seed + 1_000_003, device=self.device,
            dtype=self.cfg.dtype,
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

        Raises:
            RuntimeError: the loss is not finite (the run diverged; lower ``lr``).
        """
        cfg = self.cfg
        lr = lr_at(self.step, cfg)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        x, y = self.dataset.get_batch("train", cfg.batch_size, cfg.seq_len, self.generator, self.device)
        with _autocast(self.device, cfg.dtype):
            out = self.model(x, targets=y)
        loss = out.loss
        if not torch.isfinite(loss):
            raise RuntimeError(f"the loss became {float(loss)} at step {self.step} (lr {lr:.3g}); lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        value = loss.detach().item()
        maxes = [s.max_logit for s in out.stats if s.max_logit is not None]
        self._last_max_logit = float(torch.stack([m.max() for m in maxes]).max()) if maxes else None
        self.step_losses.append((self.step, value))
        self.step += 1
        self.tokens += x.numel()
        return value

    def fit(self) -> list[dict[str, Any]]:
        """Train from ``self.step`` up to ``cfg.steps`` (or until ``cfg.max_time`` seconds have passed in
        this call), evaluating, logging and checkpointing on the way.

        Returns:
            All metrics records of the run (``METRIC_KEYS``; those restored from a checkpoint included).
            At step 0 ``train_loss`` is scored on training windows like the validation loss and
            ``tokens_per_s`` is None.

        Raises:
            RuntimeError: the loss diverged (see ``train_step``).
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        elapsed0 = self.elapsed
        metrics_file = None
        if cfg.metrics_out:
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
            total=cfg.steps, initial=self.step, disable=not cfg.progress, dynamic_ncols=True, leave=False,
            unit="step", desc="train",
        )
        try:
            if self.step == 0 and cfg.eval_at_start and not self.metrics:
                record()
            last_recorded = self.metrics[-1]["step"] if self.metrics else -1
            last_saved = self.step
            while self.step < cfg.steps:
                if cfg.max_time is not None and time.perf_counter() - t_start >= cfg.max_time:
                    self._log(f"time budget of {cfg.max_time:.0f} s reached at step {self.step}")
                    break
                t0 = time.perf_counter()
                loss = self.train_step()
                dt = time.perf_counter() - t0
                self._acc_loss += loss
                self._acc_steps += 1
                self._acc_tokens += cfg.batch_size * cfg.seq_len
                self._acc_time += dt
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr_at(self.step - 1, cfg):.1e}",
                                tok_s=f"{cfg.batch_size * cfg.seq_len / dt:.0f}", refresh=False)
                if self.step % cfg.eval_interval == 0 or self.step == cfg.steps:
                    record()
                    last_recorded = self.step
                if cfg.out_dir and save_every > 0 and self.step % save_every == 0:
                    self.elapsed = now()
                    self.save()
                    last_saved = self.step
            if last_recorded != self.step:
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
    ``max_logit``). Pass ``model`` to keep a handle on the trained model.

    Raises:
        See ``Trainer`` and ``Trainer.fit``.
    """
    return Trainer(cfg, model=model, dataset=dataset, log=log).fit()
