"""Pinning tile configurations: reproducible choices across processes, no timing runs.

The dense and block-sparse launchers autotune by default: the first call with a new shape class
times every candidate of the per-architecture table (``fwd_configs`` / ``bwd_configs``) and keeps
the fastest. Timing is noisy, so two processes may keep different tiles (the last bits of the
results then differ between processes, though each is bitwise reproducible within itself), and
the timing runs cannot happen inside CUDA-graph capture. Two ways to avoid it (both skip timing
entirely):

* **Deterministic mode** (``set_deterministic(True)``, or ``MLA_KERNEL_CONFIG=deterministic`` in the
  environment): every launcher uses the first candidate of its table for the GPU's architecture
  and the shape class (the entry the tables list first as the preferred one). No timing, same
  choice in every process on the same GPU model.
* **Pins** (``pin_config(kernel, shape_class, config)``, or
  ``MLA_KERNEL_CONFIG="attention_fwd:d576=128x32/v2/c256:w8s2;attention_bwd_dq:d128=#0"``): the named
  configuration for that kernel and shape class. ``config`` is a config object of the kernel's
  table (``FwdConfig``, ``BwdConfig``), its :func:`config_name` (``"<tile>:w<warps>s<stages>"``), or
  ``"#i"`` (the i-th candidate). A name that is not a candidate on the running GPU raises
  ``ValueError`` at launch, listing the candidates.

Kernels (``kernel``): ``attention_fwd``, ``attention_bwd_dkdv``, ``attention_bwd_dq``,
``block_sparse_fwd``, ``block_sparse_dkdv``, ``block_sparse_dq``. Shape classes are the head-dim
classes of :func:`kernels.attention_fwd.head_class`: ``d64``, ``d128``, ``d256``, ``d576``. The
top-k and decode kernels never autotune: their tile is a fixed function of the architecture, the
head dims and the dtype.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

__all__ = [
    "KERNELS",
    "choose",
    "clear_pins",
    "config_name",
    "deterministic",
    "is_deterministic",
    "pin_config",
    "pinned",
    "set_deterministic",
]

KERNELS = ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq", "block_sparse_fwd", "block_sparse_dkdv",
           "block_sparse_dq")
SHAPE_CLASSES = ("d64", "d128", "d256", "d576")
ENV = "MLA_KERNEL_CONFIG"

_PINS: dict[tuple[str, str], Any] = {}
_DETERMINISTIC: list[bool] = [False]


def config_name(cfg) -> str:
    """``"<tile>:w<num_warps>s<num_stages>"`` of a tile configuration (e.g. ``"64x32/v2:w8s2"``)."""
    return f"{cfg.tile}:w{cfg.num_warps}s{cfg.num_stages}"


def _check_key(kernel: str, shape_class: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if shape_class not in SHAPE_CLASSES:
        raise ValueError(f"shape_class must be one of {SHAPE_CLASSES}, got {shape_class!r}")


def pin_config(kernel: str, shape_class: str, config) -> None:
    """Use ``config`` (a config object, its :func:`config_name`, or ``"#i"``) for ``kernel`` on
    ``shape_class`` from now on in this process; ``None`` removes the pin. Raises ``ValueError`` for
    an unknown kernel or shape class, ``TypeError`` for a config that is none of those."""
    _check_key(kernel, shape_class)
    if config is None:
        _PINS.pop((kernel, shape_class), None)
        return
    if not isinstance(config, str) and not hasattr(config, "tile"):
        raise TypeError(f"config must be a tile config object, its name or '#i', got {type(config).__name__}")
    _PINS[(kernel, shape_class)] = config


def clear_pins() -> None:
    """Remove every pin set with :func:`pin_config` (the environment's pins stay)."""
    _PINS.clear()


def set_deterministic(flag: bool = True) -> None:
    """Deterministic mode on or off for this process (see the module docstring)."""
    _DETERMINISTIC[0] = bool(flag)


@contextlib.contextmanager
def deterministic(flag: bool = True):
    """Context manager: deterministic mode ``flag`` inside the block, the previous mode after."""
    old = _DETERMINISTIC[0]
    _DETERMINISTIC[0] = bool(flag)
    try:
        yield
    finally:
        _DETERMINISTIC[0] = old


def _env_entries() -> tuple[bool, dict[tuple[str, str], str]]:
    """(deterministic requested, pins) parsed from ``$MLA_KERNEL_CONFIG``; raises ``ValueError`` naming a
    malformed entry."""
    raw = os.environ.get(ENV, "")
    heur, pins = False, {}
    for entry in filter(None, (e.strip() for e in raw.split(";"))):
        if entry == "deterministic":
            heur = True
            continue
        key, sep, name = entry.partition("=")
        kernel, sep2, cls = key.partition(":")
        if not sep or not sep2 or not name:
            raise ValueError(f"{ENV}: entry {entry!r} is not 'deterministic' or '<kernel>:<shape_class>=<config>'")
        _check_key(kernel.strip(), cls.strip())
        pins[(kernel.strip(), cls.strip())] = name.strip()
    return heur, pins


def is_deterministic() -> bool:
    """True when launchers must not autotune (:func:`set_deterministic` or the environment)."""
    return _DETERMINISTIC[0] or _env_entries()[0]


def pinned(kernel: str, shape_class: str):
    """The pin for ``(kernel, shape_class)`` (API pins win over the environment), or None."""
    if (kernel, shape_class) in _PINS:
        return _PINS[(kernel, shape_class)]
    return _env_entries()[1].get((kernel, shape_class))


def choose(kernel: str, shape_class: str, candidates: list):
    """The configuration a launcher must use instead of autotuning, or None (autotune).

    A pin is looked up among ``candidates`` (the table for the running GPU, so the result always
    fits it); in deterministic mode without a pin the first candidate. Raises ``ValueError`` when the
    pin names no candidate (the message lists them)."""
    pin = pinned(kernel, shape_class)
    if pin is None:
        return candidates[0] if is_deterministic() and candidates else None
    if not isinstance(pin, str):
        if pin in candidates:
            return pin
        pin = config_name(pin)
    names = [config_name(c) for c in candidates]
    if pin.startswith("#") and pin[1:].isdigit() and int(pin[1:]) < len(candidates):
        return candidates[int(pin[1:])]
    if pin in names:
        return candidates[names.index(pin)]
    raise ValueError(f"pinned config {pin!r} for {kernel} {shape_class} is not a candidate on this GPU; "
                     f"candidates: {names} (or '#0'..'#{len(candidates) - 1}')")
