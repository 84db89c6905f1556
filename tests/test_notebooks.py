"""The notebooks in examples/notebooks run top to bottom on CPU (nbclient), and are stored without outputs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "examples" / "notebooks").glob("*.ipynb"))


def test_notebooks_exist_and_are_stripped():
    nbformat = pytest.importorskip("nbformat")
    assert {p.name for p in NOTEBOOKS} >= {"mla_tour.ipynb", "kernels_on_cpu.ipynb"}
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name}: outputs not stripped"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
@pytest.mark.slow
def test_notebook_runs(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    if "kernels" in path.name:
        pytest.importorskip("triton")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # each notebook sets what it needs
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) when a cell fails
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "Error" not in text and "Traceback" not in text
    assert not os.environ.get("TRITON_INTERPRET")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_setup_cell_runs_outside_the_repository(path, monkeypatch, tmp_path):
    # Opened from elsewhere (after `pip install -e .`), the sys.path cell must not fail looking for the repo.
    nbformat = pytest.importorskip("nbformat")
    import sys

    first = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TRITON_INTERPRET", "")  # restored afterwards if the cell sets it
    exec(compile(first.source, f"{path.name}:first cell", "exec"), {})
