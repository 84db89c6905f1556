"""Training run configuration: ``TrainConfig`` (validated), the learning-rate schedule ``lr_at`` and the
units of the metrics (``METRIC_KEYS``, ``bits_per_byte``).

Units: losses are mean cross entropy in **nats per byte** (one token = one byte); ``bits per byte = loss /
ln 2``; throughput in **tokens (bytes) per second** of training time; times in **seconds** of wall clock.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from mla import registry
from mla.config import MLAConfig
from mla.train.distributed import MODES

__all__ = ["METRIC_KEYS", "TrainConfig", "bits_per_byte", "lr_at"]

#: Keys of every metrics record (one per evaluation; one JSON line each in ``metrics_out``).
METRIC_KEYS = (
    "step", "train_loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "tokens", "elapsed_s", "max_logit",
)

AUTOCAST_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Fields of TrainConfig that change the trajectory of a run (a resume with other values warns).
# (batch_size is compared as the global batch, batch_size x world_size.)
TRAJECTORY_FIELDS = (
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
    forward; weights and optimizer stay float32); ``progress`` shows a tqdm bar (when stderr is a terminal);
    ``verbose`` prints one line per evaluation (progress, lines, metrics and checkpoints come from rank 0 only).

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
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(AUTOCAST_DTYPES)}, got {self.dtype!r}")
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
