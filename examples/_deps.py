"""What an example needs, said plainly when it is missing (instead of a ``ModuleNotFoundError`` traceback).

Each example imports its dependencies inside ``with requirements():``; a missing module ends the script
with exit status 1 and the ``pip install`` command that brings it. The examples also put the repository
root on ``sys.path``, so they run from a checkout whose dependencies are installed without ``pip install -e``.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# top-level module -> the install that provides it (from the repository root)
_INSTALL = {
    "transformers": 'pip install -e ".[hf]"',
    "triton": 'pip install -e ".[triton]"   (CUDA builds of torch already include Triton)',
    "matplotlib": 'pip install -e ".[bench]"',
    "torch": "pip install torch   (then: pip install -e .)",
}


@contextlib.contextmanager
def requirements():
    """Turn a ``ModuleNotFoundError`` raised in the block into a message naming the module and the install
    command, and ``SystemExit(1)``."""
    try:
        yield
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        install = _INSTALL.get(top, "pip install -e .")
        script = Path(sys.argv[0]).name
        print(f"{script} needs the Python package {top!r}, which is not installed.\n"
              f"Install it with:  {install}", file=sys.stderr)
        raise SystemExit(1) from None
