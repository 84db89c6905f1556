"""``python -m mla.train``: train a byte-level ``MLACausalLM`` on a text file (default: CPython's bundled
``pydoc_data.topics`` documentation).

Examples::

    python -m mla.train --steps 300 --max-time 120 --metrics-out runs/tiny.jsonl --out runs/tiny
    python -m mla.train --steps 300 --out runs/tiny --resume            # continue from runs/tiny's newest
    python -m mla.train --data README.md --layers 2 --hidden 128 --seq-len 64 --steps 50
    python -m mla.train --attention sparse --sparse-mode topk --seq-len 256

    # data parallel on 2 processes (CPU: gloo; with --device cuda: one GPU per process, nccl):
    torchrun --nproc_per_node 2 -m mla.train --distributed ddp --batch-size 8 --steps 300 --out runs/ddp
    torchrun --nproc_per_node 2 -m mla.train --distributed fsdp --batch-size 8 --steps 300 --out runs/fsdp

``--batch-size`` is per process: 2 processes with ``--batch-size 8`` train on the same global batches of 16
windows as one process with ``--batch-size 16`` (and reach the same losses up to float rounding).
Checkpoints hold full tensors, so ``--resume`` works with any number of processes.

One JSON line per evaluation goes to ``--metrics-out`` (keys: step, train_loss, val_loss, val_bpb, lr,
tokens_per_s, tokens, elapsed_s, max_logit; losses in nats per byte, ``val_bpb`` in bits per byte).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import warnings

from tqdm import tqdm

from mla import registry
from mla.threads import auto_threads, describe_threads
from mla.train import TrainConfig, Trainer
from mla.train.data import DEFAULT_DATA

# CLI flag -> MLAConfig field
_OVERRIDES = {
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
    "kv_lora_rank": "kv_lora_rank",
}


_FIELD_FLAGS = {
    "out_dir": "--out", "keep_checkpoints": "--keep", "verbose": "--quiet", "progress": "--no-progress",
}


def _flag_message(msg: str) -> str:
    """Rewrite a ``TrainConfig`` message ``"field: ..."`` as ``"--flag: ..."``."""
    head, sep, rest = str(msg).partition(": ")
    if sep and head.isidentifier() and head in TrainConfig.__dataclass_fields__:
        return f"{_FIELD_FLAGS.get(head, '--' + head.replace('_', '-'))}: {rest}"
    if sep and head.startswith("MLAConfig."):
        flags = {field: flag for flag, field in _OVERRIDES.items()}
        flag = flags.get(head[len("MLAConfig."):])
        if flag:
            return f"--{flag.replace('_', '-')} ({head}): {rest}"
    return str(msg)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` only where there is a meaningful default."""

    def _get_help_string(self, action):
        if action.default is None or isinstance(action.default, bool) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The ``argparse`` parser of ``python -m mla.train`` (defaults are ``TrainConfig``'s)."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m mla.train",
        usage="python -m mla.train [options]   (--help lists them)",
        description="Train a byte-level MLA language model (one token per byte) and report validation "
        "loss and bits per byte.",
        formatter_class=_HelpFormatter,
    )
    m = p.add_argument_group("model")
    m.add_argument("--preset", default=d.preset, help=f"registry config name ({', '.join(registry.names())})")
    m.add_argument("--attention", choices=("mla", "sparse"), default=d.attention,
                   help="MultiHeadLatentAttention or LatentSparseAttention")
    m.add_argument("--sparse-mode", choices=("block", "topk"), default=None,
                   help=f"key selection of --attention sparse (default: {d.sparse_mode})")
    m.add_argument("--pack-documents", action="store_true",
                   help="train on packed documents (split at newlines) with varlen attention: no attention "
                        "across document boundaries, positions restart per document")
    m.add_argument("--layers", type=int, help="override num_hidden_layers")
    m.add_argument("--hidden", type=int, help="override hidden_size")
    m.add_argument("--heads", type=int, help="override num_attention_heads")
    m.add_argument("--intermediate", type=int, help="override intermediate_size (SwiGLU width)")
    m.add_argument("--kv-lora-rank", type=int, help="override kv_lora_rank (latent cache width)")

    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=d.steps, help="optimizer updates in total")
    o.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per update")
    o.add_argument("--seq-len", type=int, default=d.seq_len, help="bytes per window")
    o.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    o.add_argument("--min-lr", type=float, default=d.min_lr, help="learning rate at the end of the cosine")
    o.add_argument("--warmup", type=int, default=None,
                   help=f"linear warmup steps, fewer than --steps (default: min({d.warmup}, steps // 10))")
    o.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    o.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max global gradient norm (0 = off)")
    o.add_argument("--seed", type=int, default=d.seed, help="seeds the weights and the batch generator")

    e = p.add_argument_group("data and evaluation")
    e.add_argument("--data", default=None, metavar="PATH",
                   help=f"text file to train on (raw bytes; default: CPython's {DEFAULT_DATA})")
    e.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="last fraction of bytes held out")
    e.add_argument("--eval-interval", type=int, default=d.eval_interval, help="steps between evaluations")
    e.add_argument("--eval-batches", type=int, default=d.eval_batches,
                   help="validation batches per evaluation")
    e.add_argument("--no-eval-at-start", dest="eval_at_start", action="store_false",
                   help="skip the evaluation at step 0")
    e.add_argument("--metrics-out", metavar="PATH", help="write one JSON line per evaluation here")

    r = p.add_argument_group("run")
    r.add_argument("--out", metavar="DIR", help="checkpoint directory (step_NNNNNNN/ subdirectories)")
    r.add_argument("--save-interval", type=int, default=None,
                   help="steps between checkpoints (default: every evaluation; 0 = only at the end)")
    r.add_argument("--keep", type=int, default=d.keep_checkpoints, help="checkpoints kept in --out (0 = all)")
    r.add_argument("--resume", nargs="?", const="latest", metavar="PATH",
                   help="continue from a checkpoint directory, or (no value) from the newest in --out")
    r.add_argument("--max-time", type=float, metavar="SECONDS",
                   help="stop after this many seconds of wall time")
    r.add_argument("--threads", type=int,
                   help="torch CPU threads (default: torch's count limited to the cores other processes leave "
                   "idle, split between torchrun's local processes; oversubscribed threads slow CPU training "
                   "several-fold)")
    r.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype,
                   help="autocast dtype of the forward pass (weights stay float32; checked at start)")
    r.add_argument("--distributed", choices=("auto", "none", "ddp", "fsdp"), default=d.distributed,
                   help="data parallelism under torchrun: DistributedDataParallel or FSDP2 fully_shard per "
                   "block (auto: ddp when WORLD_SIZE > 1, else none); --batch-size is per process")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    r.add_argument("--quiet", action="store_true", help="no per-evaluation lines")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Turn parsed arguments into a validated ``TrainConfig``.

    Raises:
        ValueError / KeyError: see ``TrainConfig.validate``.
    """
    overrides = {
        field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None
    }
    cfg = TrainConfig(
        preset=args.preset, overrides=overrides, attention=args.attention, pack_documents=args.pack_documents,
        sparse_mode=args.sparse_mode or TrainConfig.sparse_mode,
        steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, min_lr=args.min_lr,
        warmup=args.warmup if args.warmup is not None else min(TrainConfig.warmup, max(args.steps, 0) // 10),
        weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        eval_interval=args.eval_interval, eval_batches=args.eval_batches, eval_at_start=args.eval_at_start,
        seed=args.seed, data=args.data, val_fraction=args.val_fraction, out_dir=args.out,
        save_interval=args.save_interval, keep_checkpoints=args.keep, resume=args.resume,
        metrics_out=args.metrics_out, max_time=args.max_time,
        threads=args.threads if args.threads is not None else auto_threads(), device=args.device,
        dtype=args.dtype, progress=args.progress, verbose=not args.quiet, distributed=args.distributed,
    )
    return cfg.validate()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done; 130 interrupted by Ctrl-C / SIGINT; argparse exits
    with 2 on bad input, with a message naming the flag).

    Ctrl-C stops training after the current step, saves a checkpoint when ``--out`` is set and prints the
    command that resumes it; a second Ctrl-C stops at once without saving. No traceback either way.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args, argv)
    except KeyboardInterrupt:  # before training started, or the second Ctrl-C
        print("\ninterrupted; nothing saved", file=sys.stderr, flush=True)
        return 130


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> int:
    if args.sparse_mode is not None and args.attention != "sparse":
        parser.error(f"--sparse-mode {args.sparse_mode} needs --attention sparse (got --attention {args.attention})")
    if args.warmup is not None and args.steps >= 1 and args.warmup >= args.steps:
        parser.error(f"--warmup: expected fewer warmup steps than --steps ({args.steps}), got {args.warmup}")
    try:
        cfg = config_from_args(args)
        if cfg.data is not None:
            from pathlib import Path

            if not Path(cfg.data).is_file():
                what = "is a directory, not a file" if Path(cfg.data).is_dir() else "no such file"
                raise FileNotFoundError(f"--data: {what}: {cfg.data!r}")
        with warnings.catch_warnings(record=True) as caught:  # resume warnings: the message, not a source line
            warnings.simplefilter("always")
            log = _HeldLog() if cfg.verbose else None
            trainer = Trainer(cfg, log=log)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr, flush=True)
    except (ValueError, KeyError, TypeError, FileNotFoundError, IsADirectoryError) as exc:
        parser.error(_flag_message(exc.args[0] if exc.args else str(exc)))
    try:
        with _stop_on_sigint(trainer):
            return _run(trainer, args, argv, log)
    except KeyboardInterrupt:  # the second Ctrl-C
        print(f"\ninterrupted at step {trainer.step}; nothing saved", file=sys.stderr, flush=True)
        return 130
    finally:
        trainer.close()


class _HeldLog:
    """The trainer's log (``tqdm.write``, which keeps the progress bar intact), holding the lines written
    before ``release()`` so that the CLI's first line is the one naming the model, device and threads."""

    def __init__(self):
        self.held: list[str] | None = []

    def __call__(self, msg: str) -> None:
        if self.held is None:
            tqdm.write(msg)
        else:
            self.held.append(msg)

    def release(self) -> None:
        held, self.held = self.held or [], None
        for msg in held:
            self(msg)


