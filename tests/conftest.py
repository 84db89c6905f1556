"""Session setup shared by all tests.

Without a CUDA device the Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` must
be set before ``triton`` (and ``kernels``, which reads it at import) is first imported, which is
why it happens here, at conftest import time.
"""

import os

# Busy-waiting OpenMP threads slow everything down badly on a shared 2-core CI machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
