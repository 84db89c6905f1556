"""Name -> config registry: ``get(name)`` a config, ``build(name)`` a model, ``register`` your own.

>>> from mla import registry
>>> cfg = registry.get("deepseek-v3")            # MLAConfig with the published sizes
>>> model = registry.build("tiny", num_hidden_layers=2)   # MLACausalLM
"""

from __future__ import annotations

from collections.abc import Callable

from mla.config import PRESETS, MLAConfig

__all__ = ["get", "register", "build", "names"]

_REGISTRY: dict[str, Callable[[], MLAConfig]] = dict(PRESETS)


def register(name: str, factory: Callable[[], MLAConfig], *, overwrite: bool = False) -> None:
    """Add a config factory under ``name``.

    Raises:
        TypeError: ``factory`` is not callable. ValueError: ``name`` exists and ``overwrite`` is False.
    """
    if not callable(factory):
        raise TypeError(f"factory: expected a callable returning MLAConfig, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"name: {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **overrides) -> MLAConfig:
    """A fresh ``MLAConfig`` for ``name`` with ``overrides`` applied and validated.

    Raises:
        KeyError: unknown name (the message lists the known ones). TypeError: ``name`` not a str, unknown field.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a registered config name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise KeyError(f"unknown config {name!r}; registered: {', '.join(names())}")
    cfg = _REGISTRY[name]()
    if not isinstance(cfg, MLAConfig):
        raise TypeError(f"the factory registered as {name!r} returned {type(cfg).__name__}, not MLAConfig")
    return cfg.replace(**overrides) if overrides else cfg.validate()


def build(name: str, **overrides):
    """``MLACausalLM(get(name, **overrides))``: a randomly initialised model."""
    from mla.block import MLACausalLM

    return MLACausalLM(get(name, **overrides))
