"""Every ```python block of README.md runs as written (CPU, a few seconds each).

Blocks are found by their fence, so a block another developer adds later is checked too. Each runs in a fresh
namespace in this process (one torch import for all). A block that needs an optional extra that is not
installed (transformers: ``[hf]``; triton: ``[triton]``; matplotlib: ``[bench]``) is skipped, not failed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
OPTIONAL = {"transformers", "triton", "matplotlib"}


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, code)`` of each fenced block whose info string is ``python`` (or ``py``)."""
    blocks = []
    for m in re.finditer(r"^```(?:python|py)[ \t]*\n(.*?)^```[ \t]*$", text, flags=re.M | re.S):
        blocks.append((text.count("\n", 0, m.start()) + 1, m.group(1)))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5  # the extractor finds the examples (a broken regex would make the test vacuous)
    assert python_blocks("x\n```python\na = 1\n```\n```bash\nls\n```\n") == [(2, "a = 1\n")]


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # a block that writes files writes them here
    namespace = {"__name__": f"readme_block_{line}"}
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in OPTIONAL:
            pytest.skip(f"needs the optional {exc.name!r}")
        raise


def test_readme_prose_has_no_unfilled_placeholder():
    # e.g. "FP32_SPILL_TABLE" left where a table was meant to be generated: an ALL_CAPS_NAME outside code
    text = re.sub(r"^```.*?^```", "", README.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code may name environment variables
    assert re.findall(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b", text) == []
