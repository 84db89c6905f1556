"""The README's runnable examples run from a fresh checkout (the quickstart shortened to a few steps)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script,args",
    [
        ("sparse_attention.py", ["--device", "cpu"]),
        ("serve_paged.py", ["--device", "cpu"]),
        ("serve_paged.py", ["--device", "cpu", "--fp8"]),
        ("quickstart.py", ["--steps", "3", "--new-tokens", "8", "--no-progress"]),
    ],
)
def test_example_runs(script, args):
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: reference path on CPU
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "quickstart.py":
        assert "torch.Size([2, 128, 512])" in proc.stdout and "bits/byte" in proc.stdout
