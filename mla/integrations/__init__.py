"""Integrations with other libraries.

* ``mla.integrations.transformers``: drop-in latent attention for Hugging Face ``transformers`` MLA
  models (``patch_model`` / ``unpatch_model``) and the ``"mla_latent"`` attention implementation.
* ``mla.integrations.dsa``: the DeepSeek Sparse Attention models (DeepSeek-V3.2, GLM-5) in that drop-in
  (imported when a model needs it).
* ``mla.integrations.deepseek_v4``: DeepSeek-V4 attention (sliding / CSA / HCA layers) in that drop-in.

Submodules are imported on demand, so ``import mla.integrations`` never imports ``transformers``.
"""

from __future__ import annotations

import importlib

__all__ = ["deepseek_v4", "dsa", "transformers"]


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f"mla.integrations.{name}")
    raise AttributeError(f"module 'mla.integrations' has no attribute {name!r}")
