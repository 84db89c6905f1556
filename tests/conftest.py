"""Session setup shared by all tests.

Without a CUDA device the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
be set before ``triton`` (and ``kernels``, which reads it at import) is first imported, which is
why it happens here, at conftest import time.

Markers (pyproject.toml): ``interpreter`` (launches Triton kernels, under TRITON_INTERPRET=1 on CPU),
``slow`` (left out of the everyday ``pytest -m "not slow"``), ``cuda`` (needs a CUDA device: skipped
here without one).
"""

import os

# Busy-waiting OpenMP threads slow everything down badly on a shared 2-core CI machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
