"""Byte-level data for ``mla.train``: one token per byte (vocabulary 256), a train/validation split and
random windows drawn with a seeded ``torch.Generator``.

The default corpus is the English documentation that ships inside CPython: the ``topics`` dict of
``pydoc_data.topics`` (the text behind ``help("if")`` and friends, about 0.45 MB), joined in sorted key
order and encoded as UTF-8. Nothing is downloaded. Any file can be used instead (its raw bytes).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

__all__ = ["ByteDataset", "default_corpus", "load_bytes", "DEFAULT_DATA"]

#: Name used for the built-in corpus in configs, checkpoints and metrics.
DEFAULT_DATA = "pydoc_data.topics"


def default_corpus() -> bytes:
    """The built-in corpus: CPython's ``pydoc_data.topics.topics`` texts joined by blank lines, UTF-8.

    Returns:
        ``bytes`` (about 466 kB on CPython 3.11).

    Raises:
        RuntimeError: this Python ships without ``pydoc_data`` (some minimal distributions strip it);
            pass a file with ``--data PATH`` / ``TrainConfig(data=...)`` instead.
    """
    try:
        import pydoc_data.topics as topics_mod
    except ImportError as exc:  # pragma: no cover - depends on the Python build
        raise RuntimeError(
            "the default corpus pydoc_data.topics is missing from this Python; "
            "pass a text file with --data PATH"
        ) from exc
    topics = topics_mod.topics
    return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")


def load_bytes(source: str | os.PathLike | bytes | None = None) -> bytes:
    """Read a corpus as bytes.

    Args:
        source: ``None`` or ``"pydoc_data.topics"`` for the built-in corpus (``default_corpus()``), a path
            to any file (read in binary), or ``bytes`` / ``bytearray`` used as is.

    Raises:
        FileNotFoundError: the path does not exist. IsADirectoryError: the path is a directory.
        ValueError: the corpus is empty.
    """
    if source is None or (isinstance(source, str) and source == DEFAULT_DATA):
        data = default_corpus()
    elif isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data: file not found: {str(path)!r}")
        if path.is_dir():
            raise IsADirectoryError(f"data: expected a file, got the directory {str(path)!r}")
        data = path.read_bytes()
    if len(data) == 0:
        raise ValueError(f"data: the corpus {source!r} is empty")
    return data


class ByteDataset:
    """A byte corpus split into a train part (the first ``1 - val_fraction`` of the bytes) and a
    validation part (the last ``val_fraction``), sampled as random fixed-length windows.

    A window of length ``T`` starting at ``s`` gives ``x = split[s : s+T]`` and ``y = split[s+1 : s+T+1]``
    (the next byte at every position); windows never cross the split boundary, so train and validation
    batches read disjoint bytes.

    Args:
        data: anything ``load_bytes`` accepts (``None`` = the built-in corpus).
        val_fraction: fraction of the bytes (at the end) held out for validation, in ``(0, 1)``.

    Attributes:
        train, val: ``uint8`` 1-D tensors (CPU). name: the source's name. sha256: hex digest of all bytes.

    Raises:
        ValueError: ``val_fraction`` outside ``(0, 1)``, or a split with fewer than 2 bytes.
        FileNotFoundError / IsADirectoryError: see ``load_bytes``.
    """

    def __init__(self, data: str | os.PathLike | bytes | None = None, *, val_fraction: float = 0.1):
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
        raw = load_bytes(data)
        self.name = DEFAULT_DATA if data is None else (
            "<bytes>" if isinstance(data, (bytes, bytearray)) else str(data)
        )
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.val_fraction = float(val_fraction)
        all_bytes = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        n_val = int(round(len(raw) * self.val_fraction))
        n_train = len(raw) - n_val
        if n_train < 2 or n_val < 2:
            raise ValueError(
                f"data: {len(raw)} bytes is too small for a train/validation split with "
                f"val_fraction={val_fraction} (each part needs >= 2 bytes)"
            )
        self.train = all_bytes[:n_train].clone()
        self.val = all_bytes[n_train:].clone()

    def __len__(self) -> int:
        """Total number of bytes (train + validation)."""
        return self.train.numel() + self.val.numel()

    def split(self, name: str) -> torch.Tensor:
        """The ``uint8`` tensor of split ``name`` (``"train"`` or ``"val"``).

        Raises:
            ValueError: another name.
        """
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise ValueError(f"split: expected 'train' or 'val', got {name!r}")

    def check_seq_len(self, seq_len: int) -> None:
        """Raise ``ValueError`` unless both splits hold at least one window of ``seq_len + 1`` bytes."""
        if not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"seq_len: expected a positive int, got {seq_len!r}")
        for name in ("train", "val"):
            n = self.split(name).numel()
            if n < seq_len + 1:
                raise ValueError(
                    f"seq_len: {seq_len} needs {seq_len + 1} bytes per window, but the {name} split has "
                    f"{n} bytes (use a shorter --seq-len, more data, or another --val-fraction)"
                )

    def get_batch(
        self,
        split: str,
        batch_size: int,
        seq_len: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows of one split; with ``world_size > 1``, this rank's shard of a global batch.

        ``batch_size · world_size`` start offsets (the global batch) are drawn uniformly from
        ``[0, len(split) - seq_len - 1]`` with ``generator`` (a CPU ``torch.Generator``; the same generator
        state gives the same batch on every device), and rows ``[rank · batch_size, (rank + 1) · batch_size)``
        are returned. Ranks that share the generator state therefore read disjoint rows of one global batch,
        which is exactly the batch a single process draws with ``batch_size · world_size``; every rank's
        generator advances by the same amount, so they stay in step.

        Returns:
            ``(x, y)``, both ``int64 [batch_size, seq_len]`` on ``device``, ``y[:, t] = x[:, t+1]`` for
            ``t < seq_len - 1`` and ``y[:, -1]`` the byte after the window.

        Raises:
            ValueError: bad split name, ``batch_size < 1``, a ``seq_len`` the split cannot hold, or
                ``rank`` outside ``[0, world_size)``.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected an int in [0, {world_size}), got {rank!r}")
        data = self.split(split)
        self.check_seq_len(seq_len)
        high = data.numel() - seq_len  # starts in [0, high)
        starts = torch.randint(0, high, (batch_size * world_size,), generator=generator)
        starts = starts[rank * batch_size : (rank + 1) * batch_size]
        idx = starts[:, None] + torch.arange(seq_len + 1)
        chunk = data[idx].long()
        x, y = chunk[:, :-1], chunk[:, 1:]
        if torch.device(device).type != "cpu":
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x.contiguous(), y.contiguous()


def pack_documents(x: torch.Tensor, separator: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Pack a batch of byte windows into one row of documents for varlen attention.

    Each window ``x [B, L]`` is cut into documents after every ``separator`` byte (default ``\n``) and at
    the window's end; the windows are concatenated into one row.

    Returns:
        ``(x [1, B*L], cu_seqlens int32 [D+1], doc_lengths int64 [D], max_seqlen)`` on ``x``'s device.
    """
    B, L = x.shape
    ends = x == separator
    ends[:, -1] = True  # a window never continues into the next
    stops = ends.flatten().nonzero().flatten() + 1  # exclusive document ends on the packed axis
    cu = torch.cat([stops.new_zeros(1), stops]).to(torch.int32)
    lens = stops - torch.cat([stops.new_zeros(1), stops[:-1]])
    return x.reshape(1, B * L), cu, lens, int(lens.max())
