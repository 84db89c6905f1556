"""The README's runnable examples run from a fresh checkout (the quickstart shortened to a few steps); the
quickstart and ``import mla`` work without Triton; a missing optional dependency gives the install command."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _hide(tmp_path: Path, *modules: str) -> str:
    """A directory to put first on PYTHONPATH in which importing each of ``modules`` fails as if it were not
    installed (``ModuleNotFoundError`` with ``.name`` set)."""
    for name in modules:
        pkg = tmp_path / "hidden" / name
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / "__init__.py").write_text(f"raise ModuleNotFoundError(\"No module named '{name}'\", name='{name}')\n")
    return str(tmp_path / "hidden")


def _env(**extra) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", **extra)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: reference path on CPU
    return env


@pytest.mark.parametrize(
    "script,args",
    [
        ("sparse_attention.py", ["--device", "cpu"]),
        ("serve_paged.py", ["--device", "cpu"]),
        ("serve_paged.py", ["--device", "cpu", "--fp8"]),
        ("quickstart.py", ["--steps", "3", "--new-tokens", "8", "--no-progress"]),
    ],
)
@pytest.mark.slow
def test_example_runs(script, args, tmp_path):
    # Triton hidden: a CPU user with the plain `pip install -e .` has none.
    env = _env(PYTHONPATH=os.pathsep.join(filter(None, [_hide(tmp_path, "triton"), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "quickstart.py":
        assert "torch.Size([2, 128, 512])" in proc.stdout and "bits/byte" in proc.stdout
        assert "torch thread" in proc.stdout
    if "--fp8" in args:  # compared with the unquantized cache, so random-looking bytes read as expected
        assert proc.stdout.count("greedy bytes equal the unquantized cache's") == 2


def test_import_mla_without_triton(tmp_path):
    code = ("import torch, mla\n"
            "q = torch.randn(1, 5, 2, 8)\n"
            "out = mla.latent_attention(q, q, q, causal=True)\n"
            "assert out.shape == (1, 5, 2, 8) and torch.isfinite(out).all()\n"
            "try:\n"
            "    mla.latent_attention(q, q, q, backend='triton')\n"
            "except ValueError as e:\n"
            "    print('refused:', e)\n")
    env = _env(PYTHONPATH=os.pathsep.join([_hide(tmp_path, "triton"), str(ROOT)]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused:" in proc.stdout and "triton" in proc.stdout.lower()


def test_missing_optional_dependency_names_the_install(tmp_path):
    env = _env(PYTHONPATH=os.pathsep.join([_hide(tmp_path, "transformers"), str(ROOT)]))
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_dropin.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "'transformers'" in proc.stderr and 'pip install -e ".[hf]"' in proc.stderr
