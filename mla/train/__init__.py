"""Training scaffolding: byte-level language modelling of real text with ``MLACausalLM``.

* ``ByteDataset``: one token per byte over a corpus (default: CPython's bundled ``pydoc_data.topics``
  documentation, nothing downloaded), the last ``val_fraction`` of the bytes held out, random windows
  from a seeded ``torch.Generator``.
* ``TrainConfig`` + ``train(cfg) -> list[dict]`` (or ``Trainer(cfg).fit()`` to keep the model): AdamW with
  warmup + cosine decay, gradient clipping, tqdm progress, periodic validation loss and bits per byte,
  tokens/s, safetensors checkpoints that resume bit-for-bit.
* ``evaluate``, ``bits_per_byte``, ``lr_at``, ``save_checkpoint`` / ``load_checkpoint`` /
  ``latest_checkpoint``.
* Data parallelism under ``torchrun``: ``TrainConfig(distributed="ddp" | "fsdp")`` / ``--distributed``
  (``DistributedDataParallel`` or FSDP2 ``fully_shard`` per block; ``batch_size`` per rank, the global batch
  drawn once and split by rank, losses averaged over ranks, rank-0 logging, checkpoints of full tensors that
  load on any world size); see ``mla.train.distributed``.
* CLI: ``python -m mla.train --help``.

Modules: ``data`` (``ByteDataset``), ``config`` (``TrainConfig``, ``lr_at``, metric units), ``checkpoint``
(safetensors checkpoint I/O), ``trainer`` (``Trainer``, ``train``, ``evaluate``), ``distributed``, ``__main__``
(the CLI). Every name below is importable from ``mla.train`` itself.

>>> from mla.train import TrainConfig, Trainer
>>> trainer = Trainer(TrainConfig(steps=200, max_time=60))    # doctest: +SKIP
>>> metrics = trainer.fit(); metrics[-1]["val_bpb"]            # doctest: +SKIP
"""

from mla.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from mla.train.config import METRIC_KEYS, TrainConfig, bits_per_byte, lr_at
from mla.train.data import DEFAULT_DATA, ByteDataset, default_corpus, load_bytes
from mla.train.distributed import DistContext, init_distributed
from mla.train.trainer import Trainer, evaluate, train

__all__ = [
    "ByteDataset",
    "DEFAULT_DATA",
    "default_corpus",
    "load_bytes",
    "METRIC_KEYS",
    "TrainConfig",
    "Trainer",
    "train",
    "evaluate",
    "bits_per_byte",
    "lr_at",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "DistContext",
    "init_distributed",
]