@contextlib.contextmanager
def _stop_on_sigint(trainer: Trainer):
    """While active, the first SIGINT asks ``trainer`` to stop after its current step (``request_stop``),
    the next ones raise ``KeyboardInterrupt`` as usual. No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        trainer.request_stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if trainer.dist.is_main:
            print("\nCtrl-C: stopping after this step (press again to quit without saving)", file=sys.stderr,
                  flush=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _resume_command(argv: list[str] | None) -> str:
    """The command line that continues this run from ``--out``'s newest checkpoint (``--resume`` and its
    value, if any, replaced by a bare ``--resume``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--resume":
            i += 2 if i + 1 < len(argv) and not argv[i + 1].startswith("-") else 1
            continue
        if not a.startswith("--resume="):
            kept.append(a)
        i += 1
    prefix = "torchrun ... -m mla.train" if os.environ.get("WORLD_SIZE") else "python -m mla.train"
    return " ".join([prefix, *map(shlex.quote, kept), "--resume"])


def _run(trainer: Trainer, args: argparse.Namespace, argv: list[str] | None = None, log: _HeldLog | None = None) -> int:
    cfg, m, main_rank = trainer.cfg, trainer.model, trainer.dist.is_main
    dist_info = (
        f" | {trainer.dist.mode} on {trainer.dist.world_size} process{'es' if trainer.dist.world_size != 1 else ''} "
        f"(global batch {cfg.batch_size * trainer.dist.world_size})"
        if trainer.dist.enabled else ""
    )
    info = (
        f"model: preset {cfg.preset!r}{' ' + str(cfg.overrides) if cfg.overrides else ''}, "
        f"attention {trainer.attention}{'/' + trainer.sparse_mode if trainer.attention == 'sparse' else ''}, "
        f"{m.num_parameters() / 1e6:.2f} M parameters | data: {trainer.dataset.name} "
        f"({trainer.dataset.train.numel()} train + {trainer.dataset.val.numel()} val bytes) "
        f"| device {trainer.device}, {describe_threads(args.threads)}{dist_info}"
    )
    if not args.quiet and main_rank:
        print(info, flush=True)
    if log is not None:
        log.release()  # e.g. "resumed from ...", after the line naming the device and threads
    metrics = trainer.fit()
    if trainer.stopped:
        if main_rank:
            if trainer.last_checkpoint is not None and cfg.out_dir:
                print(f"interrupted at step {trainer.step}/{cfg.steps}; checkpoint {trainer.last_checkpoint}\n"
                      f"resume with: {_resume_command(argv)}", file=sys.stderr, flush=True)
            else:
                print(f"interrupted at step {trainer.step}/{cfg.steps}; nothing saved (no --out)", file=sys.stderr,
                      flush=True)
        return 130
    if metrics and not args.quiet and main_rank:
        last = metrics[-1]
        print(
            f"done: step {last['step']}, val loss {last['val_loss']:.4f} nats/byte = {last['val_bpb']:.3f} "
            f"bits/byte, {last['elapsed_s']:.1f} s"
            + (f", checkpoint {trainer.last_checkpoint}" if trainer.last_checkpoint else ""),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
