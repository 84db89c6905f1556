"""The trainer of ``mla.train`` (``Trainer``, ``train``, ``evaluate``): ``MLACausalLM`` on byte-level text,
AdamW with linear warmup and cosine decay (``mla.train.config.lr_at``), gradient clipping, periodic
validation (loss in nats and bits per byte), throughput, and checkpoints in safetensors that resume
bit-for-bit (``mla.train.checkpoint``).

Units used throughout: losses are mean cross entropy in **nats per byte** (one token = one byte);
``bits per byte = loss / ln 2``; throughput in **tokens (bytes) per second** of training time (evaluation
and checkpointing excluded); times in **seconds** of wall clock.

Checkpoint files and their layout: ``mla.train.checkpoint``.

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

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mla.block import MLACausalLM
from mla.config import MLAConfig
from mla.train.checkpoint import (
    CHECKPOINT_FORMAT,
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mla.train.config import AUTOCAST_DTYPES, TRAJECTORY_FIELDS, TrainConfig, bits_per_byte, lr_at
from mla.train.data import ByteDataset, pack_documents
from mla.train.distributed import DistContext, init_distributed

__all__ = ["Trainer", "train", "evaluate"]


def _autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[dtype])


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
        rng = rng_state(self.generator, self.device)
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
        changed = [f"{k} {saved.get(k)!r} -> {getattr(self.cfg, k)!r}" for k in TRAJECTORY_FIELDS
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
        set_rng_state(meta["rng"], self.generator, self.device)
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
            # disable=None: tqdm hides itself when stderr is not a terminal (logs, CI) instead of writing a
            # carriage-return update per step into the file.
            total=cfg.steps, initial=self.step, disable=None if cfg.progress and d.is_main else True,
            dynamic_ncols=True,
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
