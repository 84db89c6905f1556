"""Integrations with other libraries.

* ``mla.integrations.transformers``: drop-in latent attention for Hugging Face ``transformers`` MLA
  models (``patch_model`` / ``unpatch_model``) and the ``"mla_latent"`` attention implementation.

Submodules are imported on demand, so ``import mla.integrations`` never imports ``transformers``.
"""

from __future__ import annotations

import importlib

__all__ = ["transformers"]


def __getattr__(name: str):
    if name == "transformers":
        return importlib.import_module("mla.integrations.transformers")
    raise AttributeError(f"module 'mla.integrations' has no attribute {name!r}")
