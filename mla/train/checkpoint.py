"""Checkpoint I/O of ``mla.train``: safetensors weights and optimizer state plus a JSON sidecar.

Checkpoint layout (a directory, written atomically: files go to a temporary directory that is renamed):

* ``model.safetensors``: the model's full (unsharded) weights, tied weights stored once;
* ``optimizer.safetensors``: every AdamW state tensor, unsharded, as ``state.<param index>.<name>``;
* ``state.json``: everything else: step, elapsed seconds, the ``TrainConfig``, the model's ``MLAConfig``
  and attention kind, the data's name and sha256, the optimizer's param groups, the RNG states (batch
  generator, torch CPU and CUDA, base64), the data-parallel mode and world size, and the metrics so far.

The format tag (``CHECKPOINT_FORMAT``) is unchanged since ``mla.train`` was one module: older checkpoints
load and resume as they did. Checkpoints hold full tensors gathered with
``torch.distributed.checkpoint.state_dict`` (``full_state_dict=True, cpu_offload=True``) and are loaded with
``set_model_state_dict`` / ``set_optimizer_state_dict``, so a checkpoint written on any number of ranks
loads on any other.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mla.train.distributed import full_state_dicts, load_full_state_dicts

__all__ = ["CHECKPOINT_FORMAT", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "rng_state",
           "set_rng_state"]

CHECKPOINT_FORMAT = "mla.train.checkpoint/1"



def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().contiguous().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """The RNG states a resume restores, base64 in JSON: the batch ``generator``, torch's CPU generator and,
    on CUDA, every device's generator."""
    rng: dict[str, Any] = {"generator": _b64(generator.get_state()), "torch": _b64(torch.get_rng_state())}
    if device.type == "cuda":
        rng["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return rng


def set_rng_state(rng: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    """Restore what ``rng_state`` saved (the CUDA states only when the device count matches)."""
    generator.set_state(_unb64(rng["generator"]))
    torch.set_rng_state(_unb64(rng["torch"]))
    if device.type == "cuda" and rng.get("cuda"):
        states = [_unb64(s) for s in rng["cuda"]]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


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
